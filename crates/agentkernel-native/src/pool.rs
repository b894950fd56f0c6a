//! The native warm pool (`--fast` on `-B native`, opt-in): sandboxes built
//! ahead of time, so a one-shot run only joins one (as `exec` joins a kept
//! sandbox) instead of building its namespaces, root, workspace and network.
//!
//! Rules (as for the container and VM pools: only latency changes):
//! - A warm sandbox is a kept sandbox of the pool's own store, built from
//!   the run's spec without its per-run parts (`warm_spec`) and named
//!   `run-<id>` like a one-shot run's. The key is everything fixed when it
//!   is built: that spec (image, profile and policy, workspace, home,
//!   volumes), the image's layers, and whether it is rootless. Everything
//!   else — argv, environment, working directory, user, terminal,
//!   `--timeout`, stdin and signals — is the run's, given to the command as
//!   a one-shot run gives it ([`crate::prepare::PerRun`]).
//! - A sandbox serves exactly one run. The run claims it by
//!   `mkdir <sandbox>/claimed` (atomic: two runs never get the same one),
//!   writes its owner label to `claimed/by` and signals the holder, which
//!   from then on lives exactly as long as the run: it watches the run's
//!   pidfd and ends the sandbox when the run ends, however it ends (kill -9
//!   included). The run itself kills the sandbox's init, and waits until
//!   every process of it is gone, before it returns the exit code, so
//!   nothing of the command outlives the run (as with a one-shot sandbox).
//! - No daemon: each warm sandbox has its holder. After every pooled run a
//!   detached `agentkernel pool refill-native KEY` builds the key back up
//!   to `[pool] size`, within `[pool] max_total` across keys (the sandboxes
//!   that idled longest make room first). Unclaimed sandboxes end after
//!   `[pool] idle_ttl`, counted from when they became ready.
//!
//! Layout: `<state>/native-pool/<key>/` is a [`Store`] of its own (the
//! sandboxes under `sandboxes/`, invisible to `sandbox list`), with
//! `warm.json` (what to build, for the refill) and `about.json` (what the
//! key is, and its hits and misses, for `pool status`). A sandbox's
//! directory gains `ready` when it can be claimed.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use agentkernel_core::config::Config;
use agentkernel_core::pool_keys::{record_run, About, KeyStatus};
use agentkernel_core::spec::{ExecRequest, Keep, PullPolicy, SandboxSpec};
use agentkernel_core::state::{create_private_dir_all, now_unix, write_atomic, Owner, Store};
use agentkernel_core::{names, Error, Result};
use serde::{Deserialize, Serialize};

use crate::kept::{self, Held};
use crate::plan::{Action, Plan};
use crate::prepare::{ImageRoot, PerRun};

/// The signal a claiming run sends a warm sandbox's holder.
pub const CLAIMED_SIGNAL: libc::c_int = libc::SIGUSR1;
/// Warm sandboxes a key keeps ready (`[pool] size`).
pub const DEFAULT_SIZE: u32 = 2;
/// An unclaimed warm sandbox ends after this (`[pool] idle_ttl`).
pub const DEFAULT_IDLE_TTL: Duration = Duration::from_secs(600);

const READY: &str = "ready";
const CLAIMED: &str = "claimed";
const CLAIMED_BY: &str = "by";
const KEY_FILE: &str = "warm.json";
const REFILL_LOCK: &str = "refill.lock";
/// A sandbox this close to its idle deadline is not claimed: its holder
/// could end it before the claim reaches it.
const CLAIM_MARGIN_SECS: u64 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub size: u32,
    pub idle_ttl: Duration,
    /// Warm native sandboxes across all keys.
    pub max_total: u32,
}

impl Settings {
    pub fn from_config(config: &Config) -> Settings {
        Settings {
            size: config.pool_size.unwrap_or(DEFAULT_SIZE),
            idle_ttl: config.pool_idle_ttl.unwrap_or(DEFAULT_IDLE_TTL),
            max_total: config
                .pool_max_total
                .unwrap_or(agentkernel_core::config::DEFAULT_POOL_MAX_TOTAL),
        }
    }
}

/// What `pool refill-native` builds for a key.
#[derive(Debug, Serialize, Deserialize)]
pub struct KeyFile {
    pub spec: SandboxSpec,
    pub settings: Settings,
}

pub fn root(state: &Store) -> PathBuf {
    state.root().join("native-pool")
}

fn key_store(state: &Store, key: &str) -> Store {
    Store::new(root(state).join(key))
}

/// The spec a warm sandbox is built from: the fixed-at-build parts only.
fn warm_spec(spec: &SandboxSpec) -> SandboxSpec {
    SandboxSpec {
        pull: PullPolicy::Never,
        ports: Vec::new(),
        keep: None,
        egress: None,
        exec: ExecRequest::default(),
        ..spec.clone()
    }
}

fn key_of(warm: &SandboxSpec, image: &ImageRoot) -> String {
    // A warm sandbox mounts the directories themselves: one replaced under
    // the same path since (a project deleted and cloned again) is another key.
    let mounted: Vec<Option<(u64, u64)>> = warm
        .workspace
        .iter()
        .map(|w| w.host.as_path())
        .chain(warm.home.as_deref())
        .chain(warm.volumes.iter().map(|v| v.host.as_path()))
        .map(|path| {
            std::fs::metadata(path).ok().map(|m| {
                (
                    std::os::unix::fs::MetadataExt::dev(&m),
                    std::os::unix::fs::MetadataExt::ino(&m),
                )
            })
        })
        .collect();
    let identity = serde_json::json!({
        "spec": warm,
        "mounted": mounted,
        "layers": image.layers,
        "rootless": crate::rootless::UserMap::for_caller().is_some(),
    });
    format!(
        "{:016x}",
        names::stable_hash(identity.to_string().as_bytes())
    )
}

/// Claims a warm sandbox of `spec`'s key when one is ready, and leaves a
/// refill behind either way. Returns the plan of the run's command in the
/// claimed sandbox, or `None` when none was ready (the caller builds one).
pub fn claim_for_run(
    state: &Store,
    spec: &SandboxSpec,
    image: &ImageRoot,
    settings: Settings,
) -> Result<Option<Plan>> {
    let warm = warm_spec(spec);
    let key = key_of(&warm, image);
    let claimed = claim(state, &key);
    crate::trace::phase("pool claim looked for");
    let about = About::for_spec(spec);
    record_run(&root(state).join(&key), about, claimed.is_some());
    let store = key_store(state, &key);
    write_key_file(&store, warm, settings);
    let Some(name) = claimed else {
        // A hit's refill is started by the claimed sandbox's holder, off
        // the run's path (see `start_refill_from_holder`).
        if settings.max_total > 0 && unclaimed(&store).len() < settings.size as usize {
            agentkernel_core::detached::spawn(state.root(), &["pool", "refill-native", &key]);
        }
        return Ok(None);
    };
    command_plan(&key_store(state, &key), &name, spec, image).map(Some)
}

/// A warm sandbox of `key` that is ready, claimed for this process.
fn claim(state: &Store, key: &str) -> Option<String> {
    let store = key_store(state, key);
    let entries = std::fs::read_dir(store.root().join("sandboxes")).ok()?;
    for entry in entries.flatten() {
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let dir = entry.path();
        if !dir.join(READY).exists()
            || store
                .deadline(&name)
                .is_none_or(|d| d < now_unix() + CLAIM_MARGIN_SECS)
        {
            continue;
        }
        let Some(holder) = Held::load(&store, &name)
            .filter(Held::holder_alive)
            .and_then(|h| h.holder_pid())
        else {
            continue;
        };
        // The claim: only one mkdir succeeds.
        if std::fs::create_dir(dir.join(CLAIMED)).is_err() {
            continue;
        }
        let told = write_atomic(
            &dir.join(CLAIMED).join(CLAIMED_BY),
            Owner::current().0.as_bytes(),
        )
        .is_ok()
            // SAFETY: kill has no memory-safety preconditions.
            && unsafe { libc::kill(holder, CLAIMED_SIGNAL) } == 0;
        if told {
            return Some(name);
        }
        // A holder that cannot learn who claimed its sandbox would end it
        // at its idle deadline, under a running command: end it now.
        let _ = kept::remove(&store, &name);
    }
    None
}

/// The command plan of this run in the claimed sandbox `name`: the
/// sandbox's own plan with the run's command, as a one-shot run makes it.
fn command_plan(store: &Store, name: &str, spec: &SandboxSpec, image: &ImageRoot) -> Result<Plan> {
    let path = kept::plan_file(store, name);
    let mut plan: Plan = std::fs::read(&path)
        .and_then(|data| serde_json::from_slice(&data).map_err(std::io::Error::other))
        .map_err(|e| Error::state(&path, e))?;
    let per_run = PerRun::of(spec, image, &plan.hostname);
    plan.action = Action::Exec;
    plan.argv = per_run.argv;
    plan.env = per_run.env;
    plan.workdir = per_run.workdir;
    plan.user = per_run.user;
    plan.tty = spec.exec.tty;
    plan.timeout = spec.exec.timeout;
    plan.claimed_warm = true;
    Ok(plan)
}

/// Who claimed the warm sandbox in `dir`, once the claim names them.
pub(crate) fn claimant(dir: &Path) -> Option<Owner> {
    let by = std::fs::read_to_string(dir.join(CLAIMED).join(CLAIMED_BY)).ok()?;
    Some(Owner(by.trim().to_string()))
}

/// Marks a built warm sandbox claimable (its holder, once it serves).
pub(crate) fn mark_ready(dir: &Path) -> Result<()> {
    write_atomic(&dir.join(READY), b"")
}

/// A pidfd of the process `owner` names, while it is that process.
pub(crate) fn pidfd_of(owner: &Owner) -> Option<OwnedFd> {
    let pid: libc::pid_t = owner.0.split(':').nth(1)?.parse().ok()?;
    let fd = pidfd_open(pid)?;
    // Checked after opening: the fd refers to the process we checked.
    (!owner.is_dead()).then_some(fd)
}

fn pidfd_open(pid: libc::pid_t) -> Option<OwnedFd> {
    crate::sys::pidfd_open(pid).ok()
}

/// The init of the warm sandbox a run claimed, held by pidfd from before
/// the run enters it (the sandbox's `/proc` replaces ours then).
pub struct ClaimedInit {
    pidfd: OwnedFd,
}

impl ClaimedInit {
    pub fn open(plan: &Plan) -> Option<ClaimedInit> {
        let keep = plan.keep.as_ref()?;
        let held = Held::load(&Store::new(keep.state_root.clone()), &keep.name)?;
        let pidfd = pidfd_open(held.init_pid)?;
        held.init_alive().then_some(ClaimedInit { pidfd })
    }

    /// Kills the sandbox's init — the kernel then kills every process of
    /// its pid namespace — and waits until init has exited, which it does
    /// only after all of them. The holder removes the rest.
    pub fn end(self) {
        // SAFETY: a pidfd we own, a signal number, no siginfo.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        let mut pfd = libc::pollfd {
            fd: self.pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, 10_000) };
    }
}

/// Records what the refill builds for this key (rewritten only when it
/// changed: the settings follow the config of the latest run).
fn write_key_file(store: &Store, warm: SandboxSpec, settings: Settings) {
    let path = store.root().join(KEY_FILE);
    let file = KeyFile {
        spec: warm,
        settings,
    };
    let data = serde_json::to_vec(&file).expect("serializes");
    if std::fs::read(&path).is_ok_and(|before| before == data) {
        return;
    }
    let _ = create_private_dir_all(store.root())
        .map_err(|e| Error::state(store.root(), e))
        .and_then(|()| write_atomic(&path, &data));
}

/// From the holder of a warm sandbox a run has just claimed: starts
/// `pool refill-native` for its key (detached) so that the next run finds
/// one ready. The holder is small
/// and single-threaded, and the run does not wait for it.
pub(crate) fn start_refill_from_holder(key_root: &Path) {
    let (Some(state), Some(key)) = (
        key_root.parent().and_then(Path::parent),
        key_root.file_name().and_then(|k| k.to_str()),
    ) else {
        return;
    };
    // A refill at work (it holds the lock while it builds) counts the
    // sandboxes again before each build: it sees this claim.
    if let Ok(lock) = std::fs::File::open(key_root.join(REFILL_LOCK)) {
        if lock.try_lock().is_err() {
            return;
        }
    }
    // Reaped by init: the holder exits right after this.
    agentkernel_core::detached::spawn(state, &["pool", "refill-native", key]);
}

/// The unclaimed warm sandboxes of a key store, ready or being built, whose
/// holder (or builder) lives.
fn unclaimed(store: &Store) -> Vec<String> {
    std::fs::read_dir(store.root().join("sandboxes"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter(|e| !e.path().join(CLAIMED).exists())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|name| alive(store, name))
        .collect()
}

fn alive(store: &Store, name: &str) -> bool {
    if let Some(held) = Held::load(store, name) {
        return held.holder_alive();
    }
    std::fs::read_to_string(store.sandbox_dir(name).join("owner"))
        .is_ok_and(|owner| !Owner(owner.trim().to_string()).is_dead())
}

/// `agentkernel pool refill-native KEY`: builds warm sandboxes of `key`
/// until it has `[pool] size` unclaimed ones, one at a time. One refill
/// works per key; another that finds it at work leaves it to it.
pub async fn refill(state: &Store, key: &str) -> Result<()> {
    let store = key_store(state, key);
    let path = store.root().join(KEY_FILE);
    let file: KeyFile = std::fs::read(&path)
        .and_then(|data| serde_json::from_slice(&data).map_err(std::io::Error::other))
        .map_err(|e| Error::state(&path, e))?;
    let lock_path = store.root().join(REFILL_LOCK);
    let lock = std::fs::File::create(&lock_path).map_err(|e| Error::state(&lock_path, e))?;
    if lock.try_lock().is_err() {
        return Ok(());
    }
    collect(state);
    // Bounded: a key whose builds keep failing must not spin.
    for _ in 0..file.settings.size.min(64) {
        if unclaimed(&store).len() >= file.settings.size as usize {
            break;
        }
        make_room(state, file.settings.max_total);
        if file.settings.max_total == 0 {
            break;
        }
        build_one(&store, key, &file).await?;
    }
    Ok(())
}

/// Builds one warm sandbox of `key` under its holder (in a helper child:
/// this process has a runtime, the helper must be single-threaded).
async fn build_one(store: &Store, key: &str, file: &KeyFile) -> Result<()> {
    let image = crate::images::image_root(&file.spec, &Config::default()).await?;
    if key_of(&file.spec, &image) != key {
        // The image changed under its name: the next run makes a new key.
        return Ok(());
    }
    let mut spec = file.spec.clone();
    spec.keep = Some(Keep {
        name: names::generated(),
        ttl: file.settings.idle_ttl,
        reuse: false,
        setup: Vec::new(),
    });
    let (mut plan, claim) = crate::prepare::plan(&spec, &image, store)?;
    plan.argv.clear();
    if let Some(keep) = plan.keep.as_mut() {
        keep.warm = true;
    }
    crate::helper::create_in_child(&plan)?;
    claim.hand_over();
    Ok(())
}

/// Keeps the unclaimed warm sandboxes of all keys under `max_total` to make
/// room for one more: those that idled longest (earliest deadline) end first.
pub fn make_room(state: &Store, max_total: u32) {
    let mut warm: Vec<(Store, String, u64)> = keys(state)
        .into_iter()
        .flat_map(|key| {
            let store = key_store(state, &key);
            unclaimed(&store)
                .into_iter()
                .map(|name| {
                    // Still being built: no deadline yet, goes last.
                    let deadline = store.deadline(&name).unwrap_or(u64::MAX);
                    (store.clone(), name, deadline)
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let limit = (max_total as usize).saturating_sub(1);
    if warm.len() <= limit {
        return;
    }
    warm.sort_by_key(|(_, _, deadline)| *deadline);
    let excess = warm.len() - limit;
    for (store, name, _) in warm.into_iter().take(excess) {
        end_unclaimed(&store, &name);
    }
}

/// Claims the warm sandbox `name` (so no run takes it) and removes it.
fn end_unclaimed(store: &Store, name: &str) -> bool {
    if std::fs::create_dir(store.sandbox_dir(name).join(CLAIMED)).is_err() {
        return false;
    }
    kept::remove(store, name).is_ok()
}

/// `pool prune`: ends every unclaimed warm sandbox; returns how many. A
/// refill at work on a key is waited for first (it holds the key's lock
/// while it builds), so none is left that it finishes after the prune.
pub fn prune(state: &Store) -> usize {
    keys(state)
        .into_iter()
        .map(|key| {
            let store = key_store(state, &key);
            let lock = std::fs::File::open(store.root().join(REFILL_LOCK)).ok();
            if let Some(lock) = &lock {
                let _ = lock.lock();
            }
            unclaimed(&store)
                .iter()
                .filter(|name| end_unclaimed(&store, name))
                .count()
        })
        .sum()
}

/// Warm sandboxes whose holder (or builder) died: removed with what they
/// held. Returns how many.
pub fn collect(state: &Store) -> usize {
    keys(state)
        .into_iter()
        .map(|key| {
            let store = key_store(state, &key);
            let abandoned = store.abandoned_reservations();
            for name in &abandoned {
                kept::teardown(&store, name, None);
            }
            kept::collect(&store) + abandoned.len()
        })
        .sum()
}

fn keys(state: &Store) -> Vec<String> {
    std::fs::read_dir(root(state))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect()
}

pub fn status(state: &Store) -> Vec<KeyStatus> {
    let mut out: Vec<KeyStatus> = keys(state)
        .into_iter()
        .map(|key| {
            let store = key_store(state, &key);
            let about = About::load(store.root());
            let warm = unclaimed(&store).len();
            let in_use = store
                .list()
                .iter()
                .filter(|r| store.sandbox_dir(&r.name).join(CLAIMED).exists())
                .filter(|r| alive(&store, &r.name))
                .count();
            KeyStatus {
                key,
                about,
                warm,
                in_use,
            }
        })
        .collect();
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_leaves_out_what_each_run_chooses() {
        let image = ImageRoot {
            layers: vec![PathBuf::from("/layers/a")],
            ..ImageRoot::default()
        };
        let base: SandboxSpec = serde_json::from_value(serde_json::json!({
            "image": "busybox:1",
            "pull": "Missing",
            "policy": agentkernel_core::policy::Policy::for_profile(agentkernel_core::policy::Profile::Moderate),
            "workspace": null,
            "home": null,
            "volumes": [],
            "ports": [],
            "keep": null,
            "exec": {"argv": ["true"], "env": [], "workdir": null, "tty": false, "timeout": null}
        }))
        .unwrap();
        let mut other_command = base.clone();
        other_command.exec.argv = vec!["sh".into(), "-c".into(), "exit 3".into()];
        other_command.exec.env = vec![("A".into(), "1".into())];
        other_command.exec.tty = true;
        other_command.exec.timeout = Some(Duration::from_secs(5));
        assert_eq!(
            key_of(&warm_spec(&base), &image),
            key_of(&warm_spec(&other_command), &image)
        );
        let mut no_network = base.clone();
        no_network.policy.network = false;
        assert_ne!(
            key_of(&warm_spec(&base), &image),
            key_of(&warm_spec(&no_network), &image)
        );
        let other_image = ImageRoot {
            layers: vec![PathBuf::from("/layers/b")],
            ..ImageRoot::default()
        };
        assert_ne!(
            key_of(&warm_spec(&base), &image),
            key_of(&warm_spec(&base), &other_image)
        );
    }
}
