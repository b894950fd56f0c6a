//! Stream connections carried over the agent's port as [`TunnelFrame`]s,
//! the same code at both ends: in the guest each connection is a client of
//! the egress proxy's port on the guest's loopback; on the host, a socket
//! the proxy serves. A VM with an egress proxy has no NIC: this is its one
//! way out, and it reaches nothing but the proxy.
//!
//! Bounded either way: a side sends a connection's data at most
//! [`TUNNEL_WINDOW`] bytes ahead of the other's acknowledgements (sent once
//! the data is written to its socket), and a side that receives more than
//! that unacknowledged (a misbehaving peer: the host never trusts the
//! guest) closes the connection instead of buffering it. At most
//! [`MAX_CONNECTIONS`] are open at once; an `Open` past that is closed.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};

use crate::protocol::{TunnelFrame, TUNNEL_CHUNK, TUNNEL_WINDOW};

/// Connections open at once, per VM.
pub const MAX_CONNECTIONS: usize = 256;

/// A stream socket a connection's local end can be.
pub trait Socket: Read + Write + Send + Sync + Sized + 'static {
    fn duplicate(&self) -> io::Result<Self>;
    fn shut(&self, how: Shutdown);
}

impl Socket for std::net::TcpStream {
    fn duplicate(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shut(&self, how: Shutdown) {
        let _ = self.shutdown(how);
    }
}

impl Socket for std::os::unix::net::UnixStream {
    fn duplicate(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shut(&self, how: Shutdown) {
        let _ = self.shutdown(how);
    }
}

type SendFrame = Box<dyn Fn(TunnelFrame) -> io::Result<()> + Send + Sync>;
type Connect<S> = Box<dyn Fn() -> io::Result<S> + Send + Sync>;

/// One end's connections.
pub struct Tunnels<S: Socket> {
    send: SendFrame,
    /// The host's: makes the local end of a connection the guest opened.
    /// `None` (the guest): an `Open` is refused.
    connect: Option<Connect<S>>,
    open: Mutex<HashMap<u64, Arc<Connection<S>>>>,
    next_id: AtomicU64,
}

/// What the socket's writer is given.
enum ToSocket {
    Data(Vec<u8>),
    Eof,
}

struct Connection<S> {
    socket: S,
    /// Bytes we sent and the other side has not acknowledged yet, and
    /// whether the connection is closed (the reader stops waiting).
    credit: Mutex<(u64, bool)>,
    credit_changed: Condvar,
    /// Bytes received and not yet written to the socket.
    pending: AtomicU64,
    /// To the socket's writer; taken when the connection is forgotten,
    /// which ends the writer.
    writes: Mutex<Option<mpsc::Sender<ToSocket>>>,
    /// (our socket's read ended and we said so, the other side's did)
    eofs: Mutex<(bool, bool)>,
}

/// A connection's two directions, for [`Tunnels::half_done`]: our socket's
/// reading (its end of file sent on), and the other side's (written out as
/// our socket's writing half shut).
enum Half {
    Reading,
    Writing,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl<S: Socket> Tunnels<S> {
    /// `send` puts a frame on the port (wrapped in the side's message).
    pub fn new(
        send: impl Fn(TunnelFrame) -> io::Result<()> + Send + Sync + 'static,
        connect: Option<Connect<S>>,
    ) -> Arc<Self> {
        Arc::new(Tunnels {
            send: Box::new(send),
            connect,
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        })
    }

    /// The guest's: a client connected; the host is told to open its end.
    pub fn open(self: &Arc<Self>, socket: S) {
        if lock(&self.open).len() >= MAX_CONNECTIONS {
            socket.shut(Shutdown::Both);
            return;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if (self.send)(TunnelFrame::Open { id }).is_ok() {
            self.start(id, socket);
        }
    }

    /// A frame from the other side. Never blocks on a socket: data is
    /// handed to the connection's writer (bounded by the window).
    pub fn handle(self: &Arc<Self>, frame: TunnelFrame) {
        match frame {
            TunnelFrame::Open { id } => {
                let refused =
                    lock(&self.open).len() >= MAX_CONNECTIONS || lock(&self.open).contains_key(&id);
                let socket = match &self.connect {
                    Some(connect) if !refused => connect(),
                    _ => Err(io::Error::other("refused")),
                };
                match socket {
                    Ok(socket) => self.start(id, socket),
                    Err(_) => {
                        let _ = (self.send)(TunnelFrame::Close { id });
                    }
                }
            }
            TunnelFrame::Data { id, data } => {
                let Some(connection) = self.get(id) else {
                    return;
                };
                let pending = connection
                    .pending
                    .fetch_add(data.len() as u64, Ordering::SeqCst)
                    + data.len() as u64;
                let queued = pending <= TUNNEL_WINDOW
                    && lock(&connection.writes)
                        .as_ref()
                        .is_some_and(|w| w.send(ToSocket::Data(data)).is_ok());
                if !queued {
                    self.close(id, true);
                }
            }
            TunnelFrame::Ack { id, bytes } => {
                if let Some(connection) = self.get(id) {
                    let mut credit = lock(&connection.credit);
                    credit.0 = credit.0.saturating_sub(bytes);
                    connection.credit_changed.notify_all();
                }
            }
            TunnelFrame::Eof { id } => {
                if let Some(connection) = self.get(id) {
                    if let Some(writes) = lock(&connection.writes).as_ref() {
                        let _ = writes.send(ToSocket::Eof);
                    }
                }
            }
            TunnelFrame::Close { id } => self.close(id, false),
        }
    }

    /// How many connections are open (for tests and traces).
    pub fn count(&self) -> usize {
        lock(&self.open).len()
    }

    fn get(&self, id: u64) -> Option<Arc<Connection<S>>> {
        lock(&self.open).get(&id).cloned()
    }

    /// Registers connection `id` and starts its two pumps: the socket's
    /// reads to frames, frames to the socket's writes.
    fn start(self: &Arc<Self>, id: u64, socket: S) {
        let (Ok(reader), Ok(writer)) = (socket.duplicate(), socket.duplicate()) else {
            socket.shut(Shutdown::Both);
            let _ = (self.send)(TunnelFrame::Close { id });
            return;
        };
        let (writes, queue) = mpsc::channel();
        let connection = Arc::new(Connection {
            socket,
            credit: Mutex::new((0, false)),
            credit_changed: Condvar::new(),
            pending: AtomicU64::new(0),
            writes: Mutex::new(Some(writes)),
            eofs: Mutex::new((false, false)),
        });
        lock(&self.open).insert(id, connection.clone());
        let tunnels = self.clone();
        let ours = connection.clone();
        std::thread::spawn(move || tunnels.pump_out(id, reader, &ours));
        let tunnels = self.clone();
        std::thread::spawn(move || tunnels.pump_in(id, writer, queue, &connection));
    }

    /// The socket's reads, as `Data` frames within the window, then `Eof`.
    fn pump_out(&self, id: u64, mut reader: S, connection: &Connection<S>) {
        let mut buffer = vec![0u8; TUNNEL_CHUNK];
        loop {
            let room = {
                let mut credit = lock(&connection.credit);
                while credit.0 >= TUNNEL_WINDOW && !credit.1 {
                    credit = connection
                        .credit_changed
                        .wait(credit)
                        .unwrap_or_else(|p| p.into_inner());
                }
                if credit.1 {
                    return;
                }
                (TUNNEL_WINDOW - credit.0).min(TUNNEL_CHUNK as u64) as usize
            };
            match reader.read(&mut buffer[..room]) {
                Ok(0) => {
                    if (self.send)(TunnelFrame::Eof { id }).is_err() {
                        return self.close(id, false);
                    }
                    return self.half_done(id, connection, Half::Reading);
                }
                Ok(n) => {
                    lock(&connection.credit).0 += n as u64;
                    let data = buffer[..n].to_vec();
                    if (self.send)(TunnelFrame::Data { id, data }).is_err() {
                        return self.close(id, false);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.close(id, true),
            }
        }
    }

    /// Marks one direction of `id` ended (its end of file passed on); the
    /// connection is forgotten once both are.
    fn half_done(&self, id: u64, connection: &Connection<S>, half: Half) {
        let both = {
            let mut eofs = lock(&connection.eofs);
            match half {
                Half::Reading => eofs.0 = true,
                Half::Writing => eofs.1 = true,
            }
            eofs.0 && eofs.1
        };
        if both {
            self.forget(id);
        }
    }

    /// The other side's data written to the socket (each write
    /// acknowledged), and its `Eof` as our socket's writing half shut.
    fn pump_in(
        &self,
        id: u64,
        mut writer: S,
        queue: mpsc::Receiver<ToSocket>,
        connection: &Connection<S>,
    ) {
        while let Ok(write) = queue.recv() {
            match write {
                ToSocket::Data(data) => {
                    if writer.write_all(&data).is_err() {
                        return self.close(id, true);
                    }
                    let bytes = data.len() as u64;
                    connection.pending.fetch_sub(bytes, Ordering::SeqCst);
                    if (self.send)(TunnelFrame::Ack { id, bytes }).is_err() {
                        return self.close(id, false);
                    }
                }
                ToSocket::Eof => {
                    writer.shut(Shutdown::Write);
                    return self.half_done(id, connection, Half::Writing);
                }
            }
        }
    }

    /// Both ways ended: the connection is done with (its sockets close as
    /// their last copies drop).
    fn forget(&self, id: u64) {
        if let Some(connection) = lock(&self.open).remove(&id) {
            lock(&connection.writes).take();
        }
    }

    /// Ends connection `id` at once, both ways; `tell`: the other side too.
    fn close(&self, id: u64, tell: bool) {
        let Some(connection) = lock(&self.open).remove(&id) else {
            return;
        };
        lock(&connection.writes).take();
        lock(&connection.credit).1 = true;
        connection.credit_changed.notify_all();
        connection.socket.shut(Shutdown::Both);
        if tell {
            let _ = (self.send)(TunnelFrame::Close { id });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    /// Two ends wired to each other directly (what the port carries).
    fn pair() -> (
        Arc<Tunnels<UnixStream>>,
        Arc<Tunnels<UnixStream>>,
        mpsc::Receiver<UnixStream>,
    ) {
        let (to_host, host_frames) = mpsc::channel::<TunnelFrame>();
        let (to_guest, guest_frames) = mpsc::channel::<TunnelFrame>();
        let (accepted_tx, accepted) = mpsc::channel();
        let accepted_tx = Mutex::new(accepted_tx);
        let to_host = Mutex::new(to_host);
        let to_guest = Mutex::new(to_guest);
        let guest = Tunnels::new(
            move |f| lock(&to_host).send(f).map_err(io::Error::other),
            None,
        );
        let host = Tunnels::new(
            move |f| lock(&to_guest).send(f).map_err(io::Error::other),
            Some(Box::new(move || {
                let (ours, theirs) = UnixStream::pair()?;
                lock(&accepted_tx).send(theirs).map_err(io::Error::other)?;
                Ok(ours)
            }) as Connect<UnixStream>),
        );
        let (g, h) = (guest.clone(), host.clone());
        std::thread::spawn(move || {
            while let Ok(f) = host_frames.recv() {
                h.handle(f);
            }
        });
        std::thread::spawn(move || {
            while let Ok(f) = guest_frames.recv() {
                g.handle(f);
            }
        });
        (guest, host, accepted)
    }

    #[test]
    fn data_crosses_both_ways_with_half_close() {
        let (guest, host, accepted) = pair();
        let (mut client, guest_end) = UnixStream::pair().unwrap();
        guest.open(guest_end);
        let mut server = accepted.recv_timeout(Duration::from_secs(5)).unwrap();
        // More than a window, so acknowledgements must flow.
        let sent: Vec<u8> = (0..(3 * TUNNEL_WINDOW as usize)).map(|i| i as u8).collect();
        let expected = sent.clone();
        let writer = std::thread::spawn(move || {
            client.write_all(&sent).unwrap();
            client.shutdown(Shutdown::Write).unwrap();
            client
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).unwrap();
        assert_eq!(got, expected);
        // The reply after the client's half-close still arrives.
        server.write_all(b"reply").unwrap();
        server.shutdown(Shutdown::Write).unwrap();
        let mut client = writer.join().unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).unwrap();
        assert_eq!(reply, b"reply");
        for _ in 0..100 {
            if guest.count() == 0 && host.count() == 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("connections left open: {} {}", guest.count(), host.count());
    }

    #[test]
    fn a_peer_past_the_window_is_cut_off() {
        let (frames, _keep) = mpsc::channel::<TunnelFrame>();
        let frames = Mutex::new(frames);
        let (accepted_tx, accepted) = mpsc::channel();
        let accepted_tx = Mutex::new(accepted_tx);
        let host: Arc<Tunnels<UnixStream>> = Tunnels::new(
            move |f| lock(&frames).send(f).map_err(io::Error::other),
            Some(Box::new(move || {
                let (ours, theirs) = UnixStream::pair()?;
                lock(&accepted_tx).send(theirs).map_err(io::Error::other)?;
                Ok(ours)
            })),
        );
        host.handle(TunnelFrame::Open { id: 7 });
        // Nobody reads the proxy's end: its socket buffer fills, then the
        // window; one frame more closes the connection.
        let _server = accepted.recv().unwrap();
        let chunk = vec![0u8; TUNNEL_CHUNK];
        for _ in 0..(4 * TUNNEL_WINDOW as usize / TUNNEL_CHUNK) + 64 {
            host.handle(TunnelFrame::Data {
                id: 7,
                data: chunk.clone(),
            });
            if host.count() == 0 {
                return;
            }
        }
        panic!("an unacknowledged flood was buffered");
    }
}
