//! Cleaning up after sandboxes whose agentkernel process died (`kill -9`):
//! their mounts and processes died with their namespaces; what can remain
//! is a cgroup and a scratch directory, both recorded in the scratch dir,
//! and a network lease (veth, port rules) naming the sandbox's holder.

use std::path::Path;

use agentkernel_core::state::Store;

use crate::cgroup::Cgroup;

/// Removes the cgroup and scratch directory of every run whose owner is
/// gone. Returns how many it cleaned.
pub fn orphaned_runs(store: &Store) -> usize {
    let mut cleaned = 0;
    for dir in store.orphaned_scratch() {
        remove_run(&dir);
        cleaned += 1;
    }
    cleaned + crate::net::collect_dead()
}

fn remove_run(dir: &Path) {
    if let Ok(data) = std::fs::read(dir.join("cgroup.json")) {
        if let Ok(cgroup) = serde_json::from_slice::<Cgroup>(&data) {
            cgroup.remove();
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}
