//! `sandbox stop` of a kept native sandbox: every process but its init ends,
//! as `docker stop` ends a container's; the root, the workspace, the network
//! and the TTL stay, and later commands join the same sandbox again. The
//! sandbox is frozen while its processes are killed, so none can fork a
//! replacement in between, then thawed for the kills to land.

use std::collections::BTreeSet;
use std::io;
use std::time::{Duration, Instant};

use agentkernel_core::procs;
use agentkernel_core::state::Store;

use crate::cgroup::Cgroup;
use crate::error::KeptError;
use crate::kept::Held;

/// How long the killed processes may take to go.
const SETTLE: Duration = Duration::from_secs(10);

/// Ends every process of sandbox `name` except its init; returns how many
/// were killed.
pub fn stop(store: &Store, name: &str) -> Result<usize, KeptError> {
    let held = Held::live(store, name)?;
    if held.cgroup.dirs.is_empty() {
        return stop_by_namespace(&held, name);
    }
    held.cgroup.set_frozen(true)?;
    let victims = others(&held.cgroup, held.init_pid);
    // The pids are in the sandbox's cgroup, which only its processes can be in.
    procs::kill_all(&victims);
    held.cgroup.set_frozen(false)?;
    kill_until_none_left(name, || others(&held.cgroup, held.init_pid))?;
    Ok(victims.len())
}

/// Rootless: no cgroup lists the sandbox's processes or freezes them, so
/// they are found by pid namespace (the anchor's `pid_for_children`: init's
/// own /proc entry is closed to us) and killed round after round until none
/// is left; `RLIMIT_NPROC` bounds what a fork loop can add meanwhile. The
/// scan is complete because the profiles' seccomp filters deny new
/// namespaces, so no process can hide in a nested pid namespace.
fn stop_by_namespace(held: &Held, name: &str) -> Result<usize, KeptError> {
    let ns = held
        .anchor_pid
        .and_then(procs::pid_namespace_for_children)
        .ok_or_else(|| KeptError::Gone(name.to_string()))?;
    Ok(kill_until_none_left(name, || {
        procs::in_namespace_except(&ns, &[held.init_pid])
    })?)
}

/// SIGKILLs what `find` lists until it lists nothing; returns how many
/// distinct processes it killed.
fn kill_until_none_left(
    name: &str,
    mut find: impl FnMut() -> BTreeSet<libc::pid_t>,
) -> io::Result<usize> {
    let mut killed = BTreeSet::new();
    let start = Instant::now();
    loop {
        let left = find();
        if left.is_empty() {
            return Ok(killed.len());
        }
        if start.elapsed() > SETTLE {
            return Err(io::Error::other(format!(
                "{} process(es) of sandbox {name} did not end within {}s; `agentkernel sandbox remove {name}` ends it",
                left.len(),
                SETTLE.as_secs()
            )));
        }
        procs::kill_all(&left);
        killed.extend(left);
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
