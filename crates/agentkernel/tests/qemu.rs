//! `-B qemu`: each sandbox is a VM with its own kernel. Every test here
//! boots real VMs (TCG where KVM does not work, seconds each), so they are
//! few and each checks several things; they run only in the qemu pass
//! (`AGENTKERNEL_TEST_BACKEND=qemu`, scripts/test.sh).

mod common;

mod qemu_only {
    use std::io::Write;
    use std::process::Stdio;
    use std::time::Duration;

    use super::common::*;

    /// Under TCG with a busy host a boot can take tens of seconds.
    const VM_LIMIT: Duration = Duration::from_secs(180);

    fn host_kernel() -> String {
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap()
            .trim()
            .to_string()
    }

    /// Processes whose arguments (`/proc/PID/cmdline`) satisfy `wanted`.
    fn processes_with(wanted: impl Fn(&[String]) -> bool) -> Vec<u32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let args: Vec<String> = cmdline
                    .split(|b| *b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                wanted(&args)
            })
            .collect()
    }

    /// QEMU processes started for this test's state dir (the image disk's
    /// path, on their command line, is under it).
    fn vms_of(env: &TestEnv) -> Vec<u32> {
        let marker = env.state_dir().to_string_lossy().into_owned();
        processes_with(|args| {
            args.first()
                .is_some_and(|a| a.starts_with("qemu-system") || a.contains("/qemu-system"))
                && args.iter().any(|a| a.contains(&marker))
        })
    }

    fn run_with_stdin(env: &TestEnv, args: &[&str], input: &[u8]) -> std::process::Output {
        let mut child = env
            .std_cmd()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let mut tracked_wait = child;
        let status = wait_child(&mut tracked_wait, VM_LIMIT);
        let mut out = tracked_wait.wait_with_output().unwrap();
        out.status = status;
        out
    }

    /// Debian's kernel, `(image, modules directory)`: the one a run boots
    /// when agentkernel's own is not built, and the only one with modules
    /// to load. scripts/setup.sh installs it.
    fn distribution_kernel() -> (String, std::path::PathBuf) {
        let version = std::fs::read_dir("/boot")
            .unwrap()
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                let version = name.strip_prefix("vmlinuz-")?.to_string();
                std::path::Path::new("/lib/modules")
                    .join(&version)
                    .join("modules.dep")
                    .is_file()
                    .then_some(version)
            })
            .max()
            .expect("a Debian kernel with modules (scripts/setup.sh installs linux-image-amd64)");
        (
            format!("/boot/vmlinuz-{version}"),
            std::path::Path::new("/lib/modules").join(version),
        )
    }

    /// `[qemu] kernel` naming what cannot boot: one line naming the path
    /// and the key, exit 125, and no VM started.
    #[test]
    fn a_chosen_kernel_that_is_missing_is_125_before_any_vm() {
        let env = TestEnv::new();
        let file = env.home_dir().join("kernel.toml");
        let modules = env.home_dir().join("modules");
        std::fs::create_dir(&modules).unwrap();
        for (toml, named) in [
            (
                "[qemu]\nkernel = \"/nonexistent/vmlinux\"\n".to_string(),
                "/nonexistent/vmlinux",
            ),
            (
                // A real kernel file, a modules directory without modules.dep.
                format!(
                    "[qemu]\nkernel = {:?}\nmodules = {:?}\n",
                    file.display().to_string(),
                    modules.display().to_string()
                ),
                "modules.dep",
            ),
        ] {
            std::fs::write(&file, &toml).unwrap();
            // Without the environment's choice, which would replace the file's
            // (the suite may run on another kernel that way).
            let out = env
                .cmd()
                .env_remove("AGENTKERNEL_QEMU_KERNEL")
                .env_remove("AGENTKERNEL_QEMU_MODULES")
                .args(["run", "-c", file.to_str().unwrap(), "--fast=false"])
                .args(["--no-network", "-i", BUSYBOX, "true"])
                .output()
                .unwrap();
            let line = assert_one_line_error(&out);
            assert!(
                line.contains(named) && line.contains("qemu."),
                "{toml}: {line}"
            );
            assert!(vms_of(&env).is_empty(), "a VM was started");
        }
        // The environment's choice replaces the config's, and is checked the same way.
        let out = env
            .cmd()
            .env("AGENTKERNEL_QEMU_KERNEL", "/nonexistent/bzImage")
            .args(["run", "--fast=false", "--no-network", "-i", BUSYBOX, "true"])
            .output()
            .unwrap();
        let line = assert_one_line_error(&out);
        assert!(line.contains("/nonexistent/bzImage"), "{line}");
    }

    /// A guest agent that gives up ends its VM at once (the guest has no
    /// ACPI to power off with: the agent reboots, and QEMU's -no-reboot
    /// makes that its exit), so the run is one line naming the guest's
    /// last word, not a wait for the boot timeout. Provoked with a modules
    /// directory like Debian's in which virtio_blk is not a module.
    #[test]
    fn a_guest_agent_that_gives_up_ends_its_vm_at_once() {
        let env = TestEnv::new();
        let (image, real) = distribution_kernel();
        let fake = env.home_dir().join("modules");
        std::fs::create_dir(&fake).unwrap();
        let dep = std::fs::read_to_string(real.join("modules.dep")).unwrap();
        std::fs::write(fake.join("modules.dep"), &dep).unwrap();
        let _ = std::fs::copy(real.join("modules.builtin"), fake.join("modules.builtin"));
        for module in dep
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(m, _)| m)
        {
            let path = fake.join(module);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            if module.contains("/virtio_blk.ko") {
                std::fs::write(&path, "not a kernel module").unwrap();
            } else {
                std::os::unix::fs::symlink(real.join(module), &path).unwrap();
            }
        }
        let out = env
            .cmd()
            .env("AGENTKERNEL_QEMU_KERNEL", &image)
            .env("AGENTKERNEL_QEMU_MODULES", &fake)
            .args(["run", "--fast=false", "--no-network", "-i", BUSYBOX, "true"])
            .output()
            .unwrap();
        let line = assert_one_line_error(&out);
        // "timed out" here would mean the VM outlived its agent.
        assert!(
            line.contains("the connection closed") && line.contains("virtio_blk"),
            "{line}"
        );
        assert!(vms_of(&env).is_empty(), "a VM outlived its run");
    }

    /// On Debian's kernel, whose drivers are modules, the guest loads a
    /// device's driver only when the VM has the device: no NIC under
    /// `--no-network`, so no virtio_net; the workspace's 9p share either
    /// way; with a network, both. Observed in the guest's own module list.
    /// (agentkernel's own kernel has them built in: nothing to load.)
    #[test]
    fn a_vm_loads_the_drivers_of_the_devices_it_has_only() {
        let env = TestEnv::new();
        let (image, modules_dir) = distribution_kernel();
        let modules = |network: bool| {
            let mut args = vec!["run"];
            if !network {
                args.push("--no-network");
            }
            args.extend(["-i", BUSYBOX, "cut", "-d", " ", "-f", "1", "/proc/modules"]);
            let out = env
                .cmd()
                .env("AGENTKERNEL_QEMU_KERNEL", &image)
                .env("AGENTKERNEL_QEMU_MODULES", &modules_dir)
                .args(&args)
                .timeout(RUN_LIMIT)
                .output()
                .unwrap();
            assert_code(&out, 0);
            stdout(&out)
                .lines()
                .map(str::to_owned)
                .collect::<Vec<String>>()
        };
        let without = modules(false);
        assert!(without.iter().any(|m| m == "9p"), "{without:?}");
        assert!(without.iter().any(|m| m == "virtio_blk"), "{without:?}");
        assert!(!without.iter().any(|m| m == "virtio_net"), "{without:?}");
        let with = modules(true);
        assert!(with.iter().any(|m| m == "virtio_net"), "{with:?}");
        assert!(with.iter().any(|m| m == "9p"), "{with:?}");
        // A PC's devices are on PCI: the MMIO transport stays out.
        for list in [&without, &with] {
            assert!(list.iter().any(|m| m == "virtio_pci"), "{list:?}");
            assert!(!list.iter().any(|m| m == "virtio_mmio"), "{list:?}");
        }
    }

    /// A machine agentkernel does not boot is refused before any VM: one
    /// line naming the variable and the choices, exit 125, for a one-shot,
    /// a pooled and a kept run alike; nothing is left running or recorded.
    #[test]
    fn an_unknown_machine_is_one_line_and_boots_nothing() {
        let env = TestEnv::new();
        let name = unique_name("machine");
        for extra in [&["--fast=false"][..], &[], &["--name", &name]] {
            let out = env
                .cmd()
                .env("AGENTKERNEL_QEMU_MACHINE", "q35")
                .arg("run")
                .args(extra)
                .args(["-i", BUSYBOX, "true"])
                .timeout(RUN_LIMIT)
                .output()
                .unwrap();
            let line = assert_one_line_error(&out);
            assert!(
                line.contains("AGENTKERNEL_QEMU_MACHINE") && line.contains("pc or microvm"),
                "{line}"
            );
        }
        assert!(vms_of(&env).is_empty(), "a VM was started");
        let listed = env.run(&["sandbox", "list"]);
        assert!(!stdout(&listed).contains(&name), "{}", stdout(&listed));
    }

    /// microvm, the machine a KVM host boots (`AGENTKERNEL_QEMU_MACHINE`
    /// chooses it here, under TCG): no PCI bus, the devices on virtio-mmio
    /// found through ACPI, and everything a run needs works on them — the
    /// workspace share, the NIC and its lease, stdin, the exit code.
    #[test]
    fn a_microvm_runs_the_command_on_virtio_mmio_devices() {
        let env = TestEnv::new();
        std::fs::write(env.project_dir().join("marker.txt"), "from the host\n").unwrap();
        let script = "cat; cat /workspace/marker.txt; \
                      echo pci=$(ls /sys/bus/pci/devices | wc -l); \
                      ls /sys/bus/platform/devices | grep -c '^LNRO0005:'; \
                      ls /sys/bus/platform/drivers; \
                      cut -d' ' -f1 /proc/modules | sed 's/^/module=/'; \
                      echo clock=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource); \
                      ip -4 -o addr show eth0 | grep -q inet && echo eth0-up; exit 5";
        let out = env
            .cmd()
            .env("AGENTKERNEL_QEMU_MACHINE", "microvm")
            .args(["run", "--fast=false", "-i", BUSYBOX, "sh", "-c", script])
            .write_stdin("from stdin\n")
            .timeout(RUN_LIMIT)
            .output()
            .unwrap();
        assert_code(&out, 5);
        let text = stdout(&out);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[..3],
            ["from stdin", "from the host", "pci=0"],
            "{text}"
        );
        let mmio_devices: u32 = lines[3].parse().unwrap();
        // The disk, the agent's port, the share and the NIC.
        assert!(mmio_devices >= 4, "{text}");
        // The MMIO transport's driver is there, built in or loaded; a
        // kernel whose drivers are modules (Debian's) loaded it and not the
        // PCI transport's.
        assert!(lines.contains(&"virtio-mmio"), "{text}");
        if lines.iter().any(|l| l.starts_with("module=")) {
            assert!(lines.contains(&"module=virtio_mmio"), "{text}");
            assert!(!lines.contains(&"module=virtio_pci"), "{text}");
        }
        // The guest keeps a real clock: under TCG it is told the TSC's rate
        // (measuring it against the PIT fails on a busy host, and a microvm
        // hung then), under KVM it has KVM's.
        // (A host whose own TSC has no constant rate tells it nothing.)
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let constant_tsc = ["constant_tsc", "nonstop_tsc"]
            .iter()
            .all(|flag| cpuinfo.split_whitespace().any(|w| w == *flag));
        let clock = lines.iter().find_map(|l| l.strip_prefix("clock="));
        assert!(
            !constant_tsc || matches!(clock, Some("tsc" | "tsc-early" | "kvm-clock")),
            "{text}"
        );
        assert_eq!(lines.last(), Some(&"eth0-up"), "{text}");
    }

    /// agentkernel's own guest kernel, once built (scripts/setup.sh runs
    /// scripts/guest-kernel.sh), is what a run boots when the config names
    /// none: the guest's release is the one the build recorded, not
    /// Debian's.
    #[test]
    fn a_run_boots_agentkernels_own_kernel_once_it_is_built() {
        let own = std::path::Path::new(agentkernel_vm::kernel::OWN_KERNEL_DIR);
        let release = std::fs::read_to_string(own.join("release")).expect(
            "agentkernel's guest kernel is built (scripts/setup.sh runs scripts/guest-kernel.sh)",
        );
        let env = TestEnv::new();
        let out = env
            .cmd()
            .env_remove("AGENTKERNEL_QEMU_KERNEL")
            .env_remove("AGENTKERNEL_QEMU_MODULES")
            .args([
                "run",
                "--fast=false",
                "--no-network",
                "-i",
                BUSYBOX,
                "uname",
                "-r",
            ])
            .timeout(RUN_LIMIT)
            .output()
            .unwrap();
        assert_code(&out, 0);
        assert_eq!(stdout(&out).trim(), release.trim());
        assert_ne!(release.trim(), host_kernel());
        let (debian, _) = distribution_kernel();
        assert!(!debian.ends_with(release.trim()), "{debian}");
    }

    #[test]
    fn a_vm_runs_the_command_with_its_own_kernel_and_the_stdio_and_exit_code() {
        let env = TestEnv::new();
        // The guest's root user holds the profile's capabilities, no more:
        // mounting (CAP_SYS_ADMIN) fails as on native; seccomp and
        // no_new_privs are on.
        let script = "cat; uname -r; cat /proc/version; echo to-stderr >&2; \
                      mount -t tmpfs none /tmp 2>/dev/null && echo MOUNTED; \
                      grep -E '^(NoNewPrivs|Seccomp):' /proc/self/status; exit 7";
        let receipt = env.home_dir().join("vm-receipt.json");
        let out = run_with_stdin(
            &env,
            &[
                "run",
                "--no-network",
                "--receipt",
                receipt.to_str().unwrap(),
                "-i",
                BUSYBOX,
                "sh",
                "-c",
                script,
            ],
            b"from-stdin\n",
        );
        assert_code(&out, 7);
        // The receipt digests what the guest wrote and pins the image.
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&receipt).unwrap()).unwrap();
        use sha2::Digest;
        let digest = format!("{:x}", sha2::Sha256::digest(&out.stdout));
        assert_eq!(r["outcome"]["stdout"]["sha256"], digest.as_str(), "{r}");
        assert_eq!(r["outcome"]["stdout"]["bytes"], out.stdout.len(), "{r}");
        assert_eq!(r["outcome"]["exit_code"], 7, "{r}");
        assert!(
            r["sandbox"]["image"]["digest"]
                .as_str()
                .is_some_and(|d| d.starts_with("agentkernel-test/busybox@sha256:")),
            "{r}"
        );
        assert_code(
            &env.run(&["receipt", "verify", receipt.to_str().unwrap()]),
            0,
        );
        let text = stdout(&out);
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("from-stdin"), "{text}");
        let guest_kernel = lines.next().unwrap_or_default();
        assert!(!guest_kernel.is_empty(), "{text}");
        assert_ne!(
            guest_kernel,
            host_kernel(),
            "the guest runs the host's kernel: {text}"
        );
        let host_version = std::fs::read_to_string("/proc/version").unwrap();
        assert_ne!(
            lines.next().unwrap_or_default(),
            host_version.trim(),
            "{text}"
        );
        assert_eq!(lines.next(), Some("NoNewPrivs:\t1"), "{text}");
        assert_eq!(lines.next(), Some("Seccomp:\t2"), "{text}");
        assert!(stderr(&out).contains("to-stderr"), "{}", stderr(&out));
        // A command that is not there is the command's failure: 127.
        // (This run is served by the VM the first one left warm.)
        let out = env.run(&["run", "--no-network", "-i", BUSYBOX, "no-such-command-xyz"]);
        assert_code(&out, 127);
        assert!(
            stderr(&out).contains("no-such-command-xyz"),
            "{}",
            stderr(&out)
        );
        // Only the pool's warm VMs (one booting for the next run) remain.
        let warm = warm_holders(&env);
        let outliving: Vec<u32> = vms_of(&env)
            .into_iter()
            .filter(|vm| !warm.iter().any(|h| parent_of(*vm) == Some(*h)))
            .collect();
        assert!(outliving.is_empty(), "a VM outlived its run: {outliving:?}");
    }

    /// Holders of this test's warm pool VMs.
    fn warm_holders(env: &TestEnv) -> Vec<u32> {
        let state = env.state_dir().to_string_lossy().into_owned();
        processes_with(|args| {
            args.iter().any(|a| a == "--warm") && args.iter().any(|a| a.contains(&state))
        })
    }

    /// The session id of `pid` (`/proc/PID/stat`, the 6th field).
    fn session_of(pid: u32) -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(3)?
            .parse()
            .ok()
    }

    fn parent_of(pid: u32) -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    #[test]
    fn the_workspace_is_copy_on_write_read_write_or_read_only_per_profile() {
        let env = TestEnv::new();
        let file = env.project_dir().join("file.txt");
        std::fs::write(&file, "host\n").unwrap();
        let write = "echo changed > /workspace/file.txt && cat /workspace/file.txt";

        // moderate: the sandbox sees its change, the host copy never changes
        let out = env.run(&[
            "run",
            "--fast=false",
            "--no-network",
            "-i",
            BUSYBOX,
            "sh",
            "-c",
            write,
        ]);
        assert_code(&out, 0);
        assert_eq!(stdout(&out), "changed\n");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "host\n");

        // restrictive: neither the workspace nor the root can be written
        // ...and root in it has no capabilities at all.
        let attempt =
            "echo x > /workspace/file.txt; echo x > /etc/new; echo tmp > /tmp/t; cat /tmp/t; \
                       grep -E '^Cap(Eff|Bnd):' /proc/self/status";
        let out = env.run(&[
            "run",
            "--fast=false",
            "-p",
            "restrictive",
            "-i",
            BUSYBOX,
            "sh",
            "-c",
            attempt,
        ]);
        assert_code(&out, 0);
        assert_eq!(
            stdout(&out),
            "tmp\nCapEff:\t0000000000000000\nCapBnd:\t0000000000000000\n",
            "{}",
            stderr(&out)
        );
        assert_eq!(
            stderr(&out).matches("Read-only file system").count(),
            2,
            "{}",
            stderr(&out)
        );
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "host\n");

        // permissive: writes reach the host
        let out = env.run(&[
            "run",
            "--fast=false",
            "-p",
            "permissive",
            "--no-network",
            "-i",
            BUSYBOX,
            "sh",
            "-c",
            write,
        ]);
        assert_code(&out, 0);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "changed\n");
    }

    #[test]
    fn timeout_is_124_a_memory_bomb_137_and_a_fork_bomb_meets_the_pids_limit() {
        let env = TestEnv::new();
        // The guest's clock is the host's: the command really had its 2 s
        // (measured from its start, which the trace marks).
        let out = env
            .cmd()
            .env("AGENTKERNEL_TRACE_STARTUP", "1")
            .args([
                "run",
                "--fast=false",
                "--no-network",
                "--timeout",
                "2s",
                "-i",
                BUSYBOX,
                "sh",
                "-c",
                "sleep 60 & sleep 60",
            ])
            .output()
            .unwrap();
        assert_code(&out, 124);
        let err = stderr(&out);
        assert!(err.contains("timed out"), "{err}");
        let at = |phase: &str| -> u64 {
            err.lines()
                .find(|l| l.starts_with("agentkernel-trace ") && l.ends_with(phase))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
                .unwrap_or_else(|| panic!("no {phase} in {err}"))
        };
        let ran_ms = (at("exit seen") - at("command started")) / 1000;
        assert!(
            (1900..30_000).contains(&ran_ms),
            "the 2 s timeout took {ran_ms} ms of host time"
        );
        let bomb = "x=a; while :; do x=$x$x; done";
        let out = env.run(&[
            "run",
            "--fast=false",
            "--no-network",
            "--memory",
            "256m",
            "-i",
            BUSYBOX,
            "sh",
            "-c",
            bomb,
        ]);
        assert_code(&out, 137);
        assert!(stderr(&out).contains("out of memory"), "{}", stderr(&out));
        // restrictive: pids.max 512 in the command's cgroup, which it sees
        // (read-only: it cannot raise the limit) and the fork bomb meets.
        let out = env.run(&[
            "run",
            "--fast=false",
            "-p",
            "restrictive",
            "--timeout",
            "120s",
            "-i",
            BUSYBOX,
            "sh",
            "-c",
            &format!(
                "cat /sys/fs/cgroup/pids.max; \
                 echo max > /sys/fs/cgroup/pids.max 2>/dev/null && echo RAISED; {FORK_BOMB}"
            ),
        ]);
        assert_fork_bomb_contained(&out);
        assert!(stdout(&out).starts_with("512\n"), "{}", stdout(&out));
        assert!(!stdout(&out).contains("RAISED"), "{}", stdout(&out));
        assert!(vms_of(&env).is_empty(), "a VM outlived its run");
    }

    /// `agentkernel run … sleep 600`, spawned, once its VM is up.
    fn spawn_sleeper(env: &TestEnv) -> (std::process::Child, Vec<u32>) {
        let child = env
            .std_cmd()
            .args([
                "run",
                "--fast=false",
                "--no-network",
                "-i",
                BUSYBOX,
                "sleep",
                "600",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        poll_until(VM_LIMIT, "a VM for this run", || !vms_of(env).is_empty());
        (child, vms_of(env))
    }

    fn assert_gone(vms: &[u32]) {
        poll_until(Duration::from_secs(10), "the VM dies with its run", || {
            vms.iter()
                .all(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
        });
    }

    #[test]
    fn sigterm_reaches_the_command_and_kill_9_takes_the_vm_with_it() {
        let env = TestEnv::new();
        // SIGTERM is forwarded to the command in the guest: sleep dies of
        // it (143), and the VM with the run.
        let (mut child, vms) = spawn_sleeper(&env);
        // The VM is up; give the agent time to start the command.
        std::thread::sleep(Duration::from_secs(2));
        // SAFETY: kill has no memory preconditions; our own child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let status = wait_child(&mut child, VM_LIMIT);
        assert_eq!(status.code(), Some(143), "{status:?}");
        assert_gone(&vms);

        // kill -9 of agentkernel: QEMU dies with it (PR_SET_PDEATHSIG) and
        // leaves nothing in the store.
        let (mut child, vms) = spawn_sleeper(&env);
        child.kill().unwrap();
        child.wait().unwrap();
        assert_gone(&vms);
        // Only the caches (disks, initramfs, kernel, accel, the TSC rate; a dot file is
        // one another test is writing) are in the store's VM directory: a
        // run keeps nothing of its own there.
        let vm_dir = env.state_dir().join("images/vm");
        let left: Vec<_> = std::fs::read_dir(&vm_dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| {
                !(name.starts_with('.')
                    || name == "disks"
                    || name == "accel"
                    || name == "tsc-khz"
                    || name.starts_with("initramfs-")
                    || name.starts_with("vmlinux-"))
            })
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    /// `shell` run by `script`, which gives it a terminal: what the
    /// terminal shows is collected as it comes, and the test types into it.
    struct OnTerminal {
        child: std::process::Child,
        keys: std::process::ChildStdin,
        shown: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    }

    impl OnTerminal {
        fn start(env: &TestEnv, shell: &str) -> OnTerminal {
            let mut cmd = std::process::Command::new("script");
            env.configure(&mut cmd);
            cmd.env_remove("TERM")
                .args(["-qec", shell, "/dev/null"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null());
            let mut child = cmd.spawn().expect("script (bsdutils) is installed");
            let keys = child.stdin.take().unwrap();
            let mut screen = child.stdout.take().unwrap();
            let shown = std::sync::Arc::<std::sync::Mutex<Vec<u8>>>::default();
            let collected = shown.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = std::io::Read::read(&mut screen, &mut buf) {
                    if n == 0 {
                        break;
                    }
                    collected.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
            OnTerminal { child, keys, shown }
        }

        fn shown(&self) -> String {
            String::from_utf8_lossy(&self.shown.lock().unwrap()).into_owned()
        }

        fn wait_for(&self, text: &str) {
            poll_until(VM_LIMIT, &format!("{text:?} on the terminal"), || {
                self.shown().contains(text)
            });
        }

        fn type_keys(&mut self, keys: &[u8]) {
            self.keys.write_all(keys).unwrap();
            self.keys.flush().unwrap();
        }

        fn finish(mut self) -> (std::process::ExitStatus, String) {
            let status = wait_child(&mut self.child, VM_LIMIT);
            // The collector has the rest once script's output closes.
            std::thread::sleep(Duration::from_millis(200));
            (status, self.shown())
        }
    }

    /// A run in a terminal that closes as the run ends (an agent's pty,
    /// `script -c`) starts the refill of its warm VM as it exits: the
    /// holder must not get the terminal's hang-up, not even before its
    /// `main` runs. Three such runs, each of which refills the pool: every
    /// refill's VM becomes ready. (Spawned into the caller's process group,
    /// two holders of three died of SIGHUP on this host.)
    #[test]
    fn warm_vms_outlive_the_terminal_of_the_run_that_refilled_them() {
        let env = TestEnv::new();
        let run = format!(
            "AGENTKERNEL_TRACE_STARTUP=1 {} run --no-network -i {BUSYBOX} true",
            binary().display()
        );
        for round in 0..3 {
            let (status, shown) = OnTerminal::start(&env, &run).finish();
            assert_eq!(status.code(), Some(0), "{shown}");
            assert!(
                shown.contains("pool refill started"),
                "round {round}: {shown}"
            );
            // Every warm VM a refill started boots to ready: none lost its
            // holder (a dead holder's directory stays, never ready, until gc).
            poll_until(VM_LIMIT, "every warm VM ready", || {
                let dirs = warm_dirs(&env);
                !dirs.is_empty()
                    && dirs
                        .iter()
                        .all(|d| d.join("ready").exists() || d.join("claimed").exists())
            });
        }
    }

    #[test]
    fn a_command_gets_a_terminal_of_the_hosts_size_in_a_cold_and_a_claimed_vm() {
        let env = TestEnv::new();
        // In the guest: a terminal as stdin and stdout, stderr merged into
        // it, TERM set; the typed line; the window size, then its change;
        // ^C (a key, sent raw) interrupting a sleep through the guest
        // terminal's SIGINT; and the exit code.
        let inner = "trap 'echo got-int' INT; tty; [ -t 0 ] && [ -t 1 ] && echo in-tty; \
                     echo to-stderr >&2; echo TERM=$TERM; stty size; \
                     read line; echo got:$line; \
                     i=0; while [ \"$(stty size)\" = '33 101' ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; \
                     stty size; echo sleeping; sleep 30; echo after-sleep; exit 3";
        let resize = env.home_dir().join("resize");
        // Outside: our window is 33x101; agentkernel runs in the background
        // (on the terminal still) so that this shell can resize the window
        // when told to; the terminal's settings must be back as they were.
        let outer = format!(
            "stty rows 33 cols 101; before=$(stty -g); \
             AGENTKERNEL_TRACE_STARTUP=1 {ak} run --fast=true --no-network -i {BUSYBOX} sh -c \"{inner}\" < /dev/tty & ak=$!; \
             while [ ! -e {resize} ]; do sleep 0.1; done; stty rows 21 cols 77; kill -WINCH $ak; \
             wait $ak; code=$?; [ \"$(stty -g)\" = \"$before\" ] && echo terminal-restored; exit $code",
            ak = binary().display(),
            inner = inner.replace('"', "\\\"").replace('$', "\\$"),
            resize = resize.display(),
        );
        let session = |claimed: bool| {
            let _ = std::fs::remove_file(&resize);
            let mut term = OnTerminal::start(&env, &outer);
            term.wait_for("33 101");
            term.type_keys(b"hello\n");
            term.wait_for("got:hello");
            std::fs::write(&resize, "").unwrap();
            term.wait_for("21 77");
            term.wait_for("sleeping");
            // ^C until the sleep is interrupted (one that comes before the
            // sleep starts only runs the trap).
            let typed = std::time::Instant::now();
            while !term.shown().contains("after-sleep") {
                assert!(
                    typed.elapsed() < Duration::from_secs(15),
                    "^C did not reach the command: {}",
                    term.shown()
                );
                term.type_keys(b"\x03");
                std::thread::sleep(Duration::from_secs(1));
            }
            let (status, shown) = term.finish();
            assert_eq!(status.code(), Some(3), "{shown}");
            for expected in [
                "/dev/pts/",
                "in-tty",
                "to-stderr",
                "TERM=xterm",
                "got-int",
                "terminal-restored",
            ] {
                assert!(shown.contains(expected), "no {expected:?}: {shown}");
            }
            assert_eq!(
                shown.contains("warm VM claimed"),
                claimed,
                "claimed a warm VM: {}",
                !claimed
            );
        };
        // A cold VM (the one-shot path), then the warm VM it left (a
        // holder's VM: the path of kept sandboxes' `exec -t` too).
        session(false);
        poll_until(VM_LIMIT, "a warm VM ready", || {
            warm_dirs(&env).iter().any(|d| d.join("ready").exists())
        });
        session(true);
    }

    #[test]
    fn what_a_vm_cannot_do_yet_is_refused_in_one_line() {
        let env = TestEnv::new();
        for (args, names) in [
            (
                &["run", "-i", "host", "--no-network", "true"][..],
                "--image host",
            ),
            // `--secret-file`: tests/egress.rs (`secret_files_are_refused`).
            (
                &[
                    "run",
                    "--no-network",
                    "-v",
                    "/etc/hostname:/hostname",
                    "-i",
                    BUSYBOX,
                    "true",
                ][..],
                "of a file",
            ),
            (
                &["run", "-B", "firecracker", "-i", BUSYBOX, "true"][..],
                "KVM",
            ),
        ] {
            let line = assert_one_line_error(&env.run(args));
            assert!(line.contains(names), "{args:?}: {line}");
        }
        assert!(vms_of(&env).is_empty());
    }

    /// `-v` shares the host directory and nothing beyond it: a symlink in it
    /// to a host file resolves in the guest (to the guest's own files), a
    /// `:ro` volume cannot be written even by the guest's root, a writable
    /// one writes the host directory; under restrictive a volume at a path
    /// the image lacks is mounted and the root stays read-only.
    #[test]
    fn a_volume_is_its_directory_only_and_ro_holds() {
        let env = TestEnv::new();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "host-secret\n").unwrap();
        let shared = tempfile::tempdir().unwrap();
        std::fs::write(shared.path().join("f"), "shared\n").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), shared.path().join("link"))
            .unwrap();
        let written = tempfile::tempdir().unwrap();
        let ro = format!("{}:/data:ro", shared.path().display());
        let rw = format!("{}:/out", written.path().display());
        let script = "cat /data/f; cat /data/link 2>/dev/null || echo no-secret; \
            touch /data/new 2>/dev/null && echo RO-WRITTEN; echo made > /out/o";
        let out = env.run(&[
            "run",
            "--fast=false",
            "--no-network",
            "-v",
            &ro,
            "-v",
            &rw,
            "-i",
            BUSYBOX,
            "sh",
            "-c",
            script,
        ]);
        assert_code(&out, 0);
        assert_eq!(stdout(&out), "shared\nno-secret\n");
        assert!(!shared.path().join("new").exists());
        assert_eq!(
            std::fs::read_to_string(written.path().join("o")).unwrap(),
            "made\n"
        );
        // A path the image lacks, under restrictive: its mount point is made
        // in the root's overlay before the root is sealed, as on native, and
        // the root is read-only for the command all the same.
        let missing = format!("{}:/no-such-dir:ro", shared.path().display());
        let out = env.run(&[
            "run",
            "--fast=false",
            "--no-network",
            "-p",
            "restrictive",
            "-v",
            &missing,
            "-i",
            BUSYBOX,
            "sh",
            "-c",
            "cat /no-such-dir/f; touch /new 2>/dev/null && echo ROOT-WRITTEN; echo sealed",
        ]);
        assert_code(&out, 0);
        assert_eq!(stdout(&out), "shared\nsealed\n");
        assert!(vms_of(&env).is_empty(), "a VM outlived its run");
    }

    /// A kept VM's holder process (`agentkernel __vm-holder STATE NAME`).
    fn holder_of(env: &TestEnv, name: &str) -> Option<u32> {
        qemu_holder_of(&env.state_dir().to_string_lossy(), name)
    }

    /// The QEMU whose parent is `holder`.
    fn vm_of_holder(env: &TestEnv, holder: u32) -> u32 {
        vms_of(env)
            .into_iter()
            .find(|pid| parent_of(*pid) == Some(holder))
            .expect("the holder's QEMU")
    }

    fn status_in_list(env: &TestEnv, name: &str) -> Option<String> {
        let out = env.run(&["sandbox", "list", "--json"]);
        assert_code(&out, 0);
        let rows: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .map(|r| r["status"].as_str().unwrap().to_string())
    }

    #[test]
    fn a_kept_vm_serves_commands_and_stops_pauses_and_is_removed() {
        let env = TestEnv::new();
        let name = unique_name("vm");
        // Permissive: the workspace is the host's directory, so the host
        // can watch a command in the VM work (or not, while paused).
        let ticks = env.project_dir().join("ticks");
        // The first command gets stdin; the VM stays up after it.
        let out = run_with_stdin(
            &env,
            &[
                "run",
                "--keep",
                "--name",
                &name,
                "-p",
                "permissive",
                "--no-network",
                "--memory",
                "256m",
                "-i",
                BUSYBOX,
                "sh",
                "-c",
                "echo kept > /root/file; cat",
            ],
            b"first-stdin\n",
        );
        assert_code(&out, 0);
        assert_eq!(stdout(&out), "first-stdin\n", "{}", stderr(&out));
        assert!(stderr(&out).contains(&format!("agentkernel exec {name}")));
        let holder = holder_of(&env, &name).expect("a holder for the kept VM");
        let vm = vm_of_holder(&env, holder);

        // exec: the root's files persist, stdio and exit codes are the
        // command's, -e and --workdir apply.
        let out = run_with_stdin(
            &env,
            &[
                "exec",
                "-e",
                "GREETING=hi",
                "--workdir",
                "/root",
                &name,
                "--",
                "sh",
                "-c",
                "cat; cat file; echo $GREETING; pwd; echo oops >&2; exit 3",
            ],
            b"exec-stdin\n",
        );
        assert_code(&out, 3);
        assert_eq!(stdout(&out), "exec-stdin\nkept\nhi\n/root\n");
        assert_eq!(stderr(&out), "oops\n");
        let out = env.run(&["exec", &name, "--", "no-such-command-xyz"]);
        assert_code(&out, 127);

        // Commands run side by side, each with its own timeout.
        let counter = "i=0; while :; do i=$((i+1)); echo $i > /workspace/ticks; sleep 0.2; done";
        let mut long = env
            .std_cmd()
            .args(["exec", &name, "--", "sh", "-c", counter])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = env.run(&["exec", "--timeout", "1s", &name, "--", "sleep", "30"]);
        assert_code(&out, 124);
        let receipt = env.home_dir().join("exec-receipt.json");
        let out = env.run(&[
            "exec",
            "--receipt",
            receipt.to_str().unwrap(),
            &name,
            "--",
            "echo",
            "beside",
        ]);
        assert_eq!(stdout(&out), "beside\n");
        // One receipt per exec, digesting what the guest wrote.
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&receipt).unwrap()).unwrap();
        use sha2::Digest;
        let digest = format!("{:x}", sha2::Sha256::digest(&out.stdout));
        assert_eq!(r["outcome"]["stdout"]["sha256"], digest.as_str(), "{r}");
        assert_eq!(r["outcome"]["exit_code"], 0, "{r}");
        assert_code(
            &env.run(&["receipt", "verify", receipt.to_str().unwrap()]),
            0,
        );
        let read_ticks = || std::fs::read_to_string(&ticks).unwrap_or_default();
        poll_until(VM_LIMIT, "the counter runs", || !read_ticks().is_empty());

        // pause freezes the VM (QMP stop): listed as paused, exec refused
        // in one line, the counter holds still; resume runs it again.
        assert_code(&env.run(&["sandbox", "pause", &name]), 0);
        assert_eq!(status_in_list(&env, &name).as_deref(), Some("paused"));
        for refused in [
            &["exec", &name, "--", "true"][..],
            &["sandbox", "stop", &name],
        ] {
            let line = assert_one_line_error(&env.run(refused));
            assert!(line.contains("resume"), "{refused:?}: {line}");
        }
        let paused_at = read_ticks();
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(read_ticks(), paused_at, "the guest ran while paused");
        assert_code(&env.run(&["sandbox", "resume", &name]), 0);
        poll_until(Duration::from_secs(30), "the counter runs again", || {
            read_ticks() != paused_at
        });

        // stop: every process in the guest ends (the counter's exec with
        // it, 137), files stay; exec is refused until start.
        let out = env.run(&["sandbox", "stop", &name]);
        assert_code(&out, 0);
        assert_eq!(wait_child(&mut long, VM_LIMIT).code(), Some(137));
        assert_eq!(status_in_list(&env, &name).as_deref(), Some("stopped"));
        assert_one_line_error(&env.run(&["exec", &name, "--", "true"]));
        assert_code(&env.run(&["sandbox", "start", &name]), 0);
        let out = env.run(&["exec", &name, "--", "cat", "/root/file"]);
        assert_eq!(stdout(&out), "kept\n", "{}", stderr(&out));

        // An exec killed with -9 takes its command with it.
        let mut orphan = env
            .std_cmd()
            .args(["exec", &name, "--", "sleep", "600"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let sleeping = || {
            let out = env.run(&["exec", &name, "--", "ps", "-o", "args"]);
            stdout(&out).lines().any(|l| l.trim() == "sleep 600")
        };
        poll_until(Duration::from_secs(30), "the exec's sleep runs", sleeping);
        orphan.kill().unwrap();
        orphan.wait().unwrap();
        poll_until(
            Duration::from_secs(10),
            "the killed exec's sleep ends",
            || !sleeping(),
        );

        // rm: the VM, its holder and its state go.
        assert_code(&env.run(&["sandbox", "rm", &name]), 0);
        assert_gone(&[vm, holder]);
        assert!(!env.state_dir().join("sandboxes").join(&name).exists());
        assert_one_line_error(&env.run(&["exec", &name, "--", "true"]));
    }

    #[test]
    fn kill_9_of_a_holder_or_its_qemu_and_the_ttl_leave_nothing() {
        let env = TestEnv::new();
        let names: Vec<String> = (0..3).map(|_| unique_name("vmgc")).collect();
        for (name, ttl) in names.iter().zip(["1h", "1h", "3s"]) {
            let out = env.run(&[
                "sandbox",
                "create",
                "-B",
                "qemu",
                "--no-network",
                "--memory",
                "256m",
                "--ttl",
                ttl,
                "-i",
                BUSYBOX,
                name,
            ]);
            assert_code(&out, 0);
        }
        let holders: Vec<u32> = names[..2]
            .iter()
            .map(|n| holder_of(&env, n).expect("a holder"))
            .collect();
        let vms: Vec<u32> = holders.iter().map(|h| vm_of_holder(&env, *h)).collect();
        // SAFETY: kill has no memory preconditions; pids found just now.
        unsafe {
            libc::kill(holders[0] as libc::pid_t, libc::SIGKILL);
            libc::kill(vms[1] as libc::pid_t, libc::SIGKILL);
        }
        // QEMU dies with its holder; a holder ends when its QEMU dies; the
        // third expires at its TTL with no agentkernel command run.
        assert_gone(&[holders[0], vms[0], holders[1], vms[1]]);
        poll_until(Duration::from_secs(30), "the TTL ends the VM", || {
            vms_of(&env).is_empty()
        });
        let out = env.run(&["sandbox", "gc"]);
        assert_code(&out, 0);
        let left: Vec<_> = std::fs::read_dir(env.state_dir().join("sandboxes"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "left behind: {left:?}");
        for name in &names {
            assert!(holder_of(&env, name).is_none());
        }
    }

    /// What the host sees of a guest whose kernel hangs or spins: nothing,
    /// not even the agent's heartbeat. Stopping QEMU (SIGSTOP) makes exactly
    /// that silence. A run and a kept sandbox's holder end such a VM after
    /// the silence limit (6 s here, 60 s by default); a paused sandbox,
    /// silent by design, is left alone.
    #[test]
    fn a_guest_that_goes_silent_is_ended_and_a_paused_one_is_not() {
        const SILENCE: &str = "6";
        let env = TestEnv::new();
        let mut run = env
            .std_cmd()
            .env("AGENTKERNEL_VM_SILENCE_SECS", SILENCE)
            .args([
                "run",
                "--fast=false",
                "--no-network",
                "-i",
                BUSYBOX,
                "sh",
                "-c",
                "echo up; sleep 600",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The command runs: every frame from here on is the agent's.
        let mut up = String::new();
        let mut out = std::io::BufReader::new(run.stdout.take().unwrap());
        std::io::BufRead::read_line(&mut out, &mut up).unwrap();
        assert_eq!(up, "up\n");
        let vms = vms_of(&env);
        assert_eq!(vms.len(), 1, "{vms:?}");
        // A command that prints nothing for longer than the limit is not
        // a silent guest: the heartbeat keeps its run going.
        std::thread::sleep(Duration::from_secs(10));
        assert!(
            run.try_wait().unwrap().is_none(),
            "a quiet command's run ended"
        );
        // SAFETY: kill has no memory preconditions; the run's own QEMU.
        unsafe { libc::kill(vms[0] as libc::pid_t, libc::SIGSTOP) };
        let status = wait_child(&mut run, Duration::from_secs(60));
        let mut err = String::new();
        std::io::Read::read_to_string(&mut run.stderr.take().unwrap(), &mut err).unwrap();
        assert_eq!(status.code(), Some(125), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("stopped answering"), "{err}");
        assert_gone(&vms);

        // A kept sandbox: paused past the limit, it lives on and serves.
        let name = unique_name("vmsilent");
        let created = env
            .cmd()
            .env("AGENTKERNEL_VM_SILENCE_SECS", SILENCE)
            .args(["sandbox", "create", "-B", "qemu", "--no-network"])
            .args(["-i", BUSYBOX, &name])
            .timeout(VM_LIMIT)
            .output()
            .unwrap();
        assert_code(&created, 0);
        let holder = holder_of(&env, &name).expect("a holder");
        let vm = vm_of_holder(&env, holder);
        assert_code(&env.run(&["sandbox", "pause", &name]), 0);
        std::thread::sleep(Duration::from_secs(10));
        assert_code(&env.run(&["sandbox", "resume", &name]), 0);
        let out = env.run(&["exec", &name, "--", "echo", "served"]);
        assert_code(&out, 0);
        assert_eq!(stdout(&out), "served\n");
        // Silent without being paused: the holder ends it and the sandbox goes.
        // SAFETY: as above; the holder's QEMU.
        unsafe { libc::kill(vm as libc::pid_t, libc::SIGSTOP) };
        poll_until(
            Duration::from_secs(60),
            "the holder ends its silent VM",
            || {
                [vm, holder]
                    .iter()
                    .all(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
            },
        );
        assert_eq!(status_in_list(&env, &name), None);
    }

    /// A kept (or warm) VM runs the image's `/bin/sh -c :` before it is
    /// ready (the TCG warm-up): an image whose shell tries to leave files
    /// and a process behind leaves nothing the command sees — and the same
    /// shell run as a command does leave them, so their absence means
    /// something.
    #[test]
    fn the_warm_up_run_of_the_images_shell_leaves_nothing_behind() {
        let env = TestEnv::new();
        let name = unique_name("vmwarm");
        let created = env
            .cmd()
            .args(["sandbox", "create", "-B", "qemu", "--no-network"])
            .args(["-i", HOSTILE_SH, &name])
            .timeout(VM_LIMIT)
            .output()
            .unwrap();
        assert_code(&created, 0);
        let files = "for f in /hostile-sh-was-here /tmp/hostile-sh-was-here; do \
                     [ -e $f ] && echo found $f; done; true";
        let look = format!("{files}; busybox ps -o args | busybox grep -c '[s]leep 600'");
        let out = env.run(&["exec", &name, "--", "/bin/busybox", "sh", "-c", &look]);
        assert_eq!(stdout(&out), "0\n", "{}", stderr(&out));
        // Run as a command, the image's shell leaves what it tries to.
        assert_code(&env.run(&["exec", &name, "--", "/bin/sh", "-c", "true"]), 0);
        let out = env.run(&["exec", &name, "--", "/bin/busybox", "sh", "-c", files]);
        assert_eq!(
            stdout(&out),
            "found /hostile-sh-was-here\nfound /tmp/hostile-sh-was-here\n",
            "{}",
            stderr(&out)
        );
        assert_code(&env.run(&["sandbox", "rm", &name]), 0);
    }

    /// A warm pool VM runs a first command of its own before it is offered
    /// (a pooled run then does not pay for TCG's first translation of the
    /// launch path): the agent's binary, never a program of the image. An
    /// image whose shell leaves files and a process behind: a pooled run
    /// finds neither (run unconfined, the shell would have left both).
    #[test]
    fn a_warm_vms_first_command_runs_nothing_of_the_image() {
        let env = TestEnv::new();
        let look = "for f in /hostile-sh-was-here /tmp/hostile-sh-was-here; do \
                    [ -e $f ] && echo found $f; done; \
                    busybox ps -o args | busybox grep -c '[s]leep 600'";
        let run = || {
            env.cmd()
                .env("AGENTKERNEL_TRACE_STARTUP", "1")
                .args(["run", "--no-network", "-i", HOSTILE_SH])
                .args(["/bin/busybox", "sh", "-c", look])
                .timeout(VM_LIMIT)
                .output()
                .unwrap()
        };
        // The first run boots its own VM and leaves a warm one booting.
        let cold = run();
        assert_eq!(stdout(&cold), "0\n", "{}", stderr(&cold));
        poll_until(VM_LIMIT, "a warm VM ready", || {
            warm_dirs(&env).iter().any(|d| d.join("ready").exists())
        });
        let pooled = run();
        assert!(
            stderr(&pooled).contains("warm VM claimed"),
            "{}",
            stderr(&pooled)
        );
        assert_eq!(stdout(&pooled), "0\n", "{}", stderr(&pooled));
    }

    fn warm_dirs(env: &TestEnv) -> Vec<std::path::PathBuf> {
        qemu_pool_vm_dirs(env.state_dir())
    }

    #[test]
    fn a_pooled_run_gets_a_fresh_vm_and_the_same_result_as_a_cold_one() {
        let env = TestEnv::new();
        // What the run sees of its VM: a root no earlier run wrote to, its
        // environment, user, capabilities, stdin and exit code.
        let script = "cat /root/mark 2>/dev/null || echo fresh; echo used > /root/mark; \
                      echo $FOO; id; grep -E '^Cap(Eff|Bnd):' /proc/self/status; cat; exit 5";
        let run = |fast: &str| {
            let mut child = env
                .std_cmd()
                .env("AGENTKERNEL_TRACE_STARTUP", "1")
                .args([
                    "run",
                    fast,
                    "--no-network",
                    "-e",
                    "FOO=bar",
                    "-i",
                    BUSYBOX,
                    "sh",
                    "-c",
                    script,
                ])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            child.stdin.take().unwrap().write_all(b"in\n").unwrap();
            let status = wait_child(&mut child, VM_LIMIT);
            let mut out = child.wait_with_output().unwrap();
            out.status = status;
            out
        };
        // The first pooled run finds no VM: it boots one (the normal path)
        // and leaves one booting for the next run of this key.
        let cold = run("--fast=true");
        assert_code(&cold, 5);
        assert!(!stderr(&cold).contains("warm VM claimed"));
        poll_until(VM_LIMIT, "a warm VM ready", || {
            warm_dirs(&env).iter().any(|d| d.join("ready").exists())
        });
        let warm = run("--fast=true");
        assert_code(&warm, 5);
        assert!(
            stderr(&warm).contains("warm VM claimed"),
            "{}",
            stderr(&warm)
        );
        let unpooled = run("--fast=false");
        assert_code(&unpooled, 5);
        assert!(
            stdout(&cold).starts_with("fresh\nbar\nuid=0(root)"),
            "{}",
            stdout(&cold)
        );
        assert!(stdout(&cold).ends_with("\nin\n"), "{}", stdout(&cold));
        assert_eq!(stdout(&warm), stdout(&cold));
        assert_eq!(stdout(&unpooled), stdout(&cold));

        // The claimed VM served that one command and is gone; a new one boots.
        poll_until(Duration::from_secs(30), "the used warm VM ends", || {
            warm_dirs(&env).iter().all(|d| !d.join("claimed").exists())
        });
        poll_until(VM_LIMIT, "the pool refilled", || {
            warm_dirs(&env).iter().any(|d| d.join("ready").exists())
        });
        // pool status counts the key's runs: the first booted, the second
        // found a VM (--fast=false is not the pool's).
        let out = env.run(&["pool", "status", "--json"]);
        assert_code(&out, 0);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let key = &status["vms"]["keys"][0];
        assert_eq!(key["image"], BUSYBOX, "{status}");
        assert_eq!(
            (&key["hits"], &key["misses"]),
            (&1.into(), &1.into()),
            "{status}"
        );
        assert_eq!(key["warm"], 1, "{status}");
        // kill -9 of a warm VM's holder takes its QEMU; gc removes the rest.
        let holders = warm_holders(&env);
        assert_eq!(holders.len(), 1, "{holders:?}");
        // Started by a run, the holder is detached from it: a session of
        // its own (a Ctrl-C to the run's terminal or group never reaches
        // it) and `/` as its directory (it pins no project directory).
        assert_eq!(session_of(holders[0]), Some(holders[0]), "its own session");
        assert_eq!(
            std::fs::read_link(format!("/proc/{}/cwd", holders[0])).ok(),
            Some(std::path::PathBuf::from("/"))
        );
        let vm = vm_of_holder(&env, holders[0]);
        // SAFETY: kill has no memory preconditions; the pid was found just now.
        unsafe { libc::kill(holders[0] as libc::pid_t, libc::SIGKILL) };
        assert_gone(&[holders[0], vm]);
        assert_code(&env.run(&["sandbox", "gc"]), 0);
        assert!(warm_dirs(&env).is_empty(), "{:?}", warm_dirs(&env));

        // pool prune ends a warm VM, and no run can claim it meanwhile.
        assert_code(&run("--fast=true"), 5);
        poll_until(VM_LIMIT, "a warm VM ready", || {
            warm_dirs(&env).iter().any(|d| d.join("ready").exists())
        });
        let holders = warm_holders(&env);
        assert_eq!(holders.len(), 1, "{holders:?}");
        let vm = vm_of_holder(&env, holders[0]);
        let out = env.run(&["pool", "prune"]);
        assert_code(&out, 0);
        assert!(stderr(&out).contains("1 warm VM"), "{}", stderr(&out));
        assert_gone(&[holders[0], vm]);
        assert!(warm_dirs(&env).is_empty(), "{:?}", warm_dirs(&env));
    }

    // ---- The VM's network (docs/qemu.md, "Network") ----

    use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
    use std::sync::atomic::Ordering;
    use std::sync::{mpsc, Arc, Mutex};

    use super::common::netprobe::*;

    /// A stand-in for the internet, reachable only by routing through the
    /// host: a network namespace behind a veth pair on a /30 of 198.18/15,
    /// with a TCP server that greets each client with "inet-hello" and
    /// records the address it came from. Removed on drop.
    struct Internet {
        ns: String,
        host_if: String,
        /// The host's end of the veth: what NAT makes a VM's packets come from.
        host_ip: Ipv4Addr,
        server: SocketAddr,
        peers: Arc<Mutex<Vec<Ipv4Addr>>>,
    }

    fn ip(args: &[&str]) {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn internet() -> Internet {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let id = std::process::id() % 100_000;
        let ns = format!("akinet{id}x{n}");
        let host_if = format!("akih{id}x{n}");
        // A /30 per (process, internet): 198.18.A.B/30.
        let slot = (id * 4 + n) % (128 * 64);
        let base = Ipv4Addr::new(198, 18, (slot / 64) as u8, ((slot % 64) * 4) as u8);
        let host_ip = Ipv4Addr::from(u32::from(base) + 1);
        let server_ip = Ipv4Addr::from(u32::from(base) + 2);
        ip(&["netns", "add", &ns]);
        let mut inet = Internet {
            ns: ns.clone(),
            host_if: host_if.clone(),
            host_ip,
            server: SocketAddr::from((server_ip, 0)),
            peers: Arc::default(),
        };
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        let (server_net, gateway) = (format!("{server_ip}/30"), host_ip.to_string());
        for args in [
            ["addr", "add", &server_net, "dev", "eth0"].as_slice(),
            &["link", "set", "eth0", "up"],
            &["link", "set", "lo", "up"],
            &["route", "add", "default", "via", &gateway],
        ] {
            let mut all = vec!["-n", ns.as_str()];
            all.extend_from_slice(args);
            ip(&all);
        }
        // The server's socket is made in the namespace by a thread that
        // enters it (it stays there; the socket stays bound to it).
        let netns = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
        let (tx, rx) = mpsc::channel();
        let peers = inet.peers.clone();
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            // SAFETY: setns on this thread only, with a namespace fd we own.
            let entered = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(entered, 0);
            let l = TcpListener::bind((server_ip, 0)).unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            for mut c in l.incoming().flatten() {
                if let Ok(SocketAddr::V4(peer)) = c.peer_addr() {
                    peers.lock().unwrap().push(*peer.ip());
                }
                let _ = std::io::Write::write_all(&mut c, b"inet-hello\n");
            }
        });
        inet.server = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        inet
    }

    impl Drop for Internet {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", &self.host_if])
                .output();
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.ns])
                .output();
        }
    }

    /// Network leases (`/run/agentkernel/net/leases/<ip>`) held by process
    /// `pid` (a lease's id ends with its holder's `<boot>.<pid>.<start>`):
    /// (lease file, tap name).
    fn leases_of(pid: u32) -> Vec<(std::path::PathBuf, String)> {
        let marker = format!(".{pid}.");
        std::fs::read_dir("/run/agentkernel/net/leases")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let text = std::fs::read_to_string(e.path()).ok()?;
                let id = text.lines().find_map(|l| l.strip_prefix("sandbox="))?;
                let tap = text.lines().find_map(|l| l.strip_prefix("veth="))?;
                (id.starts_with("vm-") && id.contains(&marker)).then(|| (e.path(), tap.to_string()))
            })
            .collect()
    }

    /// `agentkernel ARGS` with piped output (not `TestEnv::spawn`, whose
    /// clean-up is a container engine's), killed if the test fails first.
    fn spawn_piped(env: &TestEnv, args: &[&str]) -> Running {
        Running(Some(
            env.std_cmd()
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        ))
    }

    struct Running(Option<std::process::Child>);

    impl Running {
        fn child(&mut self) -> &mut std::process::Child {
            self.0.as_mut().unwrap()
        }

        fn id(&self) -> u32 {
            self.0.as_ref().unwrap().id()
        }

        fn into_output(mut self) -> std::process::Output {
            let mut child = self.0.take().unwrap();
            let status = wait_child(&mut child, VM_LIMIT);
            let mut out = child.wait_with_output().unwrap();
            out.status = status;
            out
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            if let Some(mut child) = self.0.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    fn link_exists(name: &str) -> bool {
        std::path::Path::new("/sys/class/net").join(name).exists()
    }

    /// Waits for the one lease `pid` holds; checks its tap is a port of
    /// agentkernel's bridge.
    fn lease_of(pid: u32) -> (std::path::PathBuf, String) {
        // The lease is taken first, then its tap is made.
        poll_until(VM_LIMIT, "the VM's lease and tap", || {
            let held = leases_of(pid);
            held.len() == 1 && link_exists(&format!("{}/master", held[0].1))
        });
        let (file, tap) = leases_of(pid).remove(0);
        let master = std::fs::read_link(format!("/sys/class/net/{tap}/master")).unwrap();
        assert!(master.ends_with("agentkernel0"), "{master:?}");
        (file, tap)
    }

    fn assert_released(lease: &(std::path::PathBuf, String)) {
        poll_until(Duration::from_secs(30), "the lease is released", || {
            !lease.0.exists() && !link_exists(&lease.1)
        });
    }

    /// An address of agentkernel's subnet that a VM claims as its own in a
    /// forged ARP request.
    const SPOOFED: &str = "10.209.255.254";

    /// A networked VM as native gives one: out through NAT to the world,
    /// its published port from the host, DNS config; and none of the host:
    /// not a service on its loopback (even with a hand-made packet to the
    /// gateway's MAC, CVE-2020-8558), not one on the host's addresses, and
    /// no forged ARP. Its lease and tap are gone when the run ends.
    #[test]
    fn a_vm_reaches_out_through_nat_and_publishes_ports_but_never_the_host_nor_forges_arp() {
        let env = TestEnv::new();
        let inet = internet();
        let secret = host_listener(Ipv4Addr::LOCALHOST);
        let service = host_listener(Ipv4Addr::UNSPECIFIED);
        let published = free_port();
        let mut hosts = host_ipv4_addresses();
        assert!(hosts.contains(&inet.host_ip.to_string()), "{hosts:?}");
        hosts.insert(0, "GW".into());
        // Permissive keeps CAP_NET_RAW for the raw probe (RAW_SYN_PROBE).
        let script = format!(
            "{FIND_GATEWAY}import subprocess, sys, threading\n\
             served = threading.Event()\n\
             s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             s.bind(('0.0.0.0', 8080)); s.listen(8)\n\
             def serve():\n\
             \x20   while True:\n\
             \x20       c, _ = s.accept(); c.sendall(b'hello\\n'); c.close(); served.set()\n\
             threading.Thread(target=serve, daemon=True).start()\n\
             print('resolv', open('/etc/resolv.conf').readline().strip(), flush=True)\n\
             def connect(host, port):\n\
             \x20   try:\n\
             \x20       c = socket.create_connection((host, port), 3)\n\
             \x20       print(host, 'connected', c.recv(64).decode().strip(), flush=True)\n\
             \x20   except OSError as e:\n\
             \x20       print(host, 'refused', e, flush=True)\n\
             connect('{inet_ip}', {inet_port})\n\
             for h in '{hosts}'.replace('GW', gw).split():\n\
             \x20   connect(h, {service_port})\n\
             subprocess.call(['python3', '-c', sys.argv[1], gw + ':{published}', '127.0.0.1:{secret}'])\n\
             mac = open('/sys/class/net/eth0/address').read().strip()\n\
             u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.connect((gw, 9))\n\
             print('me', u.getsockname()[0], mac, flush=True)\n\
             raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); raw.bind(('eth0', 0))\n\
             m = bytes.fromhex(mac.replace(':', ''))\n\
             raw.send(b'\\xff' * 6 + m + b'\\x08\\x06' + struct.pack('!HHBBH', 1, 0x0800, 6, 4, 1)\n\
             \x20        + m + socket.inet_aton('{spoofed}') + bytes(6) + socket.inet_aton(gw))\n\
             import time; time.sleep(1)\n\
             print('done', flush=True)\n\
             served.wait(120)\n",
            inet_ip = inet.server.ip(),
            inet_port = inet.server.port(),
            hosts = hosts.join(" "),
            service_port = service.port,
            secret = secret.port,
            spoofed = SPOOFED,
        );
        let publish = format!("0.0.0.0:{published}:8080");
        let mut run = spawn_piped(
            &env,
            &[
                "run",
                "--fast=false",
                "-p",
                "permissive",
                "-P",
                &publish,
                "-i",
                PYTHON,
                "python3",
                "-c",
                &script,
                RAW_SYN_PROBE,
            ],
        );
        let lease = lease_of(run.id());
        let out = run.child().stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let done = line == "done";
                let _ = tx.send(line);
                if done {
                    break;
                }
            }
        });
        let mut text = String::new();
        while !text.ends_with("done\n") {
            let line = rx.recv_timeout(VM_LIMIT).unwrap_or_else(|_| {
                panic!("the VM did not finish its probes: {text:?}");
            });
            text.push_str(&line);
            text.push('\n');
        }
        // The VM's own ARP reached the host (it knows the VM's MAC), but
        // its ARP request from another sandbox's address did not: the tap
        // takes only the lease's MAC and address, so a guest cannot point
        // the host at itself for another sandbox's traffic.
        let me: Vec<&str> = text
            .lines()
            .find_map(|l| l.strip_prefix("me "))
            .unwrap_or_else(|| panic!("{text}"))
            .split(' ')
            .collect();
        let neighbour = |addr: &str| {
            let out = std::process::Command::new("ip")
                .args(["neigh", "show", addr, "dev", "agentkernel0"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        assert!(neighbour(me[0]).contains(me[1]), "{}", neighbour(me[0]));
        assert!(
            !neighbour(SPOOFED).contains(me[1]),
            "the host took the VM's forged ARP: {}",
            neighbour(SPOOFED)
        );
        // -P from the host: the published port reaches the VM's server.
        let mut c = TcpStream::connect_timeout(
            &SocketAddr::from((Ipv4Addr::LOCALHOST, published)),
            Duration::from_secs(5),
        )
        .unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut greeting = String::new();
        std::io::Read::read_to_string(&mut c, &mut greeting).unwrap();
        assert_eq!(greeting, "hello\n");
        let output = run.into_output();
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        assert!(
            stderr(&output).contains(&format!("port 0.0.0.0:{published} -> 8080/tcp")),
            "{}",
            stderr(&output)
        );

        assert!(
            text.starts_with("resolv # generated by agentkernel"),
            "{text}"
        );
        // Out through the host, and NATed: the server saw the host's address.
        assert!(
            text.contains(&format!("{} connected inet-hello", inet.server.ip())),
            "{text}"
        );
        assert_eq!(*inet.peers.lock().unwrap(), vec![inet.host_ip]);
        // Nothing of the host: the gateway and every host address refuse.
        let host_lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(" connected") || l.contains(" refused"))
            .filter(|l| !l.starts_with(&inet.server.ip().to_string()))
            .collect();
        assert_eq!(host_lines.len(), hosts.len(), "{text}");
        assert!(
            host_lines.iter().all(|l| l.contains(" refused ")),
            "the VM reached a host service: {text}"
        );
        assert_eq!(service.accepted.load(Ordering::SeqCst), 0);
        // The hand-made packet to the host's loopback: never answered;
        // the same probe to the VM's published port is.
        assert_eq!(
            probe_result(&text, &format!("127.0.0.1:{}", secret.port)),
            "silent",
            "the host's loopback answered the VM: {text}"
        );
        let control = text
            .lines()
            .find(|l| l.ends_with(&format!(":{published} synack")))
            .map(|_| "synack");
        assert_eq!(control, Some("synack"), "the control probe failed: {text}");
        assert_eq!(secret.accepted.load(Ordering::SeqCst), 0);

        assert_released(&lease);
        assert!(vms_of(&env).is_empty(), "a VM outlived its run");
    }

    /// `--no-network` is no NIC at all; a kept VM and a warm pool VM get
    /// the network, and every exit path frees the tap and the lease: the
    /// run's end, a QEMU killed with -9 (its holder releases), an
    /// agentkernel or a holder killed with -9 (the tap goes with QEMU,
    /// `sandbox gc` releases the lease).
    #[test]
    fn no_network_is_no_nic_and_kept_and_pooled_vms_get_one_freed_on_every_exit() {
        let env = TestEnv::new();
        let inet = internet();
        let probe = format!(
            "ls /sys/class/net | tr '\\n' ' '; echo; nc -w 5 {} {} </dev/null",
            inet.server.ip(),
            inet.server.port()
        );

        let out = env.run(&[
            "run",
            "--fast=false",
            "--no-network",
            "-i",
            BUSYBOX,
            "ls",
            "/sys/class/net",
        ]);
        assert_code(&out, 0);
        assert_eq!(stdout(&out), "lo\n");

        // A kept VM: networked from its first command to its last.
        let name = unique_name("vmnet");
        let out = env.run(&[
            "sandbox", "create", "--memory", "256m", "-i", BUSYBOX, &name,
        ]);
        assert_code(&out, 0);
        let holder = holder_of(&env, &name).expect("a holder");
        let lease = lease_of(holder);
        let out = env.run(&["exec", &name, "--", "sh", "-c", &probe]);
        assert_code(&out, 0);
        assert_eq!(stdout(&out), "eth0 lo \ninet-hello\n");
        // QEMU killed: the holder ends the sandbox and releases the lease.
        let vm = vm_of_holder(&env, holder);
        // SAFETY: kill has no memory preconditions; the pid was found just now.
        unsafe { libc::kill(vm as libc::pid_t, libc::SIGKILL) };
        assert_gone(&[vm, holder]);
        assert_released(&lease);

        // agentkernel killed with -9 mid-run: the tap goes with QEMU, gc
        // releases the lease.
        let mut run = spawn_piped(
            &env,
            &["run", "--fast=false", "-i", BUSYBOX, "sleep", "600"],
        );
        let lease = lease_of(run.id());
        let cli = run.id();
        let of_run = || -> Vec<u32> {
            vms_of(&env)
                .into_iter()
                .filter(|p| parent_of(*p) == Some(cli))
                .collect()
        };
        poll_until(VM_LIMIT, "the run's VM", || !of_run().is_empty());
        let vms = of_run();
        run.child().kill().unwrap();
        run.child().wait().unwrap();
        assert_gone(&vms);
        poll_until(Duration::from_secs(10), "the tap goes with QEMU", || {
            !link_exists(&lease.1)
        });
        assert_code(&env.run(&["sandbox", "gc"]), 0);
        assert_released(&lease);

        // The warm pool: the second run claims a VM booted with a network.
        let pooled = || env.run(&["run", "-i", BUSYBOX, "sh", "-c", &probe]);
        let cold = pooled();
        assert_code(&cold, 0);
        poll_until(VM_LIMIT, "a warm VM ready", || {
            warm_dirs(&env).iter().any(|d| d.join("ready").exists())
        });
        let warm = env
            .std_cmd()
            .env("AGENTKERNEL_TRACE_STARTUP", "1")
            .args(["run", "-i", BUSYBOX, "sh", "-c", &probe])
            .output()
            .unwrap();
        assert_code(&warm, 0);
        assert!(
            stderr(&warm).contains("warm VM claimed"),
            "{}",
            stderr(&warm)
        );
        assert_eq!(stdout(&warm), "eth0 lo \ninet-hello\n");
        assert_eq!(stdout(&cold), stdout(&warm));
        // A warm VM's holder killed with -9: its QEMU and tap go, gc
        // releases its lease.
        poll_until(Duration::from_secs(30), "the used warm VM ends", || {
            warm_dirs(&env).iter().all(|d| !d.join("claimed").exists())
        });
        poll_until(VM_LIMIT, "the pool refilled", || {
            warm_dirs(&env).iter().any(|d| d.join("ready").exists())
        });
        let holders = warm_holders(&env);
        assert_eq!(holders.len(), 1, "{holders:?}");
        let lease = lease_of(holders[0]);
        let vm = vm_of_holder(&env, holders[0]);
        // SAFETY: as above.
        unsafe { libc::kill(holders[0] as libc::pid_t, libc::SIGKILL) };
        assert_gone(&[holders[0], vm]);
        assert_code(&env.run(&["sandbox", "gc"]), 0);
        assert_released(&lease);
        assert!(vms_of(&env).is_empty());
    }

    // ---- Without root (docs/qemu.md, "Network without root") ----

    use super::common::user::User;

    /// Run by an ordinary user, a VM's network is passt's: the host's
    /// addresses answer (as from a rootless native sandbox), its loopback
    /// never does — not through the gateway's address, and not with a
    /// hand-made SYN for 127.0.0.1 sent to the gateway's MAC (the guest's
    /// root has CAP_NET_RAW under permissive). `-P`, and a network without
    /// passt installed, are refused in one line.
    /// A `kill -9` of agentkernel leaves nothing of that user running:
    /// QEMU dies with it and passt with QEMU.
    #[test]
    fn without_root_a_vm_reaches_the_host_but_never_its_loopback_and_kill_9_leaves_nothing() {
        let user = User::new(4330);
        let secret = host_listener(Ipv4Addr::LOCALHOST);
        let service = host_listener(Ipv4Addr::UNSPECIFIED);
        let host_ip = host_ipv4_addresses()
            .into_iter()
            .next()
            .expect("PREREQUISITE MISSING: the host has no non-loopback IPv4 address");
        let script = format!(
            "{FIND_GATEWAY}import subprocess, sys\n\
             def connect(host, port):\n\
             \x20   try:\n\
             \x20       socket.create_connection((host, port), 3).close(); print(host, 'connected', flush=True)\n\
             \x20   except OSError as e:\n\
             \x20       print(host, 'refused', e, flush=True)\n\
             print('resolv', open('/etc/resolv.conf').readline().strip(), flush=True)\n\
             connect(gw, {secret})\n\
             connect('{host_ip}', {service})\n\
             subprocess.call(['python3', '-c', sys.argv[1], '127.0.0.1:{secret}', '0.0.0.0:{secret}', '{host_ip}:{service}'])\n",
            secret = secret.port,
            service = service.port,
        );
        let out = user
            .cmd()
            .args([
                "run",
                "-B",
                "qemu",
                "--fast=false",
                "-p",
                "permissive",
                "-i",
                PYTHON,
                "--",
                "python3",
                "-c",
                &script,
                RAW_SYN_PROBE,
            ])
            .output()
            .unwrap();
        assert_code(&out, 0);
        let text = stdout(&out);
        assert!(text.contains("resolv nameserver 10.0.2.3"), "{text}");
        assert!(
            text.contains("10.0.2.2 refused"),
            "gateway to loopback: {text}"
        );
        assert!(
            text.contains(&format!("{host_ip} connected")),
            "the network does not work: {text}"
        );
        for loopback in ["127.0.0.1", "0.0.0.0"] {
            let target = format!("{loopback}:{}", secret.port);
            assert_eq!(probe_result(&text, &target), "silent", "{text}");
        }
        // The same probe gets an answer where one is allowed: it works.
        assert_eq!(
            probe_result(&text, &format!("{host_ip}:{}", service.port)),
            "synack",
            "{text}"
        );
        assert_eq!(secret.accepted.load(Ordering::SeqCst), 0, "{text}");
        user.assert_no_processes();

        let refused = user
            .cmd()
            .args([
                "run",
                "-B",
                "qemu",
                "-P",
                "127.0.0.1:18081:80",
                "-i",
                BUSYBOX,
                "true",
            ])
            .output()
            .unwrap();
        let line = assert_one_line_error(&refused);
        assert!(line.contains("-P") || line.contains("port"), "{line}");
        assert!(user.runs_left().is_empty(), "{:?}", user.runs_left());

        // Without passt on its PATH: one line naming it, before any VM.
        let empty = user.dir.path().join("empty-path");
        std::fs::create_dir(&empty).unwrap();
        let no_passt = user
            .cmd()
            .env("PATH", &empty)
            .args(["run", "-B", "qemu", "-i", BUSYBOX, "true"])
            .output()
            .unwrap();
        let line = assert_one_line_error(&no_passt);
        assert!(
            line.contains("passt is not installed") && line.contains("--no-network"),
            "{line}"
        );
        assert!(user.runs_left().is_empty(), "{:?}", user.runs_left());

        let mut running = user
            .cmd()
            .args([
                "run",
                "-B",
                "qemu",
                "--fast=false",
                "-i",
                BUSYBOX,
                "sleep",
                "300",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        poll_until(VM_LIMIT, "the VM and passt run", || {
            let names: Vec<String> = user.processes().into_iter().map(|(_, c)| c).collect();
            names.iter().any(|c| c.contains("passt"))
                && names.iter().any(|c| c.contains("qemu-system"))
        });
        running.kill().unwrap();
        running.wait().unwrap();
        user.assert_no_processes();
    }
}
