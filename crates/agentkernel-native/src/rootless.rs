//! Rootless native sandboxes: what changes when agentkernel runs as an
//! ordinary user.
//!
//! The helper first enters a user namespace of its own that maps the caller's
//! uid and gid to root (and nothing else: no setuid helper, no subordinate
//! ids). Everything the root path does then happens inside it, with these
//! differences, each decided here or where noted:
//! - Limits: an unprivileged user cannot create cgroups on cgroup v1 and, on
//!   v2, only inside a delegated subtree we do not manage yet. The pids limit
//!   is still enforced, by RLIMIT_NPROC: since Linux 5.14 it counts processes
//!   per user *namespace*, so in the sandbox's own namespace it caps the
//!   sandbox as a whole. Memory and CPU limits cannot be: a limit the user
//!   asked for (flag or config) is refused; the profile's default ones are
//!   dropped with a notice on stderr (Podman rootless on v1 does the same, with a warning).
//! - Network: no veth or bridge; `slirp4netns` gives the sandbox a user-mode
//!   network stack instead (host loopback unreachable), or loopback only.
//! - overlayfs is mounted with `userxattr` (its metadata in `user.*` xattrs,
//!   which is also where image layers pulled without root keep opaque dirs).
//! - Only uid 0 exists inside: an image whose USER is someone else is refused.
//! - No freezer: `sandbox stop` is refused.
//! - The egress proxy is the same process as root's (started by the run, as
//!   the user, outside every namespace of the sandbox); with an allow-list
//!   the sandbox gets no slirp4netns, only the proxy on its loopback.

use std::io;

use serde::{Deserialize, Serialize};

/// The caller's ids, mapped to root in the sandbox's user namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserMap {
    pub uid: u32,
    pub gid: u32,
}

impl UserMap {
    /// `Some` when agentkernel runs without root.
    pub fn for_caller() -> Option<UserMap> {
        // SAFETY: geteuid/getegid have no preconditions and cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        (uid != 0).then_some(UserMap { uid, gid })
    }
}

/// Moves this (single-threaded) process into a new user namespace where it
/// is root with every capability, mapped to the caller outside.
pub fn enter_user_namespace(map: &UserMap) -> io::Result<()> {
    // SAFETY: unshare with a namespace flag; the helper is single-threaded.
    if unsafe { libc::unshare(libc::CLONE_NEWUSER) } != 0 {
        return Err(crate::sys::context("create a user namespace")(
            io::Error::last_os_error(),
        ));
    }
    // Without setgroups denied, an unprivileged process may not write gid_map.
    let write = |file: &str, text: String| {
        std::fs::write(format!("/proc/self/{file}"), text)
            .map_err(crate::sys::context(format_args!("write /proc/self/{file}")))
    };
    write("setgroups", "deny".into())?;
    write("uid_map", format!("0 {} 1\n", map.uid))?;
    write("gid_map", format!("0 {} 1\n", map.gid))?;
    Ok(())
}

/// Caps the sandbox's processes at `max` (see the module doc): set in the
/// sandbox's user namespace, inherited by everything started there.
pub fn limit_processes(max: i64) -> io::Result<()> {
    let max = max.max(1) as libc::rlim_t;
    let limit = libc::rlimit {
        rlim_cur: max,
        rlim_max: max,
    };
    // SAFETY: setrlimit reads the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NPROC, &limit) } != 0 {
        return Err(crate::sys::context("limit the sandbox's processes")(
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}
