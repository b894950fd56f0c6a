//! `--fast` on `-B qemu` (the default): a one-shot run claims a VM booted
//! ahead of time for its key instead of booting one, and leaves one more
//! booting for the next run (`agentkernel_vm::pool` has the rules). A key
//! with no ready VM takes the normal path.

use std::time::Duration;

use agentkernel_core::backend::RunOptions;
use agentkernel_core::config::Config;
use agentkernel_core::spec::{Outcome, SandboxSpec};
use agentkernel_core::state::Store;
use agentkernel_core::Result;
use agentkernel_vm::kept::KeptVm;
use agentkernel_vm::{pool, session};

use super::qemu::{backend_error, outcome, prepare, with_terminal};

/// Warm VMs a key keeps ready (each serves one run).
const DEFAULT_SIZE: u32 = 1;
/// An unclaimed warm VM ends after this (`[pool] idle_ttl`).
const DEFAULT_IDLE_TTL: Duration = Duration::from_secs(600);

fn pool_root(store: &Store) -> std::path::PathBuf {
    store.root().join("vm-pool")
}

pub async fn run(store: &Store, spec: &SandboxSpec, options: &RunOptions<'_>) -> Result<Outcome> {
    // Published ports are bound when a VM boots: a warm VM would hold them
    // while it waits. A run that publishes boots its own.
    if !spec.ports.is_empty() {
        return super::qemu::run(spec, options).await;
    }
    let config = options.config;
    let (host, vm, request) = prepare(spec, config, &[]).await?;
    let warm = KeptVm {
        qemu: host.qemu.binary.clone(),
        vm,
        sandbox: request.clone(),
        record: None,
    };
    let root = pool_root(store);
    let key = pool::key(&warm);
    let claimed = pool::claim(&root, &key);
    let about = pool::About::for_spec(spec);
    pool::record_run(&root, &key, about, claimed.is_some());
    let request = with_terminal(request, spec.exec.tty);
    // The next run of this key finds a VM ready: room is made and the next
    // warm VM's directory prepared (files on the host's disk, milliseconds)
    // while the command runs; its holder starts after the command, so that
    // a booting VM never competes with the run it is for. A failure only
    // costs the next run a boot.
    let next = {
        let size = target(config);
        let idle = config.pool_idle_ttl.unwrap_or(DEFAULT_IDLE_TTL);
        let max_total = config
            .pool_max_total
            .unwrap_or(agentkernel_core::config::DEFAULT_POOL_MAX_TOTAL);
        let (root, key, warm) = (root.clone(), key.clone(), warm.clone());
        std::thread::spawn(move || {
            pool::make_room(&root, max_total);
            // A cap of 0: no warm VMs at all, nothing more boots.
            if max_total == 0 {
                return Ok(None);
            }
            pool::prepare_refill(&root, &key, &warm, size, idle)
        })
    };
    let ended = match claimed {
        Some(claimed) => {
            agentkernel_native::trace::phase("warm VM claimed");
            pool::run_claimed(claimed, request)
        }
        None => session::run(&host.qemu, &warm.vm, request, None),
    };
    agentkernel_native::trace::phase("command ended");
    let refilled = match next.join() {
        Ok(Ok(Some(dir))) => pool::start_refill(&dir).map_err(|e| e.to_string()),
        Ok(Ok(None)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the warm pool's refill stopped short".to_string()),
    };
    if let Err(e) = refilled {
        eprintln!("agentkernel: notice: {e}");
    }
    agentkernel_native::trace::phase("pool refill started");
    Ok(outcome(ended.map_err(backend_error)?))
}

/// Warm VMs whose holder died: removed.
pub fn collect(store: &Store) -> usize {
    pool::collect(&pool_root(store))
}

/// Warm VMs each key keeps ready (`[pool] size`).
pub fn target(config: &Config) -> u32 {
    config.pool_size.unwrap_or(DEFAULT_SIZE)
}

/// Each key's warm and in-use VMs and hits, for `pool status`.
pub fn status(store: &Store) -> Vec<pool::KeyStatus> {
    pool::status(&pool_root(store))
}

/// Ends every unclaimed warm VM (`pool prune`); returns how many.
pub fn prune(store: &Store) -> usize {
    pool::prune(&pool_root(store))
}
