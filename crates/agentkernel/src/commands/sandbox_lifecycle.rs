//! Upstream's lifecycle verbs on kept sandboxes: `sandbox stop` (processes
//! end, files stay), `extend-ttl`, `clean`. Freezing stays available as
//! `sandbox pause|resume` (`sandbox.rs`).
//!
//! A stopped sandbox keeps running its init (native) or keep-alive loop
//! (Docker/Podman), which holds its root, workspace and network and still
//! enforces the TTL; a `stopped` file in its state directory says it is
//! stopped, so `exec` refuses until `sandbox start` removes it.

use std::time::Duration;

use agentkernel_core::state::{now_unix, Store, NO_EXPIRY};
use agentkernel_core::{names, parse, Error, Result};

use crate::backend;

fn marker(store: &Store, name: &str) -> std::path::PathBuf {
    store.sandbox_dir(name).join("stopped")
}

pub fn is_stopped(store: &Store, name: &str) -> bool {
    marker(store, name).exists()
}

/// For `exec`: a stopped sandbox runs nothing until it is started.
pub fn refuse_if_stopped(store: &Store, name: &str) -> Result<()> {
    if is_stopped(store, name) {
        return Err(Error::Conflict(format!(
            "sandbox {name} is stopped; start it with `agentkernel sandbox start {name}`"
        )));
    }
    Ok(())
}

/// For `sandbox start`: the sandbox runs commands again.
pub fn clear_stopped(store: &Store, name: &str) -> Result<()> {
    match std::fs::remove_file(marker(store, name)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::state(marker(store, name), e))
        }
        _ => Ok(()),
    }
}

/// The status `sandbox list` shows: the backend's (`running`, or `paused`
/// when frozen), `stopped` when stopped.
pub fn shown_status(store: &Store, name: &str, backend_status: &str) -> String {
    match backend_status {
        "running" if is_stopped(store, name) => "stopped".into(),
        other => other.into(),
    }
}

/// `sandbox stop NAME`: ends every process in it but the one holding it.
pub async fn stop(store: &Store, name: &str) -> Result<usize> {
    let (backend, _) = backend::holding(store, name)?;
    let killed = backend.stop(name).await?;
    mark_stopped(store, name)?;
    Ok(killed)
}

/// Records that `name` is stopped: `exec` refuses until `sandbox start`.
pub fn mark_stopped(store: &Store, name: &str) -> Result<()> {
    agentkernel_core::state::write_atomic(&marker(store, name), b"")
}

pub async fn stop_command(store: &Store, name: &str) -> Result<i32> {
    let killed = stop(store, name).await?;
    eprintln!(
        "agentkernel: stopped {name}: {} ended, its files kept; `agentkernel sandbox start {name}` starts it (it still expires at its TTL)",
        super::counted(killed, "process", "processes")
    );
    Ok(0)
}

/// `sandbox extend-ttl NAME [DURATION | --by DURATION]`: the TTL grows by
/// DURATION and so does the current deadline (upstream adds to the expiry;
/// here every later use also keeps the longer TTL).
pub fn extend_ttl(store: &Store, name: &str, by: &str) -> Result<i32> {
    names::validate(name)?;
    let by = parse::duration("extend-ttl DURATION", by)?;
    let (backend, mut record) = backend::holding(store, name)?;
    if record.ttl_secs == 0 {
        eprintln!("agentkernel: {name} never expires (--ttl 0); nothing to extend");
        return Ok(0);
    }
    record.ttl_secs = record.ttl_secs.saturating_add(by.as_secs());
    backend.set_ttl(name, Duration::from_secs(record.ttl_secs))?;
    store.commit(&record)?;
    let deadline = store
        .deadline(name)
        .unwrap_or(0)
        .max(now_unix())
        .saturating_add(by.as_secs())
        .min(NO_EXPIRY - 1);
    agentkernel_core::state::write_atomic_mode(
        &store.control_dir(name).join("deadline"),
        deadline.to_string().as_bytes(),
        0o644,
    )?;
    eprintln!(
        "agentkernel: {name} now expires in {} (TTL {} after each use)",
        parse::format_duration(Duration::from_secs(deadline - now_unix())),
        parse::format_duration(Duration::from_secs(record.ttl_secs))
    );
    Ok(0)
}

/// `sandbox clean [--force]`: removes what has expired or was left behind,
/// every stopped or paused sandbox, and with `--force` the running ones too;
/// names each one it removed.
pub async fn clean(store: &Store, force: bool, all: bool) -> Result<i32> {
    if all {
        eprintln!(
            "agentkernel: notice: --all: images are not removed here; `agentkernel image prune` (native) or `docker image prune` does that"
        );
    }
    // Expired sandboxes and leftovers first (that line counts them).
    super::sandbox::collect_garbage(store).await?;
    let rows = super::sandbox::rows(store).await?;
    let mut removed = 0;
    for row in rows {
        if force || row.status != "running" {
            super::sandbox::remove_one(store, &row.record.name).await?;
            eprintln!("agentkernel: removed {} ({})", row.record.name, row.status);
            removed += 1;
        }
    }
    eprintln!(
        "agentkernel: cleaned {}{}",
        super::counted(removed, "sandbox", "sandboxes"),
        if force {
            ""
        } else {
            " (running ones are kept; --force removes them too)"
        }
    );
    Ok(0)
}
