//! Reading a process's cgroup from the host, for facts the engines do not
//! always report (how many times the OOM killer struck).

use std::path::PathBuf;

/// The memory cgroup directory of `pid`: the v1 `memory` controller's, or the
/// v2 unified one.
fn memory_cgroup_dir(pid: i64) -> Option<(PathBuf, bool)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let mut unified = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.split(',').any(|c| c == "memory") {
            return Some((
                PathBuf::from("/sys/fs/cgroup/memory").join(path.trim_start_matches('/')),
                false,
            ));
        }
        if controllers.is_empty() {
            unified = Some(PathBuf::from("/sys/fs/cgroup").join(path.trim_start_matches('/')));
        }
    }
    unified.map(|p| (p, true))
}

/// How many processes the OOM killer has killed in `pid`'s memory cgroup.
pub fn oom_kills(pid: i64) -> Option<u64> {
    let (dir, v2) = memory_cgroup_dir(pid)?;
    let (file, key) = if v2 {
        ("memory.events", "oom_kill")
    } else {
        ("memory.oom_control", "oom_kill")
    };
    let text = std::fs::read_to_string(dir.join(file)).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
}

/// How many processes the OOM killer has killed on this kernel since boot
/// (`oom_kill` in /proc/vmstat, Linux 4.13+). The kernel counts a kill before
/// the victim's SIGKILL is sent, so once a process is seen dead, an unchanged
/// count proves no OOM kill took it, however late an engine's own report of
/// the kill would arrive.
pub fn host_oom_kills() -> Option<u64> {
    std::fs::read_to_string("/proc/vmstat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn own_cgroup_is_readable_or_absent() {
        // Whatever the host, reading our own counter must not panic, and a
        // counter that exists parses as a number.
        let _ = super::oom_kills(std::process::id() as i64);
        assert!(super::oom_kills(-1).is_none());
    }

    #[test]
    fn the_hosts_oom_kill_count_is_read_where_the_kernel_has_it() {
        // Every kernel this tool supports (4.13+) has the counter.
        let vmstat = std::fs::read_to_string("/proc/vmstat").unwrap();
        let listed = vmstat.lines().any(|l| l.starts_with("oom_kill "));
        assert_eq!(super::host_oom_kills().is_some(), listed);
    }
}
