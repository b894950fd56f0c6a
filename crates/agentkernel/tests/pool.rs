//! The warm pool behind `--fast` (issue: Podman backend and --fast): the same
//! semantics as the normal path, a fresh container for every run, atomic
//! claims, idle expiry, and `--fast=false` never touching it.

mod common;

use std::time::Duration;

use common::*;

/// Inside a claimed pool container, the control mount has `claimed/`.
const WHICH_PATH: &str = "test -d /run/agentkernel/claimed && echo pooled >&2 || echo normal >&2";

/// Pool settings for a test; a short idle time bounds what a refill still in
/// flight at the end of the test can leave behind.
fn write_config(env: &TestEnv, size: u32, idle_ttl: &str) {
    let text = format!("[pool]\nsize = {size}\nidle_ttl = \"{idle_ttl}\"\n");
    std::fs::write(env.project_dir().join("agentkernel.toml"), text).unwrap();
}

fn warm_count(env: &TestEnv) -> usize {
    let out = env.run(&["pool", "status"]);
    assert_code(&out, 0);
    stdout(&out)
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(4)?.parse::<usize>().ok())
        .sum()
}

/// Runs once (a miss, which warms the key) and waits until `n` containers are warm.
fn warm_up(env: &TestEnv, extra: &[&str], n: usize) {
    let mut args = vec!["run", "-i", BUSYBOX];
    args.extend_from_slice(extra);
    args.push("true");
    assert_code(&env.run(&args), 0);
    poll_until(Duration::from_secs(60), "the pool to warm up", || {
        warm_count(env) >= n
    });
}

fn prune(env: &TestEnv) {
    let _ = env.run(&["pool", "prune"]);
}

#[test]
fn a_pooled_run_has_the_normal_paths_semantics() {
    let env = TestEnv::new();
    write_config(&env, 1, "60s");
    std::fs::write(env.project_dir().join("f.txt"), "host\n").unwrap();
    warm_up(&env, &[], 1);
    let script = format!(
        "{WHICH_PATH}; printf '%s|' \"$0\" \"$@\"; echo; echo \"K=$K\"; pwd; cat /workspace/f.txt; \
         echo changed > /workspace/f.txt; cat; echo to-stderr >&2; exit 7"
    );
    let out = env
        .cmd()
        .args([
            "run", "-i", BUSYBOX, "-e", "K=v a", "-w", "/tmp", "sh", "-c", &script, "zero", "a b",
            "\"q\"", "$HOME",
        ])
        .write_stdin("from-stdin\n")
        .output()
        .unwrap();
    prune(&env);
    assert_code(&out, 7);
    let err = stderr(&out);
    assert!(err.contains("pooled"), "expected the pooled path: {err}");
    assert!(err.contains("to-stderr"), "{err}");
    assert_eq!(
        stdout(&out),
        "zero|a b|\"q\"|$HOME|\nK=v a\n/tmp\nhost\nfrom-stdin\n",
        "argv, env, workdir, workspace, stdin"
    );
    assert!(!stdout(&out).contains("to-stderr"));
    assert_eq!(
        std::fs::read_to_string(env.project_dir().join("f.txt")).unwrap(),
        "host\n"
    );
}

#[test]
fn pooled_runs_never_share_a_container_or_state() {
    let env = TestEnv::new();
    write_config(&env, 2, "60s");
    warm_up(&env, &[], 2);
    let first = env.run(&[
        "run",
        "-i",
        BUSYBOX,
        "sh",
        "-c",
        &format!("{WHICH_PATH}; hostname; echo secret > /root/left-behind"),
    ]);
    let second = env.run(&[
        "run",
        "-i",
        BUSYBOX,
        "sh",
        "-c",
        &format!("{WHICH_PATH}; hostname; cat /root/left-behind 2>/dev/null || echo clean"),
    ]);
    prune(&env);
    assert_code(&first, 0);
    assert_code(&second, 0);
    assert!(stderr(&first).contains("pooled") && stderr(&second).contains("pooled"));
    let (h1, h2) = (stdout(&first), stdout(&second));
    assert_ne!(
        h1.lines().next(),
        h2.lines().next(),
        "two runs got the same container"
    );
    assert!(h2.ends_with("clean\n"), "state leaked between runs: {h2}");
}

#[test]
fn pooled_exit_codes_timeout_and_oom() {
    let env = TestEnv::new();
    write_config(&env, 4, "60s");
    warm_up(&env, &["--memory", "32m"], 4);
    let base = ["run", "-i", BUSYBOX, "--memory", "32m"];
    let with = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        env.run(&a)
    };
    let not_found = with(&["no-such-command"]);
    let not_exec = with(&["/etc/passwd"]);
    let timeout = with(&["--timeout", "2s", "sh", "-c", "sleep 60 & sleep 60"]);
    let oom = with(&[
        "sh",
        "-c",
        "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived",
    ]);
    prune(&env);
    assert_code(&not_found, 127);
    assert_code(&not_exec, 126);
    assert_code(&timeout, 124);
    assert_code(&oom, 137);
    assert!(stderr(&oom).contains("out of memory"), "{}", stderr(&oom));
}

#[test]
fn twenty_parallel_runs_get_twenty_distinct_containers() {
    let env = TestEnv::new();
    write_config(&env, 20, "60s");
    warm_up(&env, &[], 20);
    let script = format!("{WHICH_PATH}; hostname");
    let children: Vec<_> = (0..20)
        .map(|_| env.spawn(&["run", "-i", BUSYBOX, "sh", "-c", &script]))
        .collect();
    let outputs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_output(Duration::from_secs(120)))
        .collect();
    prune(&env);
    let mut hosts = Vec::new();
    let mut pooled = 0;
    for out in &outputs {
        assert_code(out, 0);
        pooled += stderr(out).contains("pooled") as usize;
        hosts.push(stdout(out).trim().to_string());
    }
    let mut unique = hosts.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 20, "containers were shared: {hosts:?}");
    assert!(pooled >= 10, "only {pooled} of 20 runs used the warm pool");
}

#[test]
fn fast_false_never_touches_the_pool() {
    let env = TestEnv::new();
    for _ in 0..2 {
        let out = env.run(&["run", "--fast=false", "-i", BUSYBOX, "sh", "-c", WHICH_PATH]);
        assert_code(&out, 0);
        assert!(stderr(&out).contains("normal"));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(warm_count(&env), 0);
    assert!(
        !env.state_dir().join("pool").exists(),
        "--fast=false created pool state"
    );
}

#[test]
fn warm_containers_expire_after_the_idle_ttl() {
    let env = TestEnv::new();
    write_config(&env, 1, "4s");
    warm_up(&env, &[], 1);
    // Nothing of ours runs in between: the engine removes them itself.
    poll_until(Duration::from_secs(30), "warm containers to expire", || {
        warm_count(&env) == 0
    });
}

#[test]
fn prune_removes_warm_containers() {
    let env = TestEnv::new();
    write_config(&env, 2, "60s");
    warm_up(&env, &[], 2);
    let out = env.run(&["pool", "prune"]);
    assert_code(&out, 0);
    assert_eq!(warm_count(&env), 0);
}
