//! Whether this host can run native sandboxes, and if not, exactly why —
//! for backend auto-selection and `agentkernel doctor`.

use std::fs;

/// What the native runtime found on this host.
#[derive(Debug, Clone)]
pub struct Support {
    pub cgroup: &'static str,
    pub kernel: String,
}

/// `Ok` with what was found, or the reason native sandboxes cannot run here
/// (one line, with the fix).
pub fn check() -> Result<Support, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let userns = fs::read_to_string("/proc/sys/kernel/unprivileged_userns_clone")
            .map(|v| v.trim() != "0")
            .unwrap_or(true);
        return Err(format!(
            "needs root for now: rootless native sandboxes (user namespaces{}) are not built yet; run as root or use -B docker / -B podman",
            if userns { ", which this kernel allows" } else { ", which this kernel disables" }
        ));
    }
    let filesystems = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !filesystems.lines().any(|l| l.ends_with("\toverlay")) {
        return Err(
            "the kernel has no overlayfs (try `modprobe overlay`), which the sandbox root needs"
                .into(),
        );
    }
    for ns in ["pid", "net", "mnt", "uts", "ipc", "cgroup"] {
        if fs::metadata(format!("/proc/self/ns/{ns}")).is_err() {
            return Err(format!("the kernel has no {ns} namespaces"));
        }
    }
    let cgroup = if crate::cgroup::host_is_v1() {
        if crate::cgroup::v1_hierarchies().len() < 3 {
            return Err("cgroup v1 without the memory, cpu and pids controllers mounted; mount them or boot with cgroup v2".into());
        }
        "cgroup v1"
    } else {
        let controllers =
            fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").unwrap_or_default();
        for c in ["memory", "cpu", "pids"] {
            if !controllers.split_whitespace().any(|x| x == c) {
                return Err(format!("cgroup v2 without the {c} controller"));
            }
        }
        "cgroup v2"
    };
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_string())
        .unwrap_or_default();
    Ok(Support { cgroup, kernel })
}
