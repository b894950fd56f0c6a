//! Exit codes (the README's exit code table).

mod common;

use std::time::Duration;

use common::*;

#[test]
fn command_exit_code_is_passed_through() {
    let env = TestEnv::new();
    for n in ["0", "1", "3", "42", "255"] {
        let out = env.run(&["run", "-i", BUSYBOX, "sh", "-c", &format!("exit {n}")]);
        assert_code(&out, n.parse().unwrap());
    }
}

#[test]
fn command_not_found_is_127() {
    let env = TestEnv::new();
    let out = env.run(&["run", "-i", BUSYBOX, "no-such-command-xyz"]);
    assert_code(&out, 127);
    assert!(out.stdout.is_empty());
    assert!(
        stderr(&out).contains("no-such-command-xyz"),
        "stderr should name the command: {}",
        stderr(&out)
    );
}

#[test]
fn command_not_found_inside_shell_is_127() {
    let env = TestEnv::new();
    let out = env.run(&["run", "-i", BUSYBOX, "sh", "-c", "no-such-command-xyz"]);
    assert_code(&out, 127);
}

#[test]
fn command_not_executable_is_126() {
    let env = TestEnv::new();
    let out = env.run(&["run", "-i", BUSYBOX, "/etc/passwd"]);
    assert_code(&out, 126);
    assert!(out.stdout.is_empty());
}

#[test]
fn killed_by_sigterm_is_143() {
    let env = TestEnv::new();
    let out = env.run(&["run", "-i", BUSYBOX, "sh", "-c", "kill -TERM $$"]);
    assert_code(&out, 143);
}

#[test]
fn killed_by_sigint_is_130() {
    let env = TestEnv::new();
    let out = env.run(&["run", "-i", BUSYBOX, "sh", "-c", "kill -INT $$"]);
    assert_code(&out, 130);
}

#[test]
fn killed_by_sigkill_is_137_without_oom_message() {
    let env = TestEnv::new();
    let out = env.run(&["run", "-i", BUSYBOX, "sh", "-c", "kill -KILL $$"]);
    assert_code(&out, 137);
    assert!(
        !stderr(&out).contains("out of memory"),
        "a plain SIGKILL was reported as OOM: {}",
        stderr(&out)
    );
}

#[test]
fn memory_limit_oom_is_137_and_named_on_stderr() {
    let env = TestEnv::new();
    // Doubling a shell string until it cannot fit in 16 MiB.
    let out = env.run(&[
        "run",
        "--memory",
        "16m",
        "--timeout",
        "60s",
        "-i",
        BUSYBOX,
        "sh",
        "-c",
        "x=a; while :; do x=$x$x; done",
    ]);
    assert_code(&out, 137);
    // Podman reports OOMKilled only when the container's init is the victim,
    // and removes the cgroup (with its OOM counter) before the wait returns:
    // the normal (unpooled) path there can report only the 137. README says so.
    if backend() != "podman" {
        assert!(
            stderr(&out).to_lowercase().contains("out of memory"),
            "stderr should name the OOM kill: {}",
            stderr(&out)
        );
    }
    assert!(out.stdout.is_empty(), "{}", stdout(&out));
}

#[test]
fn timeout_is_124_and_kills_the_whole_tree() {
    let env = TestEnv::new();
    // Unique sleep durations identify this test's processes on the host.
    let a = format!("{}", 30_000 + std::process::id() % 10_000);
    let b = format!("{}", 40_000 + std::process::id() % 10_000);
    let script = format!("sleep {a} & (sleep {b} &) ; sleep {a}");
    let (out, owner) =
        env.run_tracked(&["run", "--timeout", "2s", "-i", BUSYBOX, "sh", "-c", &script]);
    assert_code(&out, 124);
    assert!(
        stderr(&out).contains("timed out"),
        "stderr should say it timed out: {}",
        stderr(&out)
    );
    poll_until(
        Duration::from_secs(10),
        "the timed-out command's processes should all be gone",
        || host_processes_with_arg(&a).is_empty() && host_processes_with_arg(&b).is_empty(),
    );
    assert!(containers_of_owner(&owner).is_empty());
}

#[test]
fn timeout_not_reached_keeps_the_commands_code() {
    let env = TestEnv::new();
    let out = env.run(&[
        "run",
        "--timeout",
        "60s",
        "-i",
        BUSYBOX,
        "sh",
        "-c",
        "exit 5",
    ]);
    assert_code(&out, 5);
}

#[test]
fn unknown_image_is_125_naming_the_image() {
    let env = TestEnv::new();
    let out = env.run(&[
        "run",
        "-i",
        "agentkernel-test/nope:1",
        "--pull",
        "never",
        "true",
    ]);
    let line = assert_one_line_error(&out);
    assert!(line.contains("agentkernel-test/nope:1"), "{line}");
}

mod engine_only {
    use std::io::BufRead as _;
    use std::time::{Duration, Instant};

    use super::common::*;

    /// Attaches to the container's init (PID 1) with ptrace, which stops it:
    /// signals forwarded to the container then reach nobody.
    const STOP_INIT: &str = "\
import ctypes, sys, time
libc = ctypes.CDLL(None, use_errno=True)
if libc.ptrace(16, 1, 0, 0) != 0:
    print('attach failed', ctypes.get_errno(), flush=True)
    sys.exit(3)
print('attached', flush=True)
time.sleep(600)
";

    #[test]
    fn sigterm_ends_the_run_even_when_the_command_stops_init() {
        let env = TestEnv::new();
        let mut run = env.spawn(&[
            "run",
            "--fast=false",
            "-p",
            "moderate",
            "-i",
            PYTHON,
            "python3",
            "-c",
            STOP_INIT,
        ]);
        let stdout = run.child().stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the probe said nothing");
        assert_eq!(line, "attached\n", "the probe could not stop init");

        run.signal(libc::SIGTERM);
        let asked = Instant::now();
        let owner = run.owner.clone();
        let out = run
            .wait_output_within(Duration::from_secs(15))
            .expect("agentkernel run did not exit within 15 s of SIGTERM");
        eprintln!("exited {:?} after {:?}", out.status, asked.elapsed());
        assert_ne!(code(&out), 0, "{}", stderr(&out));
        assert!(
            containers_of_owner(&owner).is_empty(),
            "the container outlived the run"
        );
    }
}
