//! `ssh -L` (direct-tcpip): the connection is made from inside the
//! sandbox's network namespace, so `localhost:PORT` is the sandbox's own
//! loopback and nothing the host can reach but the sandbox cannot is
//! reachable through it.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::Duration;

use agentkernel_core::backend::BackendKind;
use agentkernel_core::state::Store;

/// Connects to HOST:PORT as seen from inside sandbox NAME.
pub async fn connect_inside(
    store: &Store,
    name: &str,
    backend: Option<BackendKind>,
    host: &str,
    port: u16,
) -> io::Result<tokio::net::TcpStream> {
    let pid = sandbox_pid(store, name, backend).await?;
    let host = host.to_string();
    let (tx, rx) = tokio::sync::oneshot::channel();
    // A thread of its own: setns changes the calling thread for good, so it
    // must not be one the runtime reuses.
    std::thread::spawn(move || {
        let _ = tx.send(connect_in_namespace(pid, &host, port));
    });
    let stream = rx.await.map_err(io::Error::other)??;
    stream.set_nonblocking(true)?;
    tokio::net::TcpStream::from_std(stream)
}

fn connect_in_namespace(pid: i32, host: &str, port: u16) -> io::Result<std::net::TcpStream> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
    // SAFETY: setns with a namespace fd we opened, on this thread only.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let address = match host {
        "localhost" => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
        _ => match host.parse::<IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, port),
            Err(_) => (host, port)
                .to_socket_addrs()?
                .next()
                .ok_or_else(|| io::Error::other(format!("{host} has no address")))?,
        },
    };
    std::net::TcpStream::connect_timeout(&address, Duration::from_secs(10))
}

/// A process whose network namespace is the sandbox's: a native sandbox's
/// init (or rootless anchor), a container's init.
async fn sandbox_pid(store: &Store, name: &str, backend: Option<BackendKind>) -> io::Result<i32> {
    match backend {
        Some(BackendKind::Native) => {
            let held = agentkernel_native::kept::Held::load(store, name)
                .filter(|h| h.holder_alive() && h.init_alive())
                .ok_or_else(|| io::Error::other("the sandbox is gone"))?;
            Ok(held.anchor_pid.unwrap_or(held.init_pid))
        }
        Some(kind) => {
            let engine = crate::backend::engine(kind).map_err(io::Error::other)?;
            let container = agentkernel_docker::kept::container_name(name);
            let info = agentkernel_docker::inspect::container(&engine, &container)
                .await
                .map_err(io::Error::other)?;
            info.state
                .and_then(|s| s.pid)
                .filter(|pid| *pid > 0)
                .map(|pid| pid as i32)
                .ok_or_else(|| io::Error::other("the sandbox's container is not running"))
        }
        None => Err(io::Error::other("the sandbox does not exist yet")),
    }
}
