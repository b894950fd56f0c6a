//! What a user of upstream agentkernel does with kept sandboxes: `sandbox
//! create` → `start` → `exec` (also `--detach`, `--sudo`) → `cp` → `stop`
//! → `remove`, the `sb` alias, `--ttl 0` and bare seconds, `extend-ttl`,
//! `clean`, upstream's names, and `cp` attacked through sandbox symlinks.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// An upstream-style name (uppercase, `_`) unique to this test.
fn upstream_name(prefix: &str) -> String {
    format!("{prefix}_{}", unique_name("x").replace('-', "_"))
}

fn ok(out: &std::process::Output) -> String {
    assert_code(out, 0);
    stdout(out)
}

/// `exec NAME -- sh -c SCRIPT`.
fn sh(env: &TestEnv, name: &str, script: &str) -> std::process::Output {
    env.run(&["exec", name, "--", "sh", "-c", script])
}

fn info_json(env: &TestEnv, name: &str) -> serde_json::Value {
    let out = env.run(&["sandbox", "info", "--json", name]);
    serde_json::from_slice(ok(&out).as_bytes()).expect("sandbox info --json")
}

#[test]
fn upstream_session_create_start_exec_cp_stop_remove() {
    let env = TestEnv::new();
    let name = upstream_name("Up");
    let _guard = KeptGuard::new(&name);
    let out = env.run(&["sb", "create", &name, "-i", BUSYBOX]);
    assert_code(&out, 0);
    assert!(stderr(&out).contains(&name), "{}", stderr(&out));
    // Nothing ran: create starts no command of its own.
    assert_eq!(ok(&env.run(&["exec", &name, "--", "ls", "/tmp"])), "");
    assert_code(&env.run(&["sandbox", "start", &name]), 0);

    // A detached command: exec returns at once, the command runs on.
    let started = Instant::now();
    let out = env.run(&[
        "exec",
        "--detach",
        &name,
        "--",
        "sh",
        "-c",
        "echo $$ > /tmp/bg.pid; exec sleep 300",
    ]);
    assert_code(&out, 0);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "exec --detach waited for the command"
    );
    poll_until(
        Duration::from_secs(20),
        "the detached command starts",
        || code(&sh(&env, &name, "kill -0 $(cat /tmp/bg.pid)")) == 0,
    );

    // cp both ways.
    let host = env.home_dir();
    std::fs::write(host.join("in.txt"), "from the host\n").unwrap();
    let into = format!("{name}:/tmp/in.txt");
    assert_code(
        &env.run(&[
            "sandbox",
            "cp",
            host.join("in.txt").to_str().unwrap(),
            &into,
        ]),
        0,
    );
    assert_eq!(
        ok(&env.run(&["exec", &name, "--", "cat", "/tmp/in.txt"])),
        "from the host\n"
    );
    let out_dir = host.join("outdir");
    std::fs::create_dir(&out_dir).unwrap();
    assert_code(&sh(&env, &name, "echo from the sandbox > /tmp/out.txt"), 0);
    let from = format!("{name}:/tmp/out.txt");
    assert_code(
        &env.run(&["sandbox", "cp", &from, out_dir.to_str().unwrap()]),
        0,
    );
    assert_eq!(
        std::fs::read_to_string(out_dir.join("out.txt")).unwrap(),
        "from the sandbox\n"
    );

    // Directories both ways; a symlink inside is never made on the host.
    let tree = host.join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("sub/deep.txt"), "deep\n").unwrap();
    let into_tmp = format!("{name}:/tmp/");
    assert_code(
        &env.run(&["sandbox", "cp", tree.to_str().unwrap(), &into_tmp]),
        0,
    );
    assert_code(
        &sh(
            &env,
            &name,
            "cat /tmp/tree/sub/deep.txt && ln -s /etc/passwd /tmp/tree/link",
        ),
        0,
    );
    let back = host.join("back");
    let from_tree = format!("{name}:/tmp/tree");
    assert_code(
        &env.run(&["sandbox", "cp", &from_tree, back.to_str().unwrap()]),
        0,
    );
    assert_eq!(
        std::fs::read_to_string(back.join("sub/deep.txt")).unwrap(),
        "deep\n"
    );
    assert!(
        std::fs::symlink_metadata(back.join("link")).is_err(),
        "a sandbox symlink was made on the host"
    );

    // stop: processes end, files stay; exec waits for start.
    let out = env.run(&["sandbox", "stop", &name]);
    assert_code(&out, 0);
    let line = assert_one_line_error(&env.run(&["exec", &name, "--", "true"]));
    assert!(line.contains("stopped") && line.contains("start"), "{line}");
    assert_eq!(info_json(&env, &name)["status"], "stopped");
    assert_code(&env.run(&["sandbox", "start", &name]), 0);
    assert_eq!(info_json(&env, &name)["status"], "running");
    let out = sh(&env, &name, "kill -0 $(cat /tmp/bg.pid)");
    assert_ne!(
        code(&out),
        0,
        "the detached command survived `sandbox stop`"
    );
    assert_eq!(
        ok(&env.run(&["exec", &name, "--", "cat", "/tmp/in.txt", "/tmp/out.txt"])),
        "from the host\nfrom the sandbox\n",
        "files did not survive stop/start"
    );

    assert_code(&env.run(&["sandbox", "remove", &name]), 0);
    assert!(!container_exists(&kept_object(&name)), "{name} remains");
    assert_one_line_error(&env.run(&["exec", &name, "--", "true"]));
}

/// Copies whose sandbox path leads, through a symlink the sandbox planted,
/// `..`, or /proc, to a host path: nothing of the host may be read or written.
#[test]
fn cp_never_reaches_the_host_through_sandbox_paths() {
    let env = TestEnv::new();
    let name = upstream_name("Cp");
    let _guard = KeptGuard::new(&name);
    let canary = tempfile::Builder::new()
        .prefix("ak-canary")
        .tempdir()
        .unwrap();
    let canary_dir = canary.path().to_str().unwrap().to_string();
    std::fs::write(canary.path().join("secret"), "host secret\n").unwrap();
    assert_code(&env.run(&["sb", "create", &name, "-i", BUSYBOX]), 0);
    let plant = format!(
        "ln -s {canary_dir}/secret /tmp/leak && ln -s {canary_dir}/planted /tmp/plant \
         && ln -s {canary_dir} /tmp/dirlink && ln -s / /tmp/rootlink"
    );
    assert_code(&sh(&env, &name, &plant), 0);

    let host = env.home_dir();
    let reads = [
        "/tmp/leak".to_string(),
        "/tmp/dirlink/secret".to_string(),
        format!("/../../..{canary_dir}/secret"),
        format!("/tmp/rootlink{canary_dir}/secret"),
        format!("/proc/self/root{canary_dir}/secret"),
        format!("/proc/1/root{canary_dir}/secret"),
    ];
    for (i, path) in reads.iter().enumerate() {
        let out_file = host.join(format!("read{i}"));
        let out = env.run(&[
            "sandbox",
            "cp",
            &format!("{name}:{path}"),
            out_file.to_str().unwrap(),
        ]);
        let got = std::fs::read_to_string(&out_file).unwrap_or_default();
        assert!(
            !got.contains("host secret"),
            "cp {path} read the host's file (exit {:?}, {})",
            out.status.code(),
            stderr(&out)
        );
    }

    // A FIFO would block a reader forever: refused, at once.
    assert_code(&sh(&env, &name, "mkfifo /tmp/fifo"), 0);
    let started = Instant::now();
    let fifo = format!("{name}:/tmp/fifo");
    let out = env.run(&["sandbox", "cp", &fifo, host.join("fifo").to_str().unwrap()]);
    assert_one_line_error(&out);
    assert!(started.elapsed() < Duration::from_secs(30));

    let payload = host.join("payload");
    std::fs::write(&payload, "from the attacker\n").unwrap();
    let writes = [
        "/tmp/leak".to_string(),
        "/tmp/plant".to_string(),
        "/tmp/dirlink/new".to_string(),
        format!("/../../..{canary_dir}/new2"),
        format!("/tmp/rootlink{canary_dir}/new3"),
        format!("/proc/self/root{canary_dir}/new4"),
    ];
    for path in &writes {
        env.run(&[
            "sandbox",
            "cp",
            payload.to_str().unwrap(),
            &format!("{name}:{path}"),
        ]);
    }
    assert_eq!(
        std::fs::read_to_string(canary.path().join("secret")).unwrap(),
        "host secret\n",
        "a copy into the sandbox wrote the host's file"
    );
    let mut entries: Vec<String> = std::fs::read_dir(canary.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(
        entries,
        ["secret"],
        "a copy into the sandbox created files on the host"
    );
}

#[test]
fn ttl_zero_bare_seconds_extend_and_clean() {
    let env = TestEnv::new();
    let forever = upstream_name("Forever");
    let hourly = upstream_name("Hourly");
    let _guards = (KeptGuard::new(&forever), KeptGuard::new(&hourly));
    assert_code(
        &env.run(&["sandbox", "create", &forever, "--ttl", "0", "-i", BUSYBOX]),
        0,
    );
    assert_code(
        &env.run(&["sandbox", "create", &hourly, "--ttl", "3600", "-i", BUSYBOX]),
        0,
    );
    let out = ok(&env.run(&["sandbox", "info", &forever]));
    assert!(out.contains("never"), "{out}");
    assert_eq!(info_json(&env, &hourly)["ttl_secs"], 3600);
    assert_code(&env.run(&["sandbox", "extend-ttl", &hourly, "30m"]), 0);
    assert_code(
        &env.run(&["sandbox", "extend-ttl", &hourly, "--by", "1h"]),
        0,
    );
    let info = info_json(&env, &hourly);
    assert_eq!(info["ttl_secs"], 3600 + 1800 + 3600, "{info}");
    let expires = info["expires_in_secs"].as_u64().unwrap();
    assert!(expires > 3600 + 1800, "{info}");
    // extend-ttl sticks: a later use keeps the longer TTL.
    assert_code(&env.run(&["exec", &hourly, "--", "true"]), 0);
    assert!(
        info_json(&env, &hourly)["expires_in_secs"]
            .as_u64()
            .unwrap()
            > 8000
    );

    assert_code(&env.run(&["sandbox", "stop", &hourly]), 0);
    let out = env.run(&["sandbox", "clean"]);
    assert_code(&out, 0);
    assert!(stderr(&out).contains(&hourly), "{}", stderr(&out));
    assert!(!stderr(&out).contains(&forever), "{}", stderr(&out));
    assert!(!container_exists(&kept_object(&hourly)));
    assert!(container_exists(&kept_object(&forever)));
    let out = env.run(&["sandbox", "clean", "--force"]);
    assert_code(&out, 0);
    assert!(stderr(&out).contains(&forever), "{}", stderr(&out));
    assert!(!container_exists(&kept_object(&forever)));
}

#[test]
fn sudo_runs_as_root_under_the_same_filter() {
    let env = TestEnv::new();
    let name = upstream_name("Sudo");
    let _guard = KeptGuard::new(&name);
    assert_code(&env.run(&["sb", "create", &name, "-i", NOBODY]), 0);
    let probe = "id -u; grep -E '^(Seccomp|NoNewPrivs|CapBnd):' /proc/self/status";
    let plain = ok(&sh(&env, &name, probe));
    let sudo = ok(&env.run(&["exec", "--sudo", &name, "--", "sh", "-c", probe]));
    let (plain_uid, plain_rest) = plain.split_once('\n').unwrap();
    let (sudo_uid, sudo_rest) = sudo.split_once('\n').unwrap();
    assert_ne!(plain_uid, "0", "the image's user is not root");
    assert_eq!(sudo_uid, "0");
    assert_eq!(
        plain_rest, sudo_rest,
        "--sudo changed the seccomp filter, no_new_privs or the capability bound"
    );
    assert!(sudo_rest.contains("Seccomp:\t2"), "{sudo_rest}");
}

#[test]
fn bad_names_and_paths_are_125() {
    let env = TestEnv::new();
    for bad in ["../x", ".", "a/b", "_lead", &"x".repeat(64)] {
        assert_one_line_error(&env.run(&["sandbox", "create", bad, "-i", BUSYBOX]));
    }
    assert_one_line_error(&env.run(&["sandbox", "cp", "a", "b"]));
    assert_one_line_error(&env.run(&["sandbox", "cp", "No_Such:/x", "b"]));
    assert_one_line_error(&env.run(&["sandbox", "cp", "box:relative", "b"]));
    assert!(!Path::new(&env.state_dir().join("sandboxes/x")).exists());
}

#[test]
fn init_writes_a_file_run_and_upstream_read_and_never_overwrites() {
    let env = TestEnv::new();
    let project = env.project_dir();
    std::fs::write(project.join("package.json"), "{}").unwrap();
    assert_code(&env.run(&["init", "--name", "My_App"]), 0);
    let written = std::fs::read_to_string(project.join("agentkernel.toml")).unwrap();
    // Upstream requires [sandbox] name; the image follows the project's language.
    assert!(written.contains("name = \"My_App\""), "{written}");
    let resolved = env.dry_run(&["--", "true"]);
    assert_eq!(resolved["image"], "node:22-alpine", "{resolved}");
    assert_eq!(resolved["image_source"], "config", "{resolved}");
    let line = assert_one_line_error(&env.run(&["init"]));
    assert!(line.contains("--force"), "{line}");
    assert_eq!(
        std::fs::read_to_string(project.join("agentkernel.toml")).unwrap(),
        written
    );
    assert_code(&env.run(&["init", "--force", "-n", "Other"]), 0);
    let replaced = std::fs::read_to_string(project.join("agentkernel.toml")).unwrap();
    assert!(replaced.contains("name = \"Other\""), "{replaced}");
}

#[test]
fn choices_match_in_any_case_and_missing_arguments_are_named() {
    let env = TestEnv::new();
    std::fs::write(
        env.project_dir().join("agentkernel.toml"),
        "[sandbox]\nname = \"Case\"\n\n[security]\nprofile = \"Restrictive\"\n",
    )
    .unwrap();
    let resolved = env.dry_run(&["--pull", "NEVER", "--", "true"]);
    assert_eq!(resolved["profile"], "restrictive", "{resolved}");
    assert_eq!(resolved["pull"], "never", "{resolved}");
    let resolved = env.dry_run(&["-p", "Moderate", "--", "true"]);
    assert_eq!(resolved["profile"], "moderate", "{resolved}");

    let line = assert_one_line_error(&env.run(&["exec"]));
    assert!(line.contains("<NAME>") && line.contains("<CMD>"), "{line}");
    let line = assert_one_line_error(&env.run(&["sandbox", "cp", "x"]));
    assert!(line.contains("<DEST>"), "{line}");
}

#[test]
fn create_takes_its_name_from_the_config() {
    let env = TestEnv::new();
    let name = upstream_name("Cfg");
    let _guard = KeptGuard::new(&name);
    std::fs::write(
        env.project_dir().join("agentkernel.toml"),
        format!("[sandbox]\nname = \"{name}\"\nbase_image = \"{BUSYBOX}\"\n"),
    )
    .unwrap();
    assert_code(&env.run(&["sandbox", "create"]), 0);
    assert_eq!(ok(&env.run(&["exec", &name, "--", "echo", "hi"])), "hi\n");
    // The name is taken: a second create says so and leaves the first alone.
    assert_one_line_error(&env.run(&["sandbox", "create"]));
    assert_eq!(ok(&env.run(&["exec", &name, "--", "echo", "hi"])), "hi\n");
}

#[test]
fn no_start_creates_it_stopped() {
    let env = TestEnv::new();
    let name = upstream_name("Later");
    let _guard = KeptGuard::new(&name);
    assert_code(
        &env.run(&["sandbox", "create", "--no-start", &name, "-i", BUSYBOX]),
        0,
    );
    assert_eq!(info_json(&env, &name)["status"], "stopped");
    assert_one_line_error(&env.run(&["exec", &name, "--", "true"]));
    assert_code(&env.run(&["sandbox", "start", &name]), 0);
    assert_eq!(ok(&env.run(&["exec", &name, "--", "echo", "up"])), "up\n");
}

#[test]
fn attach_is_a_shell_in_the_sandbox() {
    let env = TestEnv::new();
    let name = upstream_name("Shell");
    let _guard = KeptGuard::new(&name);
    assert_code(&env.run(&["sb", "create", &name, "-i", BUSYBOX]), 0);
    let out = env
        .cmd()
        .args(["attach", "-e", "GREETING=hi", &name])
        .write_stdin("echo $GREETING from $(hostname); exit 3\n")
        .output()
        .unwrap();
    assert_code(&out, 3);
    assert!(stdout(&out).starts_with("hi from "), "{}", stdout(&out));
}
