//! The warm pool behind `--fast` (on by default for one-shot runs). Its
//! contract: the same semantics with and without it, only start-up differs;
//! a fresh container for every run, atomic claims, idle expiry, and
//! `--fast=false` never touching it. Every test makes sure the run under
//! test really was served by a warm container.

mod common;

use std::process::Output;
use std::time::Duration;

use common::*;

/// The pool serves Docker and Podman; native starts fast without one.
mod engine_only {
    use super::*;

    /// Waits for a warm container, runs `args` and asserts the run claimed one.
    /// Returns the output and the claimed container's name.
    fn pooled(env: &TestEnv, args: &[&str]) -> (Output, String) {
        poll_until(
            Duration::from_secs(60),
            "a warm container should be ready",
            || !env.warm_pool().is_empty(),
        );
        // A refill still under way may be starting another warm container, which
        // the run may claim: take the snapshot once it is done.
        env.wait_for_refills(Duration::from_secs(60));
        let warm = env.warm_pool();
        let (out, owner) = env.run_tracked(args);
        // The claim records our owner, but the detached refill may already have
        // removed the used container and its record; a warm container that was
        // claimed or is gone shows the run used it (nothing else claims this
        // test's pool, and idle expiry is minutes away).
        let mut used = env.claimed_by(&owner).pop();
        let start = std::time::Instant::now();
        while used.is_none() && start.elapsed() < Duration::from_secs(30) {
            used = warm
                .iter()
                .find(|w| env.is_claimed(w) || !container_exists(w))
                .cloned();
            std::thread::sleep(Duration::from_millis(200));
        }
        let used = used.unwrap_or_else(|| {
            panic!(
                "`{}` was not served by the warm pool (stderr: {})",
                args.join(" "),
                stderr(&out)
            )
        });
        assert!(containers_of_owner(&owner).is_empty());
        (out, used)
    }

    /// The used container of a finished pooled run is removed (by the detached refill).
    fn assert_used_removed(container: &str) {
        poll_until(
            Duration::from_secs(60),
            "the used pool container should be removed after the run",
            || !container_exists(container),
        );
    }

    const SH: [&str; 4] = ["-i", BUSYBOX, "sh", "-c"];

    fn run_sh(script: &str) -> Vec<&str> {
        let mut v = vec!["run"];
        v.extend(SH);
        v.push(script);
        v
    }

    #[test]
    fn second_run_is_served_by_the_pool_and_the_used_container_goes() {
        let env = TestEnv::new();
        let args = run_sh("echo hello; echo oops >&2; exit 3");
        let (first, first_owner) = env.run_tracked(&args);
        assert_code(&first, 3);
        assert!(
            env.claimed_by(&first_owner).is_empty(),
            "a cold key cannot have a warm container"
        );
        let (out, used) = pooled(&env, &args);
        assert_code(&out, 3);
        assert_eq!(stdout(&out), "hello\n");
        assert_eq!(stderr(&out), "oops\n");
        assert_used_removed(&used);
        // And the key is topped back up.
        poll_until(
            Duration::from_secs(60),
            "the pool should be refilled",
            || !env.warm_pool().is_empty(),
        );
    }

    #[test]
    fn pooled_runs_pass_argv_env_workdir_and_stdin_exactly() {
        let env = TestEnv::new();
        env.warm_up(&["run", "-i", BUSYBOX, "true"]);
        let (out, _) = pooled(
            &env,
            &[
                "run",
                "-i",
                BUSYBOX,
                "sh",
                "-c",
                r#"echo "$0" "a b"; echo "$K"; pwd"#,
                "x",
            ],
        );
        assert_code(&out, 0);
        assert_eq!(stdout(&out), "x a b\n\n/workspace\n");

        let (out, _) = pooled(
            &env,
            &[
                "run",
                "-e",
                "K=V w",
                "-w",
                "/tmp",
                "-i",
                BUSYBOX,
                "sh",
                "-c",
                r#"echo "$K" "$(pwd)""#,
            ],
        );
        assert_code(&out, 0);
        assert_eq!(stdout(&out), "V w /tmp\n");

        poll_until(Duration::from_secs(60), "warm container", || {
            !env.warm_pool().is_empty()
        });
        let t = {
            let mut cmd = env.std_cmd();
            cmd.args(["run", "-i", BUSYBOX, "sort", "-r"]);
            cmd
        };
        let out = assert_cmd::Command::from_std(t)
            .write_stdin("a\nb\n")
            .output()
            .unwrap();
        assert_code(&out, 0);
        assert_eq!(stdout(&out), "b\na\n");
    }

    #[test]
    fn pooled_runs_never_share_a_container() {
        let env = TestEnv::new();
        let args = run_sh("cat /tmp/marker 2>/dev/null; echo seen > /tmp/marker; echo fresh");
        let first = env.run(&args);
        assert_eq!(stdout(&first), "fresh\n");
        for _ in 0..3 {
            let (out, _) = pooled(&env, &args);
            assert_code(&out, 0);
            assert_eq!(
                stdout(&out),
                "fresh\n",
                "a pooled run saw state left by an earlier run"
            );
        }
    }

    #[test]
    fn pooled_runs_see_the_current_host_workspace_and_never_change_it() {
        let env = TestEnv::new();
        let f = env.project_dir().join("f.txt");
        std::fs::write(&f, "v1\n").unwrap();
        let args = run_sh("cat /workspace/f.txt; echo changed > /workspace/f.txt");
        let out = env.run(&args);
        assert_eq!(stdout(&out), "v1\n");
        poll_until(Duration::from_secs(60), "warm container", || {
            !env.warm_pool().is_empty()
        });
        // Changed on the host after the warm container was made.
        std::fs::write(&f, "v2\n").unwrap();
        std::fs::write(env.project_dir().join("g.txt"), "new\n").unwrap();
        let (out, _) = pooled(
            &env,
            &run_sh("cat /workspace/f.txt /workspace/g.txt; echo changed > /workspace/f.txt"),
        );
        assert_code(&out, 0);
        assert_eq!(
            stdout(&out),
            "v2\nnew\n",
            "a pooled run must see the workspace as it is now"
        );
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "v2\n");
    }

    #[test]
    fn pooled_exit_codes() {
        let env = TestEnv::new();
        env.warm_up(&["run", "-i", BUSYBOX, "true"]);
        let (out, _) = pooled(&env, &["run", "-i", BUSYBOX, "no-such-command-xyz"]);
        assert_code(&out, 127);
        let (out, _) = pooled(&env, &["run", "-i", BUSYBOX, "/etc/passwd"]);
        assert_code(&out, 126);
        let (out, _) = pooled(&env, &["run", "-i", BUSYBOX, "sh", "-c", "kill -TERM $$"]);
        assert_code(&out, 143);
    }

    #[test]
    fn pooled_timeout_is_124_and_kills_the_whole_tree() {
        let env = TestEnv::new();
        let args = [
            "run",
            "--timeout",
            "2s",
            "-i",
            BUSYBOX,
            "sh",
            "-c",
            "sleep 5001 & (sleep 5002 &); sleep 5003",
        ];
        env.warm_up(&["run", "--timeout", "2s", "-i", BUSYBOX, "true"]);
        let (out, used) = pooled(&env, &args);
        assert_code(&out, 124);
        assert!(stderr(&out).contains("timed out"), "{}", stderr(&out));
        let claimed = [used.clone()];
        poll_until(
            Duration::from_secs(30),
            "the timed-out command's processes should be gone",
            || {
                claimed.iter().all(|c| {
                    let ps = engine(&["top", c]);
                    !ps.status.success()
                        || !String::from_utf8_lossy(&ps.stdout).contains("sleep 500")
                })
            },
        );
        assert_used_removed(&used);
    }

    #[test]
    fn pooled_oom_is_137_and_named() {
        let env = TestEnv::new();
        env.warm_up(&["run", "--memory", "16m", "-i", BUSYBOX, "true"]);
        let (out, used) = pooled(
            &env,
            &[
                "run",
                "--memory",
                "16m",
                "-i",
                BUSYBOX,
                "sh",
                "-c",
                "x=a; while :; do x=$x$x; done",
            ],
        );
        assert_code(&out, 137);
        assert!(
            stderr(&out).to_lowercase().contains("out of memory"),
            "{}",
            stderr(&out)
        );
        assert_used_removed(&used);
    }

    /// One pooled run of a command that traps TERM: signals agentkernel as soon
    /// as the command says it is ready. Returns the used container.
    fn pooled_sigterm_once(env: &TestEnv) -> String {
        use std::io::BufRead;
        poll_until(Duration::from_secs(60), "warm container", || {
            !env.warm_pool().is_empty()
        });
        let mut t = env.spawn(&[
            "run",
            "-i",
            BUSYBOX,
            "sh",
            "-c",
            "trap 'echo got-term; exit 9' TERM; echo ready; while :; do sleep 1; done",
        ]);
        let stdout_pipe = t.child().stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout_pipe)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(60)).as_deref(),
            Ok("ready")
        );
        let used = env
            .claimed_by(&t.owner)
            .pop()
            .expect("the run was not served by the pool");
        t.signal(libc::SIGTERM);
        let pid = t.pid;
        let out = t
            .wait_output_within(Duration::from_secs(15))
            .unwrap_or_else(|| {
                panic!(
                "SIGTERM to agentkernel (pid {pid}) sent right after the pooled command printed \
             `ready` never reached the command (still running after 15s)"
            )
            });
        assert_code(&out, 9);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)).as_deref(),
            Ok("got-term")
        );
        used
    }

    /// A SIGTERM that arrives right after the command started must not be lost
    /// (repeated: the engine reports an exec's PID only a moment after it starts).
    #[test]
    fn pooled_sigterm_reaches_the_command() {
        let env = TestEnv::new();
        env.warm_up(&["run", "-i", BUSYBOX, "true"]);
        for _ in 0..4 {
            let used = pooled_sigterm_once(&env);
            assert_used_removed(&used);
        }
    }

    #[test]
    fn pooled_restrictive_keeps_its_promises() {
        let env = TestEnv::new();
        std::fs::write(env.project_dir().join("f.txt"), "host\n").unwrap();
        let script = "grep -E '^(CapEff|NoNewPrivs)' /proc/self/status; \
        tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; \
        if touch /x 2>/dev/null; then echo ROOT-RW; else echo root-ro; fi; \
        if touch /workspace/y 2>/dev/null; then echo WS-RW; else echo ws-ro; fi; \
        if unshare -U true 2>/dev/null; then echo UNSHARE; else echo no-unshare; fi";
        let args = [
            "run",
            "-p",
            "restrictive",
            "-i",
            BUSYBOX,
            "sh",
            "-c",
            script,
        ];
        let cold = env.run(&args);
        assert_code(&cold, 0);
        let (out, _) = pooled(&env, &args);
        assert_code(&out, 0);
        assert_eq!(
            stdout(&out),
            "CapEff:\t0000000000000000\nNoNewPrivs:\t1\nlo\nroot-ro\nws-ro\nno-unshare\n"
        );
        assert_eq!(stdout(&out), stdout(&cold), "pooled and normal runs differ");
    }

    #[test]
    fn moderate_pooled_matches_the_normal_path() {
        let env = TestEnv::new();
        let script = "grep -E '^(CapEff|NoNewPrivs)' /proc/self/status; \
        cat /sys/fs/cgroup/pids/pids.max /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null; \
        id -u; hostname | wc -c; env | grep -v -E '^(HOSTNAME|PWD|SHLVL|_)=' | sort";
        let args = run_sh(script);
        let normal = env.run(&{
            let mut a = vec!["run", "--fast=false"];
            a.extend(SH);
            a.push(script);
            a
        });
        assert_code(&normal, 0);
        env.warm_up(&args);
        let (out, _) = pooled(&env, &args);
        assert_code(&out, 0);
        assert_eq!(
            stdout(&out),
            stdout(&normal),
            "a pooled run's environment differs from the normal path's"
        );
    }

    #[test]
    fn fast_false_skips_the_pool() {
        let env = TestEnv::new();
        env.warm_up(&["run", "-i", BUSYBOX, "true"]);
        env.wait_for_refills(Duration::from_secs(60));
        let warm = env.warm_pool();
        let out = env.run(&["run", "--fast=false", "-i", BUSYBOX, "true"]);
        assert_code(&out, 0);
        env.assert_pool_untouched(&warm);
    }

    #[test]
    fn config_fast_false_skips_the_pool() {
        let env = TestEnv::new();
        std::fs::write(
            env.project_dir().join("agentkernel.toml"),
            "[sandbox]\nfast = false\n",
        )
        .unwrap();
        let (out, _) = env.run_tracked(&["run", "-i", BUSYBOX, "true"]);
        assert_code(&out, 0);
        env.wait_for_refills(Duration::from_secs(60));
        assert!(
            env.labelled_containers(Some("pool")).is_empty(),
            "fast = false in config still warmed the pool"
        );
    }

    #[test]
    fn pool_size_config_and_prune() {
        let env = TestEnv::new();
        std::fs::write(
            env.project_dir().join("agentkernel.toml"),
            "[pool]\nsize = 1\n",
        )
        .unwrap();
        env.warm_up(&["run", "-i", BUSYBOX, "true"]);
        assert!(env.wait_for_refills(Duration::from_secs(60)));
        assert_eq!(
            env.labelled_containers(Some("pool")).len(),
            1,
            "[pool] size = 1 should keep exactly one warm container"
        );
        let status = env.run(&["pool", "status"]);
        assert_code(&status, 0);
        assert!(stdout(&status).contains(BUSYBOX), "{}", stdout(&status));
        let out = env.run(&["pool", "prune"]);
        assert_code(&out, 0);
        assert!(out.stdout.is_empty(), "{}", stdout(&out));
        poll_until(
            Duration::from_secs(30),
            "`pool prune` should remove the warm containers",
            || env.labelled_containers(Some("pool")).is_empty(),
        );
    }

    #[test]
    fn publish_never_uses_the_pool() {
        let env = TestEnv::new();
        env.warm_up(&["run", "-i", BUSYBOX, "true"]);
        env.wait_for_refills(Duration::from_secs(60));
        let warm = env.warm_pool();
        let out = env.run(&["run", "-P", "8080", "-i", BUSYBOX, "true"]);
        assert_code(&out, 0);
        env.assert_pool_untouched(&warm);
    }

    // The tests below were written with the pool itself (commit b060a6d); they
    // detect the pooled path from inside the container instead of from the claim.

    /// Inside a claimed pool container, the control mount has `claimed/`.
    const WHICH_PATH: &str =
        "test -d /run/agentkernel/claimed && echo pooled >&2 || echo normal >&2";

    /// Pool settings for a test; a short idle time bounds what a refill still in
    /// flight at the end of the test can leave behind. The cap leaves room for
    /// `size`: set in the user's config, since a project file may not raise it.
    fn write_config(env: &TestEnv, size: u32, idle_ttl: &str) {
        let text = format!("[pool]\nsize = {size}\nidle_ttl = \"{idle_ttl}\"\n");
        std::fs::write(env.project_dir().join("agentkernel.toml"), text).unwrap();
        let user = env.home_dir().join(".config/agentkernel");
        std::fs::create_dir_all(&user).unwrap();
        let max_total = size.max(8);
        std::fs::write(
            user.join("config.toml"),
            format!("[pool]\nmax_total = {max_total}\n"),
        )
        .unwrap();
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
    fn warm_up_n(env: &TestEnv, extra: &[&str], n: usize) {
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
        warm_up_n(&env, &[], 1);
        let script = format!(
        "{WHICH_PATH}; printf '%s|' \"$0\" \"$@\"; echo; echo \"K=$K\"; pwd; cat /workspace/f.txt; \
         echo changed > /workspace/f.txt; cat; echo to-stderr >&2; exit 7"
    );
        let out = env
            .cmd()
            .args([
                "run", "-i", BUSYBOX, "-e", "K=v a", "-w", "/tmp", "sh", "-c", &script, "zero",
                "a b", "\"q\"", "$HOME",
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
        warm_up_n(&env, &[], 2);
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
        assert!(
            stderr(&first).contains("pooled") && stderr(&second).contains("pooled"),
            "both runs should have found a warm container; first: {}; second: {}",
            stderr(&first),
            stderr(&second)
        );
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
        warm_up_n(&env, &["--memory", "32m"], 4);
        let base = ["run", "-i", BUSYBOX, "--memory", "32m"];
        let with = |extra: &[&str]| {
            let mut a = base.to_vec();
            a.extend_from_slice(extra);
            env.run(&a)
        };
        let not_found = with(&["no-such-command"]);
        let not_exec = with(&["/etc/passwd"]);
        let timeout = with(&["--timeout", "2s", "sh", "-c", "sleep 60 & sleep 60"]);
        // One process growing (as in exit_codes.rs): a pipeline can make the
        // OOM killer take a second victim, the container's keep-alive, and the
        // container is gone before its count can be read (README, known limits).
        let oom = with(&["sh", "-c", "x=a; while :; do x=$x$x; done"]);
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
        warm_up_n(&env, &[], 20);
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
        warm_up_n(&env, &[], 1);
        // Nothing of ours runs in between: the engine removes them itself.
        poll_until(Duration::from_secs(30), "warm containers to expire", || {
            warm_count(&env) == 0
        });
    }

    #[test]
    fn prune_removes_warm_containers() {
        let env = TestEnv::new();
        write_config(&env, 2, "60s");
        warm_up_n(&env, &[], 2);
        let out = env.run(&["pool", "prune"]);
        assert_code(&out, 0);
        assert_eq!(warm_count(&env), 0);
    }

    /// Runs `args` (after `run`) pooled, then on the normal path; returns both.
    fn pooled_and_normal(env: &TestEnv, args: &[&str], stdin: &[u8]) -> (Output, Output) {
        let run = |extra: &[&str]| {
            let mut all = vec!["run"];
            all.extend_from_slice(extra);
            all.extend_from_slice(args);
            env.cmd().args(&all).write_stdin(stdin).output().unwrap()
        };
        poll_until(Duration::from_secs(60), "a warm container", || {
            warm_count(env) >= 1
        });
        (run(&[]), run(&["--fast=false"]))
    }

    /// Arguments and env values that a shell would mangle pass through a pooled
    /// run byte for byte, as on the normal path (on Podman the warm container's
    /// own keep-alive shell starts the command: it must never quote, split or
    /// evaluate them), and the command's environment is the normal path's.
    #[test]
    fn pooled_argv_env_and_environment_are_exact() {
        let env = TestEnv::new();
        write_config(&env, 1, "60s");
        warm_up_n(&env, &[], 1);
        let tricky = [
            "",
            " lead and trail ",
            "new\nline\n",
            "\n",
            "q'u\"o`t$e",
            "back\\slash\\",
            "$(touch /tmp/pwned)",
            "*",
            "-n",
            "ünï\tcode",
        ];
        let value = "a\nb\n 'c' $d\\ `e`\n";
        let script = format!(
        "{WHICH_PATH}; printf '[%s]' \"$@\"; printf '{{%s}}' \"$V\"; ls /tmp/pwned 2>/dev/null; true"
    );
        let mut args = vec!["-i", BUSYBOX, "-e"];
        let assignment = format!("V={value}");
        args.push(&assignment);
        args.extend(["sh", "-c", &script, "zero"]);
        args.extend(tricky);
        let (pooled, normal) = pooled_and_normal(&env, &args, b"");
        assert_code(&pooled, 0);
        assert!(stderr(&pooled).contains("pooled"), "{}", stderr(&pooled));
        let expected: String = tricky.iter().map(|a| format!("[{a}]")).collect();
        assert_eq!(stdout(&pooled), format!("{expected}{{{value}}}"));
        assert_eq!(stdout(&pooled), stdout(&normal));

        // The environment a command sees, exactly (only the hostname differs).
        let environment = |out: &Output| {
            let mut lines: Vec<String> = stdout(out)
                .lines()
                .filter(|l| !l.starts_with("HOSTNAME="))
                .map(str::to_string)
                .collect();
            lines.sort();
            lines
        };
        let command = ["-i", BUSYBOX, "-e", "K=v", "env"];
        let (pooled, _) = self::pooled(&env, &[&["run"][..], &command].concat());
        let normal = env.run(&[&["run", "--fast=false"][..], &command].concat());
        prune(&env);
        assert_code(&pooled, 0);
        assert!(stdout(&pooled).contains("K=v\n"), "{}", stdout(&pooled));
        assert_eq!(environment(&pooled), environment(&normal));
    }

    /// Names the keep-alive shell owns (IFS, SHLVL) reach the command as given:
    /// such runs are served by the exec path, with the same semantics.
    #[test]
    fn pooled_runs_pass_shell_variable_names_through() {
        let env = TestEnv::new();
        write_config(&env, 1, "60s");
        warm_up_n(&env, &[], 1);
        let command = ["-i", BUSYBOX, "-e", "IFS=:", "-e", "SHLVL=7", "env"];
        let (pooled, _) = self::pooled(&env, &[&["run"][..], &command].concat());
        let normal = env.run(&[&["run", "--fast=false"][..], &command].concat());
        prune(&env);
        assert_code(&pooled, 0);
        let pick = |out: &Output| {
            let mut v: Vec<String> = stdout(out)
                .lines()
                .filter(|l| l.starts_with("IFS=") || l.starts_with("SHLVL="))
                .map(str::to_string)
                .collect();
            v.sort();
            v
        };
        assert_eq!(pick(&pooled), vec!["IFS=:", "SHLVL=7"]);
        assert_eq!(pick(&pooled), pick(&normal));
    }

    /// A megabyte through stdin and back out, with stdin's EOF ending the command.
    #[test]
    fn pooled_stdin_and_stdout_stream_a_megabyte() {
        let env = TestEnv::new();
        write_config(&env, 1, "60s");
        warm_up_n(&env, &[], 1);
        let input: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let script = format!("{WHICH_PATH}; cat; echo end");
        let (pooled, _) = pooled_and_normal(&env, &["-i", BUSYBOX, "sh", "-c", &script], &input);
        prune(&env);
        assert_code(&pooled, 0);
        assert!(stderr(&pooled).contains("pooled"), "{}", stderr(&pooled));
        let mut expected = input.clone();
        expected.extend_from_slice(b"end\n");
        assert!(pooled.stdout == expected, "stdout differs from stdin");
    }

    /// A working directory that does not exist yet is created, as on the normal
    /// path (the warm container's keep-alive shell creates it).
    #[test]
    fn pooled_missing_workdir_is_created() {
        let env = TestEnv::new();
        write_config(&env, 1, "60s");
        warm_up_n(&env, &[], 1);
        let script = format!("{WHICH_PATH}; pwd");
        let args = ["-i", BUSYBOX, "-w", "/made/by/run", "sh", "-c", &script];
        let (pooled, normal) = pooled_and_normal(&env, &args, b"");
        prune(&env);
        assert_code(&pooled, 0);
        assert!(stderr(&pooled).contains("pooled"), "{}", stderr(&pooled));
        assert_eq!(stdout(&pooled), "/made/by/run\n");
        assert_eq!(stdout(&pooled), stdout(&normal));
    }

    /// `pool status --json`.
    fn status_json(env: &TestEnv) -> serde_json::Value {
        let out = env.run(&["pool", "status", "--json"]);
        assert_code(&out, 0);
        serde_json::from_slice(&out.stdout).expect("pool status --json prints JSON")
    }

    /// The keys of this backend in `pool status --json`.
    fn status_keys(env: &TestEnv) -> Vec<serde_json::Value> {
        status_json(env)["engines"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["backend"] == backend())
            .flat_map(|e| e["keys"].as_array().unwrap().clone())
            .collect()
    }

    /// An agent's loop: one command after another with no pause. The pool
    /// records how each run was served; after the first few runs (which find
    /// the configured two), the key's target grows and the runs keep finding
    /// a warm container (ready, or one a refill was just finishing).
    #[test]
    fn back_to_back_runs_are_served_by_the_pool() {
        let env = TestEnv::new();
        write_config(&env, 2, "2m");
        warm_up_n(&env, &[], 2);
        let runs = 24;
        for _ in 0..runs {
            // A command that takes a moment, like an agent's.
            let out = env.run(&["run", "-i", BUSYBOX, "sleep", "1"]);
            assert_code(&out, 0);
        }
        let keys = status_keys(&env);
        prune(&env);
        assert_eq!(keys.len(), 1, "{keys:?}");
        let key = &keys[0];
        let count = |field: &str| key[field].as_u64().unwrap();
        // The warm-up run was the one miss a new key must have.
        let (hits, waits, misses) = (count("hits"), count("waits"), count("misses"));
        assert_eq!(hits + waits + misses, runs + 1, "{key}");
        assert!(
            hits + waits >= runs * 3 / 4,
            "only {} of {runs} back-to-back runs were served by the pool: {key}",
            hits + waits
        );
        // A fast engine keeps two warm containers ahead of these runs; when one
        // ran dry, the key must have grown.
        if waits + misses > 1 {
            assert!(
                count("target") > 2,
                "the key ran dry and its target did not grow: {key}"
            );
        }
    }

    /// The surplus a burst of runs grows lasts about a minute, not the key's
    /// `idle_ttl`, and runs take it before the key's `size`: once the burst is
    /// over, what stays is the configured one container, and it is one that
    /// was warm before the last run.
    #[test]
    fn a_bursts_surplus_leaves_and_the_configured_size_stays() {
        let env = TestEnv::new();
        write_config(&env, 1, "5m");
        warm_up_n(&env, &[], 1);
        // Back to back: the key runs dry, so its target grows past one.
        for _ in 0..6 {
            assert_code(&env.run(&["run", "-i", BUSYBOX, "true"]), 0);
        }
        poll_until(Duration::from_secs(90), "the surplus to warm up", || {
            warm_count(&env) >= 3
        });
        assert!(env.wait_for_refills(Duration::from_secs(90)));
        let before = env.warm_pool();
        assert_code(&env.run(&["run", "-i", BUSYBOX, "true"]), 0);
        assert!(env.wait_for_refills(Duration::from_secs(90)));
        // Surplus containers wait 60 s for a run; the lasting one 5 minutes.
        let since = std::time::Instant::now();
        let mut left = env.warm_pool();
        while left.len() > 1 && since.elapsed() < Duration::from_secs(150) {
            std::thread::sleep(Duration::from_millis(500));
            left = env.warm_pool();
        }
        prune(&env);
        assert!(
            left.len() <= 1,
            "the surplus was still warm 150 s after the burst: {left:?}"
        );
        assert_eq!(
            left.len(),
            1,
            "the key's configured size went too: {left:?}"
        );
        assert!(
            before.contains(&left[0]),
            "the last run took the lasting container, not a surplus one: {before:?} -> {left:?}"
        );
    }

    /// `pool prune` right after a burst, while the refill is still making
    /// containers: once the refill is done, none is left.
    #[test]
    fn prune_during_a_refill_leaves_no_container() {
        let env = TestEnv::new();
        write_config(&env, 2, "5m");
        for _ in 0..8 {
            assert_code(&env.run(&["run", "-i", BUSYBOX, "true"]), 0);
        }
        assert_code(&env.run(&["pool", "prune"]), 0);
        let done = env.wait_for_refills(Duration::from_secs(90));
        let left = env.labelled_containers(Some("pool"));
        prune(&env);
        assert!(done, "refills still running 90 s after the prune");
        assert!(left.is_empty(), "left after pool prune: {left:?}");
    }

    /// Warm containers not claimed by a run (any state: one being created counts).
    fn unclaimed_warm(env: &TestEnv) -> Vec<String> {
        env.labelled_containers(Some("pool"))
            .into_iter()
            .filter(|n| {
                !env.state_dir()
                    .join("pool/containers")
                    .join(n)
                    .join("ctl/claimed")
                    .exists()
            })
            .collect()
    }

    /// `[pool] max_total` caps warm containers across keys: three keys of two
    /// each never hold more than three, and the least recently used key gives
    /// way first. `pool status` shows the cap, the total and each key's target.
    #[test]
    fn max_total_caps_warm_containers_across_keys() {
        let env = TestEnv::new();
        std::fs::write(
            env.project_dir().join("agentkernel.toml"),
            "[pool]\nsize = 2\nidle_ttl = \"2m\"\nmax_total = 3\n",
        )
        .unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let most_seen = std::thread::scope(|scope| {
            let watcher = scope.spawn(|| {
                let mut most = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    most = most.max(unclaimed_warm(&env).len());
                    std::thread::sleep(Duration::from_millis(100));
                }
                most
            });
            // Three keys (the profile is fixed at creation), used in turn.
            for profile in ["permissive", "moderate", "restrictive"] {
                let out = env.run(&["run", "-p", profile, "-i", BUSYBOX, "true"]);
                assert_code(&out, 0);
                assert!(env.wait_for_refills(Duration::from_secs(90)));
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            watcher.join().unwrap()
        });
        let keys = status_keys(&env);
        let text = stdout(&env.run(&["pool", "status"]));
        let json = status_json(&env);
        prune(&env);
        assert!(
            most_seen <= 3,
            "{most_seen} warm containers with max_total = 3"
        );
        assert_eq!(json["max_total"], 3, "{json}");
        assert!(text.contains("at most 3"), "{text}");
        let warm_of = |profile: &str| {
            keys.iter()
                .find(|k| k["profile"] == profile)
                .map_or(0, |k| k["warm"].as_u64().unwrap())
        };
        // Filled in turn: the newest key has its two, the one before what is left.
        assert_eq!(
            (
                warm_of("permissive"),
                warm_of("moderate"),
                warm_of("restrictive")
            ),
            (0, 1, 2),
            "{keys:?}"
        );
        let engine_total = json["engines"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["backend"] == backend())
            .unwrap()["warm"]
            .as_u64()
            .unwrap();
        assert_eq!(engine_total, 3, "{json}");
        assert!(keys.iter().all(|k| k["target"] == 2), "{keys:?}");
    }

    /// A project's `agentkernel.toml` may lower the pool's cap but not raise it
    /// (every warm container costs the host) without `agentkernel trust`.
    #[test]
    fn a_project_file_cannot_raise_max_total_untrusted() {
        let env = TestEnv::new();
        std::fs::write(
            env.project_dir().join("agentkernel.toml"),
            "[pool]\nsize = 500\nmax_total = 500\n",
        )
        .unwrap();
        let out = env.run(&["run", "-i", BUSYBOX, "true"]);
        assert_code(&out, 125);
        assert!(stderr(&out).contains("pool.max_total"), "{}", stderr(&out));
        assert!(env.labelled_containers(Some("pool")).is_empty());
    }
}

/// Native's pool (`--fast`, opt-in there): sandboxes built ahead by a
/// detached refill, each claimed by one run, which joins it.
mod native_only {
    use std::path::PathBuf;

    use super::*;

    fn native() -> TestEnv {
        assert!(is_native(), "native-only test run on {}", backend());
        let env = TestEnv::new();
        std::fs::write(
            env.project_dir().join("agentkernel.toml"),
            "[pool]\nsize = 1\nidle_ttl = \"120s\"\n",
        )
        .unwrap();
        env
    }

    fn name_of(dir: &std::path::Path) -> String {
        dir.file_name().unwrap().to_string_lossy().into_owned()
    }

    /// Runs `args` once so that its key warms up, and waits until a warm
    /// sandbox of it is ready (and the refill is done).
    fn warm_up(env: &TestEnv, args: &[&str]) -> PathBuf {
        let out = env.run(args);
        assert!(out.status.success(), "warm-up run failed: {}", stderr(&out));
        poll_until(
            Duration::from_secs(60),
            "a warm native sandbox should be ready after a --fast run",
            || !env.ready_warm_sandboxes().is_empty(),
        );
        env.wait_for_refills(Duration::from_secs(60));
        let ready = env.ready_warm_sandboxes();
        assert_eq!(ready.len(), 1, "[pool] size = 1: {ready:?}");
        ready[0].clone()
    }

    /// `args` with `--fast -i BUSYBOX` after `run`.
    fn fast<'a>(args: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec!["run", "--fast", "-i", BUSYBOX];
        v.extend_from_slice(args);
        v
    }

    #[test]
    fn a_warm_sandbox_serves_exactly_one_run_and_then_goes() {
        let env = native();
        let first = warm_up(&env, &fast(&["true"]));
        let name = name_of(&first);
        // The run is served by the warm sandbox (its hostname is the sandbox's
        // name) and leaves a mark in it.
        let out = env.run(&fast(&["sh", "-c", "hostname; echo mark > /mark"]));
        assert_code(&out, 0);
        assert_eq!(stdout(&out).trim(), name, "not served by {name}");
        poll_until(
            Duration::from_secs(30),
            "the used warm sandbox should be removed with all it held",
            || !first.exists() && !native_sandbox_exists(&name),
        );
        // The next run gets another, fresh one: no mark.
        poll_until(Duration::from_secs(60), "a new warm sandbox", || {
            !env.ready_warm_sandboxes().is_empty()
        });
        env.wait_for_refills(Duration::from_secs(60));
        let second = name_of(&env.ready_warm_sandboxes()[0]);
        assert_ne!(second, name);
        let out = env.run(&fast(&[
            "sh",
            "-c",
            "hostname; test ! -e /mark && echo fresh",
        ]));
        assert_code(&out, 0);
        assert_eq!(stdout(&out), format!("{second}\nfresh\n"));
        assert_eq!(hits_and_misses(&env), (2, 1));
    }

    /// The one key's runs that found a warm sandbox ready, and those that
    /// built their own (`pool status --json`).
    fn hits_and_misses(env: &TestEnv) -> (u64, u64) {
        let status = env.run(&["pool", "status", "--json"]);
        let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
        let keys = status["sandboxes"]["keys"].as_array().unwrap().clone();
        assert_eq!(keys.len(), 1, "{status}");
        (
            keys[0]["hits"].as_u64().unwrap(),
            keys[0]["misses"].as_u64().unwrap(),
        )
    }

    /// What the command sees and how it ends are the run's, not the warm
    /// sandbox's: the same output as a run that builds its own sandbox.
    #[test]
    fn a_pooled_run_matches_a_cold_run() {
        let env = native();
        std::fs::write(env.project_dir().join("f.txt"), "host\n").unwrap();
        warm_up(&env, &fast(&["true"]));
        let script = "printf '%s|' \"$0\" \"$@\"; echo; echo \"K=$K\"; pwd; id; \
             grep -E '^(CapEff|CapBnd|Seccomp|NoNewPrivs):' /proc/self/status; \
             cat /sys/fs/cgroup/pids.max /sys/fs/cgroup/pids/pids.max 2>/dev/null; \
             cat /workspace/f.txt; echo changed > /workspace/f.txt; cat; \
             echo to-stderr >&2; exit 7";
        let args = |fast_flag: &str| {
            vec![
                "run".to_string(),
                fast_flag.to_string(),
                "-i".into(),
                BUSYBOX.into(),
                "-e".into(),
                "K=v a".into(),
                "-w".into(),
                "/tmp".into(),
                "sh".into(),
                "-c".into(),
                script.into(),
                "zero".into(),
                "a b".into(),
                "$HOME".into(),
            ]
        };
        let run = |fast_flag: &str| {
            env.cmd()
                .args(args(fast_flag))
                .write_stdin("from-stdin\n")
                .output()
                .unwrap()
        };
        let pooled = run("--fast");
        assert_eq!(
            hits_and_misses(&env),
            (1, 1),
            "the run was not served by the pool"
        );
        let cold = run("--fast=false");
        assert_code(&pooled, 7);
        assert_code(&cold, 7);
        assert_eq!(stdout(&pooled), stdout(&cold));
        assert!(
            stdout(&pooled).starts_with("zero|a b|$HOME|\nK=v a\n/tmp\n"),
            "{}",
            stdout(&pooled)
        );
        assert!(
            stdout(&pooled).contains("host\nfrom-stdin\n"),
            "{}",
            stdout(&pooled)
        );
        assert!(stderr(&pooled).contains("to-stderr"));
        assert_eq!(
            std::fs::read_to_string(env.project_dir().join("f.txt")).unwrap(),
            "host\n",
            "the host's workspace must never change"
        );
    }

    /// Built ahead, the sandbox still shows the workspace as it is when the
    /// run starts.
    #[test]
    fn a_pooled_run_sees_the_workspace_as_it_is_now() {
        let env = native();
        warm_up(&env, &fast(&["true"]));
        std::fs::write(
            env.project_dir().join("later.txt"),
            "written after warm-up\n",
        )
        .unwrap();
        let out = env.run(&fast(&["cat", "/workspace/later.txt"]));
        assert_code(&out, 0);
        assert_eq!(stdout(&out), "written after warm-up\n");
        assert_eq!(
            hits_and_misses(&env),
            (1, 1),
            "the run was not served by the pool"
        );
    }

    /// Nothing the command started outlives the run, as with a one-shot
    /// sandbox: a writer that ignores HUP and TERM stops when `run` returns.
    #[test]
    fn no_process_of_a_pooled_command_outlives_the_run() {
        let env = native();
        let out_dir = tempfile::tempdir().unwrap();
        let volume = format!("{}:/out", out_dir.path().display());
        warm_up(&env, &fast(&["-v", &volume, "true"]));
        let file = out_dir.path().join("grows");
        let out = env.run(&fast(&[
            "-v",
            &volume,
            "sh",
            "-c",
            // Its stdio is not the run's: nothing but the sandbox's end stops it.
            "(trap '' HUP TERM; while :; do echo x >> /out/grows; done) </dev/null >/dev/null 2>&1 & sleep 0.3; exit 3",
        ]));
        assert_code(&out, 3);
        assert_eq!(
            hits_and_misses(&env),
            (1, 1),
            "the run was not served by the pool"
        );
        let size = std::fs::metadata(&file).unwrap().len();
        assert!(size > 0, "the writer never ran");
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            std::fs::metadata(&file).unwrap().len(),
            size,
            "a process of the pooled command still writes after the run returned"
        );
    }

    /// A pooled run killed with SIGKILL (it cannot clean up) still ends its
    /// sandbox: the holder watches the run and ends it then.
    #[test]
    fn a_killed_pooled_run_ends_its_sandbox() {
        let env = native();
        let first = warm_up(&env, &fast(&["true"]));
        let name = name_of(&first);
        let mut run = env.spawn(&fast(&["sh", "-c", "echo started; sleep 600"]));
        poll_until(
            Duration::from_secs(30),
            "the run should claim the warm sandbox",
            || {
                std::fs::read_to_string(first.join("claimed/by"))
                    .is_ok_and(|by| by.trim() == run.owner)
            },
        );
        poll_until(Duration::from_secs(30), "the command should run", || {
            native_cgroup_dirs(&name).iter().any(|d| {
                std::fs::read_to_string(d.join("cgroup.procs"))
                    .is_ok_and(|p| p.lines().count() >= 2)
            })
        });
        let mut child = run.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        poll_until(
            Duration::from_secs(30),
            "the killed run's sandbox should be removed with all it held",
            || !first.exists() && !native_sandbox_exists(&name),
        );
    }

    #[test]
    fn pooled_timeout_and_exit_codes_are_the_runs() {
        let env = native();
        warm_up(&env, &fast(&["true"]));
        let out = env.run(&fast(&[
            "--timeout",
            "1s",
            "sh",
            "-c",
            "sleep 30 & sleep 30",
        ]));
        assert_code(&out, 124);
        assert_eq!(
            hits_and_misses(&env),
            (1, 1),
            "the run was not served by the pool"
        );
        env.wait_for_refills(Duration::from_secs(60));
        poll_until(Duration::from_secs(60), "a new warm sandbox", || {
            !env.ready_warm_sandboxes().is_empty()
        });
        let out = env.run(&fast(&["sh", "-c", "exit 42"]));
        assert_code(&out, 42);
        assert_eq!(
            hits_and_misses(&env),
            (2, 1),
            "the run was not served by the pool"
        );
        let out = env.run(&fast(&["nosuchcommand"]));
        assert_code(&out, 127);
    }

    #[test]
    fn prune_ends_warm_sandboxes_and_what_they_held() {
        let env = native();
        let first = warm_up(&env, &fast(&["true"]));
        let name = name_of(&first);
        assert!(native_sandbox_exists(&name));
        let out = env.run(&["pool", "prune"]);
        assert_code(&out, 0);
        assert!(
            stderr(&out).contains("1 warm native sandbox"),
            "{}",
            stderr(&out)
        );
        assert!(
            env.native_pool_sandboxes().is_empty(),
            "{:?}",
            env.native_pool_sandboxes()
        );
        poll_until(
            Duration::from_secs(10),
            "nothing of the pruned sandbox",
            || !native_sandbox_exists(&name),
        );
    }

    /// Without `--fast` (or `fast = true`) native builds every sandbox: the
    /// pool is opt-in there.
    #[test]
    fn native_runs_use_no_pool_unless_asked() {
        let env = native();
        let out = env.run(&["run", "-i", BUSYBOX, "true"]);
        assert_code(&out, 0);
        assert!(!env.state_dir().join("native-pool").exists());
        let dry = env.dry_run(&["-i", BUSYBOX, "true"]);
        assert_eq!(dry["pool"], false, "{dry}");
        let dry = env.dry_run(&["--fast", "-i", BUSYBOX, "true"]);
        assert_eq!(dry["pool"], true, "{dry}");
    }
}
