//! `agentkernel ssh NAME -- CMD` over the shared connection without starting
//! another `ssh`: when the background `ssh` that holds the connection (the
//! ControlMaster) is up, we ask it for the session ourselves, over its
//! control socket, in OpenSSH's multiplexing protocol (PROTOCOL.mux in
//! OpenSSH's source) — what `ssh` itself does as a mux client, minus its
//! start-up (loading OpenSSL, reading its configuration), which is most of
//! a round trip's cost on the client side. The session is still carried by
//! the system's `ssh`: we hand it our stdin, stdout and stderr (SCM_RIGHTS),
//! it copies them to and from the channel, sends us the command's exit
//! status and closes the control connection once the channel is done (so
//! all output has been written when we exit, as with `ssh`).
//!
//! Only the plain case takes this path: a command, no terminal requested
//! (`ssh host cmd` asks for none either), no environment to send. Anything
//! else — and any failure before the session is open, such as no master
//! yet — goes to the system's `ssh`, which then starts the master.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

const HELLO: u32 = 0x0000_0001;
const NEW_SESSION: u32 = 0x1000_0002;
const EXIT_MESSAGE: u32 = 0x8000_0004;
const SESSION_OPENED: u32 = 0x8000_0006;
/// The mux protocol version OpenSSH speaks (SSHMUX_VER).
const VERSION: u32 = 4;
/// No escape character (a session without a terminal has none).
const NO_ESCAPE: u32 = 0xffff_ffff;
/// What `ssh` exits with when the connection ends without an exit status.
const CONNECTION_LOST: i32 = 255;

/// Runs COMMAND through the master listening on SOCKET with our stdio.
/// `None`: no session was opened (no master, or it refused): nothing has
/// happened, so the caller may use `ssh` instead. `Some(code)`: the
/// command's exit status, or 255 if the connection ended without one.
pub fn run(socket: &Path, command: &[u8]) -> Option<i32> {
    let mut control = UnixStream::connect(socket).ok()?;
    let session = open_session(&mut control, command).ok()?;
    Some(wait(&mut control, session))
}

fn open_session(control: &mut UnixStream, command: &[u8]) -> io::Result<u32> {
    let mut hello = Vec::new();
    put_u32(&mut hello, HELLO);
    put_u32(&mut hello, VERSION);
    write_packet(control, &hello)?;
    let reply = read_packet(control)?;
    let mut reply = Reader(&reply);
    if reply.u32()? != HELLO || reply.u32()? != VERSION {
        return Err(io::Error::other("not an OpenSSH mux master"));
    }

    let request_id = 1;
    let mut request = Vec::new();
    put_u32(&mut request, NEW_SESSION);
    put_u32(&mut request, request_id);
    put_string(&mut request, b""); // reserved
    put_u32(&mut request, 0); // terminal
    put_u32(&mut request, 0); // X11 forwarding
    put_u32(&mut request, 0); // agent forwarding
    put_u32(&mut request, 0); // subsystem
    put_u32(&mut request, NO_ESCAPE);
    put_string(&mut request, b""); // TERM: no terminal
    put_string(&mut request, command);
    write_packet(control, &request)?;
    for fd in [0, 1, 2] {
        send_fd(control, fd)?;
    }
    let reply = read_packet(control)?;
    let mut reply = Reader(&reply);
    // A refusal (permission denied, failure) carries a reason we leave to
    // `ssh` to report.
    if reply.u32()? != SESSION_OPENED || reply.u32()? != request_id {
        return Err(io::Error::other("the mux master refused the session"));
    }
    reply.u32()
}

/// Reads until the master closes the control connection (after the
/// channel has closed and its output is written), keeping the exit status.
fn wait(control: &mut UnixStream, session: u32) -> i32 {
    let mut code = None;
    while let Ok(packet) = read_packet(control) {
        let mut packet = Reader(&packet);
        if let (Ok(EXIT_MESSAGE), Ok(id), Ok(value)) = (packet.u32(), packet.u32(), packet.u32()) {
            if id == session {
                code = Some(value as i32);
            }
        }
    }
    code.unwrap_or(CONNECTION_LOST)
}

fn put_u32(buf: &mut Vec<u8>, n: u32) {
    buf.extend_from_slice(&n.to_be_bytes());
}

fn put_string(buf: &mut Vec<u8>, s: &[u8]) {
    put_u32(buf, s.len() as u32);
    buf.extend_from_slice(s);
}

fn write_packet(control: &mut UnixStream, body: &[u8]) -> io::Result<()> {
    let mut packet = Vec::with_capacity(4 + body.len());
    put_string(&mut packet, body);
    control.write_all(&packet)
}

fn read_packet(control: &mut UnixStream) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    control.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    // Replies are a few words; a bigger one is not from a mux master.
    if len > 256 * 1024 {
        return Err(io::Error::other("oversized mux packet"));
    }
    let mut body = vec![0u8; len];
    control.read_exact(&mut body)?;
    Ok(body)
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u32(&mut self) -> io::Result<u32> {
        let (word, rest) = self
            .0
            .split_first_chunk::<4>()
            .ok_or_else(|| io::Error::other("short mux packet"))?;
        self.0 = rest;
        Ok(u32::from_be_bytes(*word))
    }
}

/// Passes FD to the master: one byte of data with the descriptor attached,
/// as OpenSSH's `mm_send_fd` does.
fn send_fd(control: &UnixStream, fd: i32) -> io::Result<()> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) } as usize;
    // u64 words: the control buffer must be aligned for cmsghdr.
    let mut control_buf = vec![0u64; space.div_ceil(8)];
    // SAFETY: a zeroed msghdr is valid; every pointer set below outlives
    // the sendmsg call, and the cmsg macros stay within `control_buf`.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control_buf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<i32>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>(), fd);
        loop {
            if libc::sendmsg(control.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) == 1 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}
