//! Garbage collection: removes what agentkernel processes that died (`kill -9`,
//! power loss) left behind, and kept sandboxes past their deadline. Runs in
//! the background of every `run`, and on `sandbox list`/`gc`. It only touches
//! containers carrying our labels from this machine, and only when it can
//! prove they are abandoned (owner process gone, or sandbox expired).

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use agentkernel_core::state::{self, now_unix, Owner, Store};

use crate::listing::Listed;
use crate::oneshot::remove_container;
use crate::{labels, Engine};

#[derive(Debug, Default)]
pub struct Collected {
    /// The abandoned sandboxes' containers whose removal was asked for.
    pub containers: Vec<String>,
    /// Warm-pool containers removed (stale, or their pool's owner is gone).
    pub pool_containers: usize,
    pub directories: usize,
}

/// How long an explicit `sandbox gc` waits for the engine to finish removing
/// what it was asked to: a running container is stopped first, and another
/// agentkernel's collector (every `run` collects) may be removing the same
/// one at that moment, in which case ours can be refused.
const REMOVAL_PATIENCE: Duration = Duration::from_secs(15);

/// Of `names`, how many the engine no longer has, waiting up to
/// REMOVAL_PATIENCE for removals under way. `sandbox gc` reports only what is
/// really gone, so its count and a listing right after it agree.
pub async fn confirmed_gone(engine: &Engine, names: &[String]) -> usize {
    let deadline = Instant::now() + REMOVAL_PATIENCE;
    let mut gone = 0;
    for name in names {
        loop {
            match crate::inspect::container(engine, name).await {
                Err(e) if crate::engine::is_not_found(&e) => {
                    gone += 1;
                    break;
                }
                _ if Instant::now() >= deadline => break,
                // Still there: a removal under way, or ours was refused; ask again.
                _ => {
                    remove_container(engine, name).await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    gone
}

/// Every container carrying our `managed` label.
pub async fn managed_containers(engine: &Engine) -> Result<Vec<Listed>, agentkernel_core::Error> {
    crate::listing::containers_labelled(engine, vec![format!("{}=true", labels::MANAGED)])
        .await
        .map_err(|e| engine.error("listing sandboxes", e))
}

/// Collects what is provably abandoned. Fails only when the engine cannot
/// list its containers: the explicit `sandbox gc` must say so, not report
/// that nothing was left (the background collections ignore it).
pub async fn collect_orphans(
    engine: Engine,
    store: Store,
) -> Result<Collected, agentkernel_core::Error> {
    let mut collected = Collected::default();
    let containers = managed_containers(&engine).await?;
    let me = labels::host_id();
    let runs_dir = store.root().join("runs");
    let mut kept_names = HashSet::new();

    for c in &containers {
        let labels_of = c.labels();
        if labels_of.get(labels::HOST) != Some(&me) {
            continue;
        }
        let Some(name) = c.name() else {
            continue;
        };
        match labels_of.get(labels::KIND).map(String::as_str) {
            Some(labels::KIND_RUN) => {
                let owner = labels_of.get(labels::OWNER).cloned().unwrap_or_default();
                if Owner(owner).is_dead() {
                    remove_container(&engine, &name).await;
                    if let Some(dir) = labels_of.get(labels::SCRATCH) {
                        // Only ever delete inside our own scratch area, whatever a label says.
                        if Path::new(dir).parent() == Some(runs_dir.as_path()) {
                            let _ = state::remove_tree(Path::new(dir));
                        }
                    }
                    collected.containers.push(name);
                }
            }
            Some(labels::KIND_KEPT) => {
                let Some(sandbox) = labels_of.get(labels::NAME).cloned() else {
                    continue;
                };
                // The name becomes a path under the state directory: only ever a valid one.
                if agentkernel_core::names::validate(&sandbox).is_err() {
                    continue;
                }
                // Another state directory's sandbox: its records are not ours to judge by.
                if labels_of.get(labels::STATE).map(String::as_str) != store.root().to_str() {
                    continue;
                }
                let dir_exists = store.sandbox_dir(&sandbox).exists();
                let expired = store.deadline(&sandbox).is_some_and(|d| d <= now_unix());
                if !dir_exists || expired {
                    remove_container(&engine, &name).await;
                    let _ = store.forget(&sandbox);
                    collected.containers.push(name);
                } else {
                    kept_names.insert(sandbox);
                }
            }
            _ => {}
        }
    }

    // Records whose container is gone expired on their own (the engine removed them).
    for record in store.list() {
        if record.backend != engine.kind() || kept_names.contains(&record.name) {
            continue;
        }
        // Created after our listing? Ask the engine about this one before forgetting it.
        let container = format!("{}{}", labels::CONTAINER_PREFIX, record.name);
        if let Err(e) = crate::inspect::container(&engine, &container).await {
            if crate::engine::is_not_found(&e) {
                let _ = store.forget(&record.name);
                collected.directories += 1;
            }
        }
    }
    for name in store.abandoned_reservations() {
        remove_container(&engine, &format!("{}{name}", labels::CONTAINER_PREFIX)).await;
        let _ = store.forget(&name);
        collected.directories += 1;
    }
    collected.pool_containers = crate::pool::collect(&engine, &store).await;
    // A native sandbox's scratch (it has a `layer` mount point) goes with its
    // cgroup: the native collector removes both, so it is not ours to delete.
    for dir in store
        .orphaned_scratch()
        .into_iter()
        .filter(|d| !d.join("layer").exists())
    {
        let _ = state::remove_tree(&dir);
        collected.directories += 1;
    }
    Ok(collected)
}
