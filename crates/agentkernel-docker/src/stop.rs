//! `sandbox stop` of a kept Docker/Podman sandbox: every process of the
//! container ends except its init and the keep-alive loop (the container's
//! main process, which also enforces the TTL). A real `docker stop` would
//! end the keep-alive too, and with it the auto-removed container and its
//! files; this keeps the files, like `docker stop` of an ordinary container.
//! The container is paused while its processes are found and killed, so none
//! can fork a replacement in between, then unpaused for the kills to land.
//! The processes are killed from the engine's host by pid (as an exec's
//! timeout is, see `exec.rs`).

use std::time::{Duration, Instant};

use agentkernel_core::procs;
use agentkernel_core::state::{proc_stat_field, Store};
use agentkernel_core::Error;

use crate::kept::container_name;
use crate::Engine;

/// How long the killed processes may take to go.
const SETTLE: Duration = Duration::from_secs(10);

/// Ends every process of sandbox `name` but its init and keep-alive; returns
/// how many were killed.
pub async fn stop(engine: &Engine, store: &Store, name: &str) -> Result<usize, Error> {
    store
        .load(name)?
        .ok_or_else(|| Error::NoSuchSandbox(name.to_string()))?;
    let container = container_name(name);
    let info = match crate::inspect::container(engine, &container).await {
        Ok(info) => info,
        Err(e) if crate::engine::is_not_found(&e) => {
            store.forget(name)?;
            return Err(Error::NoSuchSandbox(format!(
                "{name} (it expired or was removed)"
            )));
        }
        Err(e) => return Err(engine.error("inspecting the sandbox", e)),
    };
    let init = info
        .state
        .and_then(|s| s.pid)
        .filter(|p| *p > 0)
        .and_then(|p| i32::try_from(p).ok());
    let (init, ns) = init
        .and_then(|p| Some((p, procs::pid_namespace(p)?)))
        .ok_or_else(|| {
            Error::Conflict(format!(
                "cannot stop {name}: its processes are not visible from here (the {} engine runs on another host); `agentkernel sandbox pause {name}` freezes it",
                engine.name()
            ))
        })?;
    match engine.docker.pause_container(&container).await {
        Ok(()) => {}
        Err(e) if crate::engine::is_conflict(&e) => {} // already paused: stop supersedes it
        Err(e) => return Err(engine.error("stopping the sandbox", e)),
    }
    let keep_alive = keep_alive(init);
    let victims = procs::in_namespace_except(&ns, &spared(init, keep_alive));
    let denied = procs::kill_all(&victims);
    match engine.docker.unpause_container(&container).await {
        Ok(()) => {}
        Err(e) if crate::engine::is_conflict(&e) => {}
        Err(e) => return Err(engine.error("stopping the sandbox", e)),
    }
    if denied {
        return Err(Error::Conflict(format!(
            "cannot stop {name}: its processes belong to another user (the {} engine's); run agentkernel as root, or `agentkernel sandbox pause {name}` freezes it",
            engine.name()
        )));
    }
    let start = Instant::now();
    loop {
        // Re-read every round: the keep-alive starts a new `date`, `cat` or
        // `sleep` every two seconds, and one started after the first scan
        // is still the keep-alive's, not the sandbox's (killing it would
        // only make the loop start another, and this chase never end).
        let left = procs::in_namespace_except(&ns, &spared(init, keep_alive));
        if left.is_empty() {
            return Ok(victims.len());
        }
        if start.elapsed() > SETTLE {
            return Err(Error::Conflict(format!(
                "{} process(es) of sandbox {name} did not end within {}s; `agentkernel sandbox remove {name}` ends it",
                left.len(),
                SETTLE.as_secs()
            )));
        }
        procs::kill_all(&left);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What stop leaves running: init, the keep-alive loop and the loop's own
/// helpers (its `date`, `cat` and `sleep`). Sandbox processes cannot be among
/// the helpers: execs are started by the engine and orphans go to init.
fn spared(init: i32, keep_alive: Option<i32>) -> Vec<i32> {
    let mut spared: Vec<i32> = [init].into_iter().chain(keep_alive).collect();
    spared.extend(keep_alive.iter().flat_map(|k| procs::children(*k)));
    spared
}

/// The keep-alive loop: init's first child, so the oldest (an orphan
/// reparented to init later started later).
fn keep_alive(init: i32) -> Option<i32> {
    procs::children(init)
        .into_iter()
        .filter_map(|pid| Some((proc_stat_field(pid as u32, 22)?, pid)))
        .min()
        .map(|(_, pid)| pid)
}
