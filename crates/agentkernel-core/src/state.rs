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
//!
//! The state is private to the user who owns it: the root and every
//! directory agentkernel makes in it are created 0700 and its files 0600
//! (explicit modes at creation, never a chmod afterwards), because
//! `plan.json` holds a sandbox's whole environment (`-e API_TOKEN=…`) and
//! scratch directories hold what sandboxes wrote. The exceptions are what a
//! sandbox's own (possibly non-root) processes read through a mount:
//! `ctl/` and its `deadline` (0755/0644), and the copy-on-write upper and
//! work directories, whose mode overlayfs shows as the workspace's; they
//! sit inside 0700 directories, so no other host user can reach them.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::backend::BackendKind;
use crate::{Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SandboxRecord {
    pub name: String,
    pub backend: BackendKind,
    /// The backend's own handle on the sandbox (a container id, a holder
    /// pid): opaque to everything but that backend. Records written before
    /// it was renamed call it `container_id`.
    #[serde(alias = "container_id")]
    pub handle: String,
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

impl SandboxRecord {
    /// The record of the kept sandbox `spec` describes, created now.
    pub fn for_kept(
        spec: &crate::spec::SandboxSpec,
        backend: BackendKind,
        handle: String,
    ) -> SandboxRecord {
        let keep = spec.keep.as_ref().expect("a kept sandbox's spec");
        SandboxRecord {
            name: keep.name.clone(),
            backend,
            handle,
            image: spec.image.clone(),
            profile: spec.policy.profile.as_str().into(),
            created_unix: now_unix(),
            ttl_secs: keep.ttl.as_secs(),
            workspace: spec.workspace.as_ref().map(|w| w.host.clone()),
            memory_bytes: spec.policy.limits.memory_bytes,
        }
    }
}

/// The deadline of a sandbox that never expires (9999-12-31): far beyond any
/// clock, and small enough for the keep-alive shell's arithmetic.
pub const NO_EXPIRY: u64 = 253_402_300_799;

/// How long past the deadline it will have once ready something may live
/// while it is still being created or booted (a kept sandbox, a warm
/// container or VM): TTLs count from readiness, and on a loaded host a
/// start can outlast a short one; bounded, so a start killed mid-way still
/// leaves something that ends on its own.
pub const STARTING_ALLOWANCE: Duration = Duration::from_secs(120);

/// The deadline to set while starting, for `ready_deadline`: the one to set
/// again once ready. [`NO_EXPIRY`] stays itself.
pub fn while_starting(ready_deadline: u64) -> u64 {
    ready_deadline
        .saturating_add(STARTING_ALLOWANCE.as_secs())
        .min(NO_EXPIRY)
}

/// The deadline a use with this TTL sets: now + ttl, or [`NO_EXPIRY`] for a zero TTL.
pub fn deadline_after(ttl: Duration) -> u64 {
    if ttl.is_zero() {
        NO_EXPIRY
    } else {
        now_unix().saturating_add(ttl.as_secs()).min(NO_EXPIRY)
    }
}

/// How long ago a file was last modified, by its metadata: None when the
/// filesystem keeps no such time or it lies in the future (a clock set
/// back), which every caller treats as "not old".
pub fn modified_ago(meta: &fs::Metadata) -> Option<Duration> {
    meta.modified().ok()?.elapsed().ok()
}

/// [`modified_ago`] of the file at `path` (not following a last symlink);
/// None also when it cannot be read.
pub fn file_age(path: &Path) -> Option<Duration> {
    modified_ago(&fs::symlink_metadata(path).ok()?)
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
pub fn boot_id() -> String {
    static BOOT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BOOT.get_or_init(|| {
        fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
    .clone()
}

/// `compute()`'s answer, kept in the file `cache` for the rest of this host
/// boot (its first line is the boot's id): for facts about the host that
/// only a reboot changes and that cost a probe to learn.
pub fn per_boot(cache: &Path, compute: impl FnOnce() -> String) -> String {
    let boot = boot_id();
    if let Ok(text) = fs::read_to_string(cache) {
        if let Some((id, value)) = text.split_once('\n') {
            if id == boot {
                return value.trim_end().to_string();
            }
        }
    }
    let value = compute();
    if let Some(dir) = cache.parent() {
        let _ = fs::create_dir_all(dir);
    }
    // Atomic: concurrent first callers each compute, and none reads half a file.
    let _ = write_atomic(cache, format!("{boot}\n{value}\n").as_bytes());
    value
}

/// Field `n` (1-based, as in proc(5)) of /proc/PID/stat, for n >= 3.
pub fn proc_stat_field(pid: u32, n: usize) -> Option<u64> {
    stat_field(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?, n)
}

/// Field `n` (1-based, as in proc(5)) of the text of a `/proc/<pid>/stat`.
pub fn stat_field(stat: &str, n: usize) -> Option<u64> {
    // The command name may contain spaces and parentheses: skip past the last ')'.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
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

    /// The default state directory, created private or repaired (see
    /// [`Store::make_private`]).
    pub fn open_default() -> Store {
        let store = Store::new(crate::paths::state_dir());
        store.make_private();
        store
    }

    /// Creates the state root 0700, or makes private one that an older
    /// agentkernel left readable by everyone. The check is one `lstat` of
    /// the root (every command pays it, so nothing is walked unless the
    /// root's mode is wrong); the repair closes the directories and files
    /// that hold secrets, then the root last, so an interrupted repair is
    /// redone next time. A root owned by someone else is left alone: the
    /// operations on it fail with "permission denied", naming the fix.
    pub fn make_private(&self) {
        match fs::symlink_metadata(&self.root) {
            Ok(meta) if meta.mode() & 0o077 == 0 => {}
            // A world-writable or sticky directory (`AGENTKERNEL_HOME=/tmp`)
            // is shared by design, not a state root an older version made:
            // never close it (what agentkernel creates in it is private).
            Ok(meta) if meta.mode() & 0o1002 != 0 => {}
            // SAFETY: geteuid has no preconditions and cannot fail.
            Ok(meta) if meta.is_dir() && meta.uid() == unsafe { libc::geteuid() } => {
                repair_modes(&self.root);
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let _ = create_private_dir_all(&self.root);
            }
            Err(_) => {}
        }
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
    /// The directory is built under a temporary name with its owner file
    /// inside and renamed into place without replacing (`RENAME_NOREPLACE`:
    /// two racers cannot both win), so no instant exists at which the name
    /// is taken but its owner unknown.
    pub fn reserve(&self, name: &str) -> Result<PathBuf> {
        let parent = self.root.join("sandboxes");
        let dir = parent.join(name);
        if dir.exists() {
            return Err(Error::NameClash(name.to_string()));
        }
        let building = build_owned_dir(&parent, name, &[])?;
        let ctl = building.join("ctl");
        let made = fs::DirBuilder::new()
            .mode(0o755)
            .create(&ctl)
            .map_err(|e| Error::state(&ctl, e))
            .and_then(|()| rename_no_replace(&building, &dir));
        match made {
            Ok(()) => Ok(dir),
            Err(e) => {
                let _ = fs::remove_dir_all(&building);
                match e {
                    Error::State { source, .. }
                        if source.kind() == std::io::ErrorKind::AlreadyExists =>
                    {
                        Err(Error::NameClash(name.to_string()))
                    }
                    e => Err(e),
                }
            }
        }
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

    /// The sandboxes `backend` holds.
    pub fn list_of(&self, backend: BackendKind) -> Vec<SandboxRecord> {
        let mut all = self.list();
        all.retain(|r| r.backend == backend);
        all
    }

    /// Reservations whose creating process died before committing.
    pub fn abandoned_reservations(&self) -> Vec<String> {
        let parent = self.root.join("sandboxes");
        remove_stale_temporaries(&parent);
        let mut out = Vec::new();
        let Ok(entries) = fs::read_dir(&parent) else {
            return out;
        };
        for entry in entries.flatten() {
            if is_temporary(&entry.file_name()) {
                continue;
            }
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

    /// Sets the expiry to now + ttl (called on every use). Readable by
    /// all: the sandbox's keep-alive reads it through a mount, possibly as
    /// a non-root user; its 0700 parents keep other host users out.
    /// A zero TTL (upstream's `--ttl 0`) never expires: [`NO_EXPIRY`].
    pub fn touch(&self, name: &str, ttl: Duration) -> Result<u64> {
        self.set_deadline(name, deadline_after(ttl))
    }

    /// [`Store::touch`] for a sandbox still being created: the TTL plus
    /// [`STARTING_ALLOWANCE`]. Touch it once it is ready.
    pub fn touch_while_starting(&self, name: &str, ttl: Duration) -> Result<u64> {
        self.set_deadline(name, while_starting(deadline_after(ttl)))
    }

    fn set_deadline(&self, name: &str, deadline: u64) -> Result<u64> {
        write_atomic_mode(
            &self.control_dir(name).join("deadline"),
            deadline.to_string().as_bytes(),
            0o644,
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

    /// Removes a sandbox's directory. Others may still write into it as it
    /// goes: an `exec` ending with the sandbox refreshes its deadline (a
    /// temporary file and a rename in `ctl/`). Moved out of `sandboxes/`
    /// first, by one rename, the tree can gain no entry through its old
    /// path, so removing it cannot fail with "Directory not empty" and no
    /// late write recreates it; what a killed remover leaves in
    /// `finished/` gc removes (it has no owner file).
    pub fn forget(&self, name: &str) -> Result<()> {
        let dir = self.sandbox_dir(name);
        let finished = self.root.join(FINISHED);
        match fs::DirBuilder::new().mode(0o700).create(&finished) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(_) => return remove_tree(&dir),
        }
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let gone = finished.join(format!("sandbox-{name}.{}.{nanos}", std::process::id()));
        match fs::rename(&dir, &gone) {
            Ok(()) => remove_tree(&gone),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(_) => remove_tree(&dir),
        }
    }

    /// Scratch directory of a short-lived run, tagged with the current
    /// process as owner, with the (empty, 0755) subdirectories `subdirs`.
    /// Built under a temporary name and renamed into place, so `runs/<id>`
    /// always has its owner file, whenever the process is killed.
    pub fn run_scratch(&self, id: &str, subdirs: &[&str]) -> Result<PathBuf> {
        let parent = self.root.join("runs");
        let building = build_owned_dir(&parent, id, subdirs)?;
        let dir = parent.join(id);
        if let Err(e) = fs::rename(&building, &dir) {
            let _ = fs::remove_dir_all(&building);
            return Err(Error::state(&dir, e));
        }
        Ok(dir)
    }

    /// Scratch directories whose owner process is gone — in `runs/`, and
    /// those of finished native runs whose cleanup process was killed
    /// (`finished/`; their owner, the run's supervisor, has returned) — and
    /// temporaries ([`Store::run_scratch`] being built) whose owner is gone
    /// or that are older than a minute (they live for microseconds).
    pub fn orphaned_scratch(&self) -> Vec<PathBuf> {
        remove_stale_temporaries(&self.root.join("runs"));
        ["runs", FINISHED]
            .iter()
            .filter_map(|dir| fs::read_dir(self.root.join(dir)).ok())
            .flatten()
            .flatten()
            .filter(|e| !is_temporary(&e.file_name()))
            .map(|e| e.path())
            .filter(|dir| {
                let owner = fs::read_to_string(dir.join("owner")).unwrap_or_default();
                if owner.is_empty() {
                    // Every scratch directory is born with its owner file:
                    // one without it was being removed when its remover died
                    // (or is being removed right now, hence the minute).
                    return older_than_a_minute(dir);
                }
                Owner(owner.trim().to_string()).is_dead()
            })
            .collect()
    }
}

/// Where a finished run's scratch directory waits for its removal (native:
/// the supervisor moves it out of `runs/` before it returns the exit code).
pub const FINISHED: &str = "finished";

/// The prefix of directories being built (see [`build_owned_dir`]).
const TEMPORARY_PREFIX: &str = ".new-";

fn is_temporary(name: &std::ffi::OsStr) -> bool {
    name.to_str()
        .is_some_and(|n| n.starts_with(TEMPORARY_PREFIX))
}

fn older_than_a_minute(path: &Path) -> bool {
    file_age(path).is_some_and(|age| age.as_secs() > 60)
}

/// Makes `<parent>/.new-<name>.<pid>` (0700) holding an `owner` file naming
/// this process and the empty directories `subdirs` (0755), ready to be
/// renamed into place.
fn build_owned_dir(parent: &Path, name: &str, subdirs: &[&str]) -> Result<PathBuf> {
    static SERIAL: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let serial = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let building = parent.join(format!(
        "{TEMPORARY_PREFIX}{name}.{}.{serial}",
        std::process::id()
    ));
    let made = (|| -> std::io::Result<()> {
        match create_private_dir(&building) {
            // The first one in this state directory: no syscall spent on
            // checking the parents every other time.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // `parent` is `<state>/runs` or `<state>/sandboxes`: the
                // state root, if missing, is made private too.
                if let Some(state_root) = parent.parent() {
                    create_private_dir_all(state_root)?;
                }
                create_private_dir_all(parent)?;
                create_private_dir(&building)?;
            }
            other => other?,
        }
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(building.join("owner"))?
            .write_all(Owner::current().0.as_bytes())?;
        for sub in subdirs {
            fs::DirBuilder::new()
                .mode(0o755)
                .create(building.join(sub))?;
        }
        Ok(())
    })();
    if let Err(e) = made {
        let _ = fs::remove_dir_all(&building);
        return Err(Error::state(&building, e));
    }
    Ok(building)
}

/// Removes temporaries in `parent` whose builder died (or that are older
/// than a minute: a live builder renames them within microseconds).
fn remove_stale_temporaries(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        if !is_temporary(&entry.file_name()) {
            continue;
        }
        let dir = entry.path();
        let owner = fs::read_to_string(dir.join("owner")).unwrap_or_default();
        let owner_dead = !owner.is_empty() && Owner(owner.trim().to_string()).is_dead();
        if owner_dead || older_than_a_minute(&dir) {
            let _ = remove_tree(&dir);
        }
    }
}

/// `rename(from, to)` that fails with `AlreadyExists` instead of replacing `to`.
fn rename_no_replace(from: &Path, to: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|e| Error::state(p, std::io::Error::other(e)))
    };
    let (cfrom, cto) = (c(from)?, c(to)?);
    // SAFETY: two valid NUL-terminated paths, resolved from the cwd.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            cfrom.as_ptr(),
            libc::AT_FDCWD,
            cto.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r != 0 {
        return Err(Error::state(to, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// `mkdir path` with mode 0700.
pub fn create_private_dir(path: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new().mode(0o700).create(path)
}

/// `mkdir -p path`: missing parents as usual (they are not agentkernel's:
/// `~/.local/share`, `/var/lib`), `path` itself 0700; an existing `path`
/// is fine.
pub fn create_private_dir_all(path: &Path) -> std::io::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)?;
    }
    match create_private_dir(path) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        other => other,
    }
}

/// Closes up a state directory an older agentkernel made readable by all:
/// agentkernel's top-level directories, each sandbox's and each run's directory, the
/// files that describe a sandbox (`plan.json` holds its environment), then
/// the root. Directories a sandbox reads through a mount (`ctl/`) and the
/// layers inside scratch directories keep their modes: their parents are
/// closed now.
fn repair_modes(root: &Path) {
    let set = |path: &Path, mode: u32| {
        let _ = fs::set_permissions(path, fs::Permissions::from_mode(mode));
    };
    let children = |dir: &Path| -> Vec<PathBuf> {
        fs::read_dir(dir)
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    for name in ["sandboxes", "runs", "pool", "images", "seccomp", "podman"] {
        let top = root.join(name);
        if !fs::symlink_metadata(&top).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        if matches!(name, "sandboxes" | "runs") {
            for dir in children(&top).into_iter().filter(|d| d.is_dir()) {
                for file in ["record.json", "plan.json", "native.json", "owner"] {
                    if dir.join(file).is_file() {
                        set(&dir.join(file), 0o600);
                    }
                }
                set(&dir, 0o700);
            }
        }
        set(&top, 0o700);
    }
    set(root, 0o700);
}

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

/// Writes a file only its owner can read (0600) via a temporary file and
/// rename, so readers never see a partial value.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    write_atomic_mode(path, data, 0o600)
}

/// [`write_atomic`] with the file created with `mode` (the umask applies).
pub fn write_atomic_mode(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let create = || {
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
    };
    // A leftover of a killed process with our pid may have another mode:
    // never reuse it.
    let mut f = match create() {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let _ = fs::remove_file(&tmp);
            create()
        }
        other => other,
    }
    .map_err(|e| Error::state(&tmp, e))?;
    f.write_all(data).map_err(|e| Error::state(&tmp, e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| Error::state(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_age_is_since_the_last_change_and_none_when_unknowable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = fs::File::create(&path).unwrap();
        file.set_modified(SystemTime::now() - Duration::from_secs(7200))
            .unwrap();
        let age = file_age(&path).unwrap();
        assert!((7200..7260).contains(&age.as_secs()), "{age:?}");
        // A clock set back leaves files "from the future": not old.
        file.set_modified(SystemTime::now() + Duration::from_secs(600))
            .unwrap();
        assert_eq!(file_age(&path), None);
        assert_eq!(file_age(&dir.path().join("missing")), None);
    }

    fn record(name: &str) -> SandboxRecord {
        SandboxRecord {
            name: name.into(),
            backend: BackendKind::Docker,
            handle: "abc".into(),
            image: "alpine:3.20".into(),
            profile: "moderate".into(),
            created_unix: 1,
            ttl_secs: 60,
            workspace: None,
            memory_bytes: None,
        }
    }

    #[test]
    fn records_written_before_the_typed_backend_still_read() {
        let old = r#"{"name":"a","backend":"podman","container_id":"c0ffee","image":"alpine",
            "profile":"moderate","created_unix":1,"ttl_secs":60,"workspace":null}"#;
        let r: SandboxRecord = serde_json::from_str(old).unwrap();
        assert_eq!(
            (r.backend, r.handle.as_str()),
            (BackendKind::Podman, "c0ffee")
        );
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

    /// An `exec` refreshing the deadline while the sandbox is removed (CI
    /// saw `sandbox remove` fail with "Directory not empty"): the removal
    /// succeeds, nothing of the sandbox is left, and no later refresh
    /// brings its directory back.
    #[test]
    fn forgetting_a_sandbox_wins_over_a_concurrent_touch() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().to_path_buf());
        for i in 0..200 {
            let name = format!("s{i}");
            store.reserve(&name).unwrap();
            store.commit(&record(&name)).unwrap();
            let stop = std::sync::atomic::AtomicBool::new(false);
            std::thread::scope(|s| {
                let toucher = s.spawn(|| {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let _ = store.touch(&name, Duration::from_secs(60));
                    }
                });
                std::thread::yield_now();
                let forgotten = store.forget(&name);
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                toucher.join().unwrap();
                forgotten.unwrap();
            });
            assert!(!store.sandbox_dir(&name).exists(), "{name} came back");
        }
        let finished = fs::read_dir(tmp.path().join(FINISHED)).unwrap().count();
        assert_eq!(finished, 0, "a removed sandbox's tree was left");
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

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().mode() & 0o777
    }

    #[test]
    fn state_is_created_private_and_repaired() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("state"));
        let dir = store.reserve("a").unwrap();
        assert_eq!(mode(store.root()), 0o700);
        store.commit(&record("a")).unwrap();
        store.touch("a", Duration::from_secs(60)).unwrap();
        assert_eq!(mode(&store.root().join("sandboxes")), 0o700);
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("record.json")), 0o600);
        // What the sandbox reads through its mount stays readable.
        assert_eq!(mode(&dir.join("ctl")), 0o755);
        assert_eq!(mode(&dir.join("ctl/deadline")), 0o644);
        let scratch = store.run_scratch("run-1", &["layer"]).unwrap();
        assert_eq!(mode(&store.root().join("runs")), 0o700);
        assert_eq!(mode(&scratch), 0o700);
        assert_eq!(mode(&scratch.join("owner")), 0o600);
        assert_eq!(mode(&scratch.join("layer")), 0o755);

        // An older version's layout: readable by all, closed up on first use.
        for p in [store.root(), &store.root().join("sandboxes"), &dir] {
            fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
        }
        fs::set_permissions(dir.join("record.json"), fs::Permissions::from_mode(0o644)).unwrap();
        store.make_private();
        assert_eq!(mode(store.root()), 0o700);
        assert_eq!(mode(&store.root().join("sandboxes")), 0o700);
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("record.json")), 0o600);

        // A shared directory (`AGENTKERNEL_HOME=/tmp`) is never closed.
        let shared = tmp.path().join("shared");
        fs::create_dir(&shared).unwrap();
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).unwrap();
        Store::new(shared.clone()).make_private();
        assert_eq!(fs::metadata(&shared).unwrap().mode() & 0o7777, 0o1777);
    }

    #[test]
    fn scratch_is_never_seen_without_its_owner() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().to_path_buf());
        let live = store.run_scratch("run-live", &[]).unwrap();
        assert!(live.join("owner").is_file());
        let runs = tmp.path().join("runs");
        // What a kill can leave: a temporary of a dead builder (removed at
        // once), a fresh one of a live builder (kept), and an ownerless
        // temporary (removed once it is a minute old).
        let dead = runs.join(format!("{TEMPORARY_PREFIX}run-dead.1.0"));
        fs::create_dir(&dead).unwrap();
        fs::write(dead.join("owner"), "other-boot:1:1").unwrap();
        let building = runs.join(format!("{TEMPORARY_PREFIX}run-building.2.0"));
        fs::create_dir(&building).unwrap();
        fs::write(building.join("owner"), Owner::current().0).unwrap();
        let old = runs.join(format!("{TEMPORARY_PREFIX}run-old.3.0"));
        fs::create_dir(&old).unwrap();
        let minute_ago = fs::File::open(&old).unwrap();
        minute_ago
            .set_modified(SystemTime::now() - Duration::from_secs(120))
            .unwrap();
        assert!(store.orphaned_scratch().is_empty());
        assert!(!dead.exists() && !old.exists());
        assert!(building.exists() && live.exists());
    }

    #[test]
    fn a_starting_sandbox_gets_the_allowance_and_no_expiry_stays_none() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().to_path_buf());
        std::fs::create_dir_all(store.control_dir("s")).unwrap();
        let ttl = Duration::from_secs(5);
        let starting = store.touch_while_starting("s", ttl).unwrap();
        assert_eq!(store.deadline("s"), Some(starting));
        let ready = store.touch("s", ttl).unwrap();
        assert!(
            starting >= ready + STARTING_ALLOWANCE.as_secs(),
            "{starting} {ready}"
        );
        assert!(ready <= now_unix() + 5);
        assert_eq!(
            store.touch_while_starting("s", Duration::ZERO).unwrap(),
            NO_EXPIRY
        );
        assert_eq!(while_starting(NO_EXPIRY - 1), NO_EXPIRY);
    }

    #[test]
    fn a_per_boot_value_is_kept_for_the_boot_and_computed_again_after_another() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("sub/fact");
        let computed = std::cell::Cell::new(0);
        let compute = || {
            computed.set(computed.get() + 1);
            "2445400".to_string()
        };
        assert_eq!(per_boot(&cache, compute), "2445400");
        assert_eq!(per_boot(&cache, compute), "2445400");
        assert_eq!(computed.get(), 1);
        // A value from an earlier boot is computed afresh.
        std::fs::write(&cache, "another-boot\n1\n").unwrap();
        assert_eq!(per_boot(&cache, compute), "2445400");
        assert_eq!(computed.get(), 2);
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
