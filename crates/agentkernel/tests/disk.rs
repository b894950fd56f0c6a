//! The disk cap of writable layers (`--disk`, the profiles' defaults): a
//! command that writes past it gets "No space left on device" inside, and
//! the host's disk never holds more than the cap for it.

mod common;

use common::*;

/// Writes `mib` MiB of zeros to `path` in the sandbox and prints ENOSPC if
/// the write stopped at a full filesystem, else what happened. (dd's message
/// is kept in a variable: once the root layer is full, no file can hold it.)
fn fill(path: &str, mib: u32) -> String {
    format!(
        "err=$(dd if=/dev/zero of={path} bs=1M count={mib} 2>&1 >/dev/null); \
         case \"$err\" in *'No space'*) echo ENOSPC;; *) echo \"WROTE $err\";; esac"
    )
}

/// The restrictive profile's only writable place, `/tmp`, is a sized tmpfs
/// on every backend.
#[test]
fn restrictive_tmp_is_capped_everywhere() {
    let env = TestEnv::new();
    let out = env.run(&[
        "run",
        "-p",
        "restrictive",
        "-i",
        BUSYBOX,
        "sh",
        "-c",
        "dd if=/dev/zero of=/tmp/big bs=1M count=100 2>&1 | grep -c 'No space'",
    ]);
    assert_code(&out, 0);
    assert_eq!(stdout(&out).trim(), "1", "{}", stderr(&out));
}

mod engine_only {
    use super::*;

    /// Docker and Podman cannot cap a container's writable layer here: an
    /// explicit `--disk` they would silently ignore is refused up front.
    #[test]
    fn an_explicit_disk_cap_the_engine_cannot_enforce_is_refused() {
        assert!(!is_native(), "engine-only test run on native");
        let env = TestEnv::new();
        let out = env.run(&["run", "--disk", "1g", "-i", BUSYBOX, "true"]);
        let line = assert_one_line_error(&out);
        assert!(
            line.contains("--disk") && line.contains("-B native"),
            "{line}"
        );
        assert!(env.leftover_runs().is_empty(), "scratch left behind");
        assert!(
            env.labelled_containers(None).is_empty(),
            "container left behind"
        );
    }
}

mod native_only {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn native() -> TestEnv {
        assert!(is_native(), "native-only test run on {}", backend());
        TestEnv::new()
    }

    /// Native runs served by the file-backed pool of attached devices, as
    /// with the disk keeper switched off.
    fn native_without_keeper() -> TestEnv {
        native().with_env("AGENTKERNEL_DISK_KEEPER", "off")
    }

    /// Loop devices backed by a file under `dir` (the workspace images), but
    /// for the ones attached ahead for later runs (`<dir>/disk-pool/`,
    /// bounded: see `the_disk_pool_is_bounded_never_reused_and_pruned`).
    fn loop_devices_under(dir: &std::path::Path) -> Vec<String> {
        let pool = dir.join("disk-pool/");
        all_loop_devices_under(dir)
            .into_iter()
            .filter(|(_, file)| !file.starts_with(&*pool.to_string_lossy()))
            .map(|(dev, file)| format!("{dev}: {file}"))
            .collect()
    }

    /// (device, backing file) of every loop device backed by a file under `dir`.
    fn all_loop_devices_under(dir: &std::path::Path) -> Vec<(String, String)> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/sys/block").unwrap().flatten() {
            let backing = entry.path().join("loop/backing_file");
            if let Ok(file) = std::fs::read_to_string(&backing) {
                if file.trim().starts_with(&*dir.to_string_lossy()) {
                    found.push((
                        entry.file_name().to_string_lossy().into_owned(),
                        file.trim().to_string(),
                    ));
                }
            }
        }
        found
    }

    #[test]
    fn writes_past_the_cap_fail_in_the_workspace_and_the_root() {
        let env = native();
        std::fs::write(env.project_dir().join("kept.txt"), "host copy\n").unwrap();
        let script = format!(
            "{}; {}; cat /workspace/kept.txt",
            fill("/workspace/big", 64),
            fill("/big", 64)
        );
        let out = env.run(&["run", "--disk", "32m", "-i", BUSYBOX, "sh", "-c", &script]);
        assert_code(&out, 0);
        assert_eq!(
            stdout(&out),
            "ENOSPC\nENOSPC\nhost copy\n",
            "both writable layers must stop at 32 MiB: {}",
            stderr(&out)
        );
        // The host copy never changed, nothing was added to it.
        let names: Vec<_> = std::fs::read_dir(env.project_dir())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("kept.txt")]);
        assert!(env.leftover_runs().is_empty(), "scratch left behind");
        // The run's cleanup process unmounts the disk after the caller has
        // its exit code: the loop device goes a moment later.
        poll_until(
            std::time::Duration::from_secs(10),
            "loop device released after the run",
            || loop_devices_under(env.state_dir()).is_empty(),
        );
    }

    /// Without `--disk` the profile's cap applies: what the sandbox sees as
    /// the size of `/` and `/workspace` is the moderate profile's 10 GiB, not
    /// the host's disk.
    #[test]
    fn the_moderate_profile_caps_both_layers_at_10_gib() {
        let env = native();
        let out = env.run(&[
            "run",
            "-i",
            BUSYBOX,
            "sh",
            "-c",
            "df -k / | tail -1 | awk '{print $2}'; df -k /workspace | tail -1 | awk '{print $2}'",
        ]);
        assert_code(&out, 0);
        let sizes: Vec<u64> = stdout(&out)
            .lines()
            .map(|l| l.trim().parse().unwrap())
            .collect();
        let gib = 1024 * 1024; // in KiB
        for size in &sizes {
            assert!(
                (9 * gib..=10 * gib).contains(size),
                "a writable layer of {size} KiB, expected ~10 GiB: {sizes:?}"
            );
        }
        assert_eq!(sizes.len(), 2);
    }

    /// Runs of data in a sparse file (`SEEK_DATA`/`SEEK_HOLE`).
    fn data_runs(path: &std::path::Path) -> Vec<(i64, i64)> {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open(path).unwrap();
        let fd = file.as_raw_fd();
        let mut runs = Vec::new();
        let mut at = 0;
        loop {
            // SAFETY: lseek on a file we hold open.
            let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
            if data < 0 {
                break; // ENXIO: no data past `at`
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            runs.push((data, hole));
            at = hole;
        }
        runs
    }

    /// Each run copies the empty layer's template and removes the copy
    /// afterwards; the fewer places of it hold data, the cheaper both are (on
    /// a host disk mounted with `discard`, each freed run is trimmed). The
    /// 10 GiB template is its metadata in a few runs at the start: one flex
    /// group holds every group's bitmaps and no backup superblocks are
    /// spread across it (the first layout had 16 runs up to 8 GiB in).
    #[test]
    fn the_empty_layers_template_holds_its_metadata_in_a_few_places() {
        let env = native();
        assert_code(&env.run(&["run", "-i", BUSYBOX, "true"]), 0);
        let templates: Vec<_> = std::fs::read_dir(env.state_dir().join("disk-templates"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
            .collect();
        assert_eq!(templates.len(), 1, "{templates:?}");
        assert_eq!(std::fs::metadata(&templates[0]).unwrap().len(), 10 << 30);
        let runs = data_runs(&templates[0]);
        assert!(
            (1..=6).contains(&runs.len()),
            "the template's data is in {} places: {runs:?}",
            runs.len()
        );
        // All in the first flex group (its metadata), but for the last
        // blocks mkfs zeroes at the device's end.
        let early = runs.iter().filter(|(start, _)| *start < 1 << 30).count();
        assert!(early + 1 >= runs.len(), "{runs:?}");
    }

    /// The host file behind a kept sandbox's workspace layer never grows past
    /// the cap, however much the sandbox writes; the cap outlives each exec.
    #[test]
    fn a_kept_sandbox_cannot_grow_its_layer_on_the_host_past_the_cap() {
        let env = native();
        let name = unique_name("disk");
        let out = env.run(&[
            "run", "--name", &name, "--disk", "24m", "-i", BUSYBOX, "true",
        ]);
        assert_code(&out, 0);
        for round in 0..2 {
            let out = env.run(&[
                "exec",
                &name,
                "--",
                "sh",
                "-c",
                &fill(&format!("/workspace/fill{round}"), 48),
            ]);
            assert_code(&out, 0);
            assert_eq!(stdout(&out), "ENOSPC\n", "round {round}: {}", stderr(&out));
        }
        let image = env
            .state_dir()
            .join("sandboxes")
            .join(&name)
            .join("scratch/workspace.ext4");
        let meta = std::fs::metadata(&image).unwrap();
        assert!(
            meta.blocks() * 512 <= 25 << 20,
            "the layer takes {} bytes on the host, past the 24 MiB cap",
            meta.blocks() * 512
        );
        let out = env.run(&["sandbox", "remove", &name]);
        assert_code(&out, 0);
        assert!(!image.exists(), "the layer outlived the sandbox");
        poll_until(
            std::time::Duration::from_secs(5),
            "loop device released",
            || loop_devices_under(env.state_dir()).is_empty(),
        );
    }

    /// kill -9 of the run: the loop device detaches itself with the
    /// sandbox's mount namespace, and gc removes the image with the scratch.
    #[test]
    fn a_killed_run_leaves_no_loop_device() {
        let env = native();
        let mut run = env.spawn(&["run", "--disk", "16m", "-i", BUSYBOX, "sleep", "60"]);
        poll_until(
            std::time::Duration::from_secs(20),
            "the workspace layer is mounted",
            || !loop_devices_under(env.state_dir()).is_empty(),
        );
        run.signal(libc::SIGKILL);
        let _ = run.child().wait();
        poll_until(
            std::time::Duration::from_secs(10),
            "loop device released",
            || loop_devices_under(env.state_dir()).is_empty(),
        );
        let out = env.run(&["sandbox", "gc"]);
        assert_code(&out, 0);
        assert!(env.leftover_runs().is_empty(), "scratch left after gc");
    }

    /// The pool's devices (see `disk_pool.rs`), by device name.
    fn pool_devices(env: &TestEnv) -> Vec<String> {
        pool_bindings(env).into_iter().map(|(dev, _)| dev).collect()
    }

    /// The pool's loop devices with the file each is bound to.
    fn pool_bindings(env: &TestEnv) -> Vec<(String, String)> {
        let pool = env.state_dir().join("disk-pool/");
        all_loop_devices_under(env.state_dir())
            .into_iter()
            .filter(|(_, file)| file.starts_with(&*pool.to_string_lossy()))
            .collect()
    }

    /// Runs' cleanup processes attach the next runs' workspace disks ahead:
    /// never more than two, each used by exactly one run (what one sandbox
    /// wrote in its workspace never shows in the next), the run's device is
    /// one of them, and `pool prune` lets them all go.
    #[test]
    fn the_disk_pool_is_bounded_never_reused_and_pruned() {
        let env = native_without_keeper();
        for round in 0..4 {
            let script = format!(
                "test -e /workspace/mark && echo REUSED; echo {round} > /workspace/mark; cat /workspace/mark"
            );
            let out = env.run(&["run", "--disk", "40m", "-i", BUSYBOX, "sh", "-c", &script]);
            assert_code(&out, 0);
            assert_eq!(stdout(&out), format!("{round}\n"), "{}", stderr(&out));
            poll_until(
                std::time::Duration::from_secs(10),
                "the run's cleanup refilled the pool",
                || pool_devices(&env).len() == 2 && env.leftover_runs().is_empty(),
            );
        }
        assert!(
            !env.project_dir().join("mark").exists(),
            "a run wrote to the host's workspace"
        );
        // A running sandbox's disk is one the pool had ready.
        let ready = pool_devices(&env);
        let mut run = env.spawn(&["run", "--disk", "40m", "-i", BUSYBOX, "sleep", "30"]);
        poll_until(
            std::time::Duration::from_secs(20),
            "the run's workspace disk is mounted",
            || !loop_devices_under(env.state_dir()).is_empty(),
        );
        let used = all_loop_devices_under(env.state_dir())
            .into_iter()
            .find(|(_, file)| file.ends_with("/workspace.ext4"))
            .expect("the run's workspace disk")
            .0;
        assert!(
            ready.contains(&used),
            "{used} was not from the pool {ready:?}"
        );
        run.signal(libc::SIGKILL);
        let _ = run.child().wait();
        poll_until(
            std::time::Duration::from_secs(10),
            "the killed run's loop device released",
            || loop_devices_under(env.state_dir()).is_empty(),
        );
        assert!(pool_devices(&env).len() <= 2, "{:?}", pool_devices(&env));
        let out = env.run(&["pool", "prune"]);
        assert_code(&out, 0);
        poll_until(
            std::time::Duration::from_secs(10),
            "every pool device released",
            || all_loop_devices_under(env.state_dir()).is_empty(),
        );
    }

    /// A pool whose state directory is deleted (rm -rf of AGENTKERNEL_HOME)
    /// leaves devices bound to deleted files: the next native run anywhere
    /// on the machine detaches them (its gc).
    #[test]
    fn a_deleted_pool_is_detached_by_the_next_run() {
        let doomed = native_without_keeper();
        for _ in 0..2 {
            let out = doomed.run(&["run", "--disk", "24m", "-i", BUSYBOX, "true"]);
            assert_code(&out, 0);
        }
        // Its runs' cleanup processes refill and sweep: once they are done
        // nothing of `doomed` runs, so only the next run can detach.
        assert!(doomed.wait_for_processes(std::time::Duration::from_secs(30)));
        // Each binding is its device and file (a number alone may be bound
        // again to another file once swept).
        let bindings = pool_bindings(&doomed);
        assert_eq!(bindings.len(), 2, "the pool was filled: {bindings:?}");
        std::fs::remove_dir_all(doomed.state_dir().join("disk-pool")).unwrap();
        let still_bound = |(dev, file): &(String, String)| {
            std::fs::read_to_string(format!("/sys/block/{dev}/loop/backing_file"))
                .is_ok_and(|now| now.trim_end() == format!("{file} (deleted)"))
        };
        assert!(bindings.iter().all(still_bound));
        let other = native_without_keeper();
        let out = other.run(&["run", "--disk", "24m", "-i", BUSYBOX, "true"]);
        assert_code(&out, 0);
        poll_until(
            std::time::Duration::from_secs(10),
            "the deleted pool's devices detached",
            || !bindings.iter().any(still_bound),
        );
    }

    /// The keeper's devices: loop devices bound to its (unlinked) images.
    fn held_devices(env: &TestEnv) -> Vec<String> {
        all_loop_devices_under(env.state_dir())
            .into_iter()
            .filter(|(_, file)| file.contains("/disk-pool/held/"))
            .map(|(dev, _)| dev)
            .collect()
    }

    /// `sh -c script` in a run with a 24 MiB disk, retried (up to 20 s)
    /// until its disk came mounted from the keeper; each attempt must
    /// succeed. The first run of a state directory starts the keeper.
    fn held_run(env: &TestEnv, script: &str) -> std::process::Output {
        let start = std::time::Instant::now();
        loop {
            let out = env
                .cmd()
                .env("AGENTKERNEL_TRACE_STARTUP", "1")
                .args(["run", "--disk", "24m", "-i", BUSYBOX, "sh", "-c", script])
                .timeout(std::time::Duration::from_secs(120))
                .output()
                .unwrap();
            assert_code(&out, 0);
            if stderr(&out).contains("disk: held mount taken") {
                return out;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(20),
                "no run got a disk from the keeper: {}",
                stderr(&out)
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    /// A run whose keeper had no disk of its size ready mounts one of its
    /// own, and that disk goes with the run: the keeper, which switches to
    /// the new size, takes back only disks it made. (It once adopted such a
    /// disk, whose loop device then stayed bound to the run's deleted image
    /// under `finished/` for as long as the keeper lived.)
    #[test]
    fn a_disk_the_keeper_did_not_make_goes_with_its_run() {
        let env = native();
        held_run(&env, "true");
        poll_until(
            std::time::Duration::from_secs(20),
            "the first runs' cleanup processes done",
            || only_the_keeper_runs(&env),
        );
        let recycled_before = keeper_disks(&env)["recycled"].clone();
        let out = env
            .cmd()
            .env("AGENTKERNEL_TRACE_STARTUP", "1")
            .args(["run", "--disk", "16m", "-i", BUSYBOX, "true"])
            .timeout(std::time::Duration::from_secs(120))
            .output()
            .unwrap();
        assert_code(&out, 0);
        assert!(
            !stderr(&out).contains("disk: held mount taken"),
            "the keeper had a 16 MiB disk before any run asked for one: {}",
            stderr(&out)
        );
        poll_until(
            std::time::Duration::from_secs(20),
            "the runs' cleanup processes done, the keeper at 16 MiB",
            || only_the_keeper_runs(&env) && keeper_disks(&env)["bytes"] == 16 << 20,
        );
        assert_eq!(
            loop_devices_under(env.state_dir()),
            Vec::<String>::new(),
            "devices left bound to a run's image"
        );
        assert_eq!(keeper_disks(&env)["recycled"], recycled_before);
    }

    /// A switch value agentkernel does not know is refused in one line
    /// before anything is made: a typo of `off` must not start the very
    /// process it meant to turn off. `on` runs.
    #[test]
    fn an_unknown_keeper_switch_is_one_line_and_starts_nothing() {
        for value in ["of", "false"] {
            let env = native().with_env("AGENTKERNEL_DISK_KEEPER", value);
            let out = env.run(&["run", "--disk", "24m", "-i", BUSYBOX, "true"]);
            let line = assert_one_line_error(&out);
            assert!(
                line.contains("AGENTKERNEL_DISK_KEEPER") && line.contains("on or off"),
                "{line}"
            );
            assert!(env.processes_running().is_empty(), "a process was left");
            assert!(
                !env.state_dir().join("disk-pool/held").exists(),
                "a keeper was started"
            );
            let runs = env.state_dir().join("runs");
            let left = std::fs::read_dir(&runs).map_or(0, |d| d.count());
            assert_eq!(left, 0, "a run's scratch was left");
        }
        let env = native().with_env("AGENTKERNEL_DISK_KEEPER", "on");
        assert_code(
            &env.run(&["run", "--disk", "24m", "-i", BUSYBOX, "true"]),
            0,
        );
    }

    /// Nothing of this test's runs is left but the disk keeper: their
    /// cleanup processes are done (a late one could still give a disk back
    /// or start another keeper).
    fn only_the_keeper_runs(env: &TestEnv) -> bool {
        env.processes_running() == env.keeper_pids()
    }

    /// `pool status --json`'s `disks` object.
    fn keeper_disks(env: &TestEnv) -> serde_json::Value {
        let out = env.run(&["pool", "status", "--json"]);
        assert_code(&out, 0);
        serde_json::from_str::<serde_json::Value>(&stdout(&out)).unwrap()["disks"].clone()
    }

    /// The disk keeper holds workspace disks mounted ahead and recycles the
    /// ones runs give back. An attack on recycling: a sandbox leaves a
    /// secret, changes the workspace root's mode and fills its disk; the
    /// disk is recycled, and every later sandbox that can get it finds its
    /// workspace as fresh — no file, the original mode, the whole cap free.
    /// The cap holds on held disks, the host's workspace is untouched, the
    /// keeper's directory and socket are private, and `pool prune` stops it
    /// with nothing left bound.
    #[test]
    fn held_disks_are_recycled_fresh_capped_and_go_with_prune() {
        use std::os::unix::fs::PermissionsExt;
        let env = native();
        let fresh_mode = stdout(&held_run(&env, "stat -c %a /workspace"))
            .trim()
            .to_string();
        let recycled = || keeper_disks(&env)["recycled"].as_u64().unwrap_or(0);
        // Until one such disk comes back recycled (it may instead be
        // dropped, when enough are ready as it returns).
        let start = std::time::Instant::now();
        loop {
            let before = recycled();
            let attack = format!(
                "echo secret > /workspace/mark; chmod 700 /workspace; {}",
                fill("/workspace/big", 40)
            );
            let out = held_run(&env, &attack);
            assert_eq!(stdout(&out).trim(), "ENOSPC", "{}", stderr(&out));
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while recycled() == before && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            if recycled() > before {
                break;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(60),
                "no disk was recycled"
            );
        }
        // The recycled disk is among the (at most two) ready ones, which
        // the next runs take in order.
        for _ in 0..3 {
            let script = format!(
                "test -e /workspace/mark && echo REUSED; stat -c %a /workspace; {}",
                fill("/workspace/big", 20)
            );
            let out = held_run(&env, &script);
            let out = stdout(&out);
            assert!(
                !out.contains("REUSED"),
                "a recycled disk kept a file: {out}"
            );
            assert!(out.starts_with(&format!("{fresh_mode}\n")), "{out}");
            assert!(
                out.contains("WROTE"),
                "the cap's space did not come back: {out}"
            );
        }
        let out = held_run(&env, &fill("/workspace/big", 40));
        assert_eq!(stdout(&out).trim(), "ENOSPC", "{}", stderr(&out));
        assert!(
            !env.project_dir().join("mark").exists(),
            "a run wrote to the host's workspace"
        );
        let held = env.state_dir().join("disk-pool/held");
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&held), 0o700);
        assert_eq!(mode(&held.join("sock")), 0o600);
        let keepers = env.keeper_pids();
        assert_eq!(keepers.len(), 1, "one keeper per state dir");
        let disks = || keeper_disks(&env);
        poll_until(
            std::time::Duration::from_secs(20),
            "pool status shows the keeper with two disks ready",
            || {
                let d = disks();
                d["keeper_pid"] == keepers[0] && d["mounted"] == 2 && d["bytes"] == 24 << 20
            },
        );
        let out = env.run(&["pool", "status"]);
        assert!(
            stdout(&out).contains(&format!("disk keeper (pid {})", keepers[0])),
            "{}",
            stdout(&out)
        );

        let out = env.run(&["pool", "prune"]);
        assert_code(&out, 0);
        assert!(
            stderr(&out).contains("mounted workspace disk"),
            "{}",
            stderr(&out)
        );
        assert!(env.keeper_pids().is_empty(), "the keeper outlived prune");
        assert_eq!(disks()["keeper_pid"], serde_json::Value::Null);
        poll_until(
            std::time::Duration::from_secs(10),
            "every device of the state dir released",
            || all_loop_devices_under(env.state_dir()).is_empty(),
        );
    }

    /// Asks the keeper's socket for a disk as another user (uid 65534):
    /// what happened, one word first.
    fn ask_as_nobody(socket: &std::path::Path) -> String {
        use std::os::unix::process::CommandExt;
        let script = r#"
import socket, struct, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("refused", e.errno); sys.exit(0)
s.settimeout(5)
try:
    s.sendall(struct.pack("<Q", 24 << 20))
    msg, anc, _, _ = s.recvmsg(1, socket.CMSG_SPACE(64))
except OSError as e:
    print("nothing", e); sys.exit(0)
print("fds", sum(len(d) // 4 for _, t, d in anc if t == socket.SCM_RIGHTS))
"#;
        let out = std::process::Command::new("python3")
            .args(["-c", script])
            .arg(socket)
            .current_dir("/")
            .uid(65534)
            .gid(65534)
            .output()
            .expect("python3");
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    }

    /// Attacks on the keeper: another user cannot reach its socket, and
    /// even with the directories opened to everyone it hands them nothing;
    /// a sandbox cannot see it; `kill -9` of the keeper leaves no device,
    /// and runs go on without it.
    #[test]
    fn the_disk_keeper_serves_no_one_else_and_leaves_nothing_when_killed() {
        use std::os::unix::fs::PermissionsExt;
        let env = native();
        held_run(&env, "true");
        let socket = env.state_dir().join("disk-pool/held/sock");

        let answer = ask_as_nobody(&socket);
        assert!(answer.starts_with("refused 13"), "{answer}");
        let open = |p: &std::path::Path, mode| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        let dirs = [
            env.state_dir().to_path_buf(),
            env.state_dir().join("disk-pool"),
            env.state_dir().join("disk-pool/held"),
        ];
        for d in &dirs {
            open(d, 0o755);
        }
        open(&socket, 0o666);
        let answer = ask_as_nobody(&socket);
        for d in &dirs {
            open(d, 0o700);
        }
        open(&socket, 0o600);
        assert!(
            answer.starts_with("nothing") || answer.trim() == "fds 0",
            "another user got: {answer}"
        );

        let out = env.run(&[
            "run",
            "--disk",
            "24m",
            "-i",
            BUSYBOX,
            "sh",
            "-c",
            &format!("test -e {} && echo SEEN; true", socket.display()),
        ]);
        assert_code(&out, 0);
        assert_eq!(stdout(&out), "", "the sandbox sees the keeper's socket");

        // Once the runs' cleanup processes are done too: a late one would
        // give its disk back, or start another keeper.
        poll_until(
            std::time::Duration::from_secs(20),
            "the keeper holds its disks, alone",
            || held_devices(&env).len() == 2 && only_the_keeper_runs(&env),
        );
        for pid in env.keeper_pids() {
            // SAFETY: kill of a PID we just found as this test's keeper.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        poll_until(
            std::time::Duration::from_secs(10),
            "the killed keeper's devices released",
            || held_devices(&env).is_empty(),
        );
        // What a keeper killed while copying a template leaves, gc removes.
        let copying = env.state_dir().join("disk-pool/held/.image-999999999.1");
        std::fs::write(&copying, b"half a copy").unwrap();
        let out = env.run(&["sandbox", "gc"]);
        assert_code(&out, 0);
        assert!(!copying.exists(), "gc left a killed keeper's image");
        // Runs go on without it, and start another.
        held_run(&env, "true");
        let out = env.run(&["pool", "prune"]);
        assert_code(&out, 0);
        poll_until(
            std::time::Duration::from_secs(10),
            "every device of the state dir released",
            || all_loop_devices_under(env.state_dir()).is_empty(),
        );
    }

    /// The keeper also holds fresh network namespaces: each serves one
    /// sandbox. Two sandboxes running at once, both given one by the
    /// keeper, are in different namespaces, and neither is among those the
    /// keeper still holds.
    #[test]
    fn keeper_network_namespaces_serve_one_sandbox_each() {
        use std::io::BufRead;
        let env = native();
        held_run(&env, "true");
        poll_until(
            std::time::Duration::from_secs(20),
            "the keeper holds two network namespaces",
            || {
                let out = env.run(&["pool", "status", "--json"]);
                serde_json::from_str::<serde_json::Value>(&stdout(&out))
                    .is_ok_and(|v| v["disks"]["netns"] == 2)
            },
        );
        let spawn = || {
            let mut cmd = env.std_cmd();
            cmd.env("AGENTKERNEL_TRACE_STARTUP", "1")
                .args(["run", "--disk", "24m", "-i", BUSYBOX, "sh", "-c"])
                .arg("readlink /proc/self/ns/net; sleep 5")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            Tracked::spawn(cmd)
        };
        let mut runs = [spawn(), spawn()];
        let mut inodes = Vec::new();
        for run in &mut runs {
            let mut line = String::new();
            let out = run.child().stdout.as_mut().unwrap();
            std::io::BufReader::new(out).read_line(&mut line).unwrap();
            assert!(line.starts_with("net:["), "{line:?}");
            inodes.push(line.trim().to_string());
        }
        let held = env.keeper_namespaces();
        assert_eq!(env.keeper_pids().len(), 1, "the keeper is gone: {held:?}");
        assert_ne!(inodes[0], inodes[1], "two sandboxes share a namespace");
        for inode in &inodes {
            assert!(!held.contains(inode), "the keeper still holds {inode}");
        }
        for run in runs {
            let out = run.wait_output(std::time::Duration::from_secs(60));
            assert_code(&out, 0);
            assert!(
                stderr(&out).contains("network: namespace taken from the keeper"),
                "{}",
                stderr(&out)
            );
        }
    }
}
