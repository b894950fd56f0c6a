//! `sandbox stop` of a kept native sandbox: every process but its init ends,
//! as `docker stop` ends a container's; the root, the workspace, the network
//! and the TTL stay, and later commands join the same sandbox again. The
//! sandbox is frozen while its processes are killed, so none can fork a
//! replacement in between, then thawed for the kills to land.

use std::collections::BTreeSet;
use std::io;
use std::time::{Duration, Instant};

use agentkernel_core::state::Store;

use crate::cgroup::Cgroup;
use crate::kept::Held;

/// How long the killed processes may take to go.
const SETTLE: Duration = Duration::from_secs(10);

/// Ends every process of sandbox `name` except its init; returns how many
/// were killed.
pub fn stop(store: &Store, name: &str) -> io::Result<usize> {
    let held = Held::live(store, name)?;
    if held.cgroup.dirs.is_empty() {
        return Err(io::Error::other(format!(
            "sandbox {name} is rootless: stopping it race-free needs a freezer cgroup, which only root can create here; `agentkernel sandbox remove {name}` ends it"
        )));
    }
    held.cgroup.set_frozen(true)?;
    let victims = others(&held.cgroup, held.init_pid);
    for pid in &victims {
        // SAFETY: kill takes plain integers; the pids are in the sandbox's
        // cgroup, which only the sandbox's processes can be in.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    held.cgroup.set_frozen(false)?;
    let start = Instant::now();
    loop {
        let left = others(&held.cgroup, held.init_pid);
        if left.is_empty() {
            return Ok(victims.len());
        }
        if start.elapsed() > SETTLE {
            return Err(io::Error::other(format!(
                "{} process(es) of sandbox {name} did not end within {}s; `agentkernel sandbox remove {name}` ends it",
                left.len(),
                SETTLE.as_secs()
            )));
        }
        for pid in &left {
            // SAFETY: as above.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The processes in the sandbox's cgroups other than its init.
fn others(cgroup: &Cgroup, init: libc::pid_t) -> BTreeSet<libc::pid_t> {
    cgroup
        .dirs
        .iter()
        .filter_map(|dir| std::fs::read_to_string(dir.join("cgroup.procs")).ok())
        .flat_map(|procs| {
            procs
                .lines()
                .filter_map(|l| l.trim().parse::<libc::pid_t>().ok())
                .collect::<Vec<_>>()
        })
        .filter(|pid| *pid != init)
        .collect()
}
