//! The socketpair between the supervisor and init: one byte naming the
//! message, and the descriptors it carries (SCM_RIGHTS).
//!
//! The supervisor sends the network namespace, then the cgroup's files
//! (v1); with a network, init says when it has joined the namespace (the
//! supervisor attaches it while init builds the root); init says "ready"
//! (passing the terminal's master side when there is one), and the
//! supervisor answers "go".

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::sys;

pub(crate) const NETNS_READY: u8 = b'n';

pub(crate) const NETNS: u8 = b'e';

pub(crate) const CGROUP: u8 = b'c';

pub(crate) const DISK: u8 = b'd';

pub(crate) const READY: u8 = b'r';

pub(crate) const GO: u8 = b'g';

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
pub(crate) const MAX_FDS: usize = 8;

/// The socketpair's message: one byte, and room for fds (SCM_RIGHTS).
pub(crate) struct Message {
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
pub(crate) fn recv_ready(sock: &OwnedFd) -> io::Result<Option<OwnedFd>> {
    match recv_message(sock)? {
        (READY, fds) => Ok(fds.into_iter().next()),
        _ => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "init exited")),
    }
}
