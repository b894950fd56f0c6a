//! The VMM-specific part of a VM backend: what to boot and how to say it to
//! one hypervisor. QEMU is the one driver today; a Firecracker driver would
//! be another [`Vmm`] (API socket instead of a command line, vsock instead
//! of virtio-serial) with the same [`VmConfig`].

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::protocol::{PORT_NAME, WORKSPACE_TAG};

/// How the guest's CPU is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// QEMU's emulation (works everywhere; 10-50x slower).
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The machine QEMU emulates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Machine {
    /// A PC: virtio over PCI, booted without ACPI (the firmware's MP table
    /// describes the CPUs), with qboot where QEMU ships it. Under TCG the
    /// fastest here: ACPI's interpreter costs ~200 ms of every emulated boot.
    #[default]
    Pc,
    /// QEMU's microvm, Firecracker's model: no PCI bus and no firmware POST;
    /// the virtio devices sit on MMIO and the guest finds them in ACPI's
    /// tables (Debian's kernel cannot take them from its command line).
    /// The machine for KVM, where ACPI costs little.
    Microvm,
}

impl Machine {
    pub fn name(self) -> &'static str {
        match self {
            Machine::Pc => "pc",
            Machine::Microvm => "microvm",
        }
    }

    /// `$AGENTKERNEL_QEMU_MACHINE` (pc or microvm) if set, else microvm
    /// under KVM and pc under TCG; an unknown name is an error.
    pub fn choose(accel: Accel) -> crate::Result<Machine> {
        match std::env::var("AGENTKERNEL_QEMU_MACHINE").as_deref() {
            Ok("pc") => Ok(Machine::Pc),
            Ok("microvm") => Ok(Machine::Microvm),
            Ok(other) => crate::fail(format!(
                "AGENTKERNEL_QEMU_MACHINE={other:?} is not a machine agentkernel boots; use pc or microvm, or unset it"
            )),
            Err(_) => Ok(match accel {
                Accel::Kvm => Machine::Microvm,
                Accel::Tcg => Machine::Pc,
            }),
        }
    }

    /// The QEMU device `kind` (`virtio-blk`, …) on this machine's transport.
    fn virtio(self, kind: &str) -> String {
        match self {
            Machine::Pc => format!("{kind}-pci"),
            Machine::Microvm => format!("{kind}-device"),
        }
    }
}

/// One VM, independent of the hypervisor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// The image's read-only root disk.
    pub disk: PathBuf,
    pub memory_mib: u64,
    pub vcpus: u32,
    /// The host directory shared as the workspace, and whether the share
    /// itself is read-only (read-only and copy-on-write workspaces).
    pub workspace: Option<(PathBuf, bool)>,
    /// Host directories shared as volumes (`-v`), each with whether the
    /// share is read-only; the `n`th has the tag `protocol::volume_tag(n)`.
    #[serde(default)]
    pub volumes: Vec<(PathBuf, bool)>,
    pub accel: Accel,
    /// Older records (kept VMs, pool entries) have none: they booted a PC.
    #[serde(default)]
    pub machine: Machine,
    /// A NIC on agentkernel's bridge (`crate::net`); `None`: no NIC at all.
    #[serde(default)]
    pub network: Option<crate::net::Network>,
    /// Under TCG, the host's TSC rate (kHz), which is the guest's: told to
    /// the guest kernel so that it neither measures it nor fails to
    /// ([`crate::host_clock`]). `None` under KVM (the kernel learns it from
    /// KVM) and on a host whose TSC rate is not constant.
    #[serde(default)]
    pub tsc_khz: Option<u64>,
}

/// The VM's NIC: the descriptor QEMU inherits (a tap, or passt's socket),
/// what it is, and the guest's MAC.
#[derive(Debug, Clone)]
pub struct Nic {
    pub fd: RawFd,
    pub backend: crate::net::NicBackend,
    pub mac: String,
}

pub trait Vmm {
    fn name(&self) -> &'static str;
    /// The process that runs the VM: its serial console on stdout, errors
    /// on stderr, the agent's port connected to the socket `agent_fd`
    /// (inherited); a virtio-net NIC on `nic`'s tap if given, else none.
    fn command(&self, vm: &VmConfig, agent_fd: RawFd, nic: Option<&Nic>) -> Command;
    /// Adds the VMM's control channel (pause and resume) on the socket
    /// `fd` (inherited) to `command`.
    fn control(&self, command: &mut Command, fd: RawFd);
}

pub struct Qemu {
    pub binary: PathBuf,
}

impl Qemu {
    /// `qemu-system-x86_64` on PATH.
    pub fn find() -> crate::Result<Qemu> {
        match agentkernel_core::paths::on_path("qemu-system-x86_64") {
            Some(binary) => Ok(Qemu { binary }),
            None => crate::fail(
                "qemu-system-x86_64 is not installed; install it (Debian: apt-get install qemu-system-x86)",
            ),
        }
    }
}

impl Vmm for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn command(&self, vm: &VmConfig, agent_fd: RawFd, nic: Option<&Nic>) -> Command {
        let mut c = Command::new(&self.binary);
        // No defaults: no NIC, no VGA, no floppy; only what is listed here.
        c.args([
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-display",
            "none",
        ]);
        c.args(["-monitor", "none", "-serial", "stdio"]);
        // microvm brings its own minimal firmware.
        if vm.machine == Machine::Pc {
            if let Some(firmware) = fast_firmware(&self.binary) {
                c.arg("-bios").arg(firmware);
            }
        }
        c.args(["-accel", vm.accel.name(), "-M", vm.machine.name()]);
        match vm.accel {
            Accel::Tcg => c.args(["-cpu", TCG_CPU]),
            Accel::Kvm => c.args(["-cpu", "host"]),
        };
        c.arg("-smp").arg(vm.vcpus.max(1).to_string());
        c.arg("-m").arg(format!("{}M", vm.memory_mib));
        c.arg("-kernel").arg(&vm.kernel);
        c.arg("-initrd").arg(&vm.initramfs);
        c.arg("-append").arg(kernel_command_line(vm));
        c.arg("-drive").arg(format!(
            "file={},if=none,id=root,format=raw,readonly=on",
            qemu_escape(&vm.disk)
        ));
        let virtio = |kind: &str| vm.machine.virtio(kind);
        c.arg("-device")
            .arg(format!("{},drive=root", virtio("virtio-blk")));
        c.arg("-device").arg(virtio("virtio-serial"));
        c.arg("-chardev")
            .arg(format!("socket,id=agent,fd={agent_fd}"));
        c.arg("-device")
            .arg(format!("virtserialport,chardev=agent,name={PORT_NAME}"));
        if let Some((dir, read_only)) = &vm.workspace {
            c.arg("-fsdev").arg(format!(
                "local,id=ws,path={},security_model=passthrough{}",
                qemu_escape(dir),
                if *read_only { ",readonly=on" } else { "" }
            ));
            c.arg("-device").arg(format!(
                "{},fsdev=ws,mount_tag={WORKSPACE_TAG}",
                virtio("virtio-9p")
            ));
        }
        for (n, (dir, read_only)) in vm.volumes.iter().enumerate() {
            c.arg("-fsdev").arg(format!(
                "local,id=vol{n},path={},security_model=passthrough{}",
                qemu_escape(dir),
                if *read_only { ",readonly=on" } else { "" }
            ));
            c.arg("-device").arg(format!(
                "{},fsdev=vol{n},mount_tag={}",
                virtio("virtio-9p"),
                crate::protocol::volume_tag(n)
            ));
        }
        match nic {
            // The tap agentkernel created on its bridge, or passt's socket,
            // already open: QEMU needs no privilege and no helper to use it.
            Some(nic) => {
                let netdev = match nic.backend {
                    crate::net::NicBackend::Tap => format!("tap,id=net0,fd={},vhost=off", nic.fd),
                    crate::net::NicBackend::Stream => format!("socket,id=net0,fd={}", nic.fd),
                };
                c.arg("-netdev").arg(netdev);
                // No option ROM (a PCI device's; nothing boots from it).
                let rom = if vm.machine == Machine::Pc {
                    ",romfile="
                } else {
                    ""
                };
                c.arg("-device").arg(format!(
                    "{},netdev=net0,mac={}{rom}",
                    virtio("virtio-net"),
                    nic.mac
                ));
            }
            // --no-network: no network device at all.
            None => {
                c.args(["-nic", "none"]);
            }
        }
        c
    }

    fn control(&self, command: &mut Command, fd: RawFd) {
        // QMP, QEMU's JSON control protocol, on an inherited socket: as
        // with the agent's port, nothing another process could connect to.
        command
            .arg("-chardev")
            .arg(format!("socket,id=control,fd={fd}"));
        command.args(["-mon", "chardev=control,mode=control"]);
    }
}

/// The guest kernel's command line: its console on the first serial port
/// (read by the host only to explain a failure), the agent as init, no
/// reboot on panic (QEMU exits); and what a sandbox VM does not need, each
/// worth tenths of a second under TCG: probing a PS/2 controller, checking
/// the timer, slow RCU grace periods, patching SMP alternatives, the crypto
/// self-tests (and the KDF one `cryptomgr.notests` misses, ~80 ms), the
/// kprobe trace events (~140 ms: nothing traces in the guest), and on a PC
/// ACPI altogether (`acpi=off`, [`kernel_command_line`]): its interpreter set up each virtio device's PCI
/// link in ~150 ms under TCG (that was `acpi=noirq`), and loading its tables
/// and bringing it up took another ~200 ms at boot (25 alternated boots:
/// 1705 → 1490 ms median). The firmware's MP table describes the CPUs and
/// the PCI devices use MSI-X; without ACPI the guest cannot power off, so
/// the agent ends the VM with a reboot, which `-no-reboot` turns into
/// QEMU's exit. Measured with `initcall_debug` and A/B boots
/// (`bench/qemu_boot.py`).
/// (Not `tsc=reliable` here: a TSC the guest calibrated itself on a starved
/// TCG host can be wrong, and without the clocksource watchdog the guest's
/// clock then ran twice as fast as the host's — and with it `--timeout`.
/// [`kernel_command_line`] turns the watchdog off only with the rate the
/// host measured.)
const KERNEL_COMMAND_LINE: &str = "console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init \
    i8042.noaux i8042.nomux i8042.nopnp i8042.nokbd no_timer_check \
    rcupdate.rcu_expedited=1 noreplace-smp cryptomgr.notests \
    initcall_blacklist=init_kprobe_trace,crypto_kdf108_init";

/// The CPU a TCG guest emulates: everything TCG can (`max`: SSE4.2, AVX2,
/// SMEP/SMAP and the rest, so images built for x86-64-v3 run), less ERMS
/// ("enhanced rep movsb"). ERMS tells the guest that `rep movsb`/`rep stosb`
/// are the fastest way to copy and clear memory, and the guest kernel then
/// copies, clears pages and moves user data a byte per iteration; TCG
/// emulates a `rep` string instruction an iteration at a time, so without
/// the hint the kernel's and glibc's 8-byte and vector routines do the same
/// work in an eighth of the iterations or fewer. 12 alternated boots each
/// (`bench/qemu_boot.py`, Debian's kernel): 2489 → 2024 ms median to the
/// agent's hello. A performance hint only: nothing the guest may rely on
/// is taken away. Under KVM the guest sees the host's CPU (`host`).
const TCG_CPU: &str = "max,erms=off";

/// The command line for `vm`. A TCG `pc` with one vCPU (what a TCG run
/// gets) also has no local APIC timer (`noapictimer`): TCG has no
/// TSC-deadline timer, so the kernel calibrated the APIC timer against the
/// PIT at boot, and the PIT is then the one CPU's tick. 15 alternated
/// boots: 1613 → 1253 ms median to the agent's hello. Under KVM the
/// TSC-deadline timer needs no calibration, and several vCPUs each need a
/// timer of their own. A microvm keeps its APIC timer: with the PIT as its
/// only tick, a TCG microvm went silent for good in 4 of 5 runs, mid-command
/// (no timer interrupt, so not even a stall report), and in none of 8
/// with the APIC timer.
/// A microvm keeps ACPI: its tables are where the guest finds the virtio
/// devices. Under TCG the guest is told its TSC's rate, the host's
/// ([`crate::host_clock`]): measuring it against the PIT failed in half the
/// boots on a busy host, and a microvm then hung. With the rate known to be
/// right, the clocksource watchdog goes (`tsc=nowatchdog`): it judged the
/// TSC against jiffies, which a starved TCG guest loses, and switched a
/// loaded guest to jiffies (5 of 8 microvm runs beside a build); on the TSC
/// a guest `sleep 4` took 4.01–4.05 s of the host's time beside two busy
/// loops (3.96–4.16 s on jiffies).
fn kernel_command_line(vm: &VmConfig) -> String {
    let mut line = KERNEL_COMMAND_LINE.to_string();
    if vm.machine == Machine::Pc {
        line.push_str(" acpi=off");
        if vm.accel == Accel::Tcg && vm.vcpus <= 1 {
            line.push_str(" noapictimer");
        }
    }
    if let Some(khz) = vm.tsc_khz {
        line.push_str(&format!(" tsc_early_khz={khz} tsc=nowatchdog"));
    }
    line
}

/// qboot, the minimal firmware QEMU ships (Debian: `qemu-system-data`,
/// which `qemu-system-x86` depends on), when it is there; else QEMU's
/// default SeaBIOS. qboot only sets up the PCI devices and hands QEMU's own
/// ACPI tables and the kernel (PVH entry) over, where SeaBIOS runs a whole
/// POST and option ROMs first: under TCG a boot to the guest's init took
/// ~1.29 s with qboot against ~1.55 s with SeaBIOS (medians of five, the
/// same kernel, initramfs and devices). The guest sees the same machine.
/// Looked for in QEMU's data directory beside its binary and the usual
/// system places: a stat or three per boot.
pub fn fast_firmware(qemu_binary: &Path) -> Option<PathBuf> {
    let beside = qemu_binary
        .parent()
        .and_then(Path::parent)
        .map(|prefix| prefix.join("share/qemu/qboot.rom"));
    beside
        .into_iter()
        .chain(
            [
                "/usr/share/qemu/qboot.rom",
                "/usr/local/share/qemu/qboot.rom",
            ]
            .map(PathBuf::from),
        )
        .find(|p| p.is_file())
}

/// QEMU option values escape a comma by doubling it.
fn qemu_escape(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

/// `$AGENTKERNEL_QEMU_ACCEL` (kvm or tcg), else KVM if a real KVM guest
/// boots here, else TCG; with the reason. The device node is not trusted:
/// nested virtualization can offer /dev/kvm whose guests hang. The probe's
/// verdict is cached per host boot in `cache_dir`.
pub fn choose_accel(cache_dir: &Path, qemu: &Qemu, kernel: &Path) -> (Accel, String) {
    match std::env::var("AGENTKERNEL_QEMU_ACCEL").as_deref() {
        Ok("kvm") => return (Accel::Kvm, "AGENTKERNEL_QEMU_ACCEL=kvm".into()),
        Ok("tcg") => return (Accel::Tcg, "AGENTKERNEL_QEMU_ACCEL=tcg".into()),
        _ => {}
    }
    let verdict = agentkernel_core::state::per_boot(&cache_dir.join("accel"), || {
        let (accel, why) = probe_kvm(qemu, kernel);
        format!("{} {why}", accel.name())
    });
    let (accel, why) = verdict.split_once(' ').unwrap_or((&verdict, ""));
    let accel = if accel == "kvm" {
        Accel::Kvm
    } else {
        Accel::Tcg
    };
    (accel, why.trim().to_string())
}

/// Boots the kernel under KVM with no root: it panics at once and, with
/// `panic=-1` and `-no-reboot`, QEMU exits. A guest that does not get that
/// far in a few seconds is a KVM that does not work.
fn probe_kvm(qemu: &Qemu, kernel: &Path) -> (Accel, String) {
    const PROBE: Duration = Duration::from_secs(5);
    if std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return (Accel::Tcg, "/dev/kvm cannot be opened".into());
    }
    let child = Command::new(&qemu.binary)
        .args([
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-display",
            "none",
        ])
        .args([
            "-monitor", "none", "-serial", "none", "-accel", "kvm", "-M", "pc",
        ])
        .args(["-cpu", "host", "-m", "128M", "-kernel"])
        .arg(kernel)
        .args([
            "-append",
            "panic=-1 rdinit=/nonexistent root=/dev/nonexistent",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        return (Accel::Tcg, "cannot start QEMU with KVM".into());
    };
    let started = Instant::now();
    while started.elapsed() < PROBE {
        match child.try_wait() {
            // -no-reboot: the guest's panic reboot is a clean exit.
            Ok(Some(status)) if status.success() => {
                let ms = started.elapsed().as_millis();
                return (Accel::Kvm, format!("a KVM guest booted in {ms} ms"));
            }
            Ok(Some(_)) => {
                let mut said = String::new();
                if let Some(mut err) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut err, &mut said);
                }
                let first = said.lines().next().unwrap_or("").trim().to_string();
                return (Accel::Tcg, format!("QEMU cannot use KVM here: {first}"));
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    (
        Accel::Tcg,
        format!(
            "/dev/kvm exists but a KVM guest did not boot within {} s (nested virtualization?)",
            PROBE.as_secs()
        ),
    )
}
