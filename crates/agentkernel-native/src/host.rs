//! Whether this host can run native sandboxes, and if not, exactly why —
//! for backend auto-selection and `agentkernel doctor`.

use std::fs;

use crate::error::HostUnsupported;

/// What the native runtime found on this host.
#[derive(Debug, Clone)]
pub struct Support {
    /// How limits and networking work here, e.g. `cgroup v1`.
    pub detail: String,
    pub kernel: String,
}

/// `Ok` with what was found, or the reason native sandboxes cannot run here
/// (one line, with the fix).
pub fn check() -> Result<Support, HostUnsupported> {
    // SAFETY: geteuid has no preconditions.
    let rootless = unsafe { libc::geteuid() } != 0;
    if rootless {
        check_user_namespaces()?;
    }
    let filesystems = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !filesystems.lines().any(|l| l.ends_with("\toverlay")) {
        return Err(HostUnsupported::NoOverlayfs);
    }
    for ns in ["pid", "net", "mnt", "uts", "ipc", "cgroup"] {
        if fs::metadata(format!("/proc/self/ns/{ns}")).is_err() {
            return Err(HostUnsupported::NoNamespace(ns));
        }
    }
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_string())
        .unwrap_or_default();
    if rootless {
        // overlayfs in a user namespace: 5.11; RLIMIT_NPROC counted per
        // user namespace (the rootless pids limit): 5.14.
        if kernel_version(&kernel) < (5, 14) {
            return Err(HostUnsupported::RootlessKernelTooOld { kernel });
        }
        let network = match crate::slirp::usable() {
            Ok(_) => "network via slirp4netns".to_string(),
            Err(why) => format!("--no-network only: {why}"),
        };
        return Ok(Support {
            detail: format!("rootless: pids limited, memory/CPU limits need root; {network}"),
            kernel,
        });
    }
    let cgroup = if crate::cgroup::host_is_v1() {
        if !crate::cgroup::v1_controllers_mounted() {
            return Err(HostUnsupported::CgroupV1ControllersMissing);
        }
        "cgroup v1"
    } else {
        let controllers =
            fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").unwrap_or_default();
        for c in ["memory", "cpu", "pids"] {
            if !controllers.split_whitespace().any(|x| x == c) {
                return Err(HostUnsupported::CgroupV2ControllerMissing(c));
            }
        }
        "cgroup v2"
    };
    Ok(Support {
        detail: cgroup.to_string(),
        kernel,
    })
}

/// Whether an unprivileged process may create user namespaces here: the
/// switches distributions use to turn that off, each named with its fix.
fn check_user_namespaces() -> Result<(), HostUnsupported> {
    let sysctl = |name: &str| {
        fs::read_to_string(format!("/proc/sys/{}", name.replace('.', "/")))
            .ok()
            .map(|v| v.trim().to_string())
    };
    if sysctl("kernel.unprivileged_userns_clone").as_deref() == Some("0") {
        return Err(HostUnsupported::UnprivilegedUsernsDisabled);
    }
    if sysctl("user.max_user_namespaces").as_deref() == Some("0") {
        return Err(HostUnsupported::NoUserNamespacesAllowed);
    }
    if sysctl("kernel.apparmor_restrict_unprivileged_userns").as_deref() == Some("1") {
        return Err(HostUnsupported::AppArmorRestrictsUserns);
    }
    Ok(())
}

/// `6.1.0-13-amd64` → (6, 1).
fn kernel_version(release: &str) -> (u32, u32) {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    #[test]
    fn kernel_versions() {
        assert_eq!(super::kernel_version("6.1.0-13-amd64"), (6, 1));
        assert_eq!(super::kernel_version("5.14.21"), (5, 14));
        assert_eq!(super::kernel_version(""), (0, 0));
    }
}
