//! `agentkernel pool status|prune` (and the hidden `refill` that `run` starts).

use agentkernel_core::config::Config;
use agentkernel_core::state::Store;
use agentkernel_core::{Error, Result};
use agentkernel_docker::pool;
use serde_json::json;

use crate::backend;
use crate::cli::PoolCommand;

pub async fn pool(cmd: PoolCommand) -> Result<i32> {
    let store = Store::open_default();
    match cmd {
        PoolCommand::Refill { key, used } => {
            let file = pool::load_key_file(&store, &key)?;
            let engine = backend::engine(file.backend)?;
            pool::refill(&engine, &store, &key, used.as_deref()).await?;
            Ok(0)
        }
        PoolCommand::RefillNative { key } => {
            agentkernel_native::pool::refill(&store, &key).await?;
            Ok(0)
        }
        PoolCommand::Status { json } => status(&store, json).await,
        PoolCommand::HoldDisks { bytes } => {
            agentkernel_native::disk_keeper::serve(store.root(), bytes)
                .map_err(|e| agentkernel_core::Error::state(store.root(), e))?;
            Ok(0)
        }
        PoolCommand::Prune => {
            // Native's workspace disks mounted or attached ahead (as root only).
            let held = agentkernel_native::disk_keeper::stop(store.root());
            if held > 0 {
                eprintln!(
                    "agentkernel: released {}",
                    super::counted(held, "mounted workspace disk", "mounted workspace disks")
                );
            }
            let disks = agentkernel_native::disk_pool::drain(store.root());
            if disks > 0 {
                eprintln!(
                    "agentkernel: released {}",
                    super::counted(
                        disks,
                        "pre-attached workspace disk",
                        "pre-attached workspace disks"
                    )
                );
            }
            let mut removed = 0;
            for engine in backend::engines_in_use(&store) {
                engine.ping().await?;
                removed += pool::prune(&engine, &store).await;
            }
            let vms = super::qemu_pool::prune(&store);
            let sandboxes = agentkernel_native::pool::prune(&store);
            eprintln!(
                "agentkernel: removed {}, {} and {}",
                super::counted(removed, "warm container", "warm containers"),
                super::counted(vms, "warm VM", "warm VMs"),
                super::counted(sandboxes, "warm native sandbox", "warm native sandboxes")
            );
            Ok(0)
        }
    }
}

/// Per engine: the cap, the warm total, and each key's warm and in-use
/// containers, target and hit rate.
async fn status(store: &Store, as_json: bool) -> Result<i32> {
    let cwd = std::env::current_dir()
        .map_err(|e| Error::invalid("current directory", ".", e.to_string()))?;
    // The cap the next run from here applies (runs record it for their refills).
    let config = Config::load(&cwd, None)?;
    let max_total = config.pool_max_total.unwrap_or(pool::DEFAULT_MAX_TOTAL);
    // Warm VMs and native sandboxes have a smaller default cap than containers.
    let small_max_total = config
        .pool_max_total
        .unwrap_or(agentkernel_core::config::DEFAULT_POOL_MAX_TOTAL);
    let vm_target = super::qemu_pool::target(&config);
    let mut engines = Vec::new();
    for engine in backend::engines_in_use(store) {
        engine.ping().await?;
        engines.push((engine.name(), pool::status(&engine, store).await));
    }
    let vms = super::qemu_pool::status(store);
    let natives = agentkernel_native::pool::status(store);
    let native_target = agentkernel_native::pool::Settings::from_config(&config).size;
    // Native's workspace disks mounted (the keeper) or attached ahead.
    let keeper = agentkernel_native::disk_keeper::status(store.root());
    let attached = agentkernel_native::disk_pool::ready(store.root());
    if as_json {
        let value = json!({
            "max_total": max_total,
            "engines": engines.iter().map(|(name, keys)| json!({
                "backend": name,
                "warm": keys.iter().map(|k| k.warm).sum::<usize>(),
                "keys": keys,
            })).collect::<Vec<_>>(),
            "vms": {
                "backend": "qemu",
                "warm": vms.iter().map(|k| k.warm).sum::<usize>(),
                "max_total": small_max_total,
                "target_per_key": vm_target,
                "keys": vms,
            },
            "sandboxes": {
                "backend": "native",
                "warm": natives.iter().map(|k| k.warm).sum::<usize>(),
                "max_total": small_max_total,
                "target_per_key": native_target,
                "keys": natives,
            },
            "disks": {
                "backend": "native",
                "keeper_pid": keeper.map(|k| k.pid),
                "mounted": keeper.map_or(0, |k| k.ready),
                "bytes": keeper.map(|k| k.bytes),
                "netns": keeper.map_or(0, |k| k.netns),
                "recycled": keeper.map_or(0, |k| k.recycled),
                "attached": attached,
            },
        });
        super::print_stdout(format!("{value:#}\n").as_bytes())?;
        return Ok(0);
    }
    let mut rows = vec![Row {
        backend: "BACKEND",
        key: "KEY",
        image: "IMAGE",
        profile: "PROFILE",
        warm: "WARM".into(),
        in_use: "IN USE".into(),
        target: "TARGET".into(),
        hits: "HITS".into(),
        workspace: "WORKSPACE",
    }];
    for (name, keys) in &engines {
        rows.extend(keys.iter().map(|s| Row {
            backend: name,
            key: &s.key,
            image: &s.image,
            profile: &s.profile,
            warm: s.warm.to_string(),
            in_use: s.in_use.to_string(),
            target: s.target.to_string(),
            hits: hit_rate(s.hits, s.hits + s.waits + s.misses),
            workspace: s.workspace.as_deref().unwrap_or("-"),
        }));
    }
    rows.extend(vms.iter().map(|s| Row::of_key("qemu", s, vm_target)));
    rows.extend(
        natives
            .iter()
            .map(|s| Row::of_key("native", s, native_target)),
    );
    let mut text: String = rows.iter().map(Row::line).collect();
    for (name, keys) in &engines {
        let warm: usize = keys.iter().map(|k| k.warm).sum();
        text += &format!("{name}: {warm} warm of at most {max_total} ([pool] max_total)\n");
    }
    if !vms.is_empty() {
        let warm: usize = vms.iter().map(|k| k.warm).sum();
        let warm = super::counted(warm, "warm VM", "warm VMs");
        text += &format!("qemu: {warm} of at most {small_max_total} ([pool] max_total)\n");
    }
    if !natives.is_empty() {
        let warm: usize = natives.iter().map(|k| k.warm).sum();
        let warm = super::counted(warm, "warm sandbox", "warm sandboxes");
        text += &format!("native: {warm} of at most {small_max_total} ([pool] max_total)\n");
    }
    if let Some(keeper) = keeper {
        let disks = super::counted(
            keeper.ready,
            "mounted workspace disk",
            "mounted workspace disks",
        );
        text += &format!(
            "native: disk keeper (pid {}) holds {disks} of {} and {}; {} recycled\n",
            keeper.pid,
            agentkernel_core::parse::format_bytes(keeper.bytes),
            super::counted(keeper.netns, "network namespace", "network namespaces"),
            super::counted(keeper.recycled as usize, "used disk", "used disks"),
        );
    }
    if attached > 0 {
        let disks = super::counted(attached, "workspace disk", "workspace disks");
        text += &format!("native: {disks} attached ahead\n");
    }
    super::print_stdout(text.as_bytes())?;
    Ok(0)
}

/// One line of `pool status`: a key of a container engine's pool or of
/// the VM pool (or the header).
struct Row<'a> {
    backend: &'a str,
    key: &'a str,
    image: &'a str,
    profile: &'a str,
    warm: String,
    in_use: String,
    target: String,
    hits: String,
    workspace: &'a str,
}

impl<'a> Row<'a> {
    /// A key of a pool without a daemon (qemu's VMs, native's sandboxes).
    fn of_key(
        backend: &'a str,
        s: &'a agentkernel_core::pool_keys::KeyStatus,
        target: u32,
    ) -> Row<'a> {
        Row {
            backend,
            key: &s.key,
            image: &s.about.image,
            profile: &s.about.profile,
            warm: s.warm.to_string(),
            in_use: s.in_use.to_string(),
            target: target.to_string(),
            hits: hit_rate(s.about.hits, s.about.hits + s.about.misses),
            workspace: s.about.workspace.as_deref().unwrap_or("-"),
        }
    }

    fn line(&self) -> String {
        format!(
            "{:<8} {:<17} {:<28} {:<12} {:>4} {:>6} {:>6} {:>13}  {}\n",
            self.backend,
            self.key,
            self.image,
            self.profile,
            self.warm,
            self.in_use,
            self.target,
            self.hits,
            self.workspace
        )
    }
}

/// `93% of 16`, or `-` before the first run.
fn hit_rate(hits: u64, runs: u64) -> String {
    match runs {
        0 => "-".to_string(),
        _ => format!("{}% of {runs}", hits * 100 / runs),
    }
}
