//! What every sandbox's seccomp filter refuses, on every backend: the native
//! backend compiles this to BPF (`agentkernel-native/src/seccomp.rs`, for
//! x86_64 and aarch64), the Docker and Podman backends to the engine's JSON
//! profile (`agentkernel-docker/src/seccomp.rs`). One table, by name with
//! each architecture's number, so the backends cannot drift apart.
//!
//! It is the effect of Docker's default profile for a container without
//! CAP_SYS_ADMIN (kernel modules, mounts, new mount API, namespaces,
//! keyrings, clocks, reboot, BPF, perf, userfaultfd, kexec…) plus io_uring
//! (newer Docker defaults refuse it; 20.10's allowed it) and the argument
//! conditions in [`ARGUMENT_RULES`]: namespace flags to `clone`, `AF_VSOCK`
//! sockets, typing into a terminal (`TIOCSTI`, `TIOCLINUX`) and unusual
//! `personality` values.

/// An architecture the native filter is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    X86_64,
    Aarch64,
}

impl Arch {
    pub const ALL: [Arch; 2] = [Arch::X86_64, Arch::Aarch64];

    /// The architecture this binary runs on, if the filter knows it.
    pub fn host() -> Option<Arch> {
        match std::env::consts::ARCH {
            "x86_64" => Some(Arch::X86_64),
            "aarch64" => Some(Arch::Aarch64),
            _ => None,
        }
    }

    /// `AUDIT_ARCH_*`: what `seccomp_data.arch` holds for this ABI.
    pub const fn audit(self) -> u32 {
        match self {
            Arch::X86_64 => 0xc000_003e,
            Arch::Aarch64 => 0xc000_00b7,
        }
    }
}

/// A syscall by name, with its number on each architecture (None: the
/// architecture never had it, so there is nothing to refuse there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Syscall {
    pub name: &'static str,
    x86_64: u32,
    aarch64: Option<u32>,
}

impl Syscall {
    const fn new(name: &'static str, x86_64: u32, aarch64: Option<u32>) -> Syscall {
        Syscall {
            name,
            x86_64,
            aarch64,
        }
    }

    pub const fn number(&self, arch: Arch) -> Option<u32> {
        match arch {
            Arch::X86_64 => Some(self.x86_64),
            Arch::Aarch64 => self.aarch64,
        }
    }
}

/// Refused (EPERM) under every profile.
pub const DEFAULT_DENIED: &[Syscall] = &[
    Syscall::new("acct", 163, Some(89)),
    Syscall::new("add_key", 248, Some(217)),
    Syscall::new("bpf", 321, Some(280)),
    Syscall::new("clock_adjtime", 305, Some(266)),
    Syscall::new("clock_settime", 227, Some(112)),
    Syscall::new("create_module", 174, None),
    Syscall::new("delete_module", 176, Some(106)),
    Syscall::new("finit_module", 313, Some(273)),
    Syscall::new("fsconfig", 431, Some(431)),
    Syscall::new("fsmount", 432, Some(432)),
    Syscall::new("fsopen", 430, Some(430)),
    Syscall::new("fspick", 433, Some(433)),
    Syscall::new("get_kernel_syms", 177, None),
    Syscall::new("get_mempolicy", 239, Some(236)),
    Syscall::new("init_module", 175, Some(105)),
    Syscall::new("io_uring_enter", 426, Some(426)),
    Syscall::new("io_uring_register", 427, Some(427)),
    Syscall::new("io_uring_setup", 425, Some(425)),
    Syscall::new("ioperm", 173, None),
    Syscall::new("iopl", 172, None),
    Syscall::new("kcmp", 312, Some(272)),
    Syscall::new("kexec_file_load", 320, Some(294)),
    Syscall::new("kexec_load", 246, Some(104)),
    Syscall::new("keyctl", 250, Some(219)),
    Syscall::new("lookup_dcookie", 212, Some(18)),
    Syscall::new("mbind", 237, Some(235)),
    Syscall::new("mount", 165, Some(40)),
    Syscall::new("mount_setattr", 442, Some(442)),
    Syscall::new("move_mount", 429, Some(429)),
    Syscall::new("move_pages", 279, Some(239)),
    Syscall::new("name_to_handle_at", 303, Some(264)),
    Syscall::new("nfsservctl", 180, Some(42)),
    Syscall::new("open_by_handle_at", 304, Some(265)),
    Syscall::new("open_tree", 428, Some(428)),
    Syscall::new("perf_event_open", 298, Some(241)),
    Syscall::new("pivot_root", 155, Some(41)),
    Syscall::new("process_vm_readv", 310, Some(270)),
    Syscall::new("process_vm_writev", 311, Some(271)),
    Syscall::new("query_module", 178, None),
    Syscall::new("quotactl", 179, Some(60)),
    Syscall::new("quotactl_fd", 443, Some(443)),
    Syscall::new("reboot", 169, Some(142)),
    Syscall::new("request_key", 249, Some(218)),
    Syscall::new("set_mempolicy", 238, Some(237)),
    Syscall::new("setns", 308, Some(268)),
    Syscall::new("settimeofday", 164, Some(170)),
    Syscall::new("swapoff", 168, Some(225)),
    Syscall::new("swapon", 167, Some(224)),
    Syscall::new("sysfs", 139, None),
    Syscall::new("_sysctl", 156, None),
    Syscall::new("syslog", 103, Some(116)),
    Syscall::new("umount2", 166, Some(39)),
    Syscall::new("unshare", 272, Some(97)),
    Syscall::new("uselib", 134, None),
    Syscall::new("userfaultfd", 323, Some(282)),
    Syscall::new("ustat", 136, None),
    Syscall::new("vhangup", 153, Some(58)),
];

/// What the restrictive profile refuses on top of [`DEFAULT_DENIED`].
pub const RESTRICTIVE_EXTRA: &[Syscall] = &[Syscall::new("ptrace", 101, Some(117))];

/// `clone3` answers ENOSYS (its flags are in memory a filter cannot read), so
/// libc falls back to `clone`, whose flags it can.
pub const CLONE3: Syscall = Syscall::new("clone3", 435, Some(435));

pub const CLONE: Syscall = Syscall::new("clone", 56, Some(220));
pub const SOCKET: Syscall = Syscall::new("socket", 41, Some(198));
pub const IOCTL: Syscall = Syscall::new("ioctl", 16, Some(29));
pub const PERSONALITY: Syscall = Syscall::new("personality", 135, Some(92));

/// When a call with arguments is refused (EPERM). Arguments are compared on
/// their low 32 bits: the kernel reads these as ints.
#[derive(Clone, Copy, Debug)]
pub enum Condition {
    /// Any of these bits is set.
    AnyBit(u32),
    /// The argument is one of these values.
    OneOf(&'static [u32]),
    /// The argument is none of these values.
    NoneOf(&'static [u32]),
}

/// A syscall refused when its argument `arg` meets `when`.
#[derive(Clone, Copy, Debug)]
pub struct ArgumentRule {
    pub syscall: Syscall,
    pub arg: u32,
    pub when: Condition,
}

/// The argument conditions every profile has.
pub const ARGUMENT_RULES: &[ArgumentRule] = &[
    // No new namespaces.
    ArgumentRule {
        syscall: CLONE,
        arg: 0,
        when: Condition::AnyBit(CLONE_NAMESPACE_FLAGS),
    },
    ArgumentRule {
        syscall: SOCKET,
        arg: 0,
        when: Condition::OneOf(DENIED_SOCKET_FAMILIES),
    },
    ArgumentRule {
        syscall: IOCTL,
        arg: 1,
        when: Condition::OneOf(DENIED_IOCTLS),
    },
    ArgumentRule {
        syscall: PERSONALITY,
        arg: 0,
        when: Condition::NoneOf(&PERSONALITY_ALLOWED),
    },
];

/// Namespace flags `clone` may not carry
/// (CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET).
pub const CLONE_NAMESPACE_FLAGS: u32 = 0x7e02_0000;
/// `socket` families refused: AF_VSOCK, a way out of a VM-hosted sandbox to its host.
pub const DENIED_SOCKET_FAMILIES: &[u32] = &[40];
/// `ioctl` requests refused: typing into (or driving) a terminal shared with the host.
pub const DENIED_IOCTLS: &[u32] = &[TIOCSTI, TIOCLINUX];
pub const TIOCSTI: u32 = 0x5412;
pub const TIOCLINUX: u32 = 0x541c;
/// `personality` values Docker allows: PER_LINUX, PER_LINUX32, the UNAME26
/// variants, and the query (0xffffffff).
pub const PERSONALITY_ALLOWED: [u32; 5] = [0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

#[cfg(test)]
mod tests {
    use super::*;

    /// The table's numbers for the architecture we are built for are libc's.
    #[test]
    fn numbers_match_libc_on_this_architecture() {
        let Some(arch) = Arch::host() else {
            panic!("no seccomp table for {}", std::env::consts::ARCH);
        };
        let libc_number = |name: &str| -> Option<i64> {
            Some(match name {
                "mount" => libc::SYS_mount,
                "unshare" => libc::SYS_unshare,
                "setns" => libc::SYS_setns,
                "bpf" => libc::SYS_bpf,
                "keyctl" => libc::SYS_keyctl,
                "ptrace" => libc::SYS_ptrace,
                "clone" => libc::SYS_clone,
                "clone3" => libc::SYS_clone3,
                "socket" => libc::SYS_socket,
                "ioctl" => libc::SYS_ioctl,
                "personality" => libc::SYS_personality,
                "syslog" => libc::SYS_syslog,
                "vhangup" => libc::SYS_vhangup,
                "quotactl_fd" => libc::SYS_quotactl_fd,
                "userfaultfd" => libc::SYS_userfaultfd,
                "io_uring_setup" => libc::SYS_io_uring_setup,
                "pivot_root" => libc::SYS_pivot_root,
                "umount2" => libc::SYS_umount2,
                _ => return None,
            })
        };
        let all = DEFAULT_DENIED
            .iter()
            .chain(RESTRICTIVE_EXTRA)
            .chain([CLONE3, CLONE, SOCKET, IOCTL, PERSONALITY].iter());
        let mut checked = 0;
        for s in all {
            if let Some(expected) = libc_number(s.name) {
                assert_eq!(s.number(arch).map(i64::from), Some(expected), "{}", s.name);
                checked += 1;
            }
        }
        assert_eq!(checked, 18);
    }

    #[test]
    fn names_are_unique() {
        let mut names: Vec<&str> = DEFAULT_DENIED.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), DEFAULT_DENIED.len());
    }
}
