//! The socketpair between the supervisor and init, and the typed
//! [`Message`]s they exchange over it (with descriptors, SCM_RIGHTS).
//!
//! The supervisor sends the network namespace, then the cgroup's files
//! (v1); with a network, init says when it has joined the namespace (the
//! supervisor attaches it while init builds the root); init says "ready"
//! (passing the terminal's master side when there is one), and the
//! supervisor answers "go".

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::sys;

/// What the supervisor and init say to each other. On the wire: one byte
/// naming the message ([`Message::kind`]) and the descriptors it carries;
/// [`Message::recv`] rejects a message whose descriptors do not match its
/// kind, so neither side acts on a malformed one.
#[derive(Debug)]
pub enum Message {
    /// Supervisor → init: the network namespace a supervisor thread made.
    Netns(OwnedFd),
    /// Supervisor → init: the workspace's disk, mounted detached; `None`
    /// when init is to mount it itself (a kernel without the new mount API).
    Disk(Option<OwnedFd>),
    /// Supervisor → init: the files init writes to move into its cgroup
    /// (v1; none when init was born inside it).
    Cgroup(Vec<File>),
    /// Init → supervisor: init is in its network namespace, which the
    /// supervisor now connects.
    NetnsJoined,
    /// Init → supervisor: the root is built; the terminal's master side
    /// when the command has one.
    Ready(Option<OwnedFd>),
    /// Supervisor → init: run the command.
    Go,
}

/// Which [`Message`] a received one is, for waiting on one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Netns = b'e',
    Disk = b'd',
    Cgroup = b'c',
    NetnsJoined = b'n',
    Ready = b'r',
    Go = b'g',
}

impl Message {
    pub fn kind(&self) -> Kind {
        match self {
            Message::Netns(_) => Kind::Netns,
            Message::Disk(_) => Kind::Disk,
            Message::Cgroup(_) => Kind::Cgroup,
            Message::NetnsJoined => Kind::NetnsJoined,
            Message::Ready(_) => Kind::Ready,
            Message::Go => Kind::Go,
        }
    }

    /// Sends the message (its descriptors stay ours: the kernel dups them).
    pub fn send(&self, sock: &OwnedFd) -> io::Result<()> {
        let fds: Vec<RawFd> = match self {
            Message::Netns(fd) => vec![fd.as_raw_fd()],
            Message::Disk(fd) | Message::Ready(fd) => fd.iter().map(|f| f.as_raw_fd()).collect(),
            Message::Cgroup(files) => files.iter().map(|f| f.as_raw_fd()).collect(),
            Message::NetnsJoined | Message::Go => Vec::new(),
        };
        send_message(sock, self.kind() as u8, &fds)
    }

    /// Receives the next message; an error when the other side is gone or
    /// sent something malformed.
    pub fn recv(sock: &OwnedFd) -> io::Result<Message> {
        let (tag, fds) = recv_message(sock)?;
        Message::decode(tag, fds)
    }

    fn decode(tag: u8, mut fds: Vec<OwnedFd>) -> io::Result<Message> {
        let malformed = || {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("malformed message from the other side (tag {tag:#x})"),
            )
        };
        let at_most_one = |fds: &mut Vec<OwnedFd>| match fds.len() {
            0 | 1 => Ok(fds.pop()),
            _ => Err(malformed()),
        };
        let none = |fds: &Vec<OwnedFd>| fds.is_empty().then_some(()).ok_or_else(malformed);
        let kind = [
            Kind::Netns,
            Kind::Disk,
            Kind::Cgroup,
            Kind::NetnsJoined,
            Kind::Ready,
            Kind::Go,
        ]
        .into_iter()
        .find(|k| *k as u8 == tag)
        .ok_or_else(malformed)?;
        Ok(match kind {
            Kind::Netns if fds.len() == 1 => Message::Netns(fds.remove(0)),
            Kind::Netns => return Err(malformed()),
            Kind::Disk => Message::Disk(at_most_one(&mut fds)?),
            Kind::Cgroup => Message::Cgroup(fds.into_iter().map(File::from).collect()),
            Kind::NetnsJoined => none(&fds).map(|()| Message::NetnsJoined)?,
            Kind::Ready => Message::Ready(at_most_one(&mut fds)?),
            Kind::Go => none(&fds).map(|()| Message::Go)?,
        })
    }
}

/// Init → supervisor, after "go", the channel's last message: the
/// command's exit status (what init then exits with), sent once every
/// process of the sandbox is dead. The supervisor returns it to the caller
/// without waiting for init's own exit, in which the kernel tears down the
/// sandbox's namespaces and mounts (see `init::reap_until`).
pub(crate) fn send_exit_status(sock: &OwnedFd, status: u8) -> io::Result<()> {
    send_message(sock, status, &[])
}

/// The status [`send_exit_status`] sent; an error when init exited (or was
/// killed) without sending one.
pub(crate) fn recv_exit_status(sock: &OwnedFd) -> io::Result<u8> {
    let (status, fds) = recv_message(sock)?;
    if !fds.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "malformed exit status from init (descriptors attached)",
        ));
    }
    Ok(status)
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

/// One message's buffers: its byte, and room for fds (SCM_RIGHTS).
struct Frame {
    byte: [u8; 1],
    control: Vec<u8>,
}

impl Frame {
    fn new(byte: u8) -> Frame {
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space =
            unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) } as usize;
        Frame {
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
    Frame::new(byte).with_header(room, |msg| {
        if !fds.is_empty() {
            // SAFETY: the control buffer has room for MAX_FDS fds (Frame::new).
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
    let mut message = Frame::new(0);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every status init can exit with crosses intact; a closed channel is an error.
    #[test]
    fn exit_statuses_cross_and_a_vanished_init_is_an_error() {
        let (a, b) = socketpair().unwrap();
        for status in [0u8, 1, 124, 125, 127, 137, 255] {
            send_exit_status(&a, status).unwrap();
            assert_eq!(recv_exit_status(&b).unwrap(), status);
        }
        drop(a);
        assert!(recv_exit_status(&b).is_err());
    }

    /// Every message crosses a real socketpair with its descriptors.
    #[test]
    fn messages_cross_with_their_descriptors() {
        let (a, b) = socketpair().unwrap();
        let file = || File::open("/proc/self/exe").unwrap();
        let sent = [
            Message::Netns(OwnedFd::from(file())),
            Message::Disk(None),
            Message::Disk(Some(OwnedFd::from(file()))),
            Message::Cgroup(vec![file(), file(), file()]),
            Message::NetnsJoined,
            Message::Ready(Some(OwnedFd::from(file()))),
            Message::Go,
        ];
        for message in &sent {
            message.send(&a).unwrap();
            let got = Message::recv(&b).unwrap();
            assert_eq!(got.kind(), message.kind());
            let count = |m: &Message| match m {
                Message::Netns(_) => 1,
                Message::Disk(fd) | Message::Ready(fd) => fd.iter().count(),
                Message::Cgroup(files) => files.len(),
                Message::NetnsJoined | Message::Go => 0,
            };
            assert_eq!(count(&got), count(message), "{got:?}");
        }
    }

    /// A tag nobody sends, or descriptors that do not fit the kind, are refused.
    #[test]
    fn malformed_messages_are_refused() {
        let (a, b) = socketpair().unwrap();
        let fd = File::open("/proc/self/exe").unwrap();
        for (tag, fds) in [
            (b'x', vec![]),
            (Kind::Netns as u8, vec![]),
            (Kind::Go as u8, vec![fd.as_raw_fd()]),
            (Kind::Ready as u8, vec![fd.as_raw_fd(), fd.as_raw_fd()]),
        ] {
            send_message(&a, tag, &fds).unwrap();
            let e = Message::recv(&b).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "tag {tag}");
        }
        drop(a);
        assert_eq!(
            Message::recv(&b).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }
}
