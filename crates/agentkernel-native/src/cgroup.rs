//! The sandbox's cgroup: memory, CPU and pids limits on cgroup v2 (most
//! hosts) or v1 (older and hybrid hosts), OOM detection, and removal.
//!
//! Like Docker's cgroupfs driver, sandboxes live under an `agentkernel`
//! group at the top of each hierarchy: `/sys/fs/cgroup/agentkernel/<id>` on
//! v2, `/sys/fs/cgroup/<controller>/agentkernel/<id>` on v1. Every directory
//! created is listed in the sandbox's scratch directory, so a later `gc` can
//! remove exactly those after a crash.

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use crate::plan::CgroupLimits;

/// Why the sandbox's cgroup could not be made, used or frozen.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot create the cgroup {}: {source}", dir.display())]
    Create { dir: PathBuf, source: io::Error },
    #[error("cannot write {}: {source}", file.display())]
    Write { file: PathBuf, source: io::Error },
    #[error("cannot open {}: {source}", file.display())]
    Open { file: PathBuf, source: io::Error },
    #[error("the cgroup v1 {0} controller is not mounted")]
    V1ControllerNotMounted(&'static str),
    /// A limit file is missing because its controller could not be enabled.
    #[error("{missing}: the memory, cpu and pids controllers cannot be enabled below /sys/fs/cgroup ({why})")]
    ControllersNotEnabled {
        missing: Box<CgroupError>,
        why: io::Error,
    },
    #[error("cannot move into the sandbox's cgroup: {0}")]
    Join(#[source] io::Error),
    #[error("this sandbox has no freezer cgroup")]
    NoFreezer,
}

impl crate::error::Fix for CgroupError {
    fn fix(&self) -> Option<&'static str> {
        Some(match self {
            CgroupError::Create { .. } | CgroupError::Write { .. } | CgroupError::Open { .. } | CgroupError::Join(_) => {
                "run agentkernel as root; `agentkernel doctor` checks what native sandboxes need here"
            }
            CgroupError::V1ControllerNotMounted(_) => {
                "mount the memory, cpu, pids and freezer controllers, or boot with cgroup v2"
            }
            CgroupError::ControllersNotEnabled { .. } => {
                "in a container, first move its processes out of the root cgroup into a child group (as Docker-in-Docker's entrypoint does)"
            }
            CgroupError::NoFreezer => return None,
        })
    }
}

impl CgroupError {
    fn is_missing_file(&self) -> bool {
        matches!(self, CgroupError::Write { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const CPU_PERIOD_US: u64 = 100_000;
/// memory, cpu and pids for the limits; freezer for `sandbox stop`.
const V1_CONTROLLERS: [&str; 4] = ["memory", "cpu", "pids", "freezer"];

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Cgroup {
    pub v2: bool,
    /// One directory on v2; one per controller on v1 (memory first).
    pub dirs: Vec<PathBuf>,
}

fn is_cgroup2(path: &str) -> bool {
    let c = std::ffi::CString::new(path).expect("no NUL");
    // SAFETY: statfs writes into the zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a valid out-pointer.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == CGROUP2_SUPER_MAGIC }
}

/// The host's v1 cgroup mounts: (mount point, its options). Read once per
/// process: `/proc/self/mounts` is expensive to generate on a host with many
/// overlay mounts (each container engine's), and a run needs it several
/// times — the helper reads it before it forks, so init inherits it.
fn v1_mounts() -> &'static [(PathBuf, String)] {
    static MOUNTS: std::sync::OnceLock<Vec<(PathBuf, String)>> = std::sync::OnceLock::new();
    MOUNTS.get_or_init(|| {
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        mounts
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split(' ').collect();
                (f.len() > 3 && f[2] == "cgroup").then(|| (PathBuf::from(f[1]), f[3].to_string()))
            })
            .collect()
    })
}

/// Where each v1 controller is mounted (`cpu` is often `cpu,cpuacct`).
fn v1_mount(controller: &str) -> Option<PathBuf> {
    v1_mounts()
        .iter()
        .find(|(_, options)| options.split(',').any(|o| o == controller))
        .map(|(path, _)| path.clone())
}

/// The v1 hierarchies a sandbox joins, as (directory name, mount options):
/// e.g. ("cpu,cpuacct", "cpu,cpuacct") — options must match the host's mount.
pub fn v1_hierarchies() -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (_, options) in v1_mounts() {
        let controllers: Vec<&str> = options
            .split(',')
            .filter(|o| V1_CONTROLLERS.contains(o) || *o == "cpuacct")
            .collect();
        if !controllers.iter().any(|c| V1_CONTROLLERS.contains(c)) {
            continue;
        }
        let joined = controllers.join(",");
        if !out.iter().any(|(d, _)| *d == joined) {
            out.push((joined.clone(), joined));
        }
    }
    out
}

/// Whether memory, cpu and pids are mounted as v1 hierarchies. Checked at
/// their usual places first (a statfs each), so choosing the backend costs
/// no read of `/proc/self/mounts`.
pub fn v1_controllers_mounted() -> bool {
    const CGROUP_SUPER_MAGIC: i64 = 0x0027_e0eb;
    let at_usual_place = |c: &str| {
        let path = std::ffi::CString::new(format!("/sys/fs/cgroup/{c}")).expect("no NUL");
        // SAFETY: statfs writes into the zeroed struct we own.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: a valid C string and out-pointer.
        unsafe {
            libc::statfs(path.as_ptr(), &mut st) == 0 && st.f_type as i64 == CGROUP_SUPER_MAGIC
        }
    };
    ["memory", "cpu", "pids"]
        .iter()
        .all(|c| at_usual_place(c) || v1_mount(c).is_some())
}

/// True when this host's cgroups are v1 (or hybrid: v2 without controllers).
pub fn host_is_v1() -> bool {
    !is_cgroup2("/sys/fs/cgroup")
}

/// The `oom_kill` count in a v1 `memory.oom_control` or v2 `memory.events`.
pub fn read_oom_kills(file: &fs::File) -> u64 {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 4096];
    let n = file.read_at(&mut buf, 0).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
        .unwrap_or(0)
}

/// Moves the calling process into the cgroup through files from
/// [`Cgroup::self_move_files`]. The caller must be single-threaded: on v1
/// only the calling thread moves.
pub fn move_self(files: &[fs::File]) -> Result<(), CgroupError> {
    for file in files {
        io::Write::write_all(&mut &*file, b"0").map_err(CgroupError::Join)?;
    }
    Ok(())
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|source| CgroupError::Write {
        file: path.to_path_buf(),
        source,
    })
}

fn create_dir(dir: &Path, create: impl FnOnce(&Path) -> io::Result<()>) -> Result<(), CgroupError> {
    create(dir).map_err(|source| CgroupError::Create {
        dir: dir.to_path_buf(),
        source,
    })
}

/// A cgroup being created: removed again when dropped before
/// [`Unfinished::done`], so no error path leaves half a cgroup behind.
struct Unfinished(Option<Cgroup>);

impl Unfinished {
    fn cgroup(&mut self) -> &mut Cgroup {
        self.0.as_mut().expect("not done")
    }

    fn done(mut self) -> Cgroup {
        self.0.take().expect("not done")
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(cgroup) = self.0.take() {
            cgroup.remove();
        }
    }
}

impl Cgroup {
    /// The sandbox's cgroup: none for a rootless sandbox (which cannot
    /// create one; see rootless.rs), else a new one with the plan's limits.
    pub fn for_plan(plan: &crate::Plan) -> Result<Cgroup, CgroupError> {
        if plan.rootless.is_some() {
            return Ok(Cgroup {
                v2: false,
                dirs: Vec::new(),
            });
        }
        Cgroup::create(&plan.id, &plan.limits)
    }

    /// Whether a one-shot run creates its cgroup after forking init (v1:
    /// init moves itself in) rather than before (v2: init is born inside).
    pub fn created_after_init(plan: &crate::Plan) -> bool {
        plan.rootless.is_none() && host_is_v1()
    }

    /// Creates the sandbox's cgroup with its limits.
    pub fn create(id: &str, limits: &CgroupLimits) -> Result<Cgroup, CgroupError> {
        let cgroup = if is_cgroup2("/sys/fs/cgroup") {
            Cgroup::create_v2(id, limits)?
        } else {
            Cgroup::create_v1(id, limits)?
        };
        Ok(cgroup)
    }

    fn create_v2(id: &str, limits: &CgroupLimits) -> Result<Cgroup, CgroupError> {
        let root = Path::new("/sys/fs/cgroup");
        let parent = root.join("agentkernel");
        // Controllers must be enabled on the path down to the sandbox. One
        // already enabled is fine; one that cannot be (e.g. in a container
        // whose cgroup has processes of its own: "no internal processes")
        // surfaces below as a missing limit file, reported with this error.
        let enabling = fs::write(root.join("cgroup.subtree_control"), "+memory +cpu +pids");
        create_dir(&parent, |dir| match fs::create_dir(dir) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            other => other,
        })?;
        let enabling = enabling.and(fs::write(
            parent.join("cgroup.subtree_control"),
            "+memory +cpu +pids",
        ));
        let dir = parent.join(id);
        create_dir(&dir, |dir| fs::create_dir(dir))?;
        let cgroup = Unfinished(Some(Cgroup {
            v2: true,
            dirs: vec![dir.clone()],
        }));
        let apply = || -> Result<(), CgroupError> {
            if let Some(m) = limits.memory_bytes {
                write(&dir.join("memory.max"), &m.to_string())?;
                // No swap beyond the limit: a memory hog meets the OOM killer.
                if dir.join("memory.swap.max").exists() {
                    write(&dir.join("memory.swap.max"), "0")?;
                }
            }
            if let Some(c) = limits.cpus {
                let quota = (c * CPU_PERIOD_US as f64).round() as u64;
                write(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
            }
            if let Some(p) = limits.pids {
                write(&dir.join("pids.max"), &p.to_string())?;
            }
            Ok(())
        };
        match (apply(), enabling) {
            (Ok(()), _) => Ok(cgroup.done()),
            (Err(missing), Err(why)) if missing.is_missing_file() => {
                Err(CgroupError::ControllersNotEnabled {
                    missing: Box::new(missing),
                    why,
                })
            }
            (Err(e), _) => Err(e),
        }
    }

    fn create_v1(id: &str, limits: &CgroupLimits) -> Result<Cgroup, CgroupError> {
        let mut cgroup = Unfinished(Some(Cgroup {
            v2: false,
            dirs: Vec::new(),
        }));
        for controller in V1_CONTROLLERS {
            let mount =
                v1_mount(controller).ok_or(CgroupError::V1ControllerNotMounted(controller))?;
            let dir = mount.join("agentkernel").join(id);
            create_dir(&dir, |dir| fs::create_dir_all(dir))?;
            cgroup.cgroup().dirs.push(dir.clone());
            match controller {
                "memory" => {
                    if let Some(m) = limits.memory_bytes {
                        write(&dir.join("memory.limit_in_bytes"), &m.to_string())?;
                        let memsw = dir.join("memory.memsw.limit_in_bytes");
                        if memsw.exists() {
                            write(&memsw, &m.to_string())?;
                        }
                    }
                }
                "cpu" => {
                    if let Some(c) = limits.cpus {
                        let quota = (c * CPU_PERIOD_US as f64).round() as u64;
                        write(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                        write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                    }
                }
                "pids" => {
                    if let Some(p) = limits.pids {
                        write(&dir.join("pids.max"), &p.to_string())?;
                    }
                }
                _ => {}
            }
        }
        Ok(cgroup.done())
    }

    /// The cgroup sandbox `id` has (or had) on this host, for removing what
    /// a crashed supervisor left.
    pub fn of(id: &str) -> Cgroup {
        if !host_is_v1() {
            return Cgroup {
                v2: true,
                dirs: vec![Path::new("/sys/fs/cgroup/agentkernel").join(id)],
            };
        }
        Cgroup {
            v2: false,
            dirs: V1_CONTROLLERS
                .iter()
                .filter_map(|c| v1_mount(c))
                .map(|m| m.join("agentkernel").join(id))
                .collect(),
        }
    }

    /// One-shot runs' cgroups that are empty and older than `min_age`. A
    /// live run's cgroup holds its init from the first milliseconds on, so
    /// such a group belongs to no run: its agentkernel died before (or while)
    /// its scratch directory was removed, which is how `gc` finds the rest.
    pub fn abandoned_runs(min_age: std::time::Duration) -> Vec<PathBuf> {
        let parents: Vec<PathBuf> = if host_is_v1() {
            V1_CONTROLLERS
                .iter()
                .filter_map(|c| v1_mount(c))
                .map(|m| m.join("agentkernel"))
                .collect()
        } else {
            vec![PathBuf::from("/sys/fs/cgroup/agentkernel")]
        };
        let mut found = Vec::new();
        for parent in parents {
            let Ok(entries) = fs::read_dir(&parent) else {
                continue;
            };
            // The group's own files (cgroup.procs, memory.*) are listed too.
            let runs = entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("run-"))
                .map(|e| e.path());
            for dir in runs {
                let old = agentkernel_core::state::file_age(&dir).is_some_and(|age| age >= min_age);
                if old
                    && fs::read_to_string(dir.join("cgroup.procs"))
                        .is_ok_and(|procs| procs.trim().is_empty())
                {
                    found.push(dir);
                }
            }
        }
        found
    }

    /// The v2 cgroup's directory, for `clone3(CLONE_INTO_CGROUP)`: a child
    /// born inside needs no move at all. None on v1 (and without a cgroup).
    pub fn v2_dir_fd(&self) -> Option<OwnedFd> {
        let dir = self.dirs.first().filter(|_| self.v2)?;
        fs::File::open(dir).ok().map(OwnedFd::from)
    }

    /// Files a process writes "0" to (with [`move_self`]) to move itself
    /// into the cgroup. Opened by the supervisor, written by the child.
    ///
    /// Moving a whole process takes the kernel's global threadgroup lock for
    /// writing, which waits for an RCU grace period: 5-30 ms per run measured
    /// on a 2-CPU VM, longer than the rest of a run's set-up. On v1, a
    /// single-threaded process that moves only itself (its one thread, via
    /// `tasks`) skips that lock, and costs well under a millisecond. v2 has
    /// no per-thread file outside threaded subtrees: there, `cgroup.procs`
    /// is the fallback for kernels without `CLONE_INTO_CGROUP` (< 5.7).
    pub fn self_move_files(&self) -> Result<Vec<fs::File>, CgroupError> {
        let file = if self.v2 { "cgroup.procs" } else { "tasks" };
        self.dirs
            .iter()
            .map(|dir| {
                let path = dir.join(file);
                fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|source| CgroupError::Open { file: path, source })
            })
            .collect()
    }

    /// How many processes the OOM killer has killed here.
    pub fn oom_kills(&self) -> u64 {
        self.oom_counter_file().as_ref().map_or(0, read_oom_kills)
    }

    /// The file that counts OOM kills (open it before leaving the host's
    /// mount namespace, read it with [`read_oom_kills`]).
    pub fn oom_counter_file(&self) -> Option<fs::File> {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        fs::File::open(self.dirs.first()?.join(file)).ok()
    }

    /// The directory of a v1 controller (or the one v2 directory).
    fn dir_of(&self, controller: &str) -> Option<&PathBuf> {
        if self.v2 {
            return self.dirs.first();
        }
        self.dirs.iter().find(|d| {
            d.parent()
                .and_then(|p| p.parent())
                .and_then(|m| m.file_name())
                .is_some_and(|n| n.to_string_lossy().split(',').any(|c| c == controller))
        })
    }

    /// Freezes (`true`) or thaws every process in the sandbox.
    pub fn set_frozen(&self, frozen: bool) -> Result<(), CgroupError> {
        let dir = self.dir_of("freezer").ok_or(CgroupError::NoFreezer)?;
        if self.v2 {
            write(&dir.join("cgroup.freeze"), if frozen { "1" } else { "0" })
        } else {
            write(
                &dir.join("freezer.state"),
                if frozen { "FROZEN" } else { "THAWED" },
            )
        }
    }

    pub fn is_frozen(&self) -> bool {
        let Some(dir) = self.dir_of("freezer") else {
            return false;
        };
        if self.v2 {
            fs::read_to_string(dir.join("cgroup.freeze")).is_ok_and(|v| v.trim() == "1")
        } else {
            fs::read_to_string(dir.join("freezer.state"))
                .is_ok_and(|v| matches!(v.trim(), "FROZEN" | "FREEZING"))
        }
    }

    /// Kills anything left inside and removes the directories. Best effort:
    /// what cannot be removed now is found again by `gc`.
    pub fn remove(&self) {
        if self.is_frozen() {
            let _ = self.set_frozen(false);
        }
        for dir in &self.dirs {
            for attempt in 0..200 {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(_) if attempt < 199 => {
                        self.kill_all(dir);
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                    Err(_) => {}
                }
            }
        }
    }

    fn kill_all(&self, dir: &Path) {
        if self.v2 && fs::write(dir.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                // SAFETY: kill takes plain integers.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real cgroups (tests run as root, like CI): an empty run group is
    /// abandoned, one with a process in it never is.
    #[test]
    fn abandoned_runs_are_the_empty_ones() {
        let id = |what: &str| format!("run-test{what}{}", std::process::id());
        let empty = Cgroup::create(&id("empty"), &CgroupLimits::default()).unwrap();
        let busy = Cgroup::create(&id("busy"), &CgroupLimits::default()).unwrap();
        let mut sleeper = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        for dir in &busy.dirs {
            write(&dir.join("cgroup.procs"), &sleeper.id().to_string()).unwrap();
        }

        let found = Cgroup::abandoned_runs(std::time::Duration::ZERO);
        // Young groups are left alone (a run may be about to join its own).
        let old_only = Cgroup::abandoned_runs(std::time::Duration::from_secs(3600));
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        empty.remove();
        busy.remove();
        for dir in &empty.dirs {
            assert!(
                found.contains(dir),
                "{} not found in {found:?}",
                dir.display()
            );
        }
        for dir in &busy.dirs {
            assert!(!found.contains(dir), "{} has a process", dir.display());
        }
        assert!(old_only.iter().all(|d| !empty.dirs.contains(d)));
    }
}
