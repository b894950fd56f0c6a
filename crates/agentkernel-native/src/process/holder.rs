//! The holder: a kept sandbox's supervisor, detached from the command that
//! created it. It owns the sandbox's init (so the sandbox lives while the
//! holder does), enforces the TTL by reading `ctl/deadline` (moved by every
//! use), and tears the sandbox down when it expires, is removed, or its
//! init dies. See `kept.rs` for the record it leaves and for removal.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

use agentkernel_core::state::{now_unix, proc_stat_field, Owner, Store};

use super::{kill, wait_for};
use crate::cgroup::Cgroup;
use crate::error::KeptError;
use crate::kept::{plan_file, state_file, Held};
use crate::plan::{Action, Plan};
use crate::sys;

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
    let sfd = match super::supervisor_signalfd() {
        Ok(s) => s,
        Err(e) => fail(crate::error::with_fix(&e)),
    };
    let started = match super::supervisor::start(plan, &mut Some(cgroup.clone()), &[&sfd, &report])
    {
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
    // Copied in once, when the sandbox was built.
    exec_plan.files.clear();
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
        super::channel::Message::Go
            .send(&started.sock)
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
    // A warm sandbox, only now (init runs, nothing of ours is inherited
    // any more): the signal a claiming run sends, then `ready`, which runs
    // look for. One that cannot be claimed is ended at once.
    let claimable = !keep.warm
        || (listen_for_claims(&sfd).is_ok()
            && crate::pool::mark_ready(&store.sandbox_dir(&keep.name)).is_ok());

    // A warm sandbox's namespaces stay referenced here until the holder has
    // reaped init: otherwise the run that joined them would hold the last
    // reference, and its exit would wait for the kernel to unmount the
    // sandbox's filesystems and dismantle its network.
    let namespaces: Vec<std::fs::File> = if keep.warm {
        crate::join::NAMESPACES
            .iter()
            .filter_map(|ns| std::fs::File::open(format!("/proc/{}/ns/{ns}", started.pid)).ok())
            .collect()
    } else {
        Vec::new()
    };
    let served_a_run =
        claimable && wait_until_done(store, &keep.name, &sfd, started.pid, keep.warm);
    // Frozen (stopped) processes cannot die until thawed.
    let _ = cgroup.set_frozen(false);
    kill(started.pid, libc::SIGKILL);
    wait_for(started.pid);
    end_anchor();
    drop(namespaces);
    if let Some(link) = &started.link {
        link.release();
    }
    cgroup.remove();
    let _ = store.forget(&keep.name);
    if served_a_run {
        // Once the run and this sandbox are over, not while the command
        // runs: the build competes with nothing of the run then.
        crate::pool::start_refill_from_holder(store.root());
    }
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

/// Adds [`crate::pool::CLAIMED_SIGNAL`] to the holder's signalfd (blocked
/// only after init exists: a blocked signal would be inherited by it).
fn listen_for_claims(sfd: &OwnedFd) -> io::Result<()> {
    let mut signals = super::supervisor_signals();
    // SAFETY: adds to a set we own, blocks it in our (single) thread and
    // gives the signalfd we own the larger set.
    unsafe {
        libc::sigaddset(&mut signals, crate::pool::CLAIMED_SIGNAL);
        libc::sigprocmask(libc::SIG_BLOCK, &signals, std::ptr::null_mut());
        if libc::signalfd(sfd.as_raw_fd(), &signals, 0) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Sleeps until the deadline passes (re-reading it: every use moves it), a
/// signal asks us to end, or init dies. A warm sandbox a run has claimed
/// lives exactly as long as that run (see [`watch_claimant`]). Returns
/// whether it was such a sandbox.
fn wait_until_done(
    store: &Store,
    name: &str,
    sfd: &OwnedFd,
    init: libc::pid_t,
    warm: bool,
) -> bool {
    loop {
        if warm {
            if let Some(claimant) = crate::pool::claimant(&store.sandbox_dir(name)) {
                watch_claimant(&claimant, sfd, init);
                return true;
            }
        }
        let now = now_unix();
        // Read again before acting on an expiry: `exec` rewrites the
        // deadline in place, and a read racing that write may mix old and
        // new digits.
        let Some(deadline) = store
            .deadline(name)
            .filter(|d| *d > now)
            .or_else(|| store.deadline(name))
            .filter(|d| *d > now)
        else {
            return false;
        };
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
        // A claim (CLAIMED_SIGNAL) is seen on the loop's next turn.
        if signal_ends_sandbox(sfd, init) {
            return false;
        }
    }
}

/// Reads a signal from the holder's signalfd: true when it ends the
/// sandbox — init died (SIGCHLD for it), or TERM (remove), INT, HUP, QUIT.
fn signal_ends_sandbox(sfd: &OwnedFd, init: libc::pid_t) -> bool {
    match super::next_signal(sfd) {
        Some(libc::SIGCHLD) => {
            let mut status = 0;
            // SAFETY: non-blocking wait for our own child.
            unsafe { libc::waitpid(init, &mut status, libc::WNOHANG) == init }
        }
        None | Some(libc::SIGWINCH) => false,
        Some(sig) => sig != crate::pool::CLAIMED_SIGNAL,
    }
}

/// Waits, with no deadline, until the run that claimed this warm sandbox
/// has ended (killed or not: its pidfd says so), init dies, or a signal
/// asks us to end. The run ends the sandbox's processes itself before it
/// returns its exit code; this is what ends them when the run is killed.
fn watch_claimant(claimant: &Owner, sfd: &OwnedFd, init: libc::pid_t) {
    let Some(pidfd) = crate::pool::pidfd_of(claimant) else {
        return;
    };
    loop {
        let mut pfds = [
            libc::pollfd {
                fd: sfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds.
        if unsafe { libc::poll(pfds.as_mut_ptr(), 2, -1) } <= 0 {
            continue;
        }
        if pfds[1].revents != 0 {
            return;
        }
        if signal_ends_sandbox(sfd, init) {
            return;
        }
    }
}

/// Makes /dev/null our stdio and / our directory: a holder has no terminal
/// (and closes its creator's report pipe).
pub fn detach_stdio() {
    let null = c"/dev/null";
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
