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
//! Layout: `<state>/vm-pool/<key>/<id>/` with `vm.json` (what to boot),
//! `idle-until`, `booting` (who boots it), `vm-held.json` and `ready` once it
//! serves, `vm.sock`, and `claimed`.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use agentkernel_core::state::{create_private_dir_all, now_unix, write_atomic, Owner};
use sha2::{Digest, Sha256};

use crate::kept::{self, Held, KeptVm, SPEC_FILE};
use crate::protocol::RunRequest;
use crate::session::{self, Ended};
use crate::{fail, Result};

pub(crate) const READY: &str = "ready";
pub(crate) const BOOTING: &str = "booting";
const CLAIMED: &str = "claimed";
const IDLE_UNTIL: &str = "idle-until";
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

/// Boots one more warm VM of `key` in the background when the key has
/// fewer than `size` unclaimed ones (ready or booting).
pub fn refill(root: &Path, key: &str, vm: &KeptVm, size: u32, idle: Duration) -> Result<()> {
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
        return Ok(());
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
            let until = now_unix() + idle.as_secs();
            write_atomic(&dir.join(IDLE_UNTIL), until.to_string().as_bytes())
                .map_err(|e| e.to_string())?;
            // Who boots it, until the holder says so itself.
            write_atomic(&dir.join(BOOTING), Owner::current().0.as_bytes())
                .map_err(|e| e.to_string())
        });
    if let Err(e) = prepared {
        let _ = std::fs::remove_dir_all(&dir);
        return fail(format!("cannot prepare a warm VM: {e}"));
    }
    if let Err(e) = kept::spawn_holder(&["--warm".as_ref(), dir.as_os_str()], Stdio::null()) {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e);
    }
    Ok(())
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
        Ok(claimed) => claimed
            .modified()
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > CLAIM_GRACE),
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
        // Gone only when empty.
        let _ = std::fs::remove_dir(key.path());
    }
    removed
}

/// The warm VMs of every key (ready or booting, unclaimed), for status.
pub fn warm(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for key in std::fs::read_dir(root).into_iter().flatten().flatten() {
        for entry in std::fs::read_dir(key.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if !entry.path().join(CLAIMED).exists() && alive(&entry.path()) {
                out.push(entry.path());
            }
        }
    }
    out
}
