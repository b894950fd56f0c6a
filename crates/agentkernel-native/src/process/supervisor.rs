//! The supervisor: creates the sandbox (init, its network and cgroup),
//! says "go", waits for init while forwarding signals and enforcing
//! `--timeout`, and cleans up when the sandbox ends.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use agentkernel_core::spec::Outcome;

use super::channel::{socketpair, Message};
use super::cleanup;
use super::init::init;
use super::relay::copy_window_size;
use super::{decode_status, kill, supervisor_signalfd, wait_for, watch, Ended};
use crate::cgroup::{Cgroup, CgroupError};
use crate::plan::Plan;

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
    let mut left = Leftovers::default();
    let result = supervise(plan, &mut cgroup, &mut left);
    cleanup::retire_scratch_dir(plan);
    // Started while the command ran; or now, when the run ended before "go".
    let started = left.cleanup.take().or_else(|| {
        cleanup::start(
            plan,
            cgroup.as_ref(),
            left.init.as_ref(),
            left.workspace_disk.as_ref(),
        )
    });
    // Ours closed first: the workspace disk unmounts in the cleanup process.
    drop(left.workspace_disk.take());
    match started {
        Some(cleanup) => cleanup.begin_at_exit(),
        None => cleanup::clean_up_here(
            plan,
            cgroup.as_ref(),
            left.init.as_ref().map(AsFd::as_fd),
            None,
        ),
    }
    result
}

/// What a one-shot run's cleanup process (`cleanup.rs`) takes over from
/// the supervisor.
#[derive(Default)]
pub(crate) struct Leftovers {
    /// The workspace's disk mount (see `Started::workspace_disk`).
    workspace_disk: Option<OwnedFd>,
    /// A pidfd of init: the cleanup waits for init's exit (after its
    /// report of the command's status, see `init::reap_until`) before it
    /// removes the cgroup init is in.
    init: Option<OwnedFd>,
    /// The cleanup process, once started.
    cleanup: Option<cleanup::Cleanup>,
}

/// Removes the run's scratch directory when an error ends the run before
/// `clean_up_after_exit` owns it (forgotten once it does).
pub(crate) struct ScratchGuard<'a>(&'a Plan);

impl Drop for ScratchGuard<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0.scratch);
        if self.0.workspace_device.is_some() {
            // The claimed pool device's image went with the scratch.
            crate::disk_pool::sweep();
        }
    }
}

/// Runs the sandbox until the command's status is known; hands what the
/// cleanup takes over back in `left`.
pub(crate) fn supervise(
    plan: &Plan,
    cgroup: &mut Option<Cgroup>,
    left: &mut Leftovers,
) -> Result<Outcome, SandboxError> {
    let sfd = supervisor_signalfd()?;
    let mut started = match start(plan, cgroup, &[&sfd])? {
        Ok(started) => started,
        // Init exited during setup (it printed why): its status is the outcome.
        Err(status) => return Ok(Outcome::Exited(status)),
    };
    let cgroup = cgroup.as_ref().expect("start created the cgroup");
    left.workspace_disk = started.workspace_disk.take();
    // Init is our unreaped child: its pid is its own.
    left.init = crate::sys::pidfd_open(started.pid).ok();
    let result = run_command(plan, cgroup, &started, &sfd, || {
        left.cleanup = cleanup::start(
            plan,
            Some(cgroup),
            left.init.as_ref(),
            left.workspace_disk.as_ref(),
        );
    })
    .map(|(outcome, ended)| {
        if !ended.reaped && left.init.is_none() {
            // No pidfds (Linux before 5.3): init's exit is waited for here.
            wait_for(started.pid);
        }
        outcome
    });
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
    // As root, the disk keeper may have a network namespace made ahead
    // (disk_keeper.rs): asked for now, it answers while init is forked.
    let premade_netns = plan
        .state_root()
        .filter(|_| plan.rootless.is_none() && crate::disk_keeper::enabled())
        .and_then(|root| crate::disk_keeper::ask_netns(&root));
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
    // The keeper has usually answered during the fork: init gets its
    // network namespace now, before any thread of ours competes with it
    // for the CPU (on two cores, a thread's start delayed it ~0.3 ms).
    let answered = premade_netns.map(crate::disk_keeper::Asked::netns_if_answered);
    let (premade_netns, premade_netns_asked) = match answered {
        Some(Ok(netns)) => (netns, None),
        Some(Err(still_asked)) => (None, Some(still_asked)),
        None => (None, None),
    };
    if let Some(netns) = &premade_netns {
        if let Err(e) = send_netns(netns, &ours) {
            return failed_during_setup(init, SandboxError::Network(e));
        }
    }

    // Init's network namespace, the costliest of its namespaces to create
    // (~1 ms), is made by a thread of ours while init makes the others; the
    // thread hands it to init, which joins it.
    // With a bridge, the same thread then connects the namespace (veth,
    // address, routes: ~3 ms) at once, from the host's namespace, by the
    // namespace's file: init need not have joined it.
    let netns = {
        let sock = ours.try_clone().map_err(SandboxError::Channel)?;
        let egress = plan.egress.clone();
        let loopback_only = !plan.network;
        let connect = if crate::net::connects_before_init_joins(plan) {
            let host = std::fs::File::open("/proc/thread-self/ns/net");
            Some((plan.clone(), host.map_err(SandboxError::Network)?))
        } else {
            None
        };
        std::thread::spawn(move || -> Result<Option<crate::net::Link>, SandboxError> {
            let created = (|| -> io::Result<std::fs::File> {
                // The keeper answered after the fork: init waits for
                // nothing else, so it goes first.
                let answered_late = premade_netns_asked.and_then(crate::disk_keeper::Asked::netns);
                if let Some(netns) = &answered_late {
                    send_netns(netns, &sock)?;
                }
                let premade = premade_netns.or(answered_late);
                let entered = match &premade {
                    // SAFETY: setns of this thread only, into the fresh
                    // namespace the keeper sent (checked to be a netns).
                    Some(netns) => unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) },
                    // SAFETY: unshare of this thread's own network namespace.
                    None => unsafe { libc::unshare(libc::CLONE_NEWNET) },
                };
                if entered != 0 {
                    return Err(io::Error::last_os_error());
                }
                if premade.is_some() {
                    // Made with loopback up (disk_keeper::make_netns).
                    crate::trace::phase("network: namespace taken from the keeper");
                } else if loopback_only {
                    // The whole network of a `--no-network` sandbox, here
                    // rather than in init (a network's link brings it up).
                    crate::net::loopback_up()?;
                } else if connect.is_some() {
                    // Made here for the bridge (the keeper's come so).
                    crate::net::no_ipv6_on_new_links()?;
                }
                // The egress proxy's socket, bound here: only this sandbox
                // can reach it.
                if let Some(egress) = &egress {
                    crate::egress::listen_here(egress)?;
                }
                let ns = std::fs::File::open("/proc/thread-self/ns/net")?;
                if premade.is_none() {
                    Message::Netns(ns.try_clone()?.into()).send(&sock)?;
                    crate::trace::phase("network: namespace sent");
                }
                Ok(ns)
            })()
            .map_err(SandboxError::Network)?;
            let Some((plan, host)) = connect else {
                return Ok(None);
            };
            // Still in the namespace: a netlink socket bound to it costs
            // nothing here (from the host's, a thread has to join it).
            let created =
                agentkernel_net::SandboxNetns::current(created).map_err(SandboxError::Network)?;
            // SAFETY: setns of this thread only, back to the host's namespace.
            if unsafe { libc::setns(host.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(SandboxError::Network(io::Error::last_os_error()));
            }
            let link = crate::net::connect_netns(&plan, &created).map_err(SandboxError::Connect)?;
            crate::trace::phase("network: connected");
            Ok(Some(link))
        })
    };

    // The workspace's disk (loop device and ext4 mount: milliseconds of
    // waiting on the block layer) is mounted by another thread meanwhile;
    // it sends the mount to init, or nothing, for init to mount it itself
    // (a kernel without the new mount API) and report what fails.
    let disk = plan.workspace_disk.clone().map(|image| {
        let sock = ours.try_clone();
        let source = match (
            plan.workspace_held,
            plan.state_root(),
            plan.workspace_disk_bytes,
        ) {
            (true, Some(state_root), Some(bytes)) => {
                crate::disk::DiskSource::Held { state_root, bytes }
            }
            _ => crate::disk::DiskSource::Image {
                pooled: plan.workspace_device.clone(),
            },
        };
        std::thread::spawn(move || -> Option<OwnedFd> {
            let sock = sock.ok()?;
            let message = Message::Disk(crate::disk::mount_for_run(&image, source).ok());
            crate::trace::phase("disk: workspace mounted (detached)");
            message.send(&sock).ok()?;
            // Ours too: see `Started::workspace_disk`.
            let Message::Disk(mount) = message else {
                return None;
            };
            mount
        })
    });

    // On v1 the cgroup is created now, while init creates its namespaces
    // (creating it takes about a millisecond: a memory cgroup is costly);
    // init moves itself in once its root is built, before it forks.
    // A failure before the thread is joined: the lease it may have taken
    // is released here, not left for gc.
    let abandon =
        |netns: std::thread::JoinHandle<Result<Option<crate::net::Link>, SandboxError>>| {
            if let Ok(Ok(Some(link))) = netns.join() {
                link.release();
            }
        };
    if cgroup.is_none() {
        match Cgroup::for_plan(plan) {
            Ok(created) => {
                *cgroup = Some(created);
                crate::trace::phase("cgroup made");
            }
            Err(e) => {
                abandon(netns);
                return failed_during_setup(init, e.into());
            }
        }
    }
    // (A rootless sandbox's cgroup has no directories: nothing to move into.)
    // Init takes its messages in its own order (see `init::Inbox`).
    let self_move = match cgroup.as_ref() {
        Some(c) if !born_in_cgroup => c.self_move_files(),
        _ => Ok(Vec::new()),
    };
    let handed_over = self_move.map_err(SandboxError::from).and_then(|files| {
        Message::Cgroup(files)
            .send(&ours)
            .map_err(SandboxError::Channel)
    });
    if let Err(e) = handed_over {
        abandon(netns);
        return failed_during_setup(init, e);
    }
    let connected = netns.join().unwrap_or_else(|_| {
        Err(SandboxError::Network(io::Error::other(
            "the network namespace thread panicked",
        )))
    });
    let connected = match connected {
        Ok(connected) => connected,
        Err(e) => return failed_during_setup(init, e),
    };

    // Rootless, init says when it is in its namespace, and slirp4netns is
    // attached to it while init builds the root filesystem.
    let link = if plan.network && connected.is_none() {
        if !matches!(Message::recv(&ours), Ok(Message::NetnsJoined)) {
            return Ok(Err(init.wait()));
        }
        crate::trace::phase("network: init's namespace exists");
        match crate::net::connect(plan, pid) {
            Ok(link) => Some(link),
            Err(e) => {
                return failed_during_setup(init, SandboxError::Connect(e));
            }
        }
    } else {
        connected
    };
    if let (Some(link), crate::plan::Action::Run) = (&link, &plan.action) {
        link.print_ports();
    }
    crate::trace::phase("network and cgroup ready");
    let ready = Message::recv(&ours);
    let workspace_disk = disk.and_then(|d| d.join().ok().flatten());
    match ready {
        Ok(Message::Ready(master)) => Ok(Ok(Started {
            pid: init.ready(),
            sock: ours,
            link,
            master,
            workspace_disk,
        })),
        _ => {
            let status = init.wait();
            if let Some(link) = &link {
                link.release();
            }
            Ok(Err(status))
        }
    }
}

/// A forked init: `id` is 0 in the child.
pub(crate) struct Forked {
    id: libc::pid_t,
    /// Created inside the sandbox's cgroup (v2's `CLONE_INTO_CGROUP`), so
    /// init need not move itself there.
    born_in_cgroup: bool,
}

/// The arguments of `clone3` up to `cgroup` (the kernel's
/// `CLONE_ARGS_SIZE_VER2`, 88 bytes).
#[repr(C)]
#[derive(Default)]
pub(crate) struct CloneArgs {
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

pub(crate) const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Hands init a network namespace the disk keeper made.
fn send_netns(netns: &OwnedFd, init: &OwnedFd) -> io::Result<()> {
    Message::Netns(netns.try_clone()?).send(init)?;
    crate::trace::phase("network: namespace from the keeper sent");
    Ok(())
}

/// Forks init straight into a new pid namespace (clone, not unshare: after
/// unshare(CLONE_NEWPID) this process could no longer start threads, which
/// the network setup uses to enter the sandbox's namespace) and, on cgroup
/// v2, straight into the sandbox's cgroup. Kernels before 5.7 refuse
/// `CLONE_INTO_CGROUP`; init then moves itself (see `cgroup::move_self`),
/// as it always does on v1.
pub(crate) fn fork_init(cgroup: Option<&Cgroup>) -> io::Result<Forked> {
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
pub(crate) struct UnreapedInit(libc::pid_t);

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
pub(crate) fn failed_during_setup(
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

/// From "go" to the command's end (init reports it, or exits); `after_go`
/// runs while the command starts.
pub(crate) fn run_command(
    plan: &Plan,
    cgroup: &Cgroup,
    started: &Started,
    sfd: &OwnedFd,
    after_go: impl FnOnce(),
) -> Result<(Outcome, Ended), SandboxError> {
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
    Message::Go
        .send(&started.sock)
        .map_err(SandboxError::Channel)?;
    after_go();
    let report = (plan.action == crate::plan::Action::Run).then_some(&started.sock);
    let ended = watch(sfd, started.pid, report, master, plan.timeout, &mut || {})
        .map_err(SandboxError::Supervise)?;
    crate::trace::phase("exit status known");
    let outcome = if ended.timed_out {
        Outcome::TimedOut
    } else if ended.code == 137 && cgroup.oom_kills() > 0 {
        Outcome::OutOfMemory
    } else {
        Outcome::Exited(ended.code)
    };
    Ok((outcome, ended))
}
