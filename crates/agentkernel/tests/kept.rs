//! Kept sandboxes (README, "Use"): `--keep`, `exec`, `sandbox …`,
//! `--ttl`, `--branch`, names and races.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// The `run-<8 hex>` name in agentkernel's stderr.
fn generated_name(stderr: &str) -> Option<String> {
    stderr
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .find_map(|w| {
            let hex = w.strip_prefix("run-")?;
            (hex.len() == 8
                && hex
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()))
            .then(|| w.to_string())
        })
}

#[test]
fn keep_prints_the_name_and_exec_sees_the_state() {
    let env = TestEnv::new();
    let out = env.run_with().keep().output(&[
        "sh",
        "-c",
        "echo kept-state > /tmp/state; echo ws-state > /workspace/w.txt",
    ]);
    let name = generated_name(&stderr(&out));
    let _guard = name.as_deref().map(KeptGuard::new);
    assert_code(&out, 0);
    assert!(out.stdout.is_empty(), "{}", stdout(&out));
    let name = name.unwrap_or_else(|| panic!("no run-<8 hex> name on stderr: {}", stderr(&out)));
    assert!(container_exists(&kept_object(&name)));

    let out = env.exec(&name, &["cat", "/tmp/state", "/workspace/w.txt"]);
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "kept-state\nws-state\n");
    // Moderate: the kept sandbox's workspace is still copy-on-write.
    assert!(!env.project_dir().join("w.txt").exists());

    // exec without `--` works too, and exit codes pass through.
    let out = env.run(&["exec", &name, "sh", "-c", "exit 4"]);
    assert_code(&out, 4);
}

#[test]
fn exec_env_and_workdir() {
    let env = TestEnv::new();
    let name = unique_name("envwd");
    let _guard = KeptGuard::new(&name);
    let out = env.run_kept(&name, &[], &["true"]);
    assert_code(&out, 0);
    let out = env.run(&[
        "exec",
        "-e",
        "K=V w",
        "-w",
        "/tmp",
        &name,
        "--",
        "sh",
        "-c",
        r#"echo "$K" "$(pwd)""#,
    ]);
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "V w /tmp\n");
}

#[test]
fn exec_forwards_stdin_and_keeps_streams_separate() {
    let env = TestEnv::new();
    let name = unique_name("stdio");
    let _guard = KeptGuard::new(&name);
    assert_code(&env.run_kept(&name, &[], &["true"]), 0);
    let out = env
        .cmd()
        .args(["exec", &name, "--", "sh", "-c", "sort -r; echo err >&2"])
        .write_stdin("a\nb\n")
        .output()
        .unwrap();
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "b\na\n");
    assert!(stderr(&out).contains("err"), "{}", stderr(&out));
}

#[test]
fn exec_timeout_kills_the_whole_tree() {
    let env = TestEnv::new();
    let name = unique_name("extmo");
    let _guard = KeptGuard::new(&name);
    assert_code(&env.run_kept(&name, &[], &["true"]), 0);
    let out = env.run(&[
        "exec",
        "--timeout",
        "2s",
        &name,
        "--",
        "sh",
        "-c",
        "sleep 3001 & (sleep 3002 &); sleep 3003",
    ]);
    assert_code(&out, 124);
    // The sandbox lives on; nothing the timed-out command started may.
    let out = env.exec(&name, &["ps", "-o", "args"]);
    assert_code(&out, 0);
    let ps = stdout(&out);
    assert!(
        !ps.contains("sleep 300"),
        "processes of the timed-out command survived:\n{ps}"
    );
}

#[test]
fn exec_unknown_sandbox_is_125() {
    let env = TestEnv::new();
    let out = env.exec(&unique_name("nosuch"), &["true"]);
    assert_one_line_error(&out);
}

#[test]
fn list_info_stop_start_remove() {
    let env = TestEnv::new();
    let name = unique_name("life");
    let _guard = KeptGuard::new(&name);
    let out = env.run_kept(&name, &[], &["sh", "-c", "echo x > /tmp/x"]);
    assert_code(&out, 0);

    let out = env.run(&["sandbox", "list"]);
    assert_code(&out, 0);
    assert!(
        stdout(&out)
            .lines()
            .any(|l| l.split_whitespace().next() == Some(name.as_str())),
        "`sandbox list` does not show {name}:\n{}",
        stdout(&out)
    );

    let out = env.run(&["sandbox", "list", "--json"]);
    assert_code(&out, 0);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("`sandbox list --json` is not JSON ({e}): {}", stdout(&out)));
    let arr = list
        .as_array()
        .expect("`sandbox list --json` is not an array");
    let entry = arr
        .iter()
        .find(|e| e["name"] == name.as_str())
        .unwrap_or_else(|| panic!("{name} missing from {list}"));
    assert_eq!(entry["status"], "running", "{entry}");

    let out = env.sandbox("info", &name);
    assert_code(&out, 0);
    let info = stdout(&out);
    assert!(info.contains(&name) && info.contains("running"), "{info}");
    let out = env.run(&["sandbox", "info", "--json", &name]);
    assert_code(&out, 0);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["name"], name.as_str());

    let out = env.sandbox("stop", &name);
    assert_code(&out, 0);
    assert!(out.stdout.is_empty());
    assert!(
        stderr(&out).contains(&format!("stopped {name}")),
        "`sandbox stop` should say what it did: {:?}",
        stderr(&out)
    );
    let out = env.exec(&name, &["true"]);
    let line = assert_one_line_error(&out);
    assert!(line.contains("stopped"), "{line}");
    let out = env.run(&["sandbox", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let entry = list
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("stopped sandbox vanished from the list: {list}"));
    assert_eq!(entry["status"], "stopped");

    let out = env.sandbox("start", &name);
    assert_code(&out, 0);
    assert!(
        stderr(&out).contains(&format!("started {name}")),
        "{}",
        stderr(&out)
    );
    let out = env.exec(&name, &["cat", "/tmp/x"]);
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "x\n", "state survives stop/start");

    let out = env.sandbox("remove", &name);
    assert_code(&out, 0);
    assert!(
        !container_exists(&kept_object(&name)),
        "container remains after remove"
    );
    let out = env.run(&["sandbox", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        !list
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == name.as_str()),
        "{list}"
    );
    let out = env.sandbox("remove", &name);
    assert_one_line_error(&out);
    let out = env.exec(&name, &["true"]);
    assert_one_line_error(&out);
    let out = env.sandbox("info", &name);
    assert_one_line_error(&out);
}

#[test]
fn name_clash_is_125() {
    let env = TestEnv::new();
    let name = unique_name("clash");
    let _guard = KeptGuard::new(&name);
    let out = env.run_kept(&name, &[], &["sh", "-c", "echo first > /tmp/f"]);
    assert_code(&out, 0);
    let out = env.run_kept(&name, &[], &["true"]);
    let line = assert_one_line_error(&out);
    assert!(line.contains(&name), "{line}");
    // The existing sandbox is untouched.
    let out = env.exec(&name, &["cat", "/tmp/f"]);
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "first\n");
}

#[test]
fn invalid_names_are_125() {
    let env = TestEnv::new();
    for bad in ["-lead", "trail_", "a/b", "..", "a.b", &"x".repeat(64)] {
        let out = env.run_kept(bad, &[], &["true"]);
        assert_one_line_error(&out);
    }
}

#[test]
fn failed_creation_leaves_no_name_behind() {
    let env = TestEnv::new();
    let name = unique_name("badimg");
    let _guard = KeptGuard::new(&name);
    let out = env
        .run_with()
        .name(&name)
        .image("agentkernel-test/nope:1")
        .flags(&["--pull", "never"])
        .output(&["true"]);
    assert_one_line_error(&out);
    assert!(!container_exists(&kept_object(&name)));
    // The name is free again.
    let out = env.run_kept(&name, &[], &["true"]);
    assert_code(&out, 0);
}

#[test]
fn ttl_expiry_removes_the_sandbox_without_agentkernel() {
    let env = TestEnv::new();
    let name = unique_name("ttl");
    let guard = KeptGuard::new(&name);
    let out = env.run_kept(&name, &["--ttl", "5s"], &["true"]);
    assert_code(&out, 0);
    let container = guard.container();
    assert!(container_exists(&container), "kept sandbox not created");
    let start = Instant::now();
    // No agentkernel command runs from here on: the engine must remove it.
    while container_exists(&container) {
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "sandbox {name} (--ttl 5s) still exists after 40s"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn a_paused_sandbox_still_expires_without_a_later_command() {
    let env = TestEnv::new();
    let name = unique_name("stopttl");
    let guard = KeptGuard::new(&name);
    let out = env.run_kept(&name, &["--ttl", "5s"], &["true"]);
    assert_code(&out, 0);
    assert_code(&env.sandbox("pause", &name), 0);
    let container = guard.container();
    assert!(
        container_exists(&container),
        "paused sandbox vanished at once"
    );
    // Its keep-alive is frozen; nothing of ours runs from here but what `stop` left.
    let start = Instant::now();
    while container_exists(&container) {
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "paused sandbox {name} (--ttl 5s) still exists after 40s"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        !env.state_dir().join("sandboxes").join(&name).exists(),
        "its record outlived it"
    );
}

#[test]
fn ttl_counts_from_last_use() {
    let env = TestEnv::new();
    let name = unique_name("ttluse");
    let guard = KeptGuard::new(&name);
    assert_code(&env.run_kept(&name, &["--ttl", "6s"], &["true"]), 0);
    // A command longer than the TTL is not cut off, and the sandbox outlives it.
    let out = env.exec(&name, &["sh", "-c", "sleep 8; echo done"]);
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "done\n");
    let out = env.exec(&name, &["true"]);
    assert_code(&out, 0);
    poll_until(
        Duration::from_secs(40),
        "the sandbox should expire after its last use",
        || !container_exists(&guard.container()),
    );
}

#[test]
fn branch_names_and_reuses_the_sandbox() {
    let env = TestEnv::new();
    let repo = env.project_dir().join("myproj");
    std::fs::create_dir(&repo).unwrap();
    let git = std::process::Command::new("git")
        .args(["init", "-q", "-b", "feature/x"])
        .current_dir(&repo)
        .output()
        .expect("git is needed for the --branch tests");
    assert!(
        git.status.success(),
        "{}",
        String::from_utf8_lossy(&git.stderr)
    );
    let name = "myproj-feature-x";
    let guard = KeptGuard::new(name);
    // A leftover of an earlier, aborted run of this test would make this one meaningless.
    guard.remove_leftover();

    let out = env
        .cmd()
        .current_dir(&repo)
        .args([
            "run",
            "--branch",
            "-i",
            BUSYBOX,
            "sh",
            "-c",
            "echo from-first > /tmp/b",
        ])
        .output()
        .unwrap();
    assert_code(&out, 0);
    assert!(stderr(&out).contains(name), "{}", stderr(&out));
    assert!(container_exists(&guard.container()));

    let out = env
        .cmd()
        .current_dir(repo.join(".git"))
        .args(["run", "--branch", "-i", BUSYBOX, "cat", "/tmp/b"])
        .output()
        .unwrap();
    assert_code(&out, 0);
    assert_eq!(
        stdout(&out),
        "from-first\n",
        "the second --branch run should reuse the sandbox"
    );
    assert!(stderr(&out).contains(name), "{}", stderr(&out));
}

#[test]
fn branch_outside_git_is_125() {
    let env = TestEnv::new();
    let out = env.run_with().flags(&["--branch"]).output(&["true"]);
    let line = assert_one_line_error(&out);
    assert!(line.contains("git"), "{line}");
}

#[test]
fn racing_creators_of_one_name_have_one_winner() {
    let env = TestEnv::new();
    let name = unique_name("race");
    let _guard = KeptGuard::new(&name);
    let mut children: Vec<_> = (0..8)
        .map(|_| env.run_with().name(&name).keep().spawn(&["true"]))
        .collect();
    let outs: Vec<_> = children
        .drain(..)
        .map(|t| t.wait_output(Duration::from_secs(120)))
        .collect();
    let codes: Vec<i32> = outs.iter().map(code).collect();
    let winners = codes.iter().filter(|c| **c == 0).count();
    let losers = codes.iter().filter(|c| **c == AK_ERROR).count();
    assert!(
        winners == 1 && losers == 7,
        "expected one success and seven 125s, got {codes:?}; stderrs: {:#?}",
        outs.iter().map(stderr).collect::<Vec<_>>()
    );
    for o in outs.iter().filter(|o| code(o) == AK_ERROR) {
        assert_one_line_error(o);
    }
    let out = env.exec(&name, &["true"]);
    assert_code(&out, 0);
}

/// Regression: garbage collection in one state directory used to remove the
/// kept sandboxes of every other state directory on the same engine.
#[test]
fn kept_sandbox_survives_commands_from_another_state_dir() {
    let owner = TestEnv::new();
    let other = TestEnv::new();
    let name = unique_name("xhome");
    let guard = KeptGuard::new(&name);
    assert_code(
        &owner.run(&["run", "--name", &name, "-i", BUSYBOX, "true"]),
        0,
    );
    // Another user / another AGENTKERNEL_HOME runs an ordinary one-shot command.
    assert_code(&other.run(&["run", "-i", BUSYBOX, "true"]), 0);
    assert!(
        container_exists(&guard.container()),
        "a one-shot `run` with another AGENTKERNEL_HOME removed kept sandbox {name}"
    );
    assert_code(&other.run(&["sandbox", "list"]), 0);
    let out = owner.run(&["exec", &name, "--", "true"]);
    assert_code(&out, 0);
}

#[test]
fn ttl_implies_keep_and_first_command_gets_stdin() {
    let env = TestEnv::new();
    let out = env
        .cmd()
        .args(["run", "--ttl", "10m", "-i", BUSYBOX, "sort", "-r"])
        .write_stdin("a\nb\n")
        .output()
        .unwrap();
    let name = generated_name(&stderr(&out));
    let _guard = name.as_deref().map(KeptGuard::new);
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "b\na\n");
    let name = name.unwrap_or_else(|| panic!("--ttl did not keep a sandbox: {}", stderr(&out)));
    assert_code(&env.exec(&name, &["true"]), 0);
}

#[test]
fn exec_exit_codes() {
    let env = TestEnv::new();
    let name = unique_name("excodes");
    let _guard = KeptGuard::new(&name);
    assert_code(&env.run_kept(&name, &[], &["true"]), 0);
    assert_code(&env.exec(&name, &["no-such-command-xyz"]), 127);
    assert_code(&env.exec(&name, &["/etc/passwd"]), 126);
    assert_code(&env.exec(&name, &["sh", "-c", "kill -TERM $$"]), 143);
    // The sandbox itself is unharmed by its commands' failures.
    assert_code(&env.exec(&name, &["true"]), 0);
}

/// A SIGTERM sent to `agentkernel exec` as soon as the command is running
/// reaches the command. Repeated, because the engine reports an exec's PID
/// only a moment after the exec has started producing output.
#[test]
fn exec_forwards_sigterm() {
    let env = TestEnv::new();
    let name = unique_name("exsig");
    let _guard = KeptGuard::new(&name);
    assert_code(&env.run_kept(&name, &[], &["true"]), 0);
    for attempt in 1..=8 {
        let mut t = env.spawn(&[
            "exec",
            &name,
            "--",
            "sh",
            "-c",
            "trap 'echo got-term; exit 9' TERM; echo ready; while :; do sleep 1; done",
        ]);
        let out = t.child().stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(60)).as_deref(),
            Ok("ready")
        );
        t.signal(libc::SIGTERM);
        let pid = t.pid;
        let out = t
            .wait_output_within(Duration::from_secs(15))
            .unwrap_or_else(|| {
                panic!(
                    "attempt {attempt}: SIGTERM to `agentkernel exec` (pid {pid}) sent right after the \
                     command printed `ready` never reached the command (still running after 15s)"
                )
            });
        assert_eq!(out.status.code(), Some(9), "attempt {attempt}");
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)).as_deref(),
            Ok("got-term")
        );
    }
    assert_code(&env.exec(&name, &["true"]), 0);
}

/// Every path under `root` (not following symlinks: the shared image store
/// is linked in), directories first.
fn state_paths(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![root.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        let dir = out[i].clone();
        i += 1;
        let is_dir = std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir());
        if let (true, Ok(entries)) = (is_dir, std::fs::read_dir(&dir)) {
            out.extend(entries.flatten().map(|e| e.path()));
        }
    }
    out
}

/// A kept sandbox's secrets (its `-e` environment, what it wrote into its
/// copy-on-write workspace) must not be readable by another local user, and
/// that user cannot remove it. The state directory starts 0755, as older
/// versions left it: the first command closes it up.
#[test]
fn state_is_private_to_its_owner() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    const OTHER_UID: u32 = 4391;
    let env = TestEnv::new();
    std::fs::set_permissions(env.state_dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let name = unique_name("private");
    let _guard = KeptGuard::new(&name);
    let token = format!("tok-{}", unique_name("s3cret"));
    let written = format!("written-{}", unique_name("cow"));
    let out = env
        .run_with()
        .name(&name)
        .env(&format!("API_TOKEN={token}"))
        .output(&[
            "sh",
            "-c",
            &format!("echo {written} > /workspace/planted.txt"),
        ]);
    assert_code(&out, 0);
    assert!(!env.project_dir().join("planted.txt").exists());

    let paths = state_paths(env.state_dir());
    let holding = |needle: &str| -> Vec<std::path::PathBuf> {
        paths
            .iter()
            // Not the native disk cap's sparse workspace image (10 GiB):
            // what is written there is behind a mount, in ext4's blocks.
            .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() < 64 << 20))
            .filter(|p| {
                std::fs::read(p)
                    .is_ok_and(|d| d.windows(needle.len()).any(|w| w == needle.as_bytes()))
            })
            .cloned()
            .collect()
    };
    // Where they are on disk depends on the backend (Podman keeps the
    // workspace's upper layer with the container, Docker the environment).
    if is_native() {
        // The upper layer lives in the disk cap's ext4 image (disk.rs).
        assert!(
            paths.iter().any(|p| p.ends_with("scratch/workspace.ext4")),
            "the copy-on-write layer's image should be under the state directory"
        );
    } else if backend() != "podman" {
        assert!(
            !holding(&written).is_empty(),
            "the copy-on-write upper layer should be under the state directory"
        );
    }
    if is_native() {
        assert!(!holding(&token).is_empty(), "plan.json should hold the env");
    }

    // Another user tries to list every directory and read every file.
    let list = paths
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("\n");
    let mut other = std::process::Command::new("sh")
        .args([
            "-c",
            "while IFS= read -r p; do \
               if [ -d \"$p\" ] && [ ! -L \"$p\" ]; then ls \"$p\" >/dev/null 2>&1 && echo \"LISTED $p\"; \
               elif [ ! -L \"$p\" ]; then cat \"$p\" >/dev/null 2>&1 && echo \"READ $p\"; fi; \
             done; true",
        ])
        .uid(OTHER_UID)
        .gid(OTHER_UID)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut other.stdin.take().unwrap(), list.as_bytes()).unwrap();
    let leaked = other.wait_with_output().unwrap();
    assert_eq!(
        stdout(&leaked),
        "",
        "another user reached agentkernel's state"
    );

    // Nor can that user remove the sandbox (it used to say "removed").
    let mut remove = env.std_cmd();
    remove
        .args(["sandbox", "remove", &name])
        .uid(OTHER_UID)
        .gid(OTHER_UID)
        .env("HOME", "/")
        .current_dir("/")
        .stdin(std::process::Stdio::null());
    let out = remove.output().unwrap();
    let err = assert_one_line_error(&out);
    assert!(err.contains("permission denied"), "{err}");
    let out = env.run(&["exec", &name, "cat", "/workspace/planted.txt"]);
    assert_code(&out, 0);
    assert_eq!(stdout(&out).trim(), written);
    let root_mode = std::fs::metadata(env.state_dir())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(root_mode & 0o777, 0o700, "the state root is {root_mode:o}");
}
