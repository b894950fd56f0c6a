//! What every sandbox's seccomp filter refuses, on every backend: the native
//! backend compiles this to BPF (`agentkernel-native/src/seccomp.rs`), the
//! Docker and Podman backends to the engine's JSON profile
//! (`agentkernel-docker/src/seccomp.rs`). One table, so the backends cannot
//! drift apart (x86_64 numbers).
//!
//! It is the effect of Docker's default profile for a container without
//! CAP_SYS_ADMIN (kernel modules, mounts, new mount API, namespaces,
//! keyrings, clocks, reboot, BPF, perf, userfaultfd, kexec…) plus io_uring
//! (newer Docker defaults refuse it; 20.10's allowed it) and a few argument
//! patterns: namespace flags to `clone`, `AF_VSOCK` sockets, typing into a
//! terminal (`TIOCSTI`, `TIOCLINUX`) and unusual `personality` values.

/// Refused (EPERM) under every profile: (name, x86_64 number).
pub const DEFAULT_DENIED: &[(&str, i64)] = &[
    ("acct", libc::SYS_acct),
    ("add_key", libc::SYS_add_key),
    ("bpf", libc::SYS_bpf),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("clock_settime", libc::SYS_clock_settime),
    ("create_module", 174), // removed from the kernel; libc has no constant
    ("delete_module", libc::SYS_delete_module),
    ("finit_module", libc::SYS_finit_module),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fsopen", libc::SYS_fsopen),
    ("fspick", libc::SYS_fspick),
    ("get_kernel_syms", 177),
    ("get_mempolicy", libc::SYS_get_mempolicy),
    ("init_module", libc::SYS_init_module),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("ioperm", libc::SYS_ioperm),
    ("iopl", libc::SYS_iopl),
    ("kcmp", libc::SYS_kcmp),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("kexec_load", libc::SYS_kexec_load),
    ("keyctl", libc::SYS_keyctl),
    ("lookup_dcookie", libc::SYS_lookup_dcookie),
    ("mbind", libc::SYS_mbind),
    ("mount", libc::SYS_mount),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("move_mount", libc::SYS_move_mount),
    ("move_pages", libc::SYS_move_pages),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    ("nfsservctl", libc::SYS_nfsservctl),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("open_tree", libc::SYS_open_tree),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("pivot_root", libc::SYS_pivot_root),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("query_module", 178),
    ("quotactl", libc::SYS_quotactl),
    ("quotactl_fd", libc::SYS_quotactl_fd),
    ("reboot", libc::SYS_reboot),
    ("request_key", libc::SYS_request_key),
    ("set_mempolicy", libc::SYS_set_mempolicy),
    ("setns", libc::SYS_setns),
    ("settimeofday", libc::SYS_settimeofday),
    ("swapoff", libc::SYS_swapoff),
    ("swapon", libc::SYS_swapon),
    ("sysfs", libc::SYS_sysfs),
    ("_sysctl", libc::SYS__sysctl),
    ("syslog", libc::SYS_syslog),
    ("umount2", libc::SYS_umount2),
    ("unshare", libc::SYS_unshare),
    ("uselib", libc::SYS_uselib),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("ustat", libc::SYS_ustat),
    ("vhangup", libc::SYS_vhangup),
];

/// What the restrictive profile refuses on top of [`DEFAULT_DENIED`].
pub const RESTRICTIVE_EXTRA: &[(&str, i64)] = &[("ptrace", libc::SYS_ptrace)];

/// `clone3` answers ENOSYS (its flags are in memory a filter cannot read), so
/// libc falls back to `clone`, whose flags it can.
pub const CLONE3: (&str, i64) = ("clone3", libc::SYS_clone3);

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
