//! The terminal: a pseudo-terminal allocated in the sandbox's own devpts,
//! and the relay between it and ours in the supervising process.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::sys;

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
pub(crate) struct Relay {
    master: OwnedFd,
    stdin_open: bool,
    output_open: bool,
}

impl Relay {
    pub(super) fn new(master: OwnedFd) -> Relay {
        Relay {
            master,
            stdin_open: true,
            output_open: true,
        }
    }

    /// Our window's size, copied to the sandbox's terminal (on SIGWINCH).
    pub(super) fn resize(&self) {
        copy_window_size(self.master.as_raw_fd());
    }

    pub(super) fn add_poll(&self, fds: &mut Vec<libc::pollfd>) {
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

    pub(super) fn pump(&mut self, fds: &[libc::pollfd]) {
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
    pub(super) fn drain(&mut self) {
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

pub(crate) fn read(fd: RawFd, buf: &mut [u8]) -> Option<usize> {
    // SAFETY: reads into a buffer we own, bounded by its length.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    (n >= 0).then_some(n as usize)
}

/// The pseudo-terminal, allocated in the sandbox's own devpts so `tty` and
/// `/proc/self/fd` show sandbox paths; the master goes to the supervisor.
/// (The qemu guest agent allocates its commands' terminals with it too.)
pub fn open_terminal() -> io::Result<(OwnedFd, OwnedFd)> {
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
