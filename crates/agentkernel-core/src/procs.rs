//! Processes by pid namespace, from the host's `/proc`: what `sandbox stop`
//! ends where no cgroup lists a sandbox's processes (Docker/Podman from the
//! engine's host, rootless native).

use std::collections::BTreeSet;
use std::path::PathBuf;

use crate::state::proc_stat_field;

/// The pid namespace `pid` is in (the link's target names it).
pub fn pid_namespace(pid: i32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok()
}

/// The pid namespace `pid`'s children are born in.
pub fn pid_namespace_for_children(pid: i32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/pid_for_children")).ok()
}

/// Every process in namespace `ns` except those in `keep`.
pub fn in_namespace_except(ns: &PathBuf, keep: &[i32]) -> BTreeSet<i32> {
    processes()
        .filter(|pid| !keep.contains(pid))
        .filter(|pid| pid_namespace(*pid).as_ref() == Some(ns))
        .collect()
}

/// The children of `parent`.
pub fn children(parent: i32) -> Vec<i32> {
    processes()
        .filter(|pid| proc_stat_field(*pid as u32, 4) == Some(parent as u64))
        .collect()
}

/// SIGKILLs `pids`; true when any of them was another user's (EPERM).
pub fn kill_all(pids: &BTreeSet<i32>) -> bool {
    let mut denied = false;
    for pid in pids {
        // SAFETY: kill takes plain integers.
        if unsafe { libc::kill(*pid, libc::SIGKILL) } != 0 {
            denied |= std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        }
    }
    denied
}

fn processes() -> impl Iterator<Item = i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
}
