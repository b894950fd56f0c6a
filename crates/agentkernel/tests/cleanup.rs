//! Nothing is left behind: no containers of our runs, no scratch directories,
//! and what a `kill -9`ed agentkernel left is removed by a later command.

mod common;

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use common::*;

#[test]
fn normal_and_failed_runs_leave_nothing() {
    let env = TestEnv::new();
    std::fs::write(env.project_dir().join("f.txt"), "x\n").unwrap();
    let cases: &[(&[&str], i32)] = &[
        (&["-i", BUSYBOX, "true"], 0),
        (
            &[
                "-i",
                BUSYBOX,
                "sh",
                "-c",
                "echo hi > /workspace/f.txt; exit 7",
            ],
            7,
        ),
        (&["-i", BUSYBOX, "no-such-command-xyz"], 127),
        (&["-i", BUSYBOX, "/etc/passwd"], 126),
        (&["-i", BUSYBOX, "--timeout", "1s", "sleep", "30"], 124),
        (
            &[
                "-i",
                BUSYBOX,
                "--memory",
                "16m",
                "sh",
                "-c",
                "x=a; while :; do x=$x$x; done",
            ],
            137,
        ),
        (
            &["-i", "agentkernel-test/nope:1", "--pull", "never", "true"],
            125,
        ),
        (&["-p", "restrictive", "-i", BUSYBOX, "true"], 0),
        (&["-p", "permissive", "-i", BUSYBOX, "true"], 0),
    ];
    for (args, expected) in cases {
        let mut full = vec!["run"];
        full.extend_from_slice(args);
        let (out, owner) = env.run_tracked(&full);
        assert_code(&out, *expected);
        if backend() == "qemu" {
            // A warm VM the run claimed is ended by its holder once the
            // command's end is relayed (detached from the run, as native's
            // cleanup is): it must go, within seconds.
            poll_until(
                Duration::from_secs(10),
                &format!("`agentkernel {}` left a VM behind", full.join(" ")),
                || containers_of_owner(&owner).is_empty(),
            );
        }
        assert!(
            containers_of_owner(&owner).is_empty(),
            "`agentkernel {}` left a container behind",
            full.join(" ")
        );
        assert!(
            env.leftover_runs().is_empty(),
            "`agentkernel {}` left {:?}",
            full.join(" "),
            env.leftover_runs()
        );
    }
    assert_eq!(
        std::fs::read_to_string(env.project_dir().join("f.txt")).unwrap(),
        "x\n"
    );
    // Runs served by the warm pool leave their container to a detached
    // refill: once those are done, only unused warm containers remain.
    assert!(env.wait_for_refills(Duration::from_secs(60)));
    for c in env.labelled_containers(Some("pool")) {
        assert!(
            !env.is_claimed(&c),
            "used pool container {c} was left behind"
        );
    }
    let pool_dirs = std::fs::read_dir(env.state_dir().join("pool/containers"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_else(|_| Vec::<String>::new());
    for d in pool_dirs {
        assert!(
            container_exists(&d),
            "pool record {d} outlived its container"
        );
    }
}

/// Nothing the command started outlives the run: a writer it left in the
/// background (ignoring SIGHUP and SIGTERM), appending to a host directory
/// as fast as it can, has stopped by the time `run` returns.
#[test]
fn no_process_of_the_sandbox_outlives_the_run() {
    let env = TestEnv::new();
    let beats = env.home_dir().join("beats");
    std::fs::create_dir(&beats).unwrap();
    let volume = format!("{}:/beats", beats.display());
    let out = env.run(&[
        "run",
        "-v",
        &volume,
        "-i",
        BUSYBOX,
        "sh",
        "-c",
        "(trap '' HUP TERM; while :; do echo beat >> /beats/log; done) & sleep 0.5; echo left",
    ]);
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "left\n");
    let written = || std::fs::metadata(beats.join("log")).map_or(0, |m| m.len());
    let at_return = written();
    assert!(at_return > 0, "the background writer never wrote");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        written(),
        at_return,
        "a process of the sandbox still wrote after `run` returned"
    );
}

#[test]
fn engine_side_start_failure_leaves_nothing() {
    let env = TestEnv::new();
    // A workdir that is a file: the engine refuses to start the container.
    let (out, owner) = env.run_tracked(&["run", "-i", BUSYBOX, "-w", "/etc/passwd", "true"]);
    assert_one_line_error(&out);
    assert!(containers_of_owner(&owner).is_empty());
    assert!(env.leftover_runs().is_empty(), "{:?}", env.leftover_runs());
}

/// Starts `sleep 60` in a one-shot run, SIGKILLs agentkernel, and returns the
/// orphaned container's owner label (and the sandbox's name) once it is
/// confirmed left behind.
fn orphan(env: &TestEnv) -> (String, String) {
    orphan_after(env, |_| {})
}

/// [`orphan`], calling `before_kill` with agentkernel's pid first.
fn orphan_after(env: &TestEnv, before_kill: impl FnOnce(u32)) -> (String, String) {
    let mut t = env.spawn(&["run", "-i", BUSYBOX, "sleep", "60"]);
    let sandbox = t.wait_running(Duration::from_secs(30));
    before_kill(t.child().id());
    t.signal(libc::SIGKILL);
    let status = wait_child(t.child(), Duration::from_secs(10));
    assert_eq!(
        status.code(),
        None,
        "agentkernel should have died of SIGKILL"
    );
    // From here the product, not the test's guard, must clean up.
    let owner = t.disarm();
    // No precondition that the container is still there: with the suite
    // running in parallel, another test's agentkernel may already have
    // collected it (its owner is provably dead), which is the behaviour under
    // test. What must hold is checked by the callers: it ends up gone.
    // Docker's copy-on-write workspace keeps its layers in our scratch space
    // (only our own state dir's agentkernel removes it); Podman's `:O` bind
    // keeps them with the container.
    if backend() == "docker" {
        assert!(
            !env.leftover_runs().is_empty(),
            "precondition: a SIGKILLed moderate run leaves its scratch directory"
        );
    }
    (owner, sandbox)
}

/// Native: the orphan's processes die with it (init has PDEATHSIG, and the
/// pid namespace dies with init); its cgroup, network lease and scratch
/// directory must be collected.
fn assert_native_orphan_collected(env: &TestEnv, sandbox: &str) {
    poll_until(
        Duration::from_secs(10),
        "the orphaned native sandbox's cgroup, lease and scratch dir should be removed",
        || !native_sandbox_exists(sandbox),
    );
    assert!(env.leftover_runs().is_empty());
}

/// Removes whatever the orphan left if the product did not (so a failing test does not leak).
struct OrphanGuard(String);

impl Drop for OrphanGuard {
    fn drop(&mut self) {
        // Native sandboxes and VMs die with their process: nothing to remove.
        if uses_own_image_store() {
            return;
        }
        for name in containers_of_owner(&self.0) {
            let _ = engine(&["rm", "-f", "-v", &name]);
        }
    }
}

#[test]
fn sandbox_gc_removes_what_a_killed_run_left() {
    let env = TestEnv::new();
    let (owner, sandbox) = orphan(&env);
    let _guard = OrphanGuard(owner.clone());
    let out = env.run(&["sandbox", "gc"]);
    assert_code(&out, 0);
    assert!(out.stdout.is_empty(), "{}", stdout(&out));
    poll_until(
        Duration::from_secs(30),
        "`sandbox gc` should remove the orphaned container",
        || containers_of_owner(&owner).is_empty(),
    );
    poll_until(
        Duration::from_secs(10),
        "`sandbox gc` should remove the orphaned scratch directory",
        || env.leftover_runs().is_empty(),
    );
    if is_native() {
        assert_native_orphan_collected(&env, &sandbox);
    }
}

/// Two collectors racing for one orphan (every `run` collects in the
/// background too): neither returns while the orphan is still there, even
/// when the engine refuses the second removal because the first is under way.
#[test]
fn racing_gcs_each_return_only_once_the_orphan_is_gone() {
    let env = TestEnv::new();
    let (owner, sandbox) = orphan(&env);
    let _guard = OrphanGuard(owner.clone());
    let gc = || {
        env.std_cmd()
            .args(["sandbox", "gc"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn agentkernel sandbox gc")
    };
    let racers = [gc(), gc()];
    for mut racer in racers {
        let status = wait_child(&mut racer, Duration::from_secs(60));
        assert_eq!(status.code(), Some(0));
        assert!(
            containers_of_owner(&owner).is_empty(),
            "a `sandbox gc` returned while the orphan was still there"
        );
    }
    if is_native() {
        assert_native_orphan_collected(&env, &sandbox);
    }
}

#[test]
fn a_later_run_removes_what_a_killed_run_left() {
    let env = TestEnv::new();
    let (owner, sandbox) = orphan(&env);
    let _guard = OrphanGuard(owner.clone());
    let (out, later) = env.run_tracked(&["run", "-i", BUSYBOX, "true"]);
    assert_code(&out, 0);
    poll_until(
        Duration::from_secs(30),
        "a later `run` should remove the orphaned container",
        || containers_of_owner(&owner).is_empty(),
    );
    assert!(containers_of_owner(&later).is_empty());
    poll_until(
        Duration::from_secs(10),
        "a later `run` should remove the orphaned scratch directory",
        || env.leftover_runs().is_empty(),
    );
    if is_native() {
        assert_native_orphan_collected(&env, &sandbox);
    }
}

#[test]
fn live_runs_are_not_collected() {
    let env = TestEnv::new();
    let other = TestEnv::new();
    // The command waits for a line on stdin, so it lives as long as the test needs.
    let mut cmd = env.std_cmd();
    cmd.args(["run", "-i", BUSYBOX, "sh", "-c", "read x; echo survived-$x"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut t = Tracked::spawn(cmd);
    let container = t.wait_running(Duration::from_secs(30));
    // Collection from this and another state directory must spare a live run.
    assert_code(&env.run(&["sandbox", "gc"]), 0);
    assert_code(&other.run(&["sandbox", "gc"]), 0);
    assert_code(&other.run(&["run", "-i", BUSYBOX, "true"]), 0);
    assert!(
        container_exists(&container),
        "gc removed a live run's container"
    );
    let mut stdin = t.child().stdin.take().unwrap();
    stdin.write_all(b"go\n").unwrap();
    drop(stdin);
    let out = t.wait_output(Duration::from_secs(60));
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "survived-go\n");
}

/// The warm pool exists on Docker and Podman only.
mod engine_only {
    use super::*;

    #[test]
    fn what_a_killed_pooled_run_left_is_collected() {
        let env = TestEnv::new();
        env.warm_up(&["run", "-i", BUSYBOX, "true"]);
        let mut t = env.spawn(&["run", "-i", BUSYBOX, "sleep", "60"]);
        let mut used = Vec::new();
        poll_until(
            Duration::from_secs(30),
            "the run should claim a warm container",
            || {
                used = env.claimed_by(&t.owner);
                !used.is_empty()
            },
        );
        let used = used.pop().unwrap();
        // Give the exec a moment to start before the kill.
        poll_until(Duration::from_secs(30), "sleep 60 running", || {
            String::from_utf8_lossy(&engine(&["top", &used]).stdout).contains("sleep 60")
        });
        // The warm-up's detached refill collects dead claimants when it ends:
        // let it finish first, or it may collect this one before we look.
        assert!(env.wait_for_refills(Duration::from_secs(60)));
        t.signal(libc::SIGKILL);
        wait_child(t.child(), Duration::from_secs(10));
        t.disarm();
        assert!(
            container_exists(&used),
            "precondition: a SIGKILLed agentkernel leaves its pool container"
        );
        // Later commands remove it (gc gives a claimed container a grace period
        // for its refill, so keep asking).
        poll_until(
            Duration::from_secs(120),
            "later `sandbox gc` runs should remove the killed run's pool container",
            || {
                let _ = env.run(&["sandbox", "gc"]);
                !container_exists(&used)
            },
        );
    }
}

mod native_only {
    use super::*;

    /// The run's cleanup process, started beside the command (waited for
    /// up to 10 s: the sandbox may be seen running before "go").
    fn cleanup_process_of(supervisor: u32) -> Option<i32> {
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Some(pid) = child_outside_the_sandbox(supervisor) {
                return Some(pid);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The child of agentkernel (`supervisor`) that is not in the sandbox's
    /// pid namespace (init is).
    fn child_outside_the_sandbox(supervisor: u32) -> Option<i32> {
        let children =
            std::fs::read_to_string(format!("/proc/{supervisor}/task/{supervisor}/children"))
                .ok()?;
        children
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .find(|pid: &i32| {
                std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|status| {
                    status
                        .lines()
                        .any(|l| l.starts_with("NSpid:") && l.split_whitespace().count() == 2)
                })
            })
    }

    /// A SIGKILLed run cleans up after itself: its cleanup process,
    /// started beside the command, sees agentkernel die and removes the
    /// sandbox's cgroup, lease and scratch dir with no later command (a
    /// scratch dir in this test's own state dir, which nothing else
    /// collects).
    #[test]
    fn a_killed_run_cleans_up_without_a_later_command() {
        let env = TestEnv::new();
        let mut cleanup = None;
        let (_owner, sandbox) = orphan_after(&env, |pid| cleanup = cleanup_process_of(pid));
        assert!(cleanup.is_some(), "no cleanup process beside the command");
        poll_until(
            Duration::from_secs(10),
            "the killed run's cleanup process should remove its scratch dir",
            || env.leftover_runs().is_empty(),
        );
        assert_native_orphan_collected(&env, &sandbox);
    }

    /// A finished run's scratch dir waits in `finished/` for the run's
    /// cleanup process (the caller already has its exit code). If that
    /// process is killed, gc must collect it and the run's cgroup like any
    /// dead run's. The state it leaves is made from a real killed run
    /// whose cleanup process was killed first: its scratch dir moved where
    /// the supervisor moves it when the command ends.
    #[test]
    fn gc_collects_what_a_killed_cleanup_process_left() {
        let env = TestEnv::new();
        let (_owner, sandbox) = orphan_after(&env, |pid| {
            let cleanup = cleanup_process_of(pid).expect("the run's cleanup process");
            // SAFETY: kill takes plain integers.
            assert_eq!(unsafe { libc::kill(cleanup, libc::SIGKILL) }, 0);
        });
        let runs = env.leftover_runs();
        assert_eq!(
            runs.len(),
            1,
            "precondition: the killed run's scratch dir: {runs:?}"
        );
        let finished = env.state_dir().join("finished");
        std::fs::create_dir_all(&finished).unwrap();
        let moved = finished.join(runs[0].file_name().unwrap());
        std::fs::rename(&runs[0], &moved).unwrap();
        assert_code(&env.run(&["sandbox", "gc"]), 0);
        poll_until(
            Duration::from_secs(10),
            "`sandbox gc` should remove the finished run's scratch dir",
            || !moved.exists(),
        );
        assert_native_orphan_collected(&env, &sandbox);
    }
}
