//! Standard streams and signals: stdin forwarded, stdout/stderr separate and
//! live, SIGTERM reaches the command and the sandbox is still cleaned up,
//! agentkernel's own messages never on stdout.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use common::*;

#[test]
fn stdin_is_forwarded_with_eof() {
    let env = TestEnv::new();
    let out = env
        .cmd()
        .args(["run", "-i", BUSYBOX, "sort", "-r"])
        .write_stdin("a\nb\n")
        .output()
        .unwrap();
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "b\na\n");
}

#[test]
fn large_binary_stdin_round_trips() {
    let env = TestEnv::new();
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let out = env
        .cmd()
        .args(["run", "-i", BUSYBOX, "cat"])
        .write_stdin(data.clone())
        .output()
        .unwrap();
    assert_code(&out, 0);
    assert!(
        out.stdout == data,
        "stdout differs from stdin ({} bytes back)",
        out.stdout.len()
    );
}

#[test]
fn stdout_and_stderr_stay_separate() {
    let env = TestEnv::new();
    let out = env.run(&[
        "run",
        "-i",
        BUSYBOX,
        "sh",
        "-c",
        "echo to-out; echo to-err >&2; echo more-out; echo more-err >&2",
    ]);
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "to-out\nmore-out\n");
    let err = stderr(&out);
    assert!(
        err.contains("to-err\n") && err.contains("more-err\n"),
        "stderr: {err:?}"
    );
    assert!(
        !err.contains("out"),
        "stdout text leaked to stderr: {err:?}"
    );
}

#[test]
fn output_streams_live() {
    let env = TestEnv::new();
    let mut child = env
        .std_cmd()
        .args([
            "run",
            "-i",
            BUSYBOX,
            "sh",
            "-c",
            "echo one; sleep 3; echo two",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    // The first line arrived while the command was still running (it sleeps
    // 3s before the second): output is not buffered until exit.
    let still_running = child.try_wait().unwrap().is_none();
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    let status = wait_child(&mut child, Duration::from_secs(60));
    assert_eq!(first, "one\n");
    assert_eq!(rest, "two\n");
    assert!(status.success(), "{status}");
    assert!(
        still_running,
        "the first line only arrived after agentkernel exited: output is not streamed live"
    );
}

/// Spawns a run whose command prints `ready` once it is set up; returns when
/// that line has arrived (so agentkernel is supervising: its signal handlers
/// are installed before it pumps any output) with the rest of stdout to come.
fn spawn_ready(env: &TestEnv, script: &str) -> (Tracked, mpsc::Receiver<String>) {
    let mut t = env.spawn(&["run", "-i", BUSYBOX, "sh", "-c", script]);
    let out = t.child().stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = rx.recv_timeout(Duration::from_secs(60));
    assert_eq!(
        first.as_deref(),
        Ok("ready"),
        "the command never said it was ready"
    );
    (t, rx)
}

#[test]
fn sigterm_reaches_the_command_and_the_sandbox_is_removed() {
    let env = TestEnv::new();
    let (t, _rest) = spawn_ready(&env, "echo ready; exec sleep 60");
    let containers = t.containers();
    assert_eq!(containers.len(), 1, "{containers:?}");
    t.signal(libc::SIGTERM);
    let owner = t.owner.clone();
    let out = t.wait_output(Duration::from_secs(30));
    assert_code(&out, 143);
    let gone = || containers_of_owner(&owner).is_empty() && !container_exists(&containers[0]);
    if is_native() {
        // Native hands the caller its exit code first and tears the sandbox
        // down in a detached cleanup process (seen still running under load).
        poll_until(
            Duration::from_secs(30),
            "the terminated run's sandbox should be cleaned up",
            gone,
        );
    } else {
        // An engine's container is removed before the CLI exits.
        assert!(
            gone(),
            "container {} of the terminated run was left behind",
            containers[0]
        );
    }
    assert!(env.leftover_runs().is_empty(), "{:?}", env.leftover_runs());
}

#[test]
fn sigint_reaches_the_command() {
    let env = TestEnv::new();
    // The command traps INT and exits 7: the signal was delivered, not just the sandbox killed.
    let (t, rest) = spawn_ready(
        &env,
        "trap 'echo got-int; exit 7' INT; echo ready; while :; do sleep 1; done",
    );
    t.signal(libc::SIGINT);
    let owner = t.owner.clone();
    let out = t.wait_output(Duration::from_secs(30));
    assert_code(&out, 7);
    assert_eq!(
        rest.recv_timeout(Duration::from_secs(10)).as_deref(),
        Ok("got-int")
    );
    assert!(containers_of_owner(&owner).is_empty());
}

#[test]
fn own_messages_never_on_stdout() {
    let env = TestEnv::new();
    // Timeout message.
    let out = env.run(&["run", "--timeout", "1s", "-i", BUSYBOX, "sleep", "30"]);
    assert_code(&out, 124);
    assert!(out.stdout.is_empty(), "stdout: {}", stdout(&out));
    assert!(stderr(&out).contains("agentkernel"), "{}", stderr(&out));

    // OOM message.
    let out = env.run(&[
        "run",
        "--memory",
        "16m",
        "-i",
        BUSYBOX,
        "sh",
        "-c",
        "x=a; while :; do x=$x$x; done",
    ]);
    assert_code(&out, 137);
    assert!(out.stdout.is_empty(), "stdout: {}", stdout(&out));

    // Kept-sandbox message.
    let name = unique_name("io-msg");
    let _guard = KeptGuard::new(&name);
    let out = env.run_kept(&name, &[], &["true"]);
    assert_code(&out, 0);
    assert!(out.stdout.is_empty(), "stdout: {}", stdout(&out));
    assert!(stderr(&out).contains(&name), "{}", stderr(&out));

    // Error messages.
    let out = env.run(&[
        "run",
        "-i",
        "agentkernel-test/nope:1",
        "--pull",
        "never",
        "true",
    ]);
    assert_code(&out, 125);
    assert!(out.stdout.is_empty(), "stdout: {}", stdout(&out));

    // Not-mounted warning (cwd is the home directory).
    let out = env
        .cmd()
        .current_dir(env.home_dir())
        .args(["run", "-i", BUSYBOX, "echo", "hi"])
        .output()
        .unwrap();
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "hi\n");
    assert!(stderr(&out).contains("warning"), "{}", stderr(&out));
}

#[test]
fn a_terminal_is_given_only_when_on_a_terminal() {
    let env = TestEnv::new();
    // The pause keeps the command alive until the engine's terminal attach is
    // complete: Podman reports a broken attach pipe when a TTY command exits
    // before its stdin stream is connected (a Podman race, not the question here).
    let script = "if [ -t 0 ] && [ -t 1 ]; then echo in-tty; else echo no-tty; fi; sleep 1";
    // Without a terminal (as in every other test).
    let out = env.run(&["run", "-i", BUSYBOX, "sh", "-c", script]);
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "no-tty\n");
    // Under a pseudo-terminal made by util-linux `script`.
    let inner = format!("{} run -i {BUSYBOX} sh -c '{script}'", binary().display());
    let mut cmd = std::process::Command::new("script");
    env.configure(&mut cmd);
    cmd.args(["-qec", &inner, "/dev/null"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t = Tracked::spawn(cmd);
    let out = t.wait_output(Duration::from_secs(60));
    assert_code(&out, 0);
    assert!(
        stdout(&out).contains("in-tty"),
        "no TTY inside although agentkernel ran on one: {:?}",
        stdout(&out)
    );
}
