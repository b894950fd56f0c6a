//! Cleaning up after sandboxes whose agentkernel process died (`kill -9`):
//! their mounts and processes died with their namespaces; what can remain
//! is a cgroup and a scratch directory, both recorded in the scratch dir,
//! and a network lease (veth, port rules) naming the sandbox.

use std::path::Path;

use agentkernel_core::state::{Owner, Store};

use crate::cgroup::Cgroup;

/// Removes the cgroup and scratch directory of every run whose owner is
/// gone. Returns how many it cleaned.
pub fn orphaned_runs(store: &Store) -> usize {
    let mut cleaned = 0;
    for dir in store.orphaned_scratch() {
        remove_run(&dir);
        cleaned += 1;
    }
    // Network leases name their sandbox; a sandbox is alive while its run's
    // scratch directory has a live owner.
    let leases = store.root().join("net");
    if leases.exists() {
        let runs = store.root().join("runs");
        let is_alive = |id: &str| {
            std::fs::read_to_string(runs.join(id).join("owner"))
                .is_ok_and(|o| !Owner(o.trim().to_string()).is_dead())
        };
        match agentkernel_net::gc(&agentkernel_net::NetConfig::new(store.root()), &is_alive) {
            Ok(n) => cleaned += n,
            Err(e) => eprintln!("agentkernel: warning: network cleanup: {e}"),
        }
    }
    cleaned
}

fn remove_run(dir: &Path) {
    if let Ok(data) = std::fs::read(dir.join("cgroup.json")) {
        if let Ok(cgroup) = serde_json::from_slice::<Cgroup>(&data) {
            cgroup.remove();
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}
