//! The native backend's isolation, attempted from inside: each test tries
//! the escape and asserts it failed. Runs with AGENTKERNEL_TEST_BACKEND=native
//! (scripts/test.sh); the images come from the loopback test registry.

mod common;

use std::time::Duration;

use common::*;

/// About the native runtime; under another backend they would test that
/// engine instead, which the other files already do.
mod native_only {
    use super::*;

    fn sh(env: &TestEnv, extra: &[&str], script: &str) -> std::process::Output {
        let mut args = vec!["run"];
        args.extend_from_slice(extra);
        args.extend(["-i", BUSYBOX, "sh", "-c", script]);
        env.run(&args)
    }

    /// A plain run's CLI becomes the sandbox's supervisor (and init's parent
    /// image) without an exec: its command line, which the sandbox can read
    /// as PID 1's, is replaced with the helper's first.
    #[test]
    fn pid_1_never_shows_the_callers_command_line() {
        let env = TestEnv::new();
        let out = sh(
            &env,
            &["-e", "MARK=zz-caller-only-zz"],
            "tr '\\0' ' ' < /proc/1/cmdline; echo; echo ${#MARK}",
        );
        assert_code(&out, 0);
        let text = stdout(&out);
        assert!(
            text.starts_with("agentkernel __native-sandbox"),
            "PID 1's command line: {text:?}"
        );
        assert!(
            !text.contains("zz-caller"),
            "the caller's arguments leak: {text:?}"
        );
        // The value itself still reaches the command, through its environment.
        assert!(text.ends_with("\n17\n"), "{text:?}");
    }

    #[test]
    fn host_processes_are_invisible() {
        let env = TestEnv::new();
        let out = sh(
        &env,
        &[],
        "ls /proc | grep -c '^[0-9]'; cat /proc/1/cmdline | tr '\\0' ' '; echo; kill -0 1 && echo init-signalable",
    );
        assert_code(&out, 0);
        let text = stdout(&out);
        let mut lines = text.lines();
        let count: u32 = lines.next().unwrap().parse().unwrap();
        // init, sh, ls, grep (and maybe a subshell): never the host's hundreds.
        assert!(count <= 6, "the sandbox sees {count} processes: {text}");
        assert!(
            lines.next().unwrap().contains("agentkernel"),
            "PID 1 should be agentkernel's init: {text}"
        );
        // The test process itself is not visible by its host PID.
        let me = std::process::id();
        let out = sh(
            &env,
            &[],
            &format!(
                "test -e /proc/{me}/cmdline && grep -c cargo /proc/{me}/cmdline || echo absent"
            ),
        );
        assert_ne!(stdout(&out), "1\n", "a host process is visible");
    }

    #[test]
    fn read_only_root_and_kernel_interfaces_cannot_be_written() {
        let env = TestEnv::new();
        let out = sh(
        &env,
        &["-p", "restrictive"],
        "for f in /bin/x /etc/passwd /proc/sys/kernel/hostname /sys/kernel/profiling /proc/sysrq-trigger; do \
           if echo x 2>/dev/null > $f; then echo WROTE $f; fi; done; \
         echo tmp > /tmp/ok && cat /tmp/ok",
    );
        assert_code(&out, 0);
        assert_eq!(stdout(&out), "tmp\n", "{}", stderr(&out));
        // Masked paths show nothing of the host kernel.
        let out = sh(
            &env,
            &[],
            "cat /proc/kcore 2>/dev/null | wc -c; ls /sys/firmware | wc -l; cat /proc/keys | wc -l",
        );
        assert_code(&out, 0);
        assert_eq!(stdout(&out), "0\n0\n0\n");
    }

    #[test]
    fn no_network_means_loopback_only() {
        let env = TestEnv::new();
        let out = sh(
        &env,
        &["--no-network"],
        "ls /sys/class/net; if wget -q -T 2 -O /dev/null http://10.209.0.1/ 2>/dev/null || nc -w 2 10.209.0.1 22 </dev/null 2>/dev/null; then echo REACHED; fi; ip route 2>/dev/null | grep -c default || true",
    );
        assert_code(&out, 0);
        assert_eq!(stdout(&out), "lo\n0\n", "{}", stderr(&out));
    }

    #[test]
    fn symlinks_cannot_lead_a_mount_out_of_the_sandbox() {
        let env = TestEnv::new();
        // An absolute symlink in the workspace, and a volume whose target goes
        // through it: resolved naively before pivot_root, it would create and
        // mount on the host's directory.
        let outside = tempfile::Builder::new()
            .prefix("ak-outside")
            .tempdir()
            .unwrap();
        let volume = tempfile::Builder::new().prefix("ak-vol").tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), env.project_dir().join("link")).unwrap();
        for profile in ["moderate", "permissive"] {
            let out = env.run(&[
                "run",
                "-p",
                profile,
                "-v",
                &format!("{}:/workspace/link/inner", volume.path().display()),
                "-i",
                BUSYBOX,
                "true",
            ]);
            let line = assert_one_line_error(&out);
            assert!(line.contains("symlink"), "{profile}: {line}");
            assert!(
                std::fs::read_dir(outside.path()).unwrap().next().is_none(),
                "{profile}: something was created through the symlink on the host"
            );
            assert!(env.leftover_runs().is_empty(), "{:?}", env.leftover_runs());
        }
        // Inside the sandbox the symlink resolves in the sandbox's own root.
        std::fs::write(outside.path().join("secret"), "host-secret\n").unwrap();
        let out = sh(
            &env,
            &["-p", "permissive"],
            "cat /workspace/link/secret 2>/dev/null || echo unreachable",
        );
        assert_eq!(stdout(&out), "unreachable\n");
    }

    #[test]
    fn seccomp_and_capabilities_refuse_namespace_and_mount_escapes() {
        let env = TestEnv::new();
        let out = sh(
            &env,
            &[],
            "unshare -U true 2>/dev/null && echo UNSHARED; \
         mount -t tmpfs x /mnt 2>/dev/null && echo MOUNTED; \
         mknod /tmp/sda b 8 0 2>/dev/null && echo MKNOD; \
         echo done",
        );
        assert_code(&out, 0);
        assert_eq!(stdout(&out), "done\n");
    }

    #[test]
    fn cpu_limit_throttles() {
        let env = TestEnv::new();
        let out = sh(
        &env,
        &["--cpus", "0.2"],
        "end=$(( $(date +%s) + 2 )); while [ $(date +%s) -lt $end ]; do :; done; \
         grep -h nr_throttled /sys/fs/cgroup/cpu/cpu.stat /sys/fs/cgroup/cpu.stat 2>/dev/null | head -1",
    );
        assert_code(&out, 0);
        let throttled: u64 = stdout(&out)
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no nr_throttled: {} {}", stdout(&out), stderr(&out)));
        assert!(
            throttled > 0,
            "a busy loop under --cpus 0.2 was never throttled"
        );
    }

    #[test]
    fn host_image_is_the_hosts_root_read_only() {
        let env = TestEnv::new();
        let marker = format!("/tmp/ak-host-image-{}", std::process::id());
        let out = env.run(&[
        "run",
        "--image",
        "host",
        "--",
        "sh",
        "-c",
        &format!(
            "cat /etc/os-release | head -1; echo x > {marker} && echo wrote-in-sandbox; ls {} | wc -l",
            env.state_dir().display()
        ),
    ]);
        assert_code(&out, 0);
        let host_first = std::fs::read_to_string("/etc/os-release")
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .to_string();
        // agentkernel's own state (other sandboxes' scratch) is hidden.
        assert_eq!(
            stdout(&out),
            format!("{host_first}\nwrote-in-sandbox\n0\n"),
            "{}",
            stderr(&out)
        );
        assert!(
            !std::path::Path::new(&marker).exists(),
            "a write in the sandbox reached the host's root"
        );
    }

    #[test]
    fn concurrent_runs_get_distinct_addresses_and_leave_nothing() {
        let env = TestEnv::new();
        let env = std::sync::Arc::new(env);
        // Each sandbox records its address in a shared volume, then waits until
        // all 20 are there: they are alive together, so a shared address would
        // leave fewer than 20 files and every run would fail.
        let sync = std::sync::Arc::new(
            tempfile::Builder::new()
                .prefix("ak-sync")
                .tempdir()
                .unwrap(),
        );
        let script = "a=$(ip -4 -o addr show eth0 | awk '{print $4}' | cut -d/ -f1); touch /sync/$a; \
                  i=0; while [ $(ls /sync | wc -l) -lt 20 ]; do i=$((i+1)); [ $i -gt 600 ] && exit 9; sleep 0.1; done; \
                  hostname";
        let handles: Vec<_> = (0..20)
            .map(|_| {
                let (env, sync) = (env.clone(), sync.clone());
                std::thread::spawn(move || {
                    let volume = format!("{}:/sync", sync.path().display());
                    let out = env.run(&["run", "-v", &volume, "-i", BUSYBOX, "sh", "-c", script]);
                    assert_code(&out, 0);
                    stdout(&out)
                })
            })
            .collect();
        let ids: Vec<String> = handles
            .into_iter()
            .map(|h| h.join().unwrap().trim().to_string())
            .collect();
        assert_eq!(std::fs::read_dir(sync.path()).unwrap().count(), 20);
        assert!(env.leftover_runs().is_empty(), "{:?}", env.leftover_runs());
        for id in &ids {
            assert!(
                native_leases_of(id).is_empty(),
                "{id}'s network lease was left behind"
            );
            poll_until(
                Duration::from_secs(10),
                "a finished sandbox's cgroup should be gone",
                || !native_sandbox_exists(id),
            );
        }
    }

    #[test]
    fn a_killed_holder_leaves_nothing_after_gc() {
        let env = TestEnv::new();
        let name = unique_name("holder");
        let out = env.run_kept(&name, &[], &["true"]);
        assert_code(&out, 0);
        let held: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                env.state_dir()
                    .join("sandboxes")
                    .join(&name)
                    .join("native.json"),
            )
            .unwrap(),
        )
        .unwrap();
        let holder: i32 = held["holder"]
            .as_str()
            .unwrap()
            .split(':')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let init = held["init_pid"].as_i64().unwrap() as i32;
        // SAFETY: SIGKILL to the holder process this test's run started.
        assert_eq!(unsafe { libc::kill(holder, libc::SIGKILL) }, 0);
        // The sandbox's init dies with its holder (PDEATHSIG), and with it every
        // process in the sandbox.
        poll_until(
            Duration::from_secs(10),
            "the sandbox's init should die with its holder",
            || {
                std::fs::read_to_string(format!("/proc/{init}/stat"))
                    .map(|s| s.contains(") Z ") || s.contains(") X "))
                    .unwrap_or(true)
            },
        );
        let out = env.run(&["sandbox", "gc"]);
        assert_code(&out, 0);
        assert!(!native_sandbox_exists(&name), "gc left something of {name}");
        let out = env.run(&["exec", &name, "--", "true"]);
        assert_one_line_error(&out);
    }

    /// The CLI is linked as a glibc static-pie (`.cargo/rustc-static-executables`):
    /// no program interpreter, so no dynamic loader maps and binds shared
    /// libraries at each run's start (~0.4 ms of every run), and still a
    /// position-independent executable, so ASLR still moves its code. The
    /// guest agent is built the same way. `scripts/setup.sh` installs glibc's
    /// static library (libc6-dev), without which the wrapper links dynamically.
    #[test]
    fn the_executables_are_static_and_position_independent() {
        let guest = binary().with_file_name("agentkernel-guest");
        for path in [binary(), guest] {
            let elf = std::fs::read(&path).unwrap();
            let (kind, interpreter) = elf_type_and_interpreter(&elf);
            assert_eq!(
                kind,
                3,
                "{} is not ET_DYN (position-independent)",
                path.display()
            );
            assert!(
                !interpreter,
                "{} has a program interpreter (dynamically linked)",
                path.display()
            );
        }
    }

    /// An ELF64 little-endian file's `e_type`, and whether a program header
    /// is PT_INTERP (3).
    fn elf_type_and_interpreter(elf: &[u8]) -> (u16, bool) {
        assert_eq!(
            &elf[..6],
            b"\x7fELF\x02\x01",
            "not a 64-bit little-endian ELF"
        );
        let u16_at = |at: usize| u16::from_le_bytes([elf[at], elf[at + 1]]);
        let u32_at = |at: usize| u32::from_le_bytes(elf[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_le_bytes(elf[at..at + 8].try_into().unwrap());
        let (phoff, phentsize, phnum) =
            (u64_at(0x20) as usize, u16_at(0x36) as usize, u16_at(0x38));
        let interpreter = (0..phnum as usize).any(|i| u32_at(phoff + i * phentsize) == 3);
        (u16_at(0x10), interpreter)
    }

    #[test]
    fn native_is_the_default_backend_as_root() {
        let env = TestEnv::new();
        // No -B, no AGENTKERNEL_BACKEND, no config: the first available backend.
        let out = env
            .cmd()
            .env_remove("AGENTKERNEL_BACKEND")
            .args(["run", "-i", BUSYBOX, "cat", "/proc/1/cmdline"])
            .output()
            .unwrap();
        assert_code(&out, 0);
        assert!(
            stdout(&out).contains("agentkernel"),
            "PID 1 is not agentkernel's init, so the default was not native: {:?}",
            stdout(&out)
        );
        let out = env.run_unchosen(&["doctor"]);
        assert!(
            stdout(&out)
                .lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["default", "native"]),
            "{}",
            stdout(&out)
        );
    }

    #[test]
    fn startup_trace_lists_each_phase_in_order_and_only_when_asked() {
        let env = TestEnv::new();
        let args = ["run", "-i", BUSYBOX, "echo", "ran"];
        let quiet = env.run(&args);
        assert_code(&quiet, 0);
        assert!(
            !stderr(&quiet).contains("agentkernel-trace"),
            "traced without being asked: {}",
            stderr(&quiet)
        );
        let traced = env
            .cmd()
            .env("AGENTKERNEL_TRACE_STARTUP", "1")
            .args(args)
            .output()
            .unwrap();
        assert_code(&traced, 0);
        assert_eq!(stdout(&traced), "ran\n");
        let phases: Vec<(u64, String)> = stderr(&traced)
            .lines()
            .filter_map(|l| {
                let mut parts = l.splitn(3, ' ');
                (parts.next()? == "agentkernel-trace")
                    .then(|| Some((parts.next()?.parse().ok()?, parts.next()?.to_string())))?
            })
            .collect();
        let names: Vec<&str> = phases.iter().map(|(_, n)| n.as_str()).collect();
        // A plain run's CLI becomes the helper in place when it is still
        // single-threaded, and execs it otherwise.
        let handoff: &[&str] = if names.contains(&"cli becomes the helper") {
            &["cli becomes the helper"]
        } else {
            &["cli execs the helper", "helper started"]
        };
        // The order processes pass these is fixed by the protocol between them.
        let expected = [
            &["cli started"][..],
            handoff,
            &[
                "forking init",
                "init: namespaces created",
                "init: root built",
                "init: in the cgroup",
                "init: volumes mounted",
                "init: ready",
                "go",
                "command: forked",
                "command: execs",
                "init: the sandbox's processes ended",
                "exit status known",
                "cleaned up",
            ],
        ]
        .concat();
        let mut at = Vec::new();
        for phase in &expected {
            let found = phases.iter().find(|(_, n)| n == phase);
            let (micros, _) = found.unwrap_or_else(|| panic!("no {phase:?} in {names:?}"));
            at.push(*micros);
        }
        assert!(
            at.windows(2).all(|w| w[0] <= w[1]),
            "phases out of order: {:?}",
            expected.iter().zip(&at).collect::<Vec<_>>()
        );
    }

    /// The sandbox's init holds none of the caller's descriptors.
    mod descriptors {
        use std::os::fd::AsRawFd as _;
        use std::os::unix::process::CommandExt as _;
        use std::process::Stdio;
        use std::time::Duration;

        use crate::common::*;

        /// The sandbox's PID 1 on the host: the process of sandbox `id`'s cgroup
        /// whose pid in its own namespace is 1.
        fn init_pid(id: &str) -> u32 {
            let procs: Vec<u32> = native_cgroup_dirs(id)
                .iter()
                .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
                .flat_map(|t| {
                    t.lines()
                        .filter_map(|l| l.parse().ok())
                        .collect::<Vec<u32>>()
                })
                .collect();
            procs
                .into_iter()
                .find(|pid| {
                    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
                        s.lines()
                            .find(|l| l.starts_with("NSpid:"))
                            .is_some_and(|l| l.split_whitespace().last() == Some("1"))
                    })
                })
                .unwrap_or_else(|| panic!("no init in sandbox {id}'s cgroup"))
        }

        fn open_fd_targets(pid: u32) -> Vec<std::path::PathBuf> {
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .unwrap()
                .flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .collect()
        }

        #[test]
        fn init_keeps_none_of_the_callers_descriptors() {
            let env = TestEnv::new();
            let secret = env.home_dir().join("caller-secret");
            std::fs::write(&secret, "s\n").unwrap();
            let file = std::fs::File::open(&secret).unwrap();
            let raw = file.as_raw_fd();
            let mut cmd = env.std_cmd();
            cmd.args(["run", "-i", BUSYBOX, "sleep", "60"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            // SAFETY: dup2 and fcntl are async-signal-safe; fd 7 stays open
            // across exec. (When the file already is fd 7 — other tests'
            // threads decide the numbers — dup2 would leave its
            // close-on-exec flag set, so it is cleared instead.)
            unsafe {
                cmd.pre_exec(move || {
                    let r = if raw == 7 {
                        libc::fcntl(7, libc::F_SETFD, 0)
                    } else {
                        libc::dup2(raw, 7)
                    };
                    if r < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                })
            };
            let mut run = Tracked::spawn(cmd);
            let id = run.wait_running(Duration::from_secs(30));
            // Control: agentkernel itself was given the descriptor.
            assert_eq!(
                std::fs::read_link(format!("/proc/{}/fd/7", run.pid)).unwrap(),
                secret
            );
            let init = init_pid(&id);
            // Init closes them once it has started the command, which may be
            // a moment after the cgroup appears: wait for that, boundedly.
            let start = std::time::Instant::now();
            let mut held = open_fd_targets(init);
            while held.contains(&secret) && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(100));
                held = open_fd_targets(init);
            }
            assert!(
                !held.contains(&secret),
                "the sandbox's init still holds the caller's fd after 10 s: {held:?}"
            );
            run.signal(libc::SIGTERM);
            let out = run.wait_output(Duration::from_secs(20));
            assert_code(&out, 143);
        }
    }
}
