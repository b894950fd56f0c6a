//! Init: PID 1 of the sandbox (see the module above for its job).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::channel::{Kind, Message};
use super::command::become_command;
use super::relay::open_terminal;
use super::{decode_status, kill, signal_set, FORWARDED};
use crate::plan::Plan;
use crate::{caps, rootfs, sys};

pub(crate) fn die(what: &str, e: impl std::fmt::Display) -> ! {
    eprintln!("agentkernel: sandbox setup failed: {what}: {e}");
    // SAFETY: ends the forked child without unwinding into the parent's state.
    unsafe { libc::_exit(125) }
}

/// Init's end of the socketpair. The supervisor's threads send as they
/// finish, so a message init asks for may arrive after others, which wait
/// here until asked for.
pub(crate) struct Inbox {
    sock: OwnedFd,
    early: Vec<Message>,
}

impl Inbox {
    /// The next message of `kind`; None when the supervisor is gone (or
    /// sent something malformed).
    fn take(&mut self, kind: Kind) -> Option<Message> {
        if let Some(i) = self.early.iter().position(|m| m.kind() == kind) {
            return Some(self.early.remove(i));
        }
        loop {
            match Message::recv(&self.sock) {
                Ok(m) if m.kind() == kind => return Some(m),
                Ok(other) => self.early.push(other),
                Err(_) => return None,
            }
        }
    }
}

/// PID 1 of the sandbox. Never returns.
pub(crate) fn init(plan: &Plan, sock: OwnedFd) -> ! {
    // SAFETY: integer-only prctl; dies with the supervisor.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
    // Of the descriptors the helper had — the caller's among them, which
    // reach it through its exec — init needs only its socket: the rest go
    // now, not only once the command runs (everything else init uses it
    // opens itself or receives on the socket).
    sys::close_descriptors_from_3_except(&[sock.as_raw_fd()]);
    let flags = libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
    // SAFETY: unshare with namespace flags; we are single-threaded.
    if unsafe { libc::unshare(flags) } != 0 {
        die("creating namespaces", io::Error::last_os_error());
    }
    let mut inbox = Inbox {
        sock,
        early: Vec::new(),
    };
    crate::trace::phase("init: own namespaces created");
    // The network namespace the supervisor made meanwhile (see `start`).
    match inbox.take(Kind::Netns) {
        Some(Message::Netns(netns)) => {
            // SAFETY: setns with the fd of a network namespace we were sent.
            if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                die("joining the network namespace", io::Error::last_os_error());
            }
        }
        // SAFETY: ends the forked child: the supervisor is gone or failed.
        _ => unsafe { libc::_exit(125) },
    }
    let host = sys::cstr(&plan.hostname).unwrap_or_else(|e| die("setting the hostname", e));
    // SAFETY: pointer and length of a valid C string.
    if unsafe { libc::sethostname(host.as_ptr(), plan.hostname.len()) } != 0 {
        die("setting the hostname", io::Error::last_os_error());
    }
    if plan.network {
        // The supervisor connects the namespace (lo and eth0) meanwhile:
        // a bridge from the moment the namespace exists, slirp4netns once
        // we are in it.
        if !crate::net::connects_before_init_joins(plan) {
            if let Err(e) = Message::NetnsJoined.send(&inbox.sock) {
                die("talking to agentkernel", e);
            }
        }
    }
    // Without a network, loopback came up with the namespace (see `start`).
    crate::trace::phase("init: namespaces created");
    let root = rootfs::build(plan).unwrap_or_else(|e| die("building the root filesystem", e));
    crate::trace::phase("init: root built");
    // Into the sandbox's cgroup before anything is forked, and before the
    // cgroup namespace is created (so it is rooted at the sandbox's cgroup).
    match inbox.take(Kind::Cgroup) {
        Some(Message::Cgroup(files)) => {
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
    if let Err(e) = rootfs::mount_cgroup_view(plan) {
        die("building the root filesystem", e);
    }
    // Only now the workspace's disk, which a thread of the supervisor
    // mounts meanwhile (milliseconds): everything above did not need it.
    let mut workspace_disk = || match inbox.take(Kind::Disk) {
        Some(Message::Disk(mount)) => mount,
        _ => None,
    };
    if let Err(e) = rootfs::mount_workspace_and_volumes(plan, &root, &mut workspace_disk) {
        die("building the root filesystem", e);
    }
    drop(root);
    crate::trace::phase("init: volumes mounted");
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
    // The master side goes to the supervisor; init keeps the slave for the command.
    let (master, slave) = terminal.unzip();
    if let Err(e) = Message::Ready(master).send(&sock) {
        die("talking to agentkernel", e);
    }
    match Message::recv(&sock) {
        Ok(Message::Go) => {}
        // The supervisor is gone or said no: nothing to run.
        _ => {
            // SAFETY: ends the forked child.
            unsafe { libc::_exit(125) }
        }
    }

    // A kept sandbox's init runs no command of its own: commands join it.
    let child = if plan.action == crate::plan::Action::Run {
        // The command shares our memory until its execve (see
        // spawn_until_exec: no page-table copy to tear down in it).
        let slave_fd = slave.as_ref().map(AsRawFd::as_raw_fd);
        let child = sys::spawn_until_exec(|| {
            // SAFETY: the child's own copy of the slave's descriptor, which
            // it makes its stdio before it execs.
            become_command(plan, slave_fd.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }))
        });
        let child = match child {
            Ok(child) => child,
            Err(e) => die("starting the command", e),
        };
        drop(slave);
        Some(child)
    } else {
        None
    };
    // From here init needs only stdio and, with a command, the socket it
    // reports the command's exit status on: the caller's other descriptors
    // (which reach the helper through its exec) must not stay open in the
    // sandbox's PID 1 for as long as the sandbox lives.
    let report = match child {
        Some(_) => {
            sys::close_descriptors_from_3_except(&[sock.as_raw_fd()]);
            Some(sock)
        }
        None => {
            drop(sock);
            sys::close_descriptors_from_3_except(&[]);
            None
        }
    };
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
    reap_until(child, report)
}

/// Init's loop: reap every child; with a command, forward the supervisor's
/// signals to it and exit with its status when it ends; without one (a kept
/// sandbox), exit when the holder says so (any forwarded signal).
///
/// With a `report` socket, init first ends every other process of the
/// sandbox and reaps it, then sends the command's status there, then exits:
/// the supervisor can return the status to the caller at once — nothing of
/// the sandbox runs any more — while the kernel tears down the namespaces
/// and mounts in init's exit, which no caller need wait for.
pub(crate) fn reap_until(command: Option<libc::pid_t>, report: Option<OwnedFd>) -> ! {
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
                    let status = decode_status(status);
                    if let Some(sock) = &report {
                        end_every_other_process();
                        crate::trace::phase("init: the sandbox's processes ended");
                        // Unsent (the supervisor is gone), the status is still
                        // init's own exit status, which the supervisor reaps.
                        let _ = super::channel::send_exit_status(sock, status as u8);
                    }
                    // SAFETY: PID 1 exiting ends the namespace: the kernel kills the rest.
                    unsafe { libc::_exit(status) }
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

/// SIGKILLs every process of the sandbox but init (kill(-1) from a pid
/// namespace's init reaches exactly its namespace; init keeps CAP_KILL, so
/// a process running as another user, or in a user namespace of its own,
/// is no exception) and reaps them all. Everything left was either our
/// child or reparented to us as PID 1, so no child left means no process
/// left. A process stuck in the kernel holds us here, as it would hold the
/// kernel's own teardown in our exit.
fn end_every_other_process() {
    // SAFETY: kill and waitpid take plain integers; SIGCHLD is blocked, so
    // waitpid is not interrupted.
    unsafe {
        libc::kill(-1, libc::SIGKILL);
        while libc::waitpid(-1, std::ptr::null_mut(), 0) > 0 {}
    }
}
