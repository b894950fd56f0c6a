//! The warm VM pool behind `--fast` on `-B qemu`: VMs booted ahead of time,
//! so a one-shot run pays for one command instead of a boot.
//!
//! Rules (as for the container pool: only latency changes):
//! - A warm VM is booted exactly as a run's VM would be and its sandbox
//!   (root, workspace, cgroup, confinement) built by the agent; everything
//!   else (argv, environment, working directory, user, timeout, stdin,
//!   signals) is the run's, sent with its command.
//! - The key is everything fixed at boot: the VM (kernel, initramfs, image
//!   disk, memory, vCPUs, workspace) and the sandbox's request without the
//!   per-run parts. A key with no ready VM takes the normal (cold) path.
//! - A VM serves exactly one command and then ends (its holder kills it
//!   and removes its directory); it is never returned to the pool.
//! - No daemon: each warm VM has a holder (`__vm-holder --warm DIR`, see
//!   `kept`). A run claims one by `mkdir DIR/claimed` — atomic, so two runs
//!   never get the same VM. Unclaimed VMs end after the idle TTL; a VM whose
//!   directory goes (its state directory removed) ends within a second.
//!
//! - `pool status` shows each key's warm and in-use VMs and how often a run
//!   found one ready; `pool prune` ends the unclaimed ones. `[pool]
//!   max_total` caps warm VMs across keys (as it caps warm containers per
//!   engine): a refill over the cap ends the VM that idled longest first.
//!
//! Layout: `<state>/vm-pool/<key>/<id>/` with `vm.json` (what to boot),
//! `idle-until`, `booting` (who boots it), `vm-held.json` and `ready` once it
//! serves, `vm.sock`, and `claimed/` (with `by`, the claiming run's owner label); `<key>/about.json` says what the key is
//! and counts its runs (for status).

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use agentkernel_core::state::{
    create_private_dir_all, modified_ago, now_unix, write_atomic, Owner,
};

use sha2::{Digest, Sha256};

use crate::kept::{self, Held, KeptVm, SPEC_FILE};
use crate::protocol::RunRequest;
use crate::session::{self, Ended};
use crate::{fail, Result};

pub(crate) const READY: &str = "ready";
pub(crate) const BOOTING: &str = "booting";
const CLAIMED: &str = "claimed";
/// In `claimed/`: the owner label of the run that claimed the VM.
const CLAIMED_BY: &str = "by";
const IDLE_UNTIL: &str = "idle-until";
/// The key's `idle_ttl` in seconds: the holder, which has no config, sets
/// the idle deadline from it once the VM is ready.
const IDLE_TTL: &str = "idle-ttl";
/// How long a key's record outlives its last VM.
const KEY_RECORD_TTL: Duration = Duration::from_secs(24 * 3600);
/// A claimed VM whose claimer never sent its command (it died) ends after this.
const CLAIM_GRACE: Duration = Duration::from_secs(60);

/// The pool key of `vm`: a hash of everything fixed when it boots.
pub fn key(vm: &KeptVm) -> String {
    let fixed = RunRequest {
        argv: Vec::new(),
        env: Vec::new(),
        workdir: String::new(),
        user: None,
        timeout_ms: None,
        network: None,
        tty: None,
        ..vm.sandbox.clone()
    };
    let text = serde_json::to_vec(&(&vm.qemu, &vm.vm, &fixed)).unwrap_or_default();
    let digest = Sha256::digest(&text);
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// A warm VM of `key` that serves, claimed for this run (connected).
pub fn claim(root: &Path, key: &str) -> Option<UnixStream> {
    let entries = std::fs::read_dir(root.join(key)).ok()?;
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.join(READY).exists() || !Held::load_from(&dir).is_some_and(|h| h.alive()) {
            continue;
        }
        // The claim: only one mkdir succeeds.
        if std::fs::create_dir(dir.join(CLAIMED)).is_err() {
            continue;
        }
        // Who claimed it: the run's owner label (the label its one-shot
        // VMs and containers carry), so what a run used can be traced to it.
        let _ = write_atomic(
            &dir.join(CLAIMED).join(CLAIMED_BY),
            Owner::current().0.as_bytes(),
        );
        if let Ok(stream) = kept::connect_at(&dir) {
            return Some(stream);
        }
    }
    None
}

/// Runs `command` on the claimed VM behind `stream`: our stdin and signals
/// to it, its output to our stdout/stderr.
pub fn run_claimed(stream: UnixStream, command: RunRequest) -> Result<Ended> {
    let signals = session::catch_signals();
    kept::exec_on(stream, command, signals)
}

/// The first half of a refill, which boots one more warm VM of `key` in
/// the background when the key has fewer than `size` unclaimed ones (ready
/// or booting): the new VM's directory (its spec, idle deadline and our
/// process as the one booting it), which counts as booting from now on;
/// None when the key has enough. A run prepares it while its command runs
/// and starts it ([`start_refill`]) after.
pub fn prepare_refill(
    root: &Path,
    key: &str,
    vm: &KeptVm,
    size: u32,
    idle: Duration,
) -> Result<Option<PathBuf>> {
    let key_dir = root.join(key);
    let unclaimed = std::fs::read_dir(&key_dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| !e.path().join(CLAIMED).exists() && alive(&e.path()))
                .count()
        })
        .unwrap_or(0);
    if unclaimed >= size as usize {
        return Ok(None);
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = key_dir.join(format!("{:x}-{nanos:x}", std::process::id()));
    let prepared = create_private_dir_all(&dir)
        .map_err(|e| e.to_string())
        .and_then(|()| {
            let spec = serde_json::to_vec(vm).map_err(|e| e.to_string())?;
            write_atomic(&dir.join(SPEC_FILE), &spec).map_err(|e| e.to_string())?;
            // Idle time counts from readiness (`mark_ready`): a boot under
            // TCG on a loaded host can outlast a short TTL.
            let until = agentkernel_core::state::while_starting(now_unix() + idle.as_secs());
            write_atomic(&dir.join(IDLE_UNTIL), until.to_string().as_bytes())
                .and_then(|()| {
                    write_atomic(&dir.join(IDLE_TTL), idle.as_secs().to_string().as_bytes())
                })
                .map_err(|e| e.to_string())?;
            // Who boots it, until the holder says so itself.
            write_atomic(&dir.join(BOOTING), Owner::current().0.as_bytes())
                .map_err(|e| e.to_string())
        });
    if let Err(e) = prepared {
        let _ = std::fs::remove_dir_all(&dir);
        return fail(format!("cannot prepare a warm VM: {e}"));
    }
    Ok(Some(dir))
}

/// The second half of a refill: starts the holder that boots the warm VM
/// of `dir` (from [`prepare_refill`]).
pub fn start_refill(dir: &Path) -> Result<()> {
    if let Err(e) = kept::spawn_holder(
        &["--warm".as_ref(), dir.as_os_str()],
        Stdio::null(),
        Stdio::null(),
        &[],
    ) {
        let _ = std::fs::remove_dir_all(dir);
        return Err(e);
    }
    Ok(())
}

/// Marks the booted VM in `dir` claimable: its idle time starts now.
pub(crate) fn mark_ready(dir: &Path) -> agentkernel_core::Result<()> {
    let ttl: u64 = std::fs::read_to_string(dir.join(IDLE_TTL))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0);
    write_atomic(
        &dir.join(IDLE_UNTIL),
        (now_unix() + ttl).to_string().as_bytes(),
    )?;
    // Ready last: a run claims only a VM that serves.
    write_atomic(&dir.join(READY), b"")
}

/// True while a holder holds the VM in `dir`, or a live process boots it.
fn alive(dir: &Path) -> bool {
    if let Some(held) = Held::load_from(dir) {
        return held.alive();
    }
    std::fs::read_to_string(dir.join(BOOTING))
        .map(|owner| !Owner(owner.trim().to_string()).is_dead())
        .unwrap_or(false)
}

/// For a warm VM's holder with no command running: its directory went, it
/// idled past its TTL unclaimed, or its claimer never sent the command.
pub(crate) fn is_over(dir: &Path) -> bool {
    if !dir.exists() {
        return true;
    }
    match std::fs::metadata(dir.join(CLAIMED)) {
        Ok(claimed) => modified_ago(&claimed).is_some_and(|age| age > CLAIM_GRACE),
        Err(_) => {
            let until: u64 = std::fs::read_to_string(dir.join(IDLE_UNTIL))
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(0);
            now_unix() >= until
        }
    }
}

/// Warm VMs whose holder (or booter) died: their directories removed.
/// Returns how many.
pub fn collect(root: &Path) -> usize {
    let mut removed = 0;
    let Ok(keys) = std::fs::read_dir(root) else {
        return 0;
    };
    for key in keys.flatten() {
        let Ok(entries) = std::fs::read_dir(key.path()) else {
            continue;
        };
        for entry in entries.flatten() {
            if !alive(&entry.path()) && std::fs::remove_dir_all(entry.path()).is_ok() {
                removed += 1;
            }
        }
        // A key with no VM left goes when its record is a day old (no run
        // of it since): status keeps its counts until then.
        let record_age = About::age(&key.path());
        if vm_dirs(&key.path()).is_empty() && record_age.is_none_or(|age| age > KEY_RECORD_TTL) {
            About::forget(&key.path());
            let _ = std::fs::remove_dir(key.path());
        }
    }
    removed
}

/// The warm VMs of every key (ready or booting, unclaimed), for status.
pub fn warm(root: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|key| vm_dirs(&key.path()))
        .filter(|vm| !vm.join(CLAIMED).exists() && alive(vm))
        .collect()
}

pub use agentkernel_core::pool_keys::{About, KeyStatus};

/// Counts a run of `key` (`hit`: it claimed a warm VM) and records what
/// the key is.
pub fn record_run(root: &Path, key: &str, about: About, hit: bool) {
    agentkernel_core::pool_keys::record_run(&root.join(key), about, hit);
}

/// Every key that has VMs or a record of runs.
pub fn status(root: &Path) -> Vec<KeyStatus> {
    let mut out = Vec::new();
    for key in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let about = About::load(&key.path());
        let mut status = KeyStatus {
            key: key.file_name().to_string_lossy().into_owned(),
            about,
            warm: 0,
            in_use: 0,
        };
        for vm in vm_dirs(&key.path()) {
            match (vm.join(CLAIMED).exists(), alive(&vm)) {
                (false, true) => status.warm += 1,
                (true, true) => status.in_use += 1,
                _ => {}
            }
        }
        out.push(status);
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

/// Ends every unclaimed warm VM (ready or booting): each is claimed first,
/// so no run can take it meanwhile, then its directory is removed and its
/// holder ends the VM within a second. Returns how many.
pub fn prune(root: &Path) -> usize {
    warm(root)
        .into_iter()
        .filter(|vm| end_unclaimed(vm))
        .count()
}

/// Keeps the unclaimed warm VMs of all keys under `max_total` to make room
/// for one more: those that idled longest end first.
pub fn make_room(root: &Path, max_total: u32) {
    let mut warm = warm(root);
    let limit = (max_total as usize).saturating_sub(1);
    if warm.len() <= limit {
        return;
    }
    // The idle deadline is set when a VM becomes ready: the earliest idled
    // longest (one still booting has a later one and goes last).
    warm.sort_by_key(|vm| {
        std::fs::read_to_string(vm.join(IDLE_UNTIL))
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .unwrap_or(0)
    });
    let excess = warm.len() - limit;
    for vm in warm.into_iter().take(excess) {
        end_unclaimed(&vm);
    }
}

/// Claims the warm VM in `dir` and removes its directory (its holder then
/// ends it); false when a run claimed it first.
fn end_unclaimed(dir: &Path) -> bool {
    if std::fs::create_dir(dir.join(CLAIMED)).is_err() {
        return false;
    }
    std::fs::remove_dir_all(dir).is_ok()
}

/// The VM directories of a key (its `about.json` is not one).
fn vm_dirs(key_dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(key_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A warm VM directory as a refill leaves it while this process boots it.
    fn booting_vm(root: &Path, key: &str, id: &str, idle_until: u64) -> PathBuf {
        let dir = root.join(key).join(id);
        create_private_dir_all(&dir).unwrap();
        write_atomic(&dir.join(BOOTING), Owner::current().0.as_bytes()).unwrap();
        write_atomic(&dir.join(IDLE_UNTIL), idle_until.to_string().as_bytes()).unwrap();
        dir
    }

    /// A VM whose boot outlasted its TTL is not over once ready: its idle
    /// time starts then.
    #[test]
    fn idle_time_counts_from_readiness() {
        let root = tempfile::tempdir().unwrap();
        // Booted for longer than its 30 s TTL: the refill's deadline has passed.
        let dir = booting_vm(root.path(), "k", "vm", now_unix() - 1);
        write_atomic(&dir.join(IDLE_TTL), b"30").unwrap();
        assert!(is_over(&dir));
        mark_ready(&dir).unwrap();
        assert!(dir.join(READY).exists());
        assert!(!is_over(&dir));
        let until: u64 = std::fs::read_to_string(dir.join(IDLE_UNTIL))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(
            (now_unix() + 29..=now_unix() + 30).contains(&until),
            "{until}"
        );
    }

    fn warm_vm(sandbox: RunRequest) -> KeptVm {
        KeptVm {
            qemu: PathBuf::from("/usr/bin/qemu-system-x86_64"),
            vm: crate::vmm::VmConfig {
                kernel: PathBuf::from("/boot/vmlinuz"),
                initramfs: PathBuf::from("/initramfs"),
                disk: PathBuf::from("/disk"),
                memory_mib: 256,
                vcpus: 1,
                workspace: None,
                volumes: Vec::new(),
                accel: crate::vmm::Accel::Tcg,
                machine: crate::vmm::Machine::Pc,
                network: None,
                tsc_khz: None,
            },
            sandbox,
            record: None,
        }
    }

    #[test]
    fn the_key_leaves_out_what_each_run_chooses_and_keeps_what_boots() {
        let base = RunRequest {
            argv: vec!["true".into()],
            env: vec!["A=1".into()],
            workdir: "/".into(),
            user: None,
            timeout_ms: None,
            root: crate::protocol::RootMode::Overlay,
            tmp_bytes: 0,
            workspace: None,
            volumes: Vec::new(),
            no_new_privileges: true,
            pids_max: None,
            memory_max: None,
            cpu_max: None,
            files: Vec::new(),
            secret_files: Vec::new(),
            capabilities: Vec::new(),
            seccomp_restrictive: false,
            network: None,
            tty: None,
            egress_port: None,
            egress_ca: None,
        };
        let per_run = RunRequest {
            argv: vec!["sh".into()],
            env: vec!["TERM=xterm".into()],
            workdir: "/tmp".into(),
            timeout_ms: Some(1000),
            tty: Some(crate::protocol::WindowSize { rows: 24, cols: 80 }),
            ..base.clone()
        };
        assert_eq!(key(&warm_vm(base.clone())), key(&warm_vm(per_run)));
        let confined = RunRequest {
            seccomp_restrictive: true,
            ..base.clone()
        };
        assert_ne!(key(&warm_vm(base)), key(&warm_vm(confined)));
    }

    #[test]
    fn make_room_ends_the_longest_idle_vms_across_keys() {
        let root = tempfile::tempdir().unwrap();
        let oldest = booting_vm(root.path(), "a", "1", 100);
        let newer = booting_vm(root.path(), "b", "1", 300);
        let middle = booting_vm(root.path(), "a", "2", 200);
        make_room(root.path(), 2);
        // Room for one more under a cap of 2: only the newest stays.
        assert!(!oldest.exists() && !middle.exists());
        assert!(newer.exists());
        assert_eq!(warm(root.path()), vec![newer.clone()]);
        // A cap of 0 leaves none (and the run then boots no more).
        make_room(root.path(), 0);
        assert!(!newer.exists());
    }

    #[test]
    fn prune_ends_unclaimed_vms_only_and_status_counts_both() {
        let root = tempfile::tempdir().unwrap();
        let unclaimed = booting_vm(root.path(), "k", "1", u64::MAX);
        let claimed = booting_vm(root.path(), "k", "2", u64::MAX);
        std::fs::create_dir(claimed.join(CLAIMED)).unwrap();
        record_run(root.path(), "k", About::default(), true);
        record_run(root.path(), "k", About::default(), false);
        let before = status(root.path());
        assert_eq!(before.len(), 1);
        assert_eq!((before[0].warm, before[0].in_use), (1, 1));
        assert_eq!((before[0].about.hits, before[0].about.misses), (1, 1));
        assert_eq!(prune(root.path()), 1);
        assert!(!unclaimed.exists());
        assert!(claimed.exists(), "a run's VM must not be pruned");
        // The key keeps its record while a VM runs, and after (for a day).
        assert_eq!(collect(root.path()), 0);
        assert!(About::age(&root.path().join("k")).is_some());
    }
}
