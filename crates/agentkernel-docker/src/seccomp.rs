//! The restrictive profile's seccomp filter, in Docker's JSON format.
//!
//! Docker's default filter is an allow-list that the engine applies when no
//! profile is given; a custom profile replaces it. Rather than re-ship that
//! list, this filter allows by default and denies (EPERM) every syscall that
//! Docker's documentation lists as blocked by its default profile, plus the
//! ones the restrictive profile adds (ptrace, mount, bpf, keyctl,
//! perf_event_open, userfaultfd, unshare, setns) and io_uring. Namespace
//! creation through clone is denied flag by flag; clone3 returns ENOSYS so
//! libc falls back to clone, where the flags can be inspected.

use serde_json::{json, Value};

/// Blocked by Docker's default profile (docs.docker.com "Significant syscalls
/// blocked by the default profile") or added by the restrictive profile.
const DENIED: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "get_kernel_syms",
    "get_mempolicy",
    "init_module",
    "io_uring_enter",
    "io_uring_register",
    "io_uring_setup",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mbind",
    "mount",
    "mount_setattr",
    "move_mount",
    "move_pages",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "query_module",
    "quotactl",
    "reboot",
    "request_key",
    "set_mempolicy",
    "setns",
    "settimeofday",
    "swapoff",
    "swapon",
    "sysfs",
    "_sysctl",
    "umount",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
    "vm86",
    "vm86old",
];

/// CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME.
const NAMESPACE_FLAGS: &[u64] = &[
    0x0002_0000,
    0x0200_0000,
    0x0400_0000,
    0x0800_0000,
    0x1000_0000,
    0x2000_0000,
    0x4000_0000,
    0x0000_0080,
];

pub fn restrictive_profile() -> Value {
    let mut rules = vec![
        json!({ "names": DENIED, "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM }),
        json!({ "names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::ENOSYS }),
    ];
    for flag in NAMESPACE_FLAGS {
        rules.push(json!({
            "names": ["clone"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": libc::EPERM,
            "args": [{ "index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ" }],
        }));
    }
    json!({ "defaultAction": "SCMP_ACT_ALLOW", "syscalls": rules })
}

/// Writes `profile` to the state directory (once per content) and returns its path.
pub fn profile_file(profile: &str) -> agentkernel_core::Result<std::path::PathBuf> {
    let dir = agentkernel_core::paths::state_dir().join("seccomp");
    std::fs::create_dir_all(&dir).map_err(|e| agentkernel_core::Error::state(&dir, e))?;
    let path = dir.join(format!(
        "restrictive-{:016x}.json",
        agentkernel_core::names::stable_hash(profile.as_bytes())
    ));
    if !path.exists() {
        agentkernel_core::state::write_atomic(&path, profile.as_bytes())?;
    }
    Ok(path)
}
