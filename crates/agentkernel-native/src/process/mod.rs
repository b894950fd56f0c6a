//! The native runtime's processes, one module per role (after youki's
//! `process/`):
//!
//! * [`supervisor`] — the `agentkernel` process itself (re-executed as the
//!   single-threaded helper). It stays on the host: creates the cgroup,
//!   forwards signals, enforces `--timeout`, relays a terminal, and cleans
//!   up when the sandbox ends. It is never inside the sandbox.
//! * [`init`] — PID 1 of the new pid namespace, born inside the sandbox's
//!   cgroup (v2) or moving itself there once its root is built (v1; see
//!   `Cgroup::self_move_files` for why init, not the supervisor, does it).
//!   It enters fresh mount, uts and ipc namespaces and the network
//!   namespace a supervisor thread made meanwhile, builds the root,
//!   creates its cgroup namespace; then it
//!   forks the command and stays as a tiny init: reaps zombies, forwards
//!   signals, exits with the command's status. When it exits the kernel kills
//!   everything left in the namespace, and it dies if the supervisor does
//!   (PDEATHSIG), so a `kill -9` of agentkernel leaves no sandbox process.
//! * [`command`] — drops privileges and execs the user's command.
//! * [`holder`] — a kept sandbox's detached supervisor (see `kept.rs`).
//! * [`relay`] — the terminal: allocated in the sandbox, relayed by the
//!   supervisor (or by `join`'s, for a command in a kept sandbox).
//!
//! Supervisor and init talk over a socketpair ([`channel`]). What every
//! supervising process shares — the signals it handles, waiting for a child
//! while forwarding them and enforcing `--timeout` — is here.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

pub mod channel;
mod cleanup;
pub(crate) mod command;
pub mod holder;
mod init;
pub(crate) mod relay;
pub mod supervisor;

pub use relay::open_terminal;
pub use supervisor::{run, SandboxError};

use relay::Relay;

pub(crate) const FORWARDED: [libc::c_int; 4] =
    [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

pub(crate) fn signal_set(signals: &[libc::c_int]) -> libc::sigset_t {
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

pub(crate) fn supervisor_signals() -> libc::sigset_t {
    signal_set(&[
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGCHLD,
        libc::SIGWINCH,
    ])
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

/// How a watched process ended.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ended {
    pub code: i32,
    pub timed_out: bool,
    /// Whether we reaped it; false when its exit status came on the
    /// `report` socket first (it is exiting, and still our child).
    pub reaped: bool,
}

/// Waits for our child `pid` while forwarding signals, enforcing `timeout`
/// (SIGKILL to `pid`'s process group) and relaying a terminal. `tick` runs
/// at least every few seconds. A status `pid` sends on `report` (see
/// `channel::send_exit_status`) ends the wait before `pid` exits; without
/// one (`pid` died first) its exit status counts.
pub(crate) fn watch(
    sfd: &OwnedFd,
    pid: libc::pid_t,
    report: Option<&OwnedFd>,
    master: Option<OwnedFd>,
    timeout: Option<std::time::Duration>,
    tick: &mut dyn FnMut(),
) -> io::Result<Ended> {
    const TICK_MS: i32 = 5_000;
    let started = Instant::now();
    let mut state = State {
        target: pid,
        exit: None,
        timed_out: false,
        interrupts: 0,
    };
    let mut report = report;
    let mut reaped = true;
    let mut relay = master.map(Relay::new);
    loop {
        if let Some(code) = state.exit {
            if let Some(r) = relay.as_mut() {
                r.drain();
            }
            return Ok(Ended {
                code,
                timed_out: state.timed_out,
                reaped,
            });
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
        // Polled with fd -1 (ignored) once it is closed, so the relay's
        // entries stay where `pump` expects them.
        fds.push(libc::pollfd {
            fd: report.map_or(-1, |r| r.as_raw_fd()),
            events: libc::POLLIN,
            revents: 0,
        });
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
        if fds[1].revents != 0 && state.exit.is_none() {
            match report.map(channel::recv_exit_status) {
                Some(Ok(status)) => {
                    state.exit = Some(i32::from(status));
                    reaped = false;
                }
                // Gone without a word (killed): its exit status will tell.
                _ => report = None,
            }
        }
        if let Some(r) = relay.as_mut() {
            r.pump(&fds[2..]);
        }
    }
}

pub(crate) struct State {
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

pub(crate) fn handle_signals(sfd: &OwnedFd, state: &mut State, relay: Option<&Relay>) {
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
                    r.resize();
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
