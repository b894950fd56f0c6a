//! A rootless sandbox's network: `slirp4netns`, a user-mode TCP/IP stack
//! (the one rootless Podman uses). It puts a tap device in the sandbox's
//! network namespace and turns the sandbox's traffic into ordinary sockets
//! of the calling user on the host — no bridge, veth or iptables, so no root.
//! The host's loopback stays unreachable (`--disable-host-loopback`), and
//! slirp4netns runs sandboxed and under its own seccomp filter.
//!
//! Its lifetime is tied to ours by `--exit-fd`: it exits when the pipe we
//! hold closes, i.e. when the supervisor (or a kept sandbox's holder) ends,
//! even by `kill -9`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::error::{SlirpUnusable, TUN};
use crate::sys;

/// slirp4netns's DNS forwarder, at its fixed address in 10.0.2.0/24.
pub const RESOLV_CONF: &str = "nameserver 10.0.2.3\n";

/// `Ok` when a rootless sandbox can have a network here; else why not, with the fix.
pub fn usable() -> Result<PathBuf, SlirpUnusable> {
    let binary =
        agentkernel_core::paths::on_path("slirp4netns").ok_or(SlirpUnusable::NotInstalled)?;
    // The tap device: world-accessible on every udev-managed system.
    let c = std::ffi::CString::new(TUN).expect("no NUL");
    // SAFETY: a valid C string; access(2) only checks.
    if unsafe { libc::access(c.as_ptr(), libc::R_OK | libc::W_OK) } != 0 {
        return Err(SlirpUnusable::TunInaccessible {
            source: io::Error::last_os_error(),
        });
    }
    Ok(binary)
}

/// A running slirp4netns serving one sandbox.
#[derive(Debug)]
pub struct Slirp {
    pid: libc::pid_t,
    /// Never written: closing it (on drop, or when we die) tells slirp4netns to exit.
    _exit_pipe: OwnedFd,
}

/// Two fds for a child: ours (close-on-exec), and theirs (inherited).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn set_cloexec(fd: &OwnedFd) {
    // SAFETY: fcntl on an fd we own.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
}

/// Connects the network namespace of `pid` (already created) and returns
/// once the sandbox's `tap0` is up with its address, route and DNS.
pub fn attach(pid: libc::pid_t) -> io::Result<Slirp> {
    let binary = usable().map_err(io::Error::other)?;
    let (ready_r, ready_w) = pipe()?;
    let (exit_r, exit_w) = pipe()?;
    set_cloexec(&ready_r);
    set_cloexec(&exit_w);
    let mut command = Command::new(&binary);
    command
        .arg("--configure")
        .arg("--mtu=65520")
        .arg("--disable-host-loopback")
        .arg("--enable-sandbox")
        .arg("--enable-seccomp")
        .arg(format!("--ready-fd={}", ready_w.as_raw_fd()))
        .arg(format!("--exit-fd={}", exit_r.as_raw_fd()))
        .arg(pid.to_string())
        .arg("tap0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // Its progress chatter ("sent tapfd=…") is not for the user; a
        // failure is reported by the ready pipe closing early.
        .stderr(Stdio::null());
    // SAFETY: sigprocmask is async-signal-safe; the supervisor's blocked
    // signals (it reads them from a signalfd) must not carry over.
    unsafe {
        command.pre_exec(|| {
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            Ok(())
        });
    }
    let child = command
        .spawn()
        .map_err(sys::context(format_args!("start {}", binary.display())))?;
    drop(ready_w);
    drop(exit_r);
    let slirp = Slirp {
        pid: child.id() as libc::pid_t,
        _exit_pipe: exit_w,
    };
    // "1" once configured; end of file if it failed (it said why on stderr).
    match sys::read_byte(ready_r.as_raw_fd()) {
        Ok(Some(b'1')) => Ok(slirp),
        _ => {
            slirp.stop();
            Err(io::Error::other("slirp4netns could not set up the network"))
        }
    }
}

impl Slirp {
    /// Ends slirp4netns and reaps it.
    pub fn stop(&self) {
        // SAFETY: signalling our own child, which we have not reaped yet.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        crate::process::wait_for(self.pid);
    }
}
