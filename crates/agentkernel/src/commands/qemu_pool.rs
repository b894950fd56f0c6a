//! `--fast` on `-B qemu` (the default): a one-shot run claims a VM booted
//! ahead of time for its key instead of booting one, and leaves one more
//! booting for the next run (`agentkernel_vm::pool` has the rules). A key
//! with no ready VM takes the normal path.

use std::time::Duration;

use agentkernel_core::config::Config;
use agentkernel_core::spec::{Outcome, SandboxSpec};
use agentkernel_core::state::Store;
use agentkernel_core::Result;
use agentkernel_vm::kept::KeptVm;
use agentkernel_vm::{pool, session};

use super::qemu::{backend_error, outcome, prepare};

/// Warm VMs a key keeps ready (each serves one run).
const DEFAULT_SIZE: u32 = 1;
/// An unclaimed warm VM ends after this (`[pool] idle_ttl`).
const DEFAULT_IDLE_TTL: Duration = Duration::from_secs(600);

fn pool_root(store: &Store) -> std::path::PathBuf {
    store.root().join("vm-pool")
}

pub async fn run(store: &Store, spec: &SandboxSpec, config: &Config) -> Result<Outcome> {
    // Published ports are bound when a VM boots: a warm VM would hold them
    // while it waits. A run that publishes boots its own.
    if !spec.ports.is_empty() {
        return super::qemu::run(spec, config).await;
    }
    let (host, vm, request) = prepare(spec, config).await?;
    let warm = KeptVm {
        qemu: host.qemu.binary.clone(),
        vm,
        sandbox: request.clone(),
        record: None,
    };
    let root = pool_root(store);
    let key = pool::key(&warm);
    let ended = match pool::claim(&root, &key) {
        Some(claimed) => {
            agentkernel_native::trace::phase("warm VM claimed");
            pool::run_claimed(claimed, request)
        }
        None => session::run(&host.qemu, &warm.vm, request),
    };
    // After the command: the next run of this key finds a VM ready. A
    // failure to start one only costs that run a boot.
    let size = config.pool_size.unwrap_or(DEFAULT_SIZE);
    let idle = config.pool_idle_ttl.unwrap_or(DEFAULT_IDLE_TTL);
    if let Err(e) = pool::refill(&root, &key, &warm, size, idle) {
        eprintln!("agentkernel: notice: {e}");
    }
    Ok(outcome(ended.map_err(backend_error)?))
}

/// Warm VMs whose holder died: removed.
pub fn collect(store: &Store) -> usize {
    pool::collect(&pool_root(store))
}
