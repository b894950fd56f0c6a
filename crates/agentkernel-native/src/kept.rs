//! Kept sandboxes without a daemon: a small detached **holder** process per
//! sandbox owns its init (so the sandbox lives while the holder does),
//! enforces the TTL by reading `ctl/deadline` (moved by every use), and tears
//! the sandbox down when it expires, is removed, or its init dies. Commands
//! join the running sandbox (`join.rs`).
//!
//! `<sandbox dir>/native.json` says who holds what; if the holder is killed,
//! its init dies with it (PDEATHSIG) and a later `gc` removes the cgroup,
//! the network lease and the directory.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

use agentkernel_core::state::{now_unix, proc_stat_field, Owner, Store};
use serde::{Deserialize, Serialize};

use crate::cgroup::Cgroup;
use crate::error::KeptError;
use crate::plan::{Action, Plan};
use crate::sandbox::{self, kill, wait_for};
use crate::sys;

/// What a kept native sandbox is made of, for commands that join or remove it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Held {
    /// The holder process (`<boot>:<pid>:<start>`).
    pub holder: String,
    /// Init's host pid and start time (to tell it from a reused pid).
    pub init_pid: i32,
    pub init_start: u64,
    pub cgroup: Cgroup,
    /// Rootless only: the namespace anchor (see [`spawn_anchor`]).
    #[serde(default)]
    pub anchor_pid: Option<i32>,
}

impl Held {
    pub fn load(store: &Store, name: &str) -> Option<Held> {
        let data = std::fs::read(state_file(store, name)).ok()?;
        serde_json::from_slice(&data).ok()
    }

    /// The sandbox's parts while its holder lives; else the error to show.
    pub fn live(store: &Store, name: &str) -> io::Result<Held> {
        Held::load(store, name)
            .filter(Held::holder_alive)
            .ok_or_else(|| {
                io::Error::other(format!(
                    "sandbox {name} is gone; `agentkernel sandbox gc` removes what it left"
                ))
            })
    }

    pub fn holder_alive(&self) -> bool {
        !Owner(self.holder.clone()).is_dead()
    }

    fn holder_pid(&self) -> Option<i32> {
        self.holder.split(':').nth(1)?.parse().ok()
    }

    /// True while init is the process we started (not a reused pid).
    pub fn init_alive(&self) -> bool {
        proc_stat_field(self.init_pid as u32, 22) == Some(self.init_start)
            && !agentkernel_core::state::is_zombie(self.init_pid as u32)
    }
}

fn state_file(store: &Store, name: &str) -> PathBuf {
    store.sandbox_dir(name).join("native.json")
}

/// The plan commands in this sandbox start from (argv, env, workdir are theirs).
pub fn plan_file(store: &Store, name: &str) -> PathBuf {
    store.sandbox_dir(name).join("plan.json")
}

/// Until the holder exists: the name's reservation and the cgroup, released
/// on drop (every early return of `create`).
struct Unwind<'a> {
    store: &'a Store,
    name: &'a str,
    cgroup: Option<&'a Cgroup>,
}

impl Drop for Unwind<'_> {
    fn drop(&mut self) {
        if let Some(cgroup) = self.cgroup {
            cgroup.remove();
        }
        let _ = self.store.forget(self.name);
    }
}

/// Builds the sandbox under a detached holder and returns once it runs (or
/// with the reason it could not be built). Call from a single-threaded process.
pub fn create(plan: &Plan) -> Result<(), KeptError> {
    let keep = plan.keep.as_ref().expect("kept plan");
    let store = Store::new(keep.state_root.clone());
    let name_only = Unwind {
        store: &store,
        name: &keep.name,
        cgroup: None,
    };
    let cgroup = Cgroup::for_plan(plan)?;
    std::mem::forget(name_only);
    let unwind = Unwind {
        store: &store,
        name: &keep.name,
        cgroup: Some(&cgroup),
    };
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error().into());
    }
    // SAFETY: both fds were just created and are ours.
    let (report_r, report_w) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };

    // Double fork: the holder is reparented away from us and has its own
    // session, so it outlives this command and its terminal.
    // SAFETY: single-threaded process (the helper); the child only forks again.
    let middle = unsafe { libc::fork() };
    if middle < 0 {
        return Err(io::Error::last_os_error().into());
    }
    // From here the holder owns the name and the cgroup (and releases them
    // itself if it fails).
    std::mem::forget(unwind);
    if middle == 0 {
        drop(report_r);
        // SAFETY: new session, then the holder; the middle process just exits.
        unsafe {
            libc::setsid();
            if libc::fork() == 0 {
                hold(plan, &cgroup, &store, report_w);
            }
            libc::_exit(0);
        }
    }
    drop(report_w);
    wait_for(middle);
    let mut answer = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        // SAFETY: reads into a buffer we own.
        let n = unsafe { libc::read(report_r.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            answer.extend_from_slice(&buf[..n as usize]);
        } else if n == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            break;
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    match answer.strip_prefix("ok") {
        Some(_) => Ok(()),
        None if answer.is_empty() => Err(KeptError::HolderDiedInSetup),
        None => Err(KeptError::Setup(answer.trim().to_string())),
    }
}

/// The holder. Never returns.
fn hold(plan: &Plan, cgroup: &Cgroup, store: &Store, report: OwnedFd) -> ! {
    let keep = plan.keep.as_ref().expect("kept plan");
    detach_stdio();
    let say = |text: &str| {
        let _ = sys::write_all_fd(report.as_raw_fd(), text.as_bytes());
    };
    let fail = |why: String| -> ! {
        say(&why);
        cgroup.remove();
        let _ = store.forget(&keep.name);
        // SAFETY: ends the holder.
        unsafe { libc::_exit(1) }
    };
    let sfd = match sandbox::supervisor_signalfd() {
        Ok(s) => s,
        Err(e) => fail(crate::error::with_fix(&e)),
    };
    let started = match sandbox::start(plan, &mut Some(cgroup.clone()), &[&sfd, &report]) {
        Ok(Ok(s)) => s,
        Ok(Err(status)) => fail(format!("the sandbox's setup failed (status {status})")),
        Err(e) => fail(crate::error::with_fix(&e)),
    };
    let anchor = match plan.rootless {
        Some(_) => match spawn_anchor(started.pid) {
            Ok(pid) => Some(pid),
            Err(e) => {
                kill(started.pid, libc::SIGKILL);
                wait_for(started.pid);
                if let Some(link) = &started.link {
                    link.release();
                }
                fail(e.to_string());
            }
        },
        None => None,
    };
    let end_anchor = || {
        if let Some(pid) = anchor {
            kill(pid, libc::SIGKILL);
            wait_for(pid);
        }
    };
    let held = Held {
        holder: Owner::current().0,
        init_pid: started.pid,
        init_start: proc_stat_field(started.pid as u32, 22).unwrap_or(0),
        cgroup: cgroup.clone(),
        anchor_pid: anchor,
    };
    let mut exec_plan = plan.clone();
    exec_plan.action = Action::Exec;
    exec_plan.argv.clear();
    // Never on disk: secret files were written when the sandbox was built.
    exec_plan.secret_files.clear();
    // The proxy serves every later command already (its descriptors are
    // this holder's, and the proxy ends when the holder does).
    exec_plan.egress = None;
    let mut record = keep.record.clone();
    record.handle = format!("native pid {}", started.pid);
    let recorded = (|| -> agentkernel_core::Result<()> {
        let write =
            |path: PathBuf, data: Vec<u8>| agentkernel_core::state::write_atomic(&path, &data);
        write(
            state_file(store, &keep.name),
            serde_json::to_vec(&held).unwrap_or_default(),
        )?;
        write(
            plan_file(store, &keep.name),
            serde_json::to_vec(&exec_plan).unwrap_or_default(),
        )?;
        store.touch(&keep.name, keep.ttl)?;
        store.commit(&record)
    })();
    if let Err(e) = recorded.and_then(|()| {
        sys::write_all_fd(started.sock.as_raw_fd(), &[sandbox::GO])
            .map_err(|e| agentkernel_core::Error::state(store.sandbox_dir(&keep.name), e))
    }) {
        kill(started.pid, libc::SIGKILL);
        wait_for(started.pid);
        end_anchor();
        if let Some(link) = &started.link {
            link.release();
        }
        fail(e.to_string());
    }
    say("ok");
    drop(report);

    wait_until_done(store, &keep.name, &sfd, started.pid);
    // Frozen (stopped) processes cannot die until thawed.
    let _ = cgroup.set_frozen(false);
    kill(started.pid, libc::SIGKILL);
    wait_for(started.pid);
    end_anchor();
    if let Some(link) = &started.link {
        link.release();
    }
    cgroup.remove();
    let _ = store.forget(&keep.name);
    // SAFETY: ends the holder.
    unsafe { libc::_exit(0) }
}

/// A rootless sandbox's init is non-dumpable (nothing in the sandbox may
/// ptrace it), which in a user namespace also hides its `/proc/<pid>/ns`
/// from the user's later `exec`. So the holder keeps an **anchor**: a
/// process that joins init's namespaces while init is still dumpable (before
/// "go") and then only sleeps. It stays in the host's pid namespace (the
/// sandbox's is only `pid_for_children` for it), so nothing in the sandbox
/// can see it; `exec` enters the sandbox through its `/proc/<pid>/ns`. It
/// dies with the holder.
fn spawn_anchor(init: libc::pid_t) -> io::Result<libc::pid_t> {
    let namespaces: Vec<std::fs::File> = crate::join::NAMESPACES
        .iter()
        .map(|ns| {
            std::fs::File::open(format!("/proc/{init}/ns/{ns}")).map_err(sys::context(
                format_args!("open the sandbox's {ns} namespace"),
            ))
        })
        .collect::<io::Result<_>>()?;
    // SAFETY: the holder is single-threaded; the child only makes syscalls.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: integer-only syscalls and fds we own; never returns.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            for ns in &namespaces {
                if libc::setns(ns.as_raw_fd(), 0) != 0 {
                    libc::_exit(1);
                }
            }
            libc::close_range(3, u32::MAX, 0);
            loop {
                libc::pause();
            }
        }
    }
    Ok(pid)
}

/// Sleeps until the deadline passes (re-reading it: every use moves it), a
/// signal asks us to end, or init dies.
fn wait_until_done(store: &Store, name: &str, sfd: &OwnedFd, init: libc::pid_t) {
    loop {
        let Some(deadline) = store.deadline(name) else {
            return;
        };
        let now = now_unix();
        if now >= deadline {
            return;
        }
        let wait_ms = ((deadline - now).min(60) * 1000) as i32;
        let mut pfd = libc::pollfd {
            fd: sfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, wait_ms) } <= 0 {
            continue;
        }
        let Some(sig) = sandbox::next_signal(sfd) else {
            continue;
        };
        match sig {
            libc::SIGCHLD => {
                let mut status = 0;
                // SAFETY: non-blocking wait for our own child.
                if unsafe { libc::waitpid(init, &mut status, libc::WNOHANG) } == init {
                    return;
                }
            }
            libc::SIGWINCH => {}
            // TERM (remove), INT, HUP, QUIT: end the sandbox.
            _ => return,
        }
    }
}

fn detach_stdio() {
    let null = sys::cstr("/dev/null");
    // SAFETY: opens /dev/null and makes it our stdio; the holder has no terminal.
    unsafe {
        let fd = libc::open(null.as_ptr(), libc::O_RDWR);
        if fd >= 0 {
            libc::dup2(fd, 0);
            libc::dup2(fd, 1);
            libc::dup2(fd, 2);
            if fd > 2 {
                libc::close(fd);
            }
        }
        libc::chdir(c"/".as_ptr());
    }
}

/// `sandbox remove`: asks the holder to end the sandbox and waits for it;
/// if the holder is gone, removes what it left. Fails (rather than claiming
/// success) when the sandbox is another user's or its directory stays.
pub fn remove(store: &Store, name: &str) -> Result<(), KeptError> {
    let denied = || KeptError::RemoveDenied(name.to_string());
    match Held::load(store, name) {
        Some(held) if held.holder_alive() => {
            if let Some(pid) = held.holder_pid() {
                // SAFETY: kill has no memory-safety preconditions.
                if unsafe { libc::kill(pid, libc::SIGTERM) } != 0
                    && io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
                {
                    return Err(denied());
                }
            }
            for _ in 0..200 {
                if !store.sandbox_dir(name).exists() {
                    return Ok(());
                }
                std::thread::sleep(std::time::Duration::from_millis(25));
            }
            teardown(store, name, Some(&held));
        }
        held => teardown(store, name, held.as_ref()),
    }
    match std::fs::symlink_metadata(store.sandbox_dir(name)) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Err(denied()),
        Err(e) => Err(e.into()),
        Ok(_) => Err(KeptError::StillThere {
            name: name.to_string(),
            dir: store.sandbox_dir(name),
        }),
    }
}

/// Removes what a dead holder left: init (if somehow alive), the cgroup, the
/// lease (collected by holder liveness) and the directory.
fn teardown(store: &Store, name: &str, held: Option<&Held>) {
    if let Some(held) = held {
        let _ = held.cgroup.set_frozen(false);
        if held.init_alive() {
            kill(held.init_pid, libc::SIGKILL);
        }
        held.cgroup.remove();
    } else {
        Cgroup::of(name).remove();
    }
    crate::net::collect_dead();
    let _ = store.forget(name);
}

/// Kept native sandboxes whose holder died: removed. Returns how many.
pub fn collect(store: &Store) -> usize {
    let mut n = 0;
    for record in store
        .list()
        .into_iter()
        .filter(|r| r.backend == agentkernel_core::backend::BackendKind::Native)
    {
        match Held::load(store, &record.name) {
            Some(held) if held.holder_alive() => {}
            held => {
                teardown(store, &record.name, held.as_ref());
                n += 1;
            }
        }
    }
    n
}

/// Status for `sandbox list`: `running` or `stopped` while the holder lives.
pub fn status(store: &Store, name: &str) -> Option<&'static str> {
    Held::load(store, name).filter(Held::holder_alive).map(|h| {
        if h.cgroup.is_frozen() {
            "stopped"
        } else {
            "running"
        }
    })
}

/// `sandbox stop` (freeze: processes and files kept, no CPU used; the TTL
/// still runs) and `sandbox start` (thaw).
pub fn set_stopped(store: &Store, name: &str, stopped: bool) -> Result<(), KeptError> {
    let held = Held::load(store, name)
        .filter(Held::holder_alive)
        .ok_or_else(|| KeptError::Gone(name.to_string()))?;
    if held.cgroup.dirs.is_empty() {
        return Err(KeptError::NoFreezer(name.to_string()));
    }
    Ok(held.cgroup.set_frozen(stopped)?)
}
