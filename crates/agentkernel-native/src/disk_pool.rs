//! Loop devices attached ahead of time for the disk-capped workspace
//! (`disk.rs`): configuring a loop device (`LOOP_CONFIGURE`) waits
//! milliseconds on the block layer, the longest wait of a run's set-up. A
//! one-shot run's cleanup process, after the caller has its exit code,
//! prepares the next runs' devices instead.
//!
//! `<state>/disk-pool/` (0700, root's state only: rootless runs have no
//! disk cap) holds at most [`TARGET`] entries, all of one size (the last
//! one a run used): `ext4-<bytes>.loop<N>.<serial>`, a fresh sparse copy of
//! the size's template, attached to `/dev/loop<N>` without `AUTOCLEAR`
//! and never mounted. Each entry serves exactly one run: the run claims it
//! by renaming the file into its scratch directory (the rename is the
//! atomic claim), the supervisor checks that the device is still bound to
//! that very file (device and inode), mounts it, and turns `AUTOCLEAR` on
//! (`LOOP_CLR_FD` while the mount holds it), so from there the device goes
//! exactly as a freshly attached one does. Nothing a sandbox touched is
//! ever used again, and nothing in the pool is reachable from a sandbox.
//!
//! Every pool device carries [`MARKER`] as its `lo_file_name`. What can
//! outlive its owner — an entry whose state directory was deleted, a claim
//! killed before `AUTOCLEAR` was on, a refill killed half-way — ends up as
//! a marked device whose backing file is gone (gc unlinks orphaned scratch
//! and dead refills' temporaries first): [`sweep`], run by every gc,
//! detaches exactly those. `agentkernel pool prune` empties the pool.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use agentkernel_core::state::Owner;

use crate::disk::{self, LoopInfo64};

/// The pool's directory under the state root.
pub const POOL_DIR: &str = "disk-pool";
/// How many devices a state directory keeps ready: a run takes one and its
/// cleanup process adds one, so back-to-back runs always find one; a burst
/// beyond this attaches its own, as without a pool.
pub const TARGET: usize = 2;
/// `lo_file_name` of every loop device the pool attaches.
pub const MARKER: &[u8] = b"agentkernel-pool";
const TEMPORARY_PREFIX: &str = ".new-";
const LOCK_NAME: &str = ".lock";

fn pool_dir(state_root: &Path) -> PathBuf {
    state_root.join(POOL_DIR)
}

fn entry_prefix(bytes: u64) -> String {
    format!("ext4-{bytes}.loop")
}

/// The loop device number an entry's name records.
fn entry_device(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("ext4-")?;
    let (_, rest) = rest.split_once(".loop")?;
    rest.split('.').next()?.parse().ok()
}

/// Takes a ready device of `bytes` for a run: its image becomes `image`
/// (the run's `<scratch>/workspace.ext4`), and its device path is returned.
/// None when the pool has none of this size (the run attaches its own).
pub fn claim(state_root: &Path, image: &Path, bytes: u64) -> Option<String> {
    let dir = pool_dir(state_root);
    let prefix = entry_prefix(bytes);
    for entry in std::fs::read_dir(&dir).ok()?.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str().filter(|n| n.starts_with(&prefix)) else {
            continue;
        };
        let Some(n) = entry_device(name) else {
            continue;
        };
        // The atomic claim: of concurrent runs, one rename succeeds.
        if std::fs::rename(entry.path(), image).is_ok() {
            return Some(format!("/dev/loop{n}"));
        }
    }
    None
}

/// The claimed device `device`, opened, if it is still the pool's device
/// bound to `image` (not auto-clearing yet, marked, same device and inode):
/// after a reboot, say, a stale entry's number may name another device.
pub fn open_claimed(device: &str, image: &Path) -> io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(device)?;
    let meta = std::fs::metadata(image)?;
    let info = disk::loop_status(&file)?;
    let ours = info.device == meta.dev()
        && info.inode == meta.ino()
        && info.flags & disk::LO_FLAGS_AUTOCLEAR == 0
        && marked(&info);
    if !ours {
        return Err(io::Error::other(format!(
            "{device} is not the pool's device of {}",
            image.display()
        )));
    }
    Ok(file)
}

fn marked(info: &LoopInfo64) -> bool {
    info.file_name[..MARKER.len()] == *MARKER && info.file_name[MARKER.len()] == 0
}

/// Lets a device go when its last user does (`LOOP_CLR_FD`: detached now
/// if `device` is its only opener, else auto-clearing).
pub fn release(device: &File) -> io::Result<()> {
    disk::clear(device)
}

/// Tops the pool of `state_root` up to [`TARGET`] devices of `bytes` from
/// `template` (the size's formatted image), dropping entries of other sizes
/// and what a killed refill left. Another refill at work: nothing to do.
pub fn refill(state_root: &Path, template: &Path, bytes: u64) -> io::Result<usize> {
    let dir = pool_dir(state_root);
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let Some(_lock) = try_lock(&dir)? else {
        return Ok(0);
    };
    let prefix = entry_prefix(bytes);
    let mut ready = 0;
    let mut dropped = false;
    for entry in std::fs::read_dir(&dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == LOCK_NAME || name == crate::disk_keeper::DIR_NAME {
            continue;
        }
        if name.starts_with(&prefix) && ready < TARGET {
            ready += 1;
            continue;
        }
        // Another size, one too many, or a temporary: under the lock no
        // other refill is making one, so its maker is dead.
        let _ = std::fs::remove_file(entry.path());
        dropped = true;
    }
    if dropped {
        sweep();
    }
    let mut made = 0;
    while ready < TARGET {
        make_entry(&dir, template, bytes)?;
        ready += 1;
        made += 1;
    }
    Ok(made)
}

fn make_entry(dir: &Path, template: &Path, bytes: u64) -> io::Result<()> {
    static SERIAL: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let serial = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let owner = Owner::current().0.replace(':', ".");
    let tmp = dir.join(format!("{TEMPORARY_PREFIX}{owner}.{serial}"));
    let made = (|| {
        disk::sparse_copy(template, &tmp, bytes)?;
        let (dev, n, device) = disk::attach_loop_with(&tmp, 0, MARKER)?;
        let unique = format!("{}{n}.{owner}.{serial}", entry_prefix(bytes));
        if let Err(e) = std::fs::rename(&tmp, dir.join(unique)) {
            // Detach now: ours is the only opener.
            let _ = release(&device);
            return Err(io::Error::new(e.kind(), format!("{dev}: {e}")));
        }
        Ok(())
    })();
    if made.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    made
}

/// How many devices the pool of `state_root` has attached ahead.
pub fn ready(state_root: &Path) -> usize {
    std::fs::read_dir(pool_dir(state_root)).map_or(0, |entries| {
        entries
            .flatten()
            .filter(|e| entry_device(&e.file_name().to_string_lossy()).is_some())
            .count()
    })
}

/// Empties the pool of `state_root` (`agentkernel pool prune`): how many
/// devices it let go.
pub fn drain(state_root: &Path) -> usize {
    let dir = pool_dir(state_root);
    if !dir.exists() {
        return 0;
    }
    // Waits for a refill at work, so none is added behind our back.
    let _lock = lock(&dir);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let ours = name != LOCK_NAME && name != crate::disk_keeper::DIR_NAME;
        if ours && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    sweep();
    removed
}

/// Detaches every pool device whose backing file is gone: an entry of a
/// deleted state directory, a claim or refill that was killed (see the
/// module's docs). A device whose file exists is never touched here: the
/// pool's own entries, and runs that are still using theirs.
pub fn sweep() -> usize {
    // Only root attaches loop devices.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return 0;
    }
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return 0;
    };
    let mut released = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let backing = entry.path().join("loop/backing_file");
        let gone = |path: &Path| {
            std::fs::read_to_string(path).is_ok_and(|f| f.trim_end().ends_with(" (deleted)"))
        };
        if !gone(&backing) {
            continue;
        }
        let Ok(device) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(format!("/dev/{name}"))
        else {
            continue;
        };
        // Our fd keeps the binding we look at from changing: look again.
        let ours = gone(&backing) && disk::loop_status(&device).is_ok_and(|i| marked(&i));
        if ours && release(&device).is_ok() {
            released += 1;
        }
    }
    released
}

/// Removes a dead refill's temporaries (gc; a refill does it too).
pub fn collect(state_root: &Path) -> usize {
    let dir = pool_dir(state_root);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(TEMPORARY_PREFIX) else {
            continue;
        };
        let parts: Vec<&str> = rest.split('.').collect();
        let dead = match parts.as_slice() {
            [boot, pid, start, _serial] => Owner(format!("{boot}:{pid}:{start}")).is_dead(),
            _ => false,
        };
        if dead && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

fn try_lock(dir: &Path) -> io::Result<Option<File>> {
    try_lock_file(&dir.join(LOCK_NAME))
}

/// An exclusive flock on the file `path` (made 0600 if missing), or `None`
/// while another process holds it. Released when the file is dropped.
pub(crate) fn try_lock_file(path: &Path) -> io::Result<Option<File>> {
    let file = open_lock(path)?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(file))
}

fn lock(dir: &Path) -> Option<File> {
    let file = open_lock(&dir.join(LOCK_NAME)).ok()?;
    // SAFETY: flock on an fd we own.
    (unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0).then_some(file)
}

fn open_lock(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_carry_their_device() {
        assert_eq!(entry_device("ext4-10737418240.loop7.b.1.2.0"), Some(7));
        assert_eq!(entry_device("ext4-1.loop12.x"), Some(12));
        assert_eq!(entry_device(".new-b.1.2.0"), None);
        assert_eq!(entry_device("ext4-1.loopx.0"), None);
        assert!("ext4-33554432.loop3.x".starts_with(&entry_prefix(33554432)));
        assert!(!"ext4-335544320.loop3.x".starts_with(&entry_prefix(33554432)));
    }
}
