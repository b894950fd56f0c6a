//! The store of kept sandboxes: one directory per name under
//! `<state>/sandboxes/`. Creating the directory is the atomic name
//! reservation (two racing processes cannot both `mkdir` it); `record.json`
//! describes the sandbox once it exists; `ctl/deadline` holds its expiry time
//! and is mounted read-only into the sandbox, whose keep-alive process ends
//! itself when the deadline passes.
//!
//! Short-lived runs keep scratch space (the copy-on-write workspace layers)
//! under `<state>/runs/<id>/` with an `owner` file, so a later command can
//! prove the owning process is gone and remove what it left.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SandboxRecord {
    pub name: String,
    pub backend: String,
    pub container_id: String,
    pub image: String,
    pub profile: String,
    pub created_unix: u64,
    pub ttl_secs: u64,
    /// The host directory mounted at /workspace, if any.
    pub workspace: Option<PathBuf>,
    /// The memory limit, for naming it when the OOM killer strikes.
    #[serde(default)]
    pub memory_bytes: Option<u64>,
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Identifies a process across pid reuse and reboots: `<boot id>:<pid>:<start time>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner(pub String);

impl Owner {
    pub fn current() -> Owner {
        let pid = std::process::id();
        Owner(format!(
            "{}:{pid}:{}",
            boot_id(),
            start_time(pid).unwrap_or(0)
        ))
    }

    /// True when the process this names is certainly gone (different boot, no
    /// such pid, or a different process behind the same pid).
    pub fn is_dead(&self) -> bool {
        let mut parts = self.0.splitn(3, ':');
        let (Some(boot), Some(pid), Some(start)) = (parts.next(), parts.next(), parts.next())
        else {
            return false; // not ours to judge
        };
        if boot != boot_id() {
            return true;
        }
        let Ok(pid) = pid.parse::<u32>() else {
            return false;
        };
        match start_time(pid) {
            None => true,
            // A zombie is dead too: its parent (often a non-reaping init,
            // for detached processes) just has not collected it.
            Some(t) => t.to_string() != start || is_zombie(pid),
        }
    }
}

/// This boot's id (read once per process: it cannot change while we run).
fn boot_id() -> String {
    static BOOT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BOOT.get_or_init(|| {
        fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
    .clone()
}

/// Field `n` (1-based, as in proc(5)) of /proc/PID/stat, for n >= 3.
pub fn proc_stat_field(pid: u32, n: usize) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: skip past the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(n.checked_sub(3)?)?.parse().ok()
}

/// True when the process has exited and awaits its parent's wait().
pub fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let rest = &stat[stat.rfind(')')? + 2..];
            rest.chars().next()
        })
        .is_some_and(|state| state == 'Z' || state == 'X')
}

/// Field 22 of /proc/PID/stat: start time in clock ticks since boot.
fn start_time(pid: u32) -> Option<u64> {
    proc_stat_field(pid, 22)
}

#[derive(Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    pub fn new(root: PathBuf) -> Store {
        Store { root }
    }

    pub fn open_default() -> Store {
        Store::new(crate::paths::state_dir())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn sandbox_dir(&self, name: &str) -> PathBuf {
        self.root.join("sandboxes").join(name)
    }

    pub fn control_dir(&self, name: &str) -> PathBuf {
        self.sandbox_dir(name).join("ctl")
    }

    /// Reserves `name`; fails with [`Error::NameClash`] if it is taken.
    pub fn reserve(&self, name: &str) -> Result<PathBuf> {
        let parent = self.root.join("sandboxes");
        fs::create_dir_all(&parent).map_err(|e| Error::state(&parent, e))?;
        let dir = parent.join(name);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(Error::NameClash(name.to_string()))
            }
            Err(e) => return Err(Error::state(&dir, e)),
        }
        write_atomic(&dir.join("owner"), Owner::current().0.as_bytes())?;
        let ctl = dir.join("ctl");
        fs::create_dir(&ctl).map_err(|e| Error::state(&ctl, e))?;
        Ok(dir)
    }

    /// Records a created sandbox and clears the reservation's owner.
    pub fn commit(&self, record: &SandboxRecord) -> Result<()> {
        let dir = self.sandbox_dir(&record.name);
        let json = serde_json::to_vec_pretty(record).expect("record serializes");
        write_atomic(&dir.join("record.json"), &json)?;
        let _ = fs::remove_file(dir.join("owner"));
        Ok(())
    }

    pub fn load(&self, name: &str) -> Result<Option<SandboxRecord>> {
        let path = self.sandbox_dir(name).join("record.json");
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::state(&path, std::io::Error::other(e))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::state(&path, e)),
        }
    }

    pub fn list(&self) -> Vec<SandboxRecord> {
        let mut out = Vec::new();
        let Ok(entries) = fs::read_dir(self.root.join("sandboxes")) else {
            return out;
        };
        for entry in entries.flatten() {
            if let Some(name) = entry.file_name().to_str() {
                if let Ok(Some(rec)) = self.load(name) {
                    out.push(rec);
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Reservations whose creating process died before committing.
    pub fn abandoned_reservations(&self) -> Vec<String> {
        let mut out = Vec::new();
        let Ok(entries) = fs::read_dir(self.root.join("sandboxes")) else {
            return out;
        };
        for entry in entries.flatten() {
            let dir = entry.path();
            if dir.join("record.json").exists() {
                continue;
            }
            let owner = fs::read_to_string(dir.join("owner")).unwrap_or_default();
            // An owner file is written right after mkdir; none at all means the
            // creator died in between, which is also abandoned.
            if owner.is_empty() || Owner(owner.trim().to_string()).is_dead() {
                if let Some(name) = entry.file_name().to_str() {
                    out.push(name.to_string());
                }
            }
        }
        out
    }

    /// Sets the expiry to now + ttl (called on every use).
    pub fn touch(&self, name: &str, ttl: Duration) -> Result<u64> {
        let deadline = now_unix() + ttl.as_secs();
        write_atomic(
            &self.control_dir(name).join("deadline"),
            deadline.to_string().as_bytes(),
        )?;
        Ok(deadline)
    }

    pub fn deadline(&self, name: &str) -> Option<u64> {
        fs::read_to_string(self.control_dir(name).join("deadline"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub fn forget(&self, name: &str) -> Result<()> {
        remove_tree(&self.sandbox_dir(name))
    }

    /// Scratch directory of a short-lived run, tagged with the current process as owner.
    pub fn run_scratch(&self, id: &str) -> Result<PathBuf> {
        let dir = self.root.join("runs").join(id);
        fs::create_dir_all(&dir).map_err(|e| Error::state(&dir, e))?;
        write_atomic(&dir.join("owner"), Owner::current().0.as_bytes())?;
        Ok(dir)
    }

    /// Scratch directories whose owner process is gone: in `runs/`, and
    /// those of finished runs whose cleanup process was killed (`finished/`).
    pub fn orphaned_scratch(&self) -> Vec<PathBuf> {
        ["runs", FINISHED]
            .iter()
            .filter_map(|dir| fs::read_dir(self.root.join(dir)).ok())
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|dir| {
                let owner = fs::read_to_string(dir.join("owner")).unwrap_or_default();
                if owner.is_empty() {
                    // A run creates its directory, then writes the owner: only a
                    // directory that stayed ownerless for a while is abandoned.
                    return fs::metadata(dir)
                        .and_then(|m| m.modified())
                        .is_ok_and(|t| t.elapsed().is_ok_and(|age| age.as_secs() > 60));
                }
                Owner(owner.trim().to_string()).is_dead()
            })
            .collect()
    }
}

/// Where a finished run's scratch directory waits for its removal (native:
/// the supervisor moves it out of `runs/` before it returns the exit code).
pub const FINISHED: &str = "finished";

pub fn remove_tree(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            // overlayfs leaves its `work/work` directory mode 000: root walks
            // through it, an ordinary user (rootless) must open it up first.
            open_up_directories(path);
            fs::remove_dir_all(path).map_err(|e| Error::state(path, e))
        }
        Err(e) => Err(Error::state(path, e)),
    }
}

/// Makes every directory under `path` (ours) searchable and writable by us.
fn open_up_directories(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = fs::symlink_metadata(path) else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o700));
    if let Ok(entries) = fs::read_dir(path) {
        for entry in entries.flatten() {
            open_up_directories(&entry.path());
        }
    }
}

/// Writes via a temporary file and rename, so readers (including the
/// sandbox's keep-alive loop) never see a partial value.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = fs::File::create(&tmp).map_err(|e| Error::state(&tmp, e))?;
    f.write_all(data).map_err(|e| Error::state(&tmp, e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| Error::state(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> SandboxRecord {
        SandboxRecord {
            name: name.into(),
            backend: "docker".into(),
            container_id: "abc".into(),
            image: "alpine:3.20".into(),
            profile: "moderate".into(),
            created_unix: 1,
            ttl_secs: 60,
            workspace: None,
            memory_bytes: None,
        }
    }

    #[test]
    fn reserve_is_exclusive_and_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().to_path_buf());
        store.reserve("a").unwrap();
        assert!(matches!(store.reserve("a"), Err(Error::NameClash(_))));
        // Reserved but not committed, by a live owner: not abandoned, not listed.
        assert!(store.abandoned_reservations().is_empty());
        assert!(store.list().is_empty());
        store.commit(&record("a")).unwrap();
        assert_eq!(store.load("a").unwrap().unwrap(), record("a"));
        let d = store.touch("a", Duration::from_secs(60)).unwrap();
        assert_eq!(store.deadline("a"), Some(d));
        store.forget("a").unwrap();
        assert!(store.load("a").unwrap().is_none());
    }

    #[test]
    fn racing_reservations_have_one_winner() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let wins: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..16)
                .map(|_| s.spawn(|| Store::new(root.clone()).reserve("same").is_ok()))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap() as usize)
                .sum()
        });
        assert_eq!(wins, 1);
    }

    #[test]
    fn owners() {
        assert!(!Owner::current().is_dead());
        assert!(Owner("other-boot:1:1".into()).is_dead());
        let boot = boot_id();
        // pid_max is at most 2^22, so this pid cannot exist.
        assert!(Owner(format!("{boot}:99999999:1")).is_dead());
        // pid 1 exists but was not started at tick 0 by us... it was, maybe; use a wrong time.
        assert!(Owner(format!("{boot}:{}:1", std::process::id())).is_dead());
    }
}
