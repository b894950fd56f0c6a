//! Running one sandbox: three processes, each with one job.
//!
//! * **supervisor** — the `agentkernel` process itself (re-executed as the
//!   single-threaded helper). It stays on the host: creates the cgroup,
//!   forwards signals, enforces `--timeout`, relays a terminal, and cleans
//!   up when the sandbox ends. It is never inside the sandbox.
//! * **init** — PID 1 of the new pid namespace, born inside the sandbox's
//!   cgroup (v2) or moving itself there once its root is built (v1; see
//!   `Cgroup::self_move_files` for why init, not the supervisor, does it).
//!   It enters fresh mount, uts and ipc namespaces and the network
//!   namespace a supervisor thread made meanwhile, builds the root,
//!   creates its cgroup namespace; then it
//!   forks the command and stays as a tiny init: reaps zombies, forwards
//!   signals, exits with the command's status. When it exits the kernel kills
//!   everything left in the namespace, and it dies if the supervisor does
//!   (PDEATHSIG), so a `kill -9` of agentkernel leaves no sandbox process.
//! * **command** — drops privileges and execs the user's command.
//!
//! Supervisor and init talk over a socketpair: the supervisor sends the
//! network namespace, then the cgroup's files (v1); with a network, init
//! says when it has joined the namespace (the supervisor attaches it while
//! init builds the root); init says "ready" (passing the terminal's master
//! side when there is one), and the supervisor answers "go".

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

use agentkernel_core::spec::Outcome;

use crate::cgroup::{Cgroup, CgroupError};
use crate::plan::Plan;
use crate::{caps, rootfs, sys};

/// Why the supervisor could not set up or watch a sandbox. (Init reports
/// its own failures itself, on stderr, and exits 125.)
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("cannot create the sandbox's {0} namespace: {1}")]
    Namespace(&'static str, #[source] io::Error),
    #[error("cannot create the sandbox's network: {0}")]
    Network(#[source] io::Error),
    #[error("cannot connect the sandbox's network: {0}")]
    Connect(#[source] io::Error),
    #[error("cannot talk to the sandbox's init: {0}")]
    Channel(#[source] io::Error),
    #[error("cannot watch the sandbox: {0}")]
    Supervise(#[source] io::Error),
}

impl crate::error::Fix for SandboxError {
    fn fix(&self) -> Option<&'static str> {
        match self {
            SandboxError::Cgroup(e) => crate::error::Fix::fix(e),
            SandboxError::Namespace(..) | SandboxError::Network(_) | SandboxError::Connect(_) => {
                Some("`agentkernel doctor` checks what native sandboxes need here")
            }
            SandboxError::Channel(_) | SandboxError::Supervise(_) => None,
        }
    }
}

const NETNS_READY: u8 = b'n';
const NETNS: u8 = b'e';
const CGROUP: u8 = b'c';
const DISK: u8 = b'd';
const READY: u8 = b'r';
pub(crate) const GO: u8 = b'g';
const FORWARDED: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

fn signal_set(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

fn supervisor_signals() -> libc::sigset_t {
    signal_set(&[
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGCHLD,
        libc::SIGWINCH,
    ])
}

/// Runs the plan to completion and cleans up. Must be called from a
/// single-threaded process (it forks).
pub fn run(plan: &Plan) -> Result<Outcome, SandboxError> {
    // v1: created by `start` while init builds its namespaces (see there).
    let mut cgroup = None;
    if !Cgroup::created_after_init(plan) {
        let scratch = ScratchGuard(plan);
        cgroup = Some(Cgroup::for_plan(plan)?);
        std::mem::forget(scratch);
    }
    // After a crash, `gc` finds this cgroup by the scratch dir's name (the id).
    let mut workspace_disk = None;
    let result = supervise(plan, &mut cgroup, &mut workspace_disk);
    clean_up_after_exit(plan, cgroup, workspace_disk);
    result
}

/// What is left once init is gone and the network lease with its port
/// rules is released (`supervise`): the cgroup and the scratch directory,
/// both named by this run's unique id, so no later command can trip over
/// them — the caller need not wait for their removal (rmdir of a cgroup
/// waits for the kernel to let go of it; unlinking the scratch dir's files
/// — the workspace's disk image, its upper layer — writes to the host's
/// disk). The scratch dir leaves `runs/` at once (one rename into
/// `finished/`), and a forked cleanup process removes it and the cgroup,
/// then collects what killed runs left, while this process returns the
/// command's exit code to its caller. The cleanup process outlives us
/// (reparented); if it is killed, gc collects `finished/` and the cgroup
/// like any dead run's.
fn clean_up_after_exit(plan: &Plan, cgroup: Option<Cgroup>, workspace_disk: Option<OwnedFd>) {
    let scratch = match crate::gc::finished_path(plan) {
        Some(finished) if std::fs::rename(&plan.scratch, &finished).is_ok() => finished,
        _ => plan.scratch.clone(),
    };
    // The workspace's disk is unmounted where its last fd closes: the
    // cleanup process closes its copy only once ours is closed (the pipe's
    // end of file), so the unmount is never on the caller's path.
    let ours_closed = workspace_disk.as_ref().and_then(|_| pipe().ok());
    let clean_up = || {
        if let Some(cgroup) = &cgroup {
            cgroup.remove();
        }
        let _ = agentkernel_core::state::remove_tree(&scratch);
        crate::trace::phase("cleaned up");
        // What killed runs left (cgroups, leases, scratch, dead kept sandboxes).
        if let Some(root) = plan.state_root() {
            let store = agentkernel_core::state::Store::new(root);
            crate::gc::orphaned_runs(&store);
            crate::kept::collect(&store);
        }
    };
    // SAFETY: fork while the port relay's threads may run: the child only
    // removes files and directories, takes no lock of ours those threads
    // could hold (glibc's fork keeps malloc usable in the child; it prints
    // nothing but trace lines) and ends with _exit.
    match unsafe { libc::fork() } {
        0 => {
            if let Some((read_end, write_end)) = ours_closed {
                drop(write_end);
                let _ = sys::read_byte(read_end.as_raw_fd());
            }
            detach_from_caller(); // closes the workspace's disk: it unmounts
            clean_up();
            // SAFETY: ends the cleanup process without running our exit path.
            unsafe { libc::_exit(0) }
        }
        pid if pid > 0 => {
            drop(workspace_disk);
            drop(ours_closed);
            crate::trace::phase("cleanup forked");
        }
        _ => {
            drop(workspace_disk);
            clean_up();
        }
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The cleanup process holds nothing of the caller's: a pipe on its stdout
/// or stderr would keep a `$(agentkernel run …)` waiting, and an inherited
/// listening socket would keep a published port busy. (Tracing keeps stderr,
/// so its last phase shows when the cleanup ended.)
fn detach_from_caller() {
    // SAFETY: plain fd calls on our own descriptors; a new session, so the
    // caller's terminal signals (already blocked here) never reach us.
    unsafe {
        libc::setsid();
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::dup2(null, 1);
            if !crate::trace::enabled() {
                libc::dup2(null, 2);
            }
        }
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
    }
}

/// Removes the run's scratch directory when an error ends the run before
/// `clean_up_after_exit` owns it (forgotten once it does).
struct ScratchGuard<'a>(&'a Plan);

impl Drop for ScratchGuard<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0.scratch);
    }
}

/// A signalfd for the signals a supervisor handles (blocked first).
pub(crate) fn supervisor_signalfd() -> Result<OwnedFd, SandboxError> {
    let signals = supervisor_signals();
    // SAFETY: blocking signals in our own (single) thread.
    unsafe { libc::sigprocmask(libc::SIG_BLOCK, &signals, std::ptr::null_mut()) };
    // SAFETY: creates a new fd from a valid set; owned below.
    let sfd = unsafe { libc::signalfd(-1, &signals, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if sfd < 0 {
        return Err(SandboxError::Supervise(io::Error::last_os_error()));
    }
    // SAFETY: just created, ours.
    Ok(unsafe { OwnedFd::from_raw_fd(sfd) })
}

/// Runs the sandbox until init exits; hands the workspace's disk mount
/// back in `workspace_disk` (see `Started`).
fn supervise(
    plan: &Plan,
    cgroup: &mut Option<Cgroup>,
    workspace_disk: &mut Option<OwnedFd>,
) -> Result<Outcome, SandboxError> {
    let sfd = supervisor_signalfd()?;
    let mut started = match start(plan, cgroup, &[&sfd])? {
        Ok(started) => started,
        // Init exited during setup (it printed why): its status is the outcome.
        Err(status) => return Ok(Outcome::Exited(status)),
    };
    let cgroup = cgroup.as_ref().expect("start created the cgroup");
    *workspace_disk = started.workspace_disk.take();
    let result = run_command(plan, cgroup, &started, &sfd);
    if let Some(link) = &started.link {
        link.release();
    }
    crate::trace::phase("network released");
    result
}

/// A sandbox whose init is ready and waiting for "go".
pub(crate) struct Started {
    /// Init's pid (in our, the host's, pid namespace).
    pub pid: libc::pid_t,
    pub sock: OwnedFd,
    pub link: Option<crate::net::Link>,
    /// The terminal's master side, when the plan asked for one.
    pub master: Option<OwnedFd>,
    /// The workspace's disk mount (see `disk::mount_detached`). Holding it
    /// keeps the filesystem alive after init's mount namespace is gone, so
    /// its unmount (and the loop device's release) happens where this fd is
    /// closed last — in a one-shot run's cleanup process, not in init's
    /// exit, which the caller waits for.
    pub workspace_disk: Option<OwnedFd>,
}

/// Creates the sandbox up to init's "ready": `Ok(Err(status))` when init
/// exited during setup (having printed why). `close_in_child` are fds of
/// ours init must not keep. `cgroup` is the sandbox's cgroup, or None for
/// `start` to create it once init exists (and leave it there for the
/// caller to remove, whatever the outcome).
pub(crate) fn start(
    plan: &Plan,
    cgroup: &mut Option<Cgroup>,
    close_in_child: &[&OwnedFd],
) -> Result<Result<Started, i32>, SandboxError> {
    let (ours, theirs) = socketpair().map_err(SandboxError::Channel)?;
    crate::trace::phase("forking init");
    let pid = fork_init(cgroup.as_ref()).map_err(|e| SandboxError::Namespace("pid", e))?;
    if pid.id == 0 {
        drop(ours);
        for fd in close_in_child {
            // SAFETY: closing our copy of an fd the parent keeps owning.
            unsafe { libc::close(fd.as_raw_fd()) };
        }
        init(plan, theirs);
    }
    drop(theirs);
    let born_in_cgroup = pid.born_in_cgroup;
    let pid = pid.id;
    // Until init is ready or reaped, an error of ours ends it.
    let init = UnreapedInit(pid);

    // Init's network namespace, the costliest of its namespaces to create
    // (~1 ms), is made by a thread of ours while init makes the others; the
    // thread hands it to init, which joins it.
    let netns = {
        let sock = ours.try_clone().map_err(SandboxError::Channel)?;
        let egress = plan.egress.clone();
        std::thread::spawn(move || -> io::Result<()> {
            // SAFETY: unshare of this thread's own network namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            // The egress proxy's socket, bound here: only this sandbox
            // can reach it.
            if let Some(egress) = &egress {
                crate::egress::listen_here(egress)?;
            }
            let ns = std::fs::File::open("/proc/thread-self/ns/net")?;
            send_message(&sock, NETNS, &[ns.as_raw_fd()])
        })
    };

    // The workspace's disk (loop device and ext4 mount: milliseconds of
    // waiting on the block layer) is mounted by another thread meanwhile;
    // it sends the mount to init, or nothing, for init to mount it itself
    // (a kernel without the new mount API) and report what fails.
    let disk = plan.workspace_disk.clone().map(|image| {
        let sock = ours.try_clone();
        std::thread::spawn(move || -> Option<OwnedFd> {
            let sock = sock.ok()?;
            let mount = crate::disk::mount_detached(&image).ok();
            crate::trace::phase("disk: workspace mounted (detached)");
            let fds: Vec<RawFd> = mount.iter().map(|m| m.as_raw_fd()).collect();
            send_message(&sock, DISK, &fds).ok()?;
            mount
        })
    });

    // On v1 the cgroup is created now, while init creates its namespaces
    // (creating it takes about a millisecond: a memory cgroup is costly);
    // init moves itself in once its root is built, before it forks.
    if cgroup.is_none() {
        match Cgroup::for_plan(plan) {
            Ok(created) => *cgroup = Some(created),
            Err(e) => return failed_during_setup(init, e.into()),
        }
    }
    // Init reads the network namespace first, then the cgroup.
    let netns = netns
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the network namespace thread panicked")));
    if let Err(e) = netns {
        return failed_during_setup(init, SandboxError::Network(e));
    }
    // (A rootless sandbox's cgroup has no directories: nothing to move into.)
    let self_move = match cgroup.as_ref() {
        Some(c) if !born_in_cgroup => c.self_move_files(),
        _ => Ok(Vec::new()),
    };
    let handed_over = self_move.map_err(SandboxError::from).and_then(|files| {
        let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        send_message(&ours, CGROUP, &fds).map_err(SandboxError::Channel)
    });
    if let Err(e) = handed_over {
        return failed_during_setup(init, e);
    }

    // With a network, init says when its namespace exists; the veth is set
    // up while init builds the root filesystem (the two take about as long).
    let link = if plan.network {
        if sys::read_byte(ours.as_raw_fd()).ok().flatten() != Some(NETNS_READY) {
            return Ok(Err(init.wait()));
        }
        crate::trace::phase("network: init's namespace exists");
        match crate::net::connect(plan, pid) {
            Ok(link) => {
                if plan.action == crate::plan::Action::Run {
                    link.print_ports();
                }
                Some(link)
            }
            Err(e) => {
                return failed_during_setup(init, SandboxError::Connect(e));
            }
        }
    } else {
        None
    };
    crate::trace::phase("network and cgroup ready");
    let ready = recv_ready(&ours);
    let workspace_disk = disk.and_then(|d| d.join().ok().flatten());
    match ready {
        Ok(master) => Ok(Ok(Started {
            pid: init.ready(),
            sock: ours,
            link,
            master,
            workspace_disk,
        })),
        Err(_) => {
            let status = init.wait();
            if let Some(link) = &link {
                link.release();
            }
            Ok(Err(status))
        }
    }
}

/// A forked init: `id` is 0 in the child.
struct Forked {
    id: libc::pid_t,
    /// Created inside the sandbox's cgroup (v2's `CLONE_INTO_CGROUP`), so
    /// init need not move itself there.
    born_in_cgroup: bool,
}

/// The arguments of `clone3` up to `cgroup` (the kernel's
/// `CLONE_ARGS_SIZE_VER2`, 88 bytes).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Forks init straight into a new pid namespace (clone, not unshare: after
/// unshare(CLONE_NEWPID) this process could no longer start threads, which
/// the network setup uses to enter the sandbox's namespace) and, on cgroup
/// v2, straight into the sandbox's cgroup. Kernels before 5.7 refuse
/// `CLONE_INTO_CGROUP`; init then moves itself (see `cgroup::move_self`),
/// as it always does on v1.
fn fork_init(cgroup: Option<&Cgroup>) -> io::Result<Forked> {
    if let Some(dir) = cgroup.and_then(Cgroup::v2_dir_fd) {
        let mut args = CloneArgs {
            flags: libc::CLONE_NEWPID as u64 | CLONE_INTO_CGROUP,
            exit_signal: libc::SIGCHLD as u64,
            cgroup: dir.as_raw_fd() as u64,
            ..Default::default()
        };
        // SAFETY: clone3 without CLONE_VM and without a stack behaves as
        // fork; this process is single-threaded (the helper re-exec
        // guarantees it), so the child may run arbitrary code.
        let id = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &mut args as *mut CloneArgs,
                std::mem::size_of::<CloneArgs>(),
            )
        } as libc::pid_t;
        if id >= 0 {
            return Ok(Forked {
                id,
                born_in_cgroup: true,
            });
        }
    }
    // SAFETY: as above, a fork-like clone of a single-threaded process.
    let id = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_NEWPID | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    } as libc::pid_t;
    if id < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Forked {
        id,
        born_in_cgroup: false,
    })
}

/// Init, forked and not yet ready: ended (SIGKILL, then reaped) when
/// dropped, so an error of ours during setup leaves no sandbox behind.
struct UnreapedInit(libc::pid_t);

impl UnreapedInit {
    /// Init is ready: its pid is the caller's to wait for from here.
    fn ready(self) -> libc::pid_t {
        let pid = self.0;
        std::mem::forget(self);
        pid
    }

    /// Init exits by itself (it printed why): its status.
    fn wait(self) -> i32 {
        wait_for(self.ready())
    }
}

impl Drop for UnreapedInit {
    fn drop(&mut self) {
        kill(self.0, libc::SIGKILL);
        wait_for(self.0);
    }
}

/// A step of ours failed while init was setting up. If init itself failed
/// first (it printed why, and took its namespaces with it), its status is
/// the outcome and our error is only a consequence; otherwise ours is the
/// error (and dropping `init` ends it).
fn failed_during_setup(
    init: UnreapedInit,
    e: SandboxError,
) -> Result<Result<Started, i32>, SandboxError> {
    for _ in 0..40 {
        let mut status = 0;
        // SAFETY: non-blocking wait for our own child.
        if unsafe { libc::waitpid(init.0, &mut status, libc::WNOHANG) } == init.0 {
            init.ready();
            return Ok(Err(decode_status(status)));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Err(e)
}

/// From "go" to the command's end.
fn run_command(
    plan: &Plan,
    cgroup: &Cgroup,
    started: &Started,
    sfd: &OwnedFd,
) -> Result<Outcome, SandboxError> {
    let master = started
        .master
        .as_ref()
        .map(|m| m.try_clone())
        .transpose()
        .map_err(SandboxError::Supervise)?;
    let _raw = match (&master, plan.tty) {
        (Some(m), true) => {
            copy_window_size(m.as_raw_fd());
            agentkernel_core::terminal::RawMode::enable(0)
        }
        _ => None,
    };
    // Traced before the write: once "go" is sent, init's own phases may be
    // stamped before this thread runs again.
    crate::trace::phase("go");
    sys::write_all_fd(started.sock.as_raw_fd(), &[GO]).map_err(SandboxError::Channel)?;
    let (code, timed_out) = watch(sfd, started.pid, master, plan.timeout, &mut || {})
        .map_err(SandboxError::Supervise)?;
    crate::trace::phase("init exited");
    Ok(if timed_out {
        Outcome::TimedOut
    } else if code == 137 && cgroup.oom_kills() > 0 {
        Outcome::OutOfMemory
    } else {
        Outcome::Exited(code)
    })
}

/// Waits for our child `pid` while forwarding signals, enforcing `timeout`
/// (SIGKILL to `pid`'s process group) and relaying a terminal. `tick` runs
/// at least every few seconds. Returns the exit code and whether the
/// timeout struck.
pub(crate) fn watch(
    sfd: &OwnedFd,
    pid: libc::pid_t,
    master: Option<OwnedFd>,
    timeout: Option<std::time::Duration>,
    tick: &mut dyn FnMut(),
) -> io::Result<(i32, bool)> {
    const TICK_MS: i32 = 5_000;
    let started = Instant::now();
    let mut state = State {
        target: pid,
        exit: None,
        timed_out: false,
        interrupts: 0,
    };
    let mut relay = master.map(|m| Relay {
        master: m,
        stdin_open: true,
        output_open: true,
    });
    loop {
        if let Some(code) = state.exit {
            if let Some(r) = relay.as_mut() {
                r.drain();
            }
            return Ok((code, state.timed_out));
        }
        let timeout_ms = match timeout {
            Some(limit) if !state.timed_out => {
                let left = limit.saturating_sub(started.elapsed());
                if left.is_zero() {
                    state.timed_out = true;
                    // The whole tree: the command leads its own session.
                    kill(-pid, libc::SIGKILL);
                    kill(pid, libc::SIGKILL);
                    continue;
                }
                (left.as_millis().min(i32::MAX as u128) as i32 + 1).min(TICK_MS)
            }
            _ => TICK_MS,
        };
        let mut fds = vec![libc::pollfd {
            fd: sfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        if let Some(r) = &relay {
            r.add_poll(&mut fds);
        }
        // SAFETY: `fds` is a valid array of pollfd for its length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            kill(pid, libc::SIGKILL);
            wait_for(pid);
            return Err(e);
        }
        if n == 0 {
            tick();
        }
        if fds[0].revents != 0 {
            handle_signals(sfd, &mut state, relay.as_ref());
        }
        if let Some(r) = relay.as_mut() {
            r.pump(&fds[1..]);
        }
    }
}

struct State {
    /// The process we wait for and signal (init, or an exec'd command).
    target: libc::pid_t,
    exit: Option<i32>,
    timed_out: bool,
    interrupts: u32,
}

/// The next signal queued on a (non-blocking) signalfd, if any.
pub(crate) fn next_signal(sfd: &OwnedFd) -> Option<libc::c_int> {
    // SAFETY: reads one siginfo record into a zeroed struct we own.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: the buffer is exactly one record long.
    let n = unsafe {
        libc::read(
            sfd.as_raw_fd(),
            (&mut info as *mut libc::signalfd_siginfo).cast(),
            size,
        )
    };
    (n == size as isize).then_some(info.ssi_signo as libc::c_int)
}

fn handle_signals(sfd: &OwnedFd, state: &mut State, relay: Option<&Relay>) {
    while let Some(sig) = next_signal(sfd) {
        match sig {
            libc::SIGCHLD => {
                let mut status = 0;
                // SAFETY: waits for our own child without blocking.
                let r = unsafe { libc::waitpid(state.target, &mut status, libc::WNOHANG) };
                if r == state.target {
                    state.exit = Some(decode_status(status));
                }
            }
            libc::SIGWINCH => {
                if let Some(r) = relay {
                    copy_window_size(r.master.as_raw_fd());
                }
            }
            _ => {
                // Like `docker run`: the first two are forwarded, the third kills.
                if sig == libc::SIGINT || sig == libc::SIGTERM {
                    state.interrupts += 1;
                }
                if state.interrupts >= 3 {
                    kill(state.target, libc::SIGKILL);
                } else {
                    kill(state.target, sig);
                }
            }
        }
    }
}

pub(crate) fn decode_status(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        125
    }
}

pub(crate) fn wait_for(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return decode_status(status);
        }
        if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return 125;
        }
    }
}

pub(crate) fn kill(pid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: plain integers.
    unsafe { libc::kill(pid, sig) };
}

pub(crate) fn copy_window_size(master: RawFd) {
    if let Some((rows, cols)) = agentkernel_core::terminal::size(0) {
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads the winsize we pass.
        unsafe { libc::ioctl(master, libc::TIOCSWINSZ, &ws) };
    }
}

/// Copies between our terminal and the sandbox's pseudo-terminal.
struct Relay {
    master: OwnedFd,
    stdin_open: bool,
    output_open: bool,
}

impl Relay {
    fn add_poll(&self, fds: &mut Vec<libc::pollfd>) {
        fds.push(libc::pollfd {
            fd: if self.stdin_open { 0 } else { -1 },
            events: libc::POLLIN,
            revents: 0,
        });
        fds.push(libc::pollfd {
            fd: if self.output_open {
                self.master.as_raw_fd()
            } else {
                -1
            },
            events: libc::POLLIN,
            revents: 0,
        });
    }

    fn pump(&mut self, fds: &[libc::pollfd]) {
        let mut buf = [0u8; 16384];
        if fds[0].revents != 0 {
            match read(0, &mut buf) {
                Some(n) if n > 0 => {
                    let _ = sys::write_all_fd(self.master.as_raw_fd(), &buf[..n]);
                }
                _ => self.stdin_open = false,
            }
        }
        if fds[1].revents != 0 {
            match read(self.master.as_raw_fd(), &mut buf) {
                Some(n) if n > 0 => {
                    let _ = sys::write_all_fd(1, &buf[..n]);
                }
                // EIO: every slave is closed — the sandbox is done with the terminal.
                _ => self.output_open = false,
            }
        }
    }

    /// What the command wrote just before it exited.
    fn drain(&mut self) {
        // SAFETY: make the master non-blocking so draining stops when empty.
        unsafe { libc::fcntl(self.master.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        let mut buf = [0u8; 16384];
        while self.output_open {
            match read(self.master.as_raw_fd(), &mut buf) {
                Some(n) if n > 0 => {
                    let _ = sys::write_all_fd(1, &buf[..n]);
                }
                _ => self.output_open = false,
            }
        }
    }
}

fn read(fd: RawFd, buf: &mut [u8]) -> Option<usize> {
    // SAFETY: reads into a buffer we own, bounded by its length.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    (n >= 0).then_some(n as usize)
}

pub(crate) fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two fds into the array.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } != 0
    {
        return Err(sys::context("socketpair")(io::Error::last_os_error()));
    }
    // SAFETY: both fds were just created and are ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Most fds one message carries: a v1 cgroup's `tasks` files, one per
/// hierarchy (four at most today).
const MAX_FDS: usize = 8;

/// The socketpair's message: one byte, and room for fds (SCM_RIGHTS).
struct Message {
    byte: [u8; 1],
    control: Vec<u8>,
}

impl Message {
    fn new(byte: u8) -> Message {
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space =
            unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) } as usize;
        Message {
            byte: [byte],
            control: vec![0u8; space],
        }
    }

    /// Calls `f` with a msghdr pointing at our buffers (with `fd_room`
    /// bytes of the control buffer, none when 0).
    fn with_header<R>(&mut self, fd_room: usize, f: impl FnOnce(&mut libc::msghdr) -> R) -> R {
        let mut iov = libc::iovec {
            iov_base: self.byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        // SAFETY: zeroed msghdr, then filled with pointers to live buffers.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if fd_room > 0 {
            msg.msg_control = self.control.as_mut_ptr().cast();
            msg.msg_controllen = fd_room.min(self.control.len());
        }
        f(&mut msg)
    }
}

/// Sends one byte with `fds` attached (at most [`MAX_FDS`]).
pub(crate) fn send_message(sock: &OwnedFd, byte: u8, fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::other("too many fds for one message"));
    }
    let bytes = std::mem::size_of_val(fds);
    let room = if fds.is_empty() {
        0
    } else {
        // SAFETY: CMSG_SPACE is a pure size computation.
        unsafe { libc::CMSG_SPACE(bytes as u32) as usize }
    };
    Message::new(byte).with_header(room, |msg| {
        if !fds.is_empty() {
            // SAFETY: the control buffer has room for MAX_FDS fds (Message::new).
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(bytes as u32) as usize;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr().cast::<u8>(),
                    libc::CMSG_DATA(cmsg),
                    bytes,
                );
            }
        }
        // SAFETY: msg points at live buffers for the duration of the call.
        if unsafe { libc::sendmsg(sock.as_raw_fd(), msg, 0) } != 1 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    })
}

/// Receives one message: its byte and the fds attached to it. An error
/// when the other side is gone.
pub(crate) fn recv_message(sock: &OwnedFd) -> io::Result<(u8, Vec<OwnedFd>)> {
    let mut message = Message::new(0);
    let room = message.control.len();
    let (n, fds) = message.with_header(room, |msg| loop {
        // SAFETY: msg points at live buffers.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        let mut fds = Vec::new();
        // SAFETY: walking the control messages the kernel filled in; each
        // fd in them was just installed for us and is owned from here on.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg);
                    let len = (*cmsg).cmsg_len - (data as usize - cmsg as usize);
                    for i in 0..len / std::mem::size_of::<RawFd>() {
                        let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                        fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(msg, cmsg);
            }
        }
        break (n, fds);
    });
    if n != 1 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the other side exited",
        ));
    }
    Ok((message.byte[0], fds))
}

/// Waits for init's READY; returns the terminal master it passed, if any.
fn recv_ready(sock: &OwnedFd) -> io::Result<Option<OwnedFd>> {
    match recv_message(sock)? {
        (READY, fds) => Ok(fds.into_iter().next()),
        _ => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "init exited")),
    }
}

// ---------------------------------------------------------------- init

fn die(what: &str, e: impl std::fmt::Display) -> ! {
    eprintln!("agentkernel: sandbox setup failed: {what}: {e}");
    // SAFETY: ends the forked child without unwinding into the parent's state.
    unsafe { libc::_exit(125) }
}

/// Init's end of the socketpair. The supervisor's threads send as they
/// finish, so a message init asks for may arrive after others, which wait
/// here until asked for.
struct Inbox {
    sock: OwnedFd,
    early: Vec<(u8, Vec<OwnedFd>)>,
}

impl Inbox {
    /// The fds of the message `kind`; None when the supervisor is gone.
    fn take(&mut self, kind: u8) -> Option<Vec<OwnedFd>> {
        if let Some(i) = self.early.iter().position(|(k, _)| *k == kind) {
            return Some(self.early.remove(i).1);
        }
        loop {
            match recv_message(&self.sock) {
                Ok((k, fds)) if k == kind => return Some(fds),
                Ok(other) => self.early.push(other),
                Err(_) => return None,
            }
        }
    }
}

/// PID 1 of the sandbox. Never returns.
fn init(plan: &Plan, sock: OwnedFd) -> ! {
    // SAFETY: integer-only prctl; dies with the supervisor.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
    // Of the descriptors the helper had — the caller's among them, which
    // reach it through its exec — init needs only its socket: the rest go
    // now, not only once the command runs (everything else init uses it
    // opens itself or receives on the socket).
    let own = sock.as_raw_fd() as u32;
    // SAFETY: closes fds from 3 up around our socket; none is in use here,
    // and none is owned by a value init drops (it never returns).
    unsafe {
        if own > 3 {
            libc::syscall(libc::SYS_close_range, 3u32, own - 1, 0u32);
        }
        libc::syscall(libc::SYS_close_range, own + 1, u32::MAX, 0u32);
    }
    let flags = libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
    // SAFETY: unshare with namespace flags; we are single-threaded.
    if unsafe { libc::unshare(flags) } != 0 {
        die("creating namespaces", io::Error::last_os_error());
    }
    let mut inbox = Inbox {
        sock,
        early: Vec::new(),
    };
    // The network namespace the supervisor made meanwhile (see `start`).
    match inbox.take(NETNS) {
        Some(fds) if fds.len() == 1 => {
            // SAFETY: setns with the fd of a network namespace we were sent.
            if unsafe { libc::setns(fds[0].as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                die("joining the network namespace", io::Error::last_os_error());
            }
        }
        // SAFETY: ends the forked child: the supervisor is gone or failed.
        _ => unsafe { libc::_exit(125) },
    }
    let host = sys::cstr(&plan.hostname);
    // SAFETY: pointer and length of a valid C string.
    if unsafe { libc::sethostname(host.as_ptr(), plan.hostname.len()) } != 0 {
        die("setting the hostname", io::Error::last_os_error());
    }
    if plan.network {
        // The supervisor connects the namespace (lo and eth0) meanwhile.
        if let Err(e) = sys::write_all_fd(inbox.sock.as_raw_fd(), &[NETNS_READY]) {
            die("talking to agentkernel", e);
        }
    } else if let Err(e) = crate::net::loopback_up() {
        die("bringing up loopback", e);
    }
    crate::trace::phase("init: namespaces created");
    let mut workspace_disk = || inbox.take(DISK).and_then(|fds| fds.into_iter().next());
    if let Err(e) = rootfs::build(plan, &mut workspace_disk) {
        die("building the root filesystem", e);
    }
    crate::trace::phase("init: root built");
    // Into the sandbox's cgroup before anything is forked, and before the
    // cgroup namespace is created (so it is rooted at the sandbox's cgroup).
    match inbox.take(CGROUP) {
        Some(files) => {
            let files: Vec<std::fs::File> = files.into_iter().map(std::fs::File::from).collect();
            if let Err(e) = crate::cgroup::move_self(&files) {
                die("joining the sandbox's cgroup", e);
            }
        }
        // SAFETY: ends the forked child: the supervisor is gone or failed.
        _ => unsafe { libc::_exit(125) },
    }
    crate::trace::phase("init: in the cgroup");
    // SAFETY: unshare with a namespace flag; we are single-threaded.
    if unsafe { libc::unshare(libc::CLONE_NEWCGROUP) } != 0 {
        die("creating the cgroup namespace", io::Error::last_os_error());
    }
    if let Err(e) = rootfs::enter(plan) {
        die("entering the root filesystem", e);
    }
    // A kept sandbox's terminals are allocated per command (see join.rs).
    let terminal = if plan.tty && plan.action == crate::plan::Action::Run {
        match open_terminal() {
            Ok(t) => Some(t),
            Err(e) => die("allocating a terminal", e),
        }
    } else {
        None
    };
    crate::trace::phase("init: ready");
    let sock = inbox.sock;
    if let Err(e) = send_message(
        &sock,
        READY,
        terminal.as_ref().map(|(m, _)| m.as_raw_fd()).as_slice(),
    ) {
        die("talking to agentkernel", e);
    }
    match sys::read_byte(sock.as_raw_fd()) {
        Ok(Some(GO)) => {}
        // The supervisor is gone or said no: nothing to run.
        _ => {
            // SAFETY: ends the forked child.
            unsafe { libc::_exit(125) }
        }
    }
    drop(sock);

    // A kept sandbox's init runs no command of its own: commands join it.
    let child = if plan.action == crate::plan::Action::Run {
        // SAFETY: single-threaded; the child only execs (via command::exec).
        let child = unsafe { libc::fork() };
        if child < 0 {
            die("fork", io::Error::last_os_error());
        }
        if child == 0 {
            become_command(plan, terminal.map(|(_, slave)| slave));
        }
        drop(terminal);
        Some(child)
    } else {
        None
    };
    // From here init needs only stdio: the caller's other descriptors (which
    // reach the helper through its exec) must not stay open in the
    // sandbox's PID 1 for as long as the sandbox lives.
    // SAFETY: closes every fd from 3 up in this process; none is in use.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    // Init keeps the command's capabilities (so the command may still
    // PTRACE_TRACEME with init as its tracer-parent, as under Docker) plus
    // KILL, to signal a command that runs as another user; nothing more.
    let mut keep: Vec<u32> = plan
        .capabilities
        .iter()
        .filter_map(|c| caps::number(c))
        .collect();
    keep.push(caps::KILL);
    // Fail closed: a sandbox whose PID 1 kept more than this must not run.
    // Init's exit ends the pid namespace, the command with it.
    if let Err(e) = caps::limit_bounding_set(&keep).and_then(|()| caps::set(&keep)) {
        die("dropping init's capabilities", e);
    }
    // SAFETY: integer-only prctl: nothing in the sandbox may ptrace or read init.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0) };
    reap_until(child)
}

/// The pseudo-terminal, allocated in the sandbox's own devpts so `tty` and
/// `/proc/self/fd` show sandbox paths; the master goes to the supervisor.
pub(crate) fn open_terminal() -> io::Result<(OwnedFd, OwnedFd)> {
    // SAFETY: plain libc calls on fds we own.
    unsafe {
        let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        if master < 0 {
            return Err(io::Error::last_os_error());
        }
        let master = OwnedFd::from_raw_fd(master);
        if libc::grantpt(master.as_raw_fd()) != 0 || libc::unlockpt(master.as_raw_fd()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut name = [0 as libc::c_char; 128];
        if libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let slave = libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        if slave < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((master, OwnedFd::from_raw_fd(slave)))
    }
}

pub(crate) fn become_command(plan: &Plan, slave: Option<OwnedFd>) -> ! {
    // SAFETY: resetting our own signal state before exec: the mask we
    // inherited, and SIGPIPE, which Rust ignores and exec would keep ignored.
    unsafe {
        let empty = signal_set(&[]);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::setsid();
    }
    if let Some(slave) = slave {
        let fd = slave.as_raw_fd();
        // SAFETY: the slave becomes our controlling terminal and stdio.
        unsafe {
            libc::ioctl(fd, libc::TIOCSCTTY, 0);
            libc::dup2(fd, 0);
            libc::dup2(fd, 1);
            libc::dup2(fd, 2);
        }
    }
    // Nothing of ours beyond stdio reaches the command.
    // SAFETY: closes every fd from 3 up in this process.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    crate::command::exec(plan)
}

/// Init's loop: reap every child; with a command, forward the supervisor's
/// signals to it and exit with its status when it ends; without one (a kept
/// sandbox), exit when the holder says so (any forwarded signal).
fn reap_until(command: Option<libc::pid_t>) -> ! {
    let waited = signal_set(&[
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGCHLD,
    ]);
    // SAFETY: blocking (already blocked, inherited) signals we wait for.
    unsafe { libc::sigprocmask(libc::SIG_BLOCK, &waited, std::ptr::null_mut()) };
    loop {
        // SAFETY: waits for a signal in the blocked set.
        let sig = unsafe { libc::sigwaitinfo(&waited, std::ptr::null_mut()) };
        if sig == libc::SIGCHLD {
            loop {
                let mut status = 0;
                // SAFETY: reaps any child without blocking.
                let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
                if pid <= 0 {
                    break;
                }
                if Some(pid) == command {
                    // SAFETY: PID 1 exiting ends the namespace: the kernel kills the rest.
                    unsafe { libc::_exit(decode_status(status)) }
                }
            }
        } else if FORWARDED.contains(&sig) {
            match command {
                Some(command) => kill(command, sig),
                // SAFETY: ends the kept sandbox: the kernel kills the rest.
                None => unsafe { libc::_exit(0) },
            }
        }
    }
}
