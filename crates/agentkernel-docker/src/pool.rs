//! The warm pool behind `--fast`: containers created and started ahead of
//! time, so a run pays only for an exec instead of create + start.
//!
//! Rules (semantics identical with and without `--fast`; only latency changes):
//! - A run gets a container no command has ever run in; it is removed after
//!   that one command, never returned.
//! - The pool key covers everything fixed at container creation: engine, image
//!   ID, resolved policy, mounts. Everything else (argv, env, workdir, TTY,
//!   stdin, timeout) is given to the exec, exactly as the normal path gives it
//!   to the container. A key with no warm container takes the normal path.
//! - No daemon of ours: warm containers live in the engine, labelled. A run
//!   claims one by `mkdir <state>/pool/containers/<name>/ctl/claimed` — atomic,
//!   so two runs never get the same one. The directory is also the container's
//!   read-only control mount: once `claimed/` exists its keep-alive loop stops
//!   counting down its idle deadline.
//! - Removing the used container and refilling happen in a detached
//!   `agentkernel pool refill` process, after the command's exit code is known.
//! - Unclaimed containers expire after `[pool] idle_ttl`: the keep-alive loop
//!   exits and the engine auto-removes them. The ones a refill makes beyond
//!   the key's `size` (a surplus, for back-to-back runs) expire after
//!   [`SURPLUS_IDLE_TTL`], and runs take them first, so a burst's extra
//!   containers leave the host soon after the burst.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agentkernel_core::spec::{ExecRequest, Outcome, PullPolicy, SandboxSpec};
use agentkernel_core::state::{self, now_unix, Owner, Store};
use agentkernel_core::{names, Error};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::create::{container_body, serving_keep_alive_command, Shape};
use crate::exec::KillScope;
use crate::listing::Listed;
use crate::oneshot::remove_container;
use crate::pool_stats::{self, KeyStats, Run};
use crate::{labels, Engine};

pub const DEFAULT_SIZE: u32 = 2;
pub const DEFAULT_IDLE_TTL: Duration = Duration::from_secs(600);
/// `[pool] max_total` for an engine's warm containers when no file sets it.
/// Each run uses up one container and an engine makes two or three a
/// second, so a tight loop of short commands needs about as many warm ones
/// as the loop has runs: with 64, fifty back-to-back runs all found one
/// ready once the key had grown (bench/pool.sh), where 8 served 72%. The
/// host pays for them only during a burst (see [`SURPLUS_IDLE_TTL`]); warm
/// VMs and native sandboxes keep the smaller cap of the core's default.
pub const DEFAULT_MAX_TOTAL: u32 = 64;
/// How long a warm container beyond its key's `size` waits for a run. Idle
/// warm containers slow every sandbox start on the host (64 of them took
/// `bwrap --unshare-all true` from 4.7 to 7.0 ms here), so the surplus a
/// burst of runs grew lives a minute, not `idle_ttl`; the key's `size`
/// containers stay for `idle_ttl`, and its target falls back to what its run
/// rate needs once a minute has passed without it running dry.
pub const SURPLUS_IDLE_TTL: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// Warm containers a key starts with (and never drops below while in use).
    pub size: u32,
    pub idle_ttl: Duration,
    /// Warm containers of one engine across all keys.
    #[serde(default = "default_max_total")]
    pub max_total: u32,
}

fn default_max_total() -> u32 {
    DEFAULT_MAX_TOTAL
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            size: DEFAULT_SIZE,
            idle_ttl: DEFAULT_IDLE_TTL,
            max_total: DEFAULT_MAX_TOTAL,
        }
    }
}

/// What `pool refill` needs to create more containers of a key.
#[derive(Debug, Serialize, Deserialize)]
pub struct KeyFile {
    pub backend: agentkernel_core::backend::BackendKind,
    pub image: String,
    /// The spec with the image replaced by its ID and no per-run parts.
    pub spec: SandboxSpec,
    pub settings: Settings,
}

fn pool_dir(store: &Store) -> PathBuf {
    store.root().join("pool")
}

fn container_dir(store: &Store, name: &str) -> PathBuf {
    pool_dir(store).join("containers").join(name)
}

pub fn key_file_path(store: &Store, key: &str) -> PathBuf {
    pool_dir(store).join("keys").join(format!("{key}.json"))
}

pub fn load_key_file(store: &Store, key: &str) -> Result<KeyFile, Error> {
    let path = key_file_path(store, key);
    let bytes = std::fs::read(&path).map_err(|e| Error::state(&path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::state(&path, std::io::Error::other(e)))
}

/// The spec of a warm container: fixed-at-creation parts only.
fn warm_spec(spec: &SandboxSpec, image_id: &str) -> SandboxSpec {
    SandboxSpec {
        image: image_id.to_string(),
        pull: PullPolicy::Never,
        ports: Vec::new(),
        keep: None,
        exec: ExecRequest::default(),
        ..spec.clone()
    }
}

fn key_of(engine: &Engine, warm: &SandboxSpec) -> String {
    let identity = json!({
        "backend": engine.name(),
        "image": warm.image,
        "policy": warm.policy,
        "workspace": warm.workspace,
        "home": warm.home,
        "volumes": warm.volumes,
        // Warm containers made before every profile carried our filter had the engine's.
        "seccomp": crate::seccomp::profile(warm.policy.seccomp == agentkernel_core::policy::Seccomp::Restrictive),
        // Warm containers made before sandboxes had a network of their own
        // sit on the engine's default bridge: never hand those out.
        "network": crate::network::NAME,
    });
    format!(
        "{:016x}",
        agentkernel_core::names::stable_hash(identity.to_string().as_bytes())
    )
}

/// Runs `spec` in a warm container when one is ready, else on the normal
/// path; either way leaves a detached refill behind.
pub async fn run(
    engine: &Engine,
    spec: &SandboxSpec,
    store: &Store,
    settings: Settings,
) -> Result<Outcome, Error> {
    if spec.pull == PullPolicy::Always {
        // Pulling on every run is the point of `always`; a warm container would skip it.
        return crate::oneshot::run(engine, spec, store).await;
    }
    let (image_id, image_env) = match engine.docker.inspect_image(&spec.image).await {
        Ok(info) => (info.id, info.config.and_then(|c| c.env).unwrap_or_default()),
        Err(e) if crate::engine::is_not_found(&e) => (None, Vec::new()),
        Err(e) => return Err(engine.error("inspecting the image", e)),
    };
    let Some(image_id) = image_id else {
        // The normal path pulls it; the next run warms the key.
        return crate::oneshot::run(engine, spec, store).await;
    };
    let warm = warm_spec(spec, &image_id);
    let key = key_of(engine, &warm);
    let key_path = key_file_path(store, &key);
    // (Re)written when the settings changed, so the refill follows the config.
    if load_key_file(store, &key).ok().map(|f| f.settings) != Some(settings) {
        let file = KeyFile {
            backend: engine.kind(),
            image: spec.image.clone(),
            spec: warm,
            settings,
        };
        std::fs::create_dir_all(key_path.parent().expect("has parent"))
            .map_err(|e| Error::state(&key_path, e))?;
        state::write_atomic(&key_path, &serde_json::to_vec(&file).expect("serializes"))?;
    }

    let started_ms = now_ms();
    let refill_time = pool_stats::load(store, &key).refill_time();
    let outcome = match claim(engine, store, &key, refill_time).await {
        Some((container, served, warm_left)) => {
            let outcome = run_claimed(engine, store, &container, spec, &image_env).await;
            // From here the refill owns the used container; gc gives it a moment.
            let _ = std::fs::write(container_dir(store, &container).join("handed-off"), b"");
            let run = match served {
                Served::Warm => Run::Hit,
                Served::AfterWait => Run::Waited,
            };
            pool_stats::update(store, &key, |s| {
                s.record_run(started_ms, run, warm_left, &settings)
            });
            spawn_refill(store, &key, Some(&container));
            outcome
        }
        None => {
            let outcome = crate::oneshot::run(engine, spec, store).await;
            pool_stats::update(store, &key, |s| {
                s.record_run(started_ms, Run::Miss, 0, &settings)
            });
            spawn_refill(store, &key, None);
            outcome
        }
    };
    outcome
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn run_claimed(
    engine: &Engine,
    store: &Store,
    container: &str,
    spec: &SandboxSpec,
    image_env: &[String],
) -> Result<Outcome, Error> {
    use crate::handoff::Handoff;
    let dir = container_dir(store, container);
    let started = crate::exec::unix_now() - 1;
    let host_ooms_before = agentkernel_core::cgroup::host_oom_kills();
    let handed = match crate::handoff::recorded(&dir) {
        Some(shell) if crate::handoff::suits(&spec.exec, image_env) => {
            crate::handoff::run(engine, container, &dir.join("ctl"), shell, &spec.exec).await?
        }
        _ => Handoff::Declined,
    };
    let outcome = match handed {
        Handoff::Ran(outcome) => outcome,
        Handoff::Declined => {
            // `run -w DIR` creates a missing DIR; an engine exec refuses it.
            // Nothing has run yet, so the normal path gives the same result.
            if let Some(dir) = &spec.exec.workdir {
                if !exists_in(engine, container, dir).await {
                    return crate::oneshot::run(engine, spec, store).await;
                }
            }
            crate::exec::run(engine, container, &spec.exec, KillScope::Container).await?
        }
        // Nothing ran: the normal path gives the same result.
        Handoff::Lost => return crate::oneshot::run(engine, spec, store).await,
    };
    // A fresh container: any OOM kill in it was this command's.
    if outcome == Outcome::Exited(137) {
        let oom = match crate::exec::oom_kills(engine, container).await {
            Some(kills) => kills > 0,
            // Gone already (auto-removed): the engine's event log still knows.
            None => {
                crate::exec::gone_container_was_oom_killed(
                    engine,
                    container,
                    started,
                    host_ooms_before,
                )
                .await
            }
        };
        if oom {
            return Ok(Outcome::OutOfMemory);
        }
    }
    Ok(outcome)
}

/// Whether `path` exists in the container (unsure counts as yes: the exec
/// then reports whatever is wrong).
async fn exists_in(engine: &Engine, container: &str, path: &str) -> bool {
    let options = bollard::query_parameters::ContainerArchiveInfoOptionsBuilder::default()
        .path(path)
        .build();
    match engine
        .docker
        .get_container_archive_info(container, Some(options))
        .await
    {
        Ok(_) => true,
        Err(e) => !crate::engine::is_not_found(&e),
    }
}

async fn list_pool(engine: &Engine, store: &Store, key: Option<&str>) -> Vec<Listed> {
    let mut label = vec![
        format!("{}=true", labels::MANAGED),
        format!("{}={}", labels::KIND, labels::KIND_POOL),
        format!("{}={}", labels::STATE, store.root().display()),
    ];
    if let Some(key) = key {
        label.push(format!("{}={key}", labels::POOL_KEY));
    }
    // An engine that does not answer now: an empty answer sends this run
    // down the slow path, so ask again a few times first.
    for attempt in 0..4 {
        match crate::listing::containers_labelled(engine, label.clone()).await {
            Ok(list) => return list,
            Err(_) if attempt < 3 => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(_) => break,
        }
    }
    Vec::new()
}

fn is_claimed(store: &Store, name: &str) -> bool {
    container_dir(store, name).join("ctl/claimed").exists()
}

/// In a warm container's host directory: its key (written before the container exists).
const KEY_FILE: &str = "key";
/// In a warm container's host directory once it has started.
const STARTED_FILE: &str = "started";
/// In a warm container's host directory when it is beyond the key's `size`
/// (written before the container exists): it expires after
/// [`SURPLUS_IDLE_TTL`], and runs take it before the others.
const SURPLUS_FILE: &str = "surplus";

/// A key's warm containers as this host sees them from their directories
/// alone, without an engine call: ready ones (their keep-alive shell is
/// recorded and alive), the surplus apart, and, of those a refill is still
/// making, how long ago the oldest was begun.
struct LocalView {
    ready_surplus: Vec<String>,
    ready: Vec<String>,
    oldest_starting: Option<Duration>,
}

fn local_view(store: &Store, key: &str) -> LocalView {
    let mut view = LocalView {
        ready_surplus: Vec::new(),
        ready: Vec::new(),
        oldest_starting: None,
    };
    let Ok(entries) = std::fs::read_dir(pool_dir(store).join("containers")) else {
        return view;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let ours = std::fs::read_to_string(dir.join(KEY_FILE)).is_ok_and(|k| k == key);
        if !ours || dir.join("ctl/claimed").exists() {
            continue;
        }
        if crate::handoff::recorded(&dir).is_some() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if dir.join(SURPLUS_FILE).exists() {
                view.ready_surplus.push(name);
            } else {
                view.ready.push(name);
            }
            continue;
        }
        if dir.join(STARTED_FILE).exists() {
            continue;
        }
        let age = agentkernel_core::state::file_age(&dir.join(KEY_FILE));
        // Younger than 30 s: its refill is creating or starting it (an older
        // one failed or was killed).
        if let Some(age) = age.filter(|a| *a < Duration::from_secs(30)) {
            view.oldest_starting = view.oldest_starting.max(Some(age));
        }
    }
    view
}

/// How a run found the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// A warm container was ready.
    Warm,
    /// None was ready, but one a refill was making: the run waited for it.
    AfterWait,
}

/// Claims a warm container of `key`, atomically; says how, and how many other
/// warm ones the key had. When none is ready but a refill is making one that
/// should be ready within a third of `refill` (what making one takes), it
/// waits for it: the normal path's create + start would take longer, and
/// compete with the refill for the engine. Otherwise the normal path is
/// quicker (and adds an engine worker, which a drained key needs).
async fn claim(
    engine: &Engine,
    store: &Store,
    key: &str,
    refill: Duration,
) -> Option<(String, Served, usize)> {
    let begun = std::time::Instant::now();
    let mut served = Served::Warm;
    let mut patience = Duration::ZERO;
    loop {
        let view = local_view(store, key);
        if let Some((name, left)) = claim_one(store, view.ready_surplus, view.ready) {
            return Some((name, served, left));
        }
        let Some(oldest) = view.oldest_starting else {
            break;
        };
        if served == Served::Warm {
            let remaining = refill.saturating_sub(oldest);
            if remaining > refill / 3 {
                break;
            }
            patience = remaining + Duration::from_millis(150);
            served = Served::AfterWait;
        }
        if begun.elapsed() >= patience {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Containers whose shell this host cannot see (made by an older version,
    // or still being recorded): the engine knows which are running.
    let running: Vec<String> = list_pool(engine, store, Some(key))
        .await
        .iter()
        .filter(|c| c.is_running())
        .filter_map(Listed::name)
        .collect();
    claim_one(store, Vec::new(), running).map(|(name, left)| (name, served, left))
}

/// Claims one of `first`, else one of `then` (`mkdir ctl/claimed`: atomic);
/// returns it and how many others there were. Runs take the surplus first, so
/// what stays after a burst is the key's `size` of long-lived containers.
fn claim_one(
    store: &Store,
    mut first: Vec<String>,
    mut then: Vec<String>,
) -> Option<(String, usize)> {
    // Start at a random place so concurrent runs rarely contend for the same one.
    for candidates in [&mut first, &mut then] {
        if !candidates.is_empty() {
            let offset = u32::from_str_radix(&names::generated()[4..], 16).unwrap_or(0) as usize
                % candidates.len();
            candidates.rotate_left(offset);
        }
    }
    let count = first.len() + then.len();
    for (tried, name) in first.into_iter().chain(then).enumerate() {
        let dir = container_dir(store, &name);
        if std::fs::create_dir(dir.join("ctl/claimed")).is_ok() {
            let _ = state::write_atomic(&dir.join("owner"), Owner::current().0.as_bytes());
            return Some((name, count - tried - 1));
        }
    }
    None
}

/// Removes a warm container unless a run has claimed it: claims it first, as
/// a run would, so a run that got there first keeps it (and a refill killed
/// midway leaves a claimed container with a dead owner, which gc removes).
async fn remove_unclaimed(engine: &Engine, store: &Store, name: &str) -> bool {
    let dir = container_dir(store, name);
    match std::fs::create_dir(dir.join("ctl/claimed")) {
        Ok(()) => {
            let _ = state::write_atomic(&dir.join("owner"), Owner::current().0.as_bytes());
        }
        // No control directory: nothing can claim it.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(_) => return false,
    }
    remove_container(engine, name).await;
    let _ = state::remove_tree(&dir);
    true
}

/// Starts `agentkernel pool refill` detached: it removes the used container
/// and tops the key back up, after we have exited.
fn spawn_refill(store: &Store, key: &str, used: Option<&str>) {
    let mut args = vec!["pool", "refill", key];
    if let Some(used) = used {
        args.extend(["--used", used]);
    }
    agentkernel_core::detached::spawn(store.root(), &args);
}

/// `agentkernel pool refill KEY [--used NAME]`: removes the used container,
/// then tops the pool up. One refill works at a time per state directory (the
/// cap counts across keys); one that finds another at work leaves a note and
/// exits, and the one at work does another round for it.
pub async fn refill(
    engine: &Engine,
    store: &Store,
    key: &str,
    used: Option<&str>,
) -> Result<(), Error> {
    // Removed by the refill at work, after its rounds (see `top_up`).
    if let Some(used) = used {
        let used_dir = pool_dir(store).join(USED_DIR);
        let _ = std::fs::create_dir_all(&used_dir);
        let _ = std::fs::write(used_dir.join(used), b"");
    }
    let topped_up = top_up(engine, store, key).await;
    // Best effort: an engine that cannot list now is asked again next time.
    let _ = crate::gc::collect_orphans(engine.clone(), store.clone()).await;
    topped_up
}

/// While runs of `key` keep coming and more than a quarter of its target is
/// warm, the engine's time goes to the runs: making and removing containers
/// meanwhile (a create + start or a removal is most of a core for a moment)
/// slowed the runs it competed with, and an engine makes containers far
/// slower than a tight loop uses them, so refilling mid-burst bought few
/// hits. Waits until no run has begun for [`BURST_GAP`], the warm ones fall
/// to a quarter of the target, or 30 s passed.
async fn wait_out_the_burst(store: &Store, key: &str) {
    let give_up = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let stats = pool_stats::load(store, key);
        let view = local_view(store, key);
        let warm = view.ready.len() + view.ready_surplus.len();
        let busy = now_ms().saturating_sub(stats.last_run_ms) < BURST_GAP.as_millis() as u64;
        if !busy || warm * 4 <= stats.target as usize || std::time::Instant::now() > give_up {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A pause between runs that ends a burst.
const BURST_GAP: Duration = Duration::from_millis(300);

/// In the pool directory: one empty file per used container, named after
/// it, for the refill at work to remove.
const USED_DIR: &str = "used";

/// Removes the used containers noted in [`USED_DIR`].
async fn remove_used(engine: &Engine, store: &Store) {
    use futures_util::StreamExt;
    let used_dir = pool_dir(store).join(USED_DIR);
    futures_util::stream::iter(notes_in(&used_dir))
        .for_each_concurrent(PARALLEL_CREATES, |name| {
            let note = used_dir.join(&name);
            async move {
                remove_container(engine, &name).await;
                let _ = state::remove_tree(&container_dir(store, &name));
                let _ = std::fs::remove_file(note);
            }
        })
        .await;
}

/// The names of the notes (empty files) in a note directory.
fn notes_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Refill rounds for `key` and for the keys other refills left notes for
/// while one was at work, each once its key's burst allows
/// ([`wait_out_the_burst`]), then the removal of the used containers. Only
/// the refill holding the lock waits and works; the others leave notes and
/// exit, so a burst of runs leaves one process polling, not one per run.
async fn top_up(engine: &Engine, store: &Store, key: &str) -> Result<(), Error> {
    let wanted_dir = pool_dir(store).join("wanted");
    let lock_path = pool_dir(store).join("refill.lock");
    let lock = std::fs::File::create(&lock_path).map_err(|e| Error::state(&lock_path, e))?;
    let try_lock = || lock.try_lock().is_ok();
    let unlock = || {
        let _ = lock.unlock();
    };
    if !try_lock() {
        let _ = std::fs::create_dir_all(&wanted_dir);
        let _ = std::fs::write(wanted_dir.join(key), b"");
        // The one at work reads the notes after it unlocks; if it did already, the lock is free.
        if !try_lock() {
            return Ok(());
        }
    }
    let mut keys = vec![key.to_string()];
    let mut failure = None;
    loop {
        for key in keys.drain(..) {
            let _ = std::fs::remove_file(wanted_dir.join(&key));
            wait_out_the_burst(store, &key).await;
            let round = match load_key_file(store, &key) {
                Ok(file) => refill_round(engine, store, &key, &file).await,
                Err(e) => Err(e),
            };
            failure = failure.or(round.err());
        }
        // The used containers go after the new ones are made: in a burst of
        // runs, the engine's time goes first to what the next run needs.
        remove_used(engine, store).await;
        unlock();
        keys = notes_in(&wanted_dir);
        let used_left = !notes_in(&pool_dir(store).join(USED_DIR)).is_empty();
        if (keys.is_empty() && !used_left) || !try_lock() {
            break;
        }
    }
    failure.map_or(Ok(()), Err)
}

/// Warm containers made (or evicted) at once. Much of a create + start is
/// the engine waiting (on containerd, runc, the network set-up), so even on a
/// 2-core host four at a time kept more back-to-back runs served than two
/// (72-76% against 54-64% ready, bench/pool.sh).
const PARALLEL_CREATES: usize = 4;

/// Tops `used_key` up to its target within `max_total`, evicting the warm
/// containers of keys used less recently.
async fn refill_round(
    engine: &Engine,
    store: &Store,
    used_key: &str,
    file: &KeyFile,
) -> Result<(), Error> {
    let settings = &file.settings;
    use futures_util::StreamExt;
    let mut warm_by_key: HashMap<String, Vec<String>> = HashMap::new();
    for c in list_pool(engine, store, None).await {
        let (Some(key), Some(name)) = (c.label(labels::POOL_KEY).cloned(), c.name()) else {
            continue;
        };
        // Created counts too: it is one being started.
        if (c.is_running() || c.state() == "created") && !is_claimed(store, &name) {
            warm_by_key.entry(key).or_default().push(name);
        }
    }
    let stats = pool_stats::load(store, used_key);
    let target = if stats.last_run_ms == 0 {
        KeyStats::initial_target(settings)
    } else {
        stats.target.min(settings.max_total)
    } as usize;
    let have = warm_by_key.get(used_key).map_or(0, Vec::len);
    // The key's long-lived ones: new containers are a surplus once there are `size`.
    let lasting = warm_by_key.get(used_key).map_or(0, |names| {
        names
            .iter()
            .filter(|n| !container_dir(store, n).join(SURPLUS_FILE).exists())
            .count()
    });
    let floor = KeyStats::initial_target(settings) as usize;
    let mut total: usize = warm_by_key.values().map(Vec::len).sum();
    let max_total = settings.max_total as usize;
    let mut wanted = target.saturating_sub(have);

    // Over the cap (or short of room): the least recently used keys give way.
    let excess = (total + wanted).saturating_sub(max_total);
    if excess > 0 {
        let mut others: Vec<(u64, String)> = warm_by_key
            .keys()
            .filter(|k| k.as_str() != used_key)
            .map(|k| (pool_stats::load(store, k).last_run_ms, k.clone()))
            .filter(|(last, _)| *last <= stats.last_run_ms)
            .collect();
        others.sort();
        let victims: Vec<String> = others
            .iter()
            .flat_map(|(_, k)| warm_by_key[k].iter().cloned())
            .take(excess)
            .collect();
        // Removed, or claimed by a run meanwhile: either way no longer warm.
        total -= victims.len();
        futures_util::stream::iter(victims)
            .for_each_concurrent(PARALLEL_CREATES, |name| async move {
                remove_unclaimed(engine, store, &name).await;
            })
            .await;
    }
    // Still over (keys used more recently hold the rest): this key yields.
    wanted = wanted.min(max_total.saturating_sub(total));
    if total > max_total {
        let surplus: Vec<String> = warm_by_key
            .get(used_key)
            .into_iter()
            .flatten()
            .take(total - max_total)
            .cloned()
            .collect();
        for name in surplus {
            remove_unclaimed(engine, store, &name).await;
        }
    }
    if wanted == 0 {
        return Ok(());
    }
    let results: Vec<Result<(), Error>> = futures_util::stream::iter(0..wanted)
        .map(|nth| async move {
            // `pool prune` removes the key files: a refill at work stops then.
            if !key_file_path(store, used_key).exists() {
                return Ok(());
            }
            let begun = std::time::Instant::now();
            let surplus = lasting + nth >= floor;
            let made = create_warm(engine, store, used_key, file, surplus).await;
            if made.is_ok() {
                let ms = begun.elapsed().as_millis() as u64;
                pool_stats::update(store, used_key, |s| s.record_refill(ms));
            }
            made
        })
        .buffer_unordered(PARALLEL_CREATES)
        .collect()
        .await;
    results.into_iter().collect()
}

async fn create_warm(
    engine: &Engine,
    store: &Store,
    key: &str,
    file: &KeyFile,
    surplus: bool,
) -> Result<(), Error> {
    let name = format!(
        "{}pool-{}",
        labels::CONTAINER_PREFIX,
        &names::generated()[4..]
    );
    let dir = container_dir(store, &name);
    let ctl = dir.join("ctl");
    std::fs::create_dir_all(&ctl).map_err(|e| Error::state(&ctl, e))?;
    state::write_atomic(&dir.join(KEY_FILE), key.as_bytes())?;
    let idle_ttl = if surplus {
        std::fs::write(dir.join(SURPLUS_FILE), b"").map_err(|e| Error::state(&dir, e))?;
        file.settings.idle_ttl.min(SURPLUS_IDLE_TTL)
    } else {
        file.settings.idle_ttl
    };
    // Idle time counts from when the container is ready (set again once it
    // has started): a container whose deadline passed while the engine was
    // slow to create and start it would exit before any run could claim it.
    let idle_deadline = || now_unix() + idle_ttl.as_secs();
    let deadline_file = ctl.join("deadline");
    let starting = state::while_starting(idle_deadline());
    state::write_atomic(&deadline_file, starting.to_string().as_bytes())?;
    let spec = &file.spec;
    let mut label_map = HashMap::from([
        (labels::MANAGED.to_string(), "true".to_string()),
        (labels::KIND.to_string(), labels::KIND_POOL.to_string()),
        (labels::POOL_KEY.to_string(), key.to_string()),
        (labels::HOST.to_string(), labels::host_id()),
        (
            labels::STATE.to_string(),
            store.root().display().to_string(),
        ),
        (labels::PROFILE.to_string(), spec.policy.profile.to_string()),
        (labels::IMAGE.to_string(), file.image.clone()),
    ]);
    if let Some(ws) = &spec.workspace {
        label_map.insert(labels::WORKSPACE.to_string(), ws.host.display().to_string());
    }
    let result = async {
        let scratch = dir.join("workspace");
        let body = container_body(
            engine.flavor,
            spec,
            Shape {
                // An engine exec is most of a pooled run's cost: the warm
                // container's own shell runs the command instead (handoff.rs).
                command: serving_keep_alive_command(&crate::exec::exec_prefix(engine)),
                labels: label_map,
                stdin: false,
                tty: false,
                scratch: crate::create::needs_scratch(engine.flavor, spec)
                    .then_some(scratch.as_path()),
                control_dir: Some(&ctl),
                auto_remove: true,
            },
        )?;
        crate::pull::create_container(engine, &spec.image, PullPolicy::Never, &name, body, |e| {
            engine.error("creating a warm container", e)
        })
        .await?;
        engine
            .docker
            .start_container(&name, None)
            .await
            .map_err(|e| engine.error("starting a warm container", e))?;
        // Runs find the keep-alive shell through this record.
        let pid = crate::inspect::container(engine, &name)
            .await
            .ok()
            .and_then(|i| i.state?.pid)
            .filter(|p| *p > 0);
        if let Some(pid) = pid {
            crate::handoff::record(pid as i32, &dir).await;
        }
        if !key_file_path(store, key).exists() {
            // `pool prune` ran while it was being made, and may have listed
            // the pool before it existed: not a failure, but not kept.
            return Ok(false);
        }
        state::write_atomic(&deadline_file, idle_deadline().to_string().as_bytes())?;
        // Started, with or without a shell this host can see: runs stop waiting for it.
        let _ = std::fs::write(dir.join(STARTED_FILE), b"");
        Ok(true)
    }
    .await;
    if !matches!(result, Ok(true)) {
        remove_container(engine, &name).await;
        let _ = state::remove_tree(&dir);
    }
    result.map(|_kept| ())
}

/// One key of `pool status`.
#[derive(Debug, Serialize)]
pub struct KeyStatus {
    pub key: String,
    pub image: String,
    pub profile: String,
    pub workspace: Option<String>,
    pub warm: usize,
    pub in_use: usize,
    /// Warm containers the refill keeps for the key now.
    pub target: u32,
    pub hits: u64,
    pub waits: u64,
    pub misses: u64,
}

/// Every key of `engine` that has containers or a record of runs.
pub async fn status(engine: &Engine, store: &Store) -> Vec<KeyStatus> {
    let mut by_key: HashMap<String, KeyStatus> = HashMap::new();
    let blank = |key: String| KeyStatus {
        key,
        image: String::new(),
        profile: String::new(),
        workspace: None,
        warm: 0,
        in_use: 0,
        target: 0,
        hits: 0,
        waits: 0,
        misses: 0,
    };
    // Keys known from their files (a key whose containers expired or were evicted).
    if let Ok(entries) = std::fs::read_dir(pool_dir(store).join("keys")) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(key) = name.strip_suffix(".json").filter(|k| !k.contains('.')) else {
                continue;
            };
            let Ok(file) = load_key_file(store, key) else {
                continue;
            };
            if file.backend != engine.kind() {
                continue;
            }
            let entry = by_key
                .entry(key.to_string())
                .or_insert_with(|| blank(key.to_string()));
            entry.image = file.image.clone();
            entry.profile = file.spec.policy.profile.to_string();
            entry.workspace = file
                .spec
                .workspace
                .as_ref()
                .map(|w| w.host.display().to_string());
        }
    }
    for c in list_pool(engine, store, None).await {
        let labels_of = c.labels();
        let (Some(key), Some(name)) = (labels_of.get(labels::POOL_KEY).cloned(), c.name()) else {
            continue;
        };
        let entry = by_key.entry(key.clone()).or_insert_with(|| KeyStatus {
            image: labels_of.get(labels::IMAGE).cloned().unwrap_or_default(),
            profile: labels_of.get(labels::PROFILE).cloned().unwrap_or_default(),
            workspace: labels_of.get(labels::WORKSPACE).cloned(),
            ..blank(key)
        });
        if is_claimed(store, &name) {
            entry.in_use += 1;
        } else if c.is_running() {
            // Only a running container can be claimed; one still starting is not warm yet.
            entry.warm += 1;
        }
    }
    let mut out: Vec<_> = by_key.into_values().collect();
    for s in &mut out {
        let stats = pool_stats::load(store, &s.key);
        s.target = stats.target;
        s.hits = stats.hits;
        s.waits = stats.waits;
        s.misses = stats.misses;
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

/// Removes every warm (unclaimed) container and forgets every key.
pub async fn prune(engine: &Engine, store: &Store) -> usize {
    // The key files first: a refill at work checks for its key's file before
    // it makes a container and once the container has started, so what it
    // finishes from here on it removes itself, and what it finished before
    // is in the listing below.
    let _ = state::remove_tree(&pool_dir(store).join("keys"));
    let mut removed = 0;
    for c in list_pool(engine, store, None).await {
        let Some(name) = c.name() else { continue };
        if remove_unclaimed(engine, store, &name).await {
            removed += 1;
        }
    }
    removed
}

/// For gc: pool containers claimed by a process that died before its refill
/// removed them, and pool directories whose container is gone.
pub async fn collect(engine: &Engine, store: &Store) -> usize {
    let mut removed = 0;
    let containers = list_pool(engine, store, None).await;
    let live: Vec<String> = containers.iter().filter_map(Listed::name).collect();
    for name in &live {
        let owner =
            std::fs::read_to_string(container_dir(store, name).join("owner")).unwrap_or_default();
        if is_claimed(store, name) && !owner.is_empty() && Owner(owner.trim().to_string()).is_dead()
        {
            // A run that ended normally handed the container to its refill,
            // which removes it in a moment; one killed mid-command did not.
            let handed_off = container_dir(store, name).join("handed-off");
            if !handed_off.exists() || age_secs(&handed_off) > 30 {
                remove_container(engine, name).await;
                let _ = state::remove_tree(&container_dir(store, name));
                removed += 1;
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(pool_dir(store).join("containers")) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            // A directory is made just before its container: leave young ones alone.
            if !live.contains(&name) && age_secs(&entry.path()) > 60 {
                let _ = state::remove_tree(&entry.path());
            }
        }
    }
    removed
}

fn age_secs(path: &Path) -> u64 {
    agentkernel_core::state::file_age(path).map_or(0, |d| d.as_secs())
}
