//! Cleaning up after sandboxes whose agentkernel process died (`kill -9`):
//! their mounts and processes died with their namespaces; what can remain
//! is a cgroup (named by the run's id, like its scratch directory), the scratch directory,
//! and a network lease (veth, port rules) naming the sandbox's holder.

use std::path::{Path, PathBuf};

use agentkernel_core::state::{Store, FINISHED};

use crate::cgroup::Cgroup;
use crate::plan::Plan;

/// Removes the cgroup and scratch directory of every run whose owner is
/// gone. Returns how many it cleaned.
pub fn orphaned_runs(store: &Store) -> usize {
    let mut cleaned = 0;
    for dir in store.orphaned_scratch() {
        remove_run(&dir);
        cleaned += 1;
    }
    for group in Cgroup::abandoned_runs(std::time::Duration::from_secs(60)) {
        if std::fs::remove_dir(&group).is_ok() {
            cleaned += 1;
        }
    }
    // After the scratch dirs: a killed run's claimed pool device is swept
    // once its image is gone with them.
    cleaned += crate::disk_pool::collect(store.root());
    cleaned += crate::disk_keeper::collect(store.root());
    crate::disk_pool::sweep();
    cleaned + crate::net::collect_dead()
}

/// Where a finished one-shot run's scratch dir waits for its cleanup
/// process: `<state>/finished/<id>`, out of `runs/` (see
/// `process::supervisor::clean_up_after_exit`). None for a kept sandbox's.
pub fn finished_path(plan: &Plan) -> Option<PathBuf> {
    if plan.keep.is_some() {
        return None;
    }
    let dir = plan.state_root()?.join(FINISHED);
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(_) => return None,
    }
    Some(dir.join(plan.scratch.file_name()?))
}

fn remove_run(dir: &Path) {
    if let Some(id) = dir.file_name().and_then(|n| n.to_str()) {
        Cgroup::of(id).remove();
    }
    let _ = agentkernel_core::state::remove_tree(dir);
}
