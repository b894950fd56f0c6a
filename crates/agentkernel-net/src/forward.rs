//! The userland side of published ports: every published port's socket is
//! bound on the host (and held for the sandbox's lifetime, so no host program
//! can take the port meanwhile), and what reaches it is relayed to the
//! sandbox, like Docker's `docker-proxy`.
//!
//! Only connections to the host's loopback addresses ever reach these
//! sockets: the others are DNATed to the sandbox before they arrive. Loopback
//! ones cannot be DNATed without `route_localnet`, which would also let a
//! sandbox reach the host's loopback services, so they are relayed here. The
//! sandbox sees them come from the gateway, as it did with DNAT and
//! masquerading.
//!
//! The relays run on threads of the process that called [`crate::attach`]
//! (a sandbox's supervisor or holder) and end with [`crate::release`] or with
//! that process.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the relay waits for the sandbox to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A UDP peer silent this long is forgotten (its upstream socket closed).
const UDP_IDLE: Duration = Duration::from_secs(60);
/// How often blocked UDP reads look at the stop flag (a wake-up by
/// `shutdown` is the fast path; this bounds it if the kernel ignores one).
const UDP_POLL: Duration = Duration::from_millis(500);
const UDP_MAX: usize = 65_535;
/// Pause after a failed `accept` (out of descriptors, say) before the next.
const ACCEPT_RETRY: Duration = Duration::from_millis(20);

/// A published port's socket, bound on the host.
pub enum Held {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

impl Held {
    pub fn port(&self) -> io::Result<u16> {
        match self {
            Held::Tcp(l) => l.local_addr(),
            Held::Udp(s) => s.local_addr(),
        }
        .map(|a| a.port())
    }
}

/// The relays of one sandbox's published ports.
pub struct Forwarder {
    shared: Arc<Shared>,
    /// The threads that own the held sockets.
    threads: Vec<JoinHandle<()>>,
}

/// What every relay thread of one sandbox sees.
#[derive(Default)]
struct Shared {
    stopping: AtomicBool,
    /// Duplicates of the sockets relays block on, by connection (0: the held
    /// sockets), to wake them with `shutdown` when stopping.
    wakers: Mutex<Vec<(u64, Waker)>>,
    next_id: AtomicU64,
    /// UDP peers' threads, which hold the published socket too.
    peer_threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Registers wakers unless stopping has begun (then the caller quits).
    fn watch(&self, id: u64, ws: impl IntoIterator<Item = Waker>) -> bool {
        let mut w = lock(&self.wakers);
        if self.stopping() {
            return false;
        }
        w.extend(ws.into_iter().map(|x| (id, x)));
        true
    }

    fn unwatch(&self, id: u64) {
        lock(&self.wakers).retain(|(i, _)| *i != id);
    }
}

enum Waker {
    Listener(TcpListener),
    Stream(TcpStream),
    Udp(UdpSocket),
}

impl Waker {
    fn wake(&self) {
        let fd = match self {
            Waker::Listener(l) => l.as_raw_fd(),
            Waker::Stream(s) => s.as_raw_fd(),
            Waker::Udp(s) => s.as_raw_fd(),
        };
        // SAFETY: shutdown(2) on a descriptor we own; errors (not connected)
        // are irrelevant: the call still wakes blocked readers.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }
}

/// Starts relaying each held socket to `sandbox_ip` at its container port.
pub fn start(sandbox_ip: Ipv4Addr, held: Vec<(Held, u16)>) -> io::Result<Forwarder> {
    let mut fwd = Forwarder {
        shared: Arc::new(Shared {
            next_id: AtomicU64::new(1),
            ..Shared::default()
        }),
        threads: Vec::new(),
    };
    for (socket, container_port) in held {
        let target = SocketAddr::V4(SocketAddrV4::new(sandbox_ip, container_port));
        let shared = fwd.shared.clone();
        let thread = match socket {
            Held::Tcp(listener) => {
                shared.watch(0, [Waker::Listener(listener.try_clone()?)]);
                std::thread::Builder::new()
                    .name("ak-forward-tcp".into())
                    .spawn(move || accept_loop(&listener, target, &shared))
            }
            Held::Udp(socket) => {
                shared.watch(0, [Waker::Udp(socket.try_clone()?)]);
                socket.set_read_timeout(Some(UDP_POLL))?;
                std::thread::Builder::new()
                    .name("ak-forward-udp".into())
                    .spawn(move || udp_loop(&socket, target, &shared))
            }
        };
        match thread {
            Ok(t) => fwd.threads.push(t),
            Err(e) => {
                fwd.stop();
                return Err(e);
            }
        }
    }
    Ok(fwd)
}

impl Forwarder {
    /// Stops every relay and closes the held sockets (the ports are free
    /// when this returns) and the connections being relayed.
    pub fn stop(self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        for (_, w) in lock(&self.shared.wakers).iter() {
            w.wake();
        }
        for t in self.threads {
            let _ = t.join();
        }
        // No new peer can appear now: the UDP loops have ended.
        let peers = std::mem::take(&mut *lock(&self.shared.peer_threads));
        for t in peers {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn accept_loop(listener: &TcpListener, target: SocketAddr, shared: &Arc<Shared>) {
    while !shared.stopping() {
        let Ok((client, _)) = listener.accept() else {
            // Woken by stop, or a transient error (EMFILE, aborted
            // handshake): look at the flag again, without spinning on an
            // error that persists.
            if !shared.stopping() {
                std::thread::sleep(ACCEPT_RETRY);
            }
            continue;
        };
        let shared = shared.clone();
        let _ = std::thread::Builder::new()
            .name("ak-forward-conn".into())
            .spawn(move || relay_connection(client, target, &shared));
    }
}

/// Copies both ways until each side has finished sending.
fn relay_connection(client: TcpStream, target: SocketAddr, shared: &Shared) {
    let Ok(upstream) = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) else {
        // Nothing listens in the sandbox: the client sees a reset, as it
        // would have from the sandbox itself.
        reset(&client);
        return;
    };
    let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
    let clones = (|| {
        Ok::<_, io::Error>((
            client.try_clone()?,
            upstream.try_clone()?,
            [
                Waker::Stream(client.try_clone()?),
                Waker::Stream(upstream.try_clone()?),
            ],
        ))
    })();
    let Ok((c2, u2, wakers)) = clones else {
        return;
    };
    if !shared.watch(id, wakers) {
        return;
    }
    let back = std::thread::Builder::new()
        .name("ak-forward-back".into())
        .spawn(move || copy_then_close(u2, c2));
    copy_then_close(client, upstream);
    if let Ok(t) = back {
        let _ = t.join();
    }
    shared.unwatch(id);
}

fn copy_then_close(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

/// Closes a connection with RST rather than FIN.
fn reset(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt with a correctly sized linger struct on our socket.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

/// One upstream socket per client address; replies go back from the
/// published socket, so the client sees them come from where it sent.
fn udp_loop(socket: &UdpSocket, target: SocketAddr, shared: &Arc<Shared>) {
    let peers: Arc<Mutex<HashMap<SocketAddr, UdpSocket>>> = Arc::default();
    let mut buf = vec![0u8; UDP_MAX];
    while !shared.stopping() {
        let Ok((n, client)) = socket.recv_from(&mut buf) else {
            continue;
        };
        if shared.stopping() {
            // Woken by stop's shutdown: what was "received" is nothing.
            break;
        }
        let known = lock(&peers).get(&client).and_then(|u| u.try_clone().ok());
        let upstream = match known {
            Some(u) => u,
            None => match udp_peer(socket, client, target, shared, &peers) {
                Ok(u) => u,
                Err(_) => continue,
            },
        };
        let _ = upstream.send(&buf[..n]);
    }
}

fn udp_peer(
    socket: &UdpSocket,
    client: SocketAddr,
    target: SocketAddr,
    shared: &Arc<Shared>,
    peers: &Arc<Mutex<HashMap<SocketAddr, UdpSocket>>>,
) -> io::Result<UdpSocket> {
    let upstream = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
    upstream.connect(target)?;
    upstream.set_read_timeout(Some(UDP_POLL))?;
    let (reader, replies) = (upstream.try_clone()?, socket.try_clone()?);
    lock(peers).insert(client, upstream.try_clone()?);
    let (shared2, peers) = (shared.clone(), peers.clone());
    let thread = std::thread::Builder::new()
        .name("ak-forward-udp-peer".into())
        .spawn(move || {
            let mut buf = vec![0u8; UDP_MAX];
            let mut idle = Duration::ZERO;
            while !shared2.stopping() && idle < UDP_IDLE {
                match reader.recv(&mut buf) {
                    Ok(n) => {
                        idle = Duration::ZERO;
                        let _ = replies.send_to(&buf[..n], client);
                    }
                    // A timeout, or ICMP unreachable from the sandbox
                    // (nothing bound there yet): keep the peer, the client
                    // may retry.
                    Err(_) => idle += UDP_POLL,
                }
            }
            lock(&peers).remove(&client);
        })?;
    let mut threads = lock(&shared.peer_threads);
    threads.retain(|t| !t.is_finished());
    threads.push(thread);
    Ok(upstream)
}
