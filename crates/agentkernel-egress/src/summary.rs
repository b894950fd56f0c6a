//! What went through the proxy, per host, for receipts: counted as it
//! happens (a few atomic adds per read or write), reported when the proxy
//! ends (one-shot sandboxes) or when asked over a Unix socket (kept
//! sandboxes: a command's share is the difference of two reports).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// One host's counts. Bytes are those between the sandbox and the proxy:
/// for a CONNECT (tunnelled or intercepted) the connection's bytes after the
/// CONNECT, TLS included; for a plain-HTTP request its request and response
/// bodies.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSummary {
    /// CONNECTs, and plain-HTTP requests (each its own upstream connection).
    pub connections: u64,
    /// HTTP requests the proxy saw: intercepted and plain HTTP (a tunnel's
    /// requests are encrypted end to end and not counted).
    pub requests: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Refused by the proxy: 403 (not allowed, or a placeholder sent to a
    /// host it is not bound to) and 421 (a request for another host on an
    /// intercepted connection).
    pub refused: u64,
    /// The upstream could not be reached or answered badly (502).
    pub failed: u64,
    /// Secret name → requests it was injected into. Never values.
    pub injected: BTreeMap<String, u64>,
}

/// Everything the proxy saw, per host (lower case, no port) and in total.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub hosts: BTreeMap<String, HostSummary>,
    pub totals: HostSummary,
    /// False when connections were still open when the report was taken
    /// (they did not end within the drain limit): their later bytes are
    /// missing.
    pub complete: bool,
}

impl Summary {
    /// What happened between `before` and `self` (two reports of one
    /// proxy): a kept sandbox's command.
    pub fn since(&self, before: &Summary) -> Summary {
        let mut hosts = BTreeMap::new();
        for (host, now) in &self.hosts {
            let diff = match before.hosts.get(host) {
                Some(then) => now.minus(then),
                None => now.clone(),
            };
            if diff != HostSummary::default() {
                hosts.insert(host.clone(), diff);
            }
        }
        Summary::from_hosts(hosts, self.complete)
    }

    fn from_hosts(hosts: BTreeMap<String, HostSummary>, complete: bool) -> Summary {
        let mut totals = HostSummary::default();
        for host in hosts.values() {
            totals.add(host);
        }
        Summary {
            hosts,
            totals,
            complete,
        }
    }
}

impl HostSummary {
    fn add(&mut self, other: &HostSummary) {
        self.connections += other.connections;
        self.requests += other.requests;
        self.bytes_up += other.bytes_up;
        self.bytes_down += other.bytes_down;
        self.refused += other.refused;
        self.failed += other.failed;
        for (name, n) in &other.injected {
            *self.injected.entry(name.clone()).or_default() += n;
        }
    }

    fn minus(&self, before: &HostSummary) -> HostSummary {
        let injected = self
            .injected
            .iter()
            .filter_map(|(name, n)| {
                let d = n.saturating_sub(before.injected.get(name).copied().unwrap_or(0));
                (d > 0).then(|| (name.clone(), d))
            })
            .collect();
        HostSummary {
            connections: self.connections.saturating_sub(before.connections),
            requests: self.requests.saturating_sub(before.requests),
            bytes_up: self.bytes_up.saturating_sub(before.bytes_up),
            bytes_down: self.bytes_down.saturating_sub(before.bytes_down),
            refused: self.refused.saturating_sub(before.refused),
            failed: self.failed.saturating_sub(before.failed),
            injected,
        }
    }
}

/// One host's live counters.
#[derive(Default)]
pub(crate) struct Counters {
    connections: AtomicU64,
    requests: AtomicU64,
    pub(crate) bytes_up: AtomicU64,
    pub(crate) bytes_down: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
    injected: Mutex<BTreeMap<String, u64>>,
}

impl Counters {
    pub(crate) fn connection(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// How the proxy answered: 403/421 refused, 502 failed.
    pub(crate) fn status(&self, status: u16) {
        match status {
            403 | 421 => self.refused.fetch_add(1, Ordering::Relaxed),
            502 => self.failed.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
    }

    pub(crate) fn injected<'a>(&self, names: impl IntoIterator<Item = &'a String>) {
        let mut injected = self.injected.lock().unwrap_or_else(|p| p.into_inner());
        for name in names {
            *injected.entry(name.clone()).or_default() += 1;
        }
    }

    fn read(&self) -> HostSummary {
        HostSummary {
            connections: self.connections.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            bytes_up: self.bytes_up.load(Ordering::Relaxed),
            bytes_down: self.bytes_down.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            injected: self
                .injected
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

/// The proxy's counts, and how many connections are still being served.
#[derive(Default)]
pub(crate) struct Tally {
    hosts: Mutex<HashMap<String, Arc<Counters>>>,
    active: Arc<AtomicUsize>,
}

/// Held by each task that serves a connection; dropped when it ends.
pub(crate) struct Active(Arc<AtomicUsize>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Hosts counted one by one; past this many, a sandbox asking for ever new
/// names (which costs it nothing) would grow the proxy's memory on the
/// host without bound, so the rest share one entry, `OTHER_HOSTS`.
pub const MAX_HOSTS: usize = 1000;
/// The entry of the hosts past `MAX_HOSTS` (not a host name: it has spaces).
pub const OTHER_HOSTS: &str = "(other hosts)";

impl Tally {
    pub(crate) fn host(&self, host: &str) -> Arc<Counters> {
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(counters) = hosts.get(host) {
            return counters.clone();
        }
        let key = if hosts.len() < MAX_HOSTS {
            host
        } else {
            OTHER_HOSTS
        };
        hosts.entry(key.to_string()).or_default().clone()
    }

    pub(crate) fn active(&self) -> Active {
        self.active.fetch_add(1, Ordering::AcqRel);
        Active(self.active.clone())
    }

    /// The counts once no connection is being served, or at `limit`.
    pub(crate) async fn drained(&self, limit: Duration) -> Summary {
        let start = Instant::now();
        while self.active.load(Ordering::Acquire) > 0 && start.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let complete = self.active.load(Ordering::Acquire) == 0;
        let hosts = self
            .hosts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(host, counters)| (host.clone(), counters.read()))
            .collect();
        Summary::from_hosts(hosts, complete)
    }
}

/// A connection from the sandbox whose bytes count toward a host.
pub(crate) struct CountedIo<T> {
    inner: T,
    counters: Arc<Counters>,
}

impl<T> CountedIo<T> {
    pub(crate) fn new(inner: T, counters: Arc<Counters>) -> Self {
        CountedIo { inner, counters }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CountedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        self.counters
            .bytes_up
            .fetch_add(read as u64, Ordering::Relaxed);
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &polled {
            self.counters
                .bytes_down
                .fetch_add(*n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// How long a report waits for open connections to end: the sandbox's
/// side is closed by then (its processes are gone), so they end as soon as
/// the proxy has read the last bytes; a connection a kept sandbox's
/// background process keeps open is reported as it stands.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(2);

/// `dir/name` as a path short enough for a Unix socket's address however
/// long `dir` is (through the directory's descriptor); keep the returned
/// file open while the path is used.
fn short_socket_path(dir: &Path, name: &str) -> io::Result<(std::fs::File, PathBuf)> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(dir)?;
    let path = PathBuf::from(format!("/proc/self/fd/{}/{name}", dir.as_raw_fd()));
    Ok((dir, path))
}

/// The kept sandbox's report socket, in its private state directory:
/// bound when the proxy starts, so a socket that cannot be is a start-up
/// error, not a missing summary later.
pub fn bind_reports(socket: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    let dir = socket.parent().unwrap_or(Path::new("."));
    let name = socket.file_name().unwrap_or_default().to_string_lossy();
    let (_dir, path) = short_socket_path(dir, &name)?;
    let _ = std::fs::remove_file(&path);
    std::os::unix::net::UnixListener::bind(&path)
}

/// Answers each connection from a process of our own uid with the summary
/// as JSON, once open connections have drained.
pub(crate) async fn serve_reports(listener: tokio::net::UnixListener, tally: Arc<Tally>) {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if stream.peer_cred().map(|c| c.uid()).ok() != Some(uid) {
            continue;
        }
        let tally = tally.clone();
        tokio::spawn(async move {
            let summary = tally.drained(DRAIN_LIMIT).await;
            if let Ok(json) = serde_json::to_vec(&summary) {
                let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, &json).await;
            }
        });
    }
}

/// The report of the proxy serving `socket`, or `None` when none answers
/// (no proxy, or it ended). Blocking, bounded by `DRAIN_LIMIT` and a margin.
pub fn request_report(socket: &Path) -> Option<Summary> {
    use std::io::Read;
    let dir = socket.parent()?;
    let name = socket.file_name()?.to_string_lossy();
    let (_dir, path) = short_socket_path(dir, &name).ok()?;
    let mut stream = std::os::unix::net::UnixStream::connect(&path).ok()?;
    stream
        .set_read_timeout(Some(DRAIN_LIMIT + Duration::from_secs(3)))
        .ok()?;
    let mut json = Vec::new();
    stream.read_to_end(&mut json).ok()?;
    serde_json::from_slice(&json).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hosts_past_the_limit_share_one_entry() {
        let tally = Tally::default();
        for i in 0..MAX_HOSTS + 50 {
            tally.host(&format!("h{i}.example")).connection();
        }
        tally.host("h0.example").connection();
        let summary = tally.drained(Duration::ZERO).await;
        assert_eq!(summary.hosts.len(), MAX_HOSTS + 1);
        assert_eq!(summary.hosts[OTHER_HOSTS].connections, 50);
        assert_eq!(summary.hosts["h0.example"].connections, 2);
        assert_eq!(summary.totals.connections, MAX_HOSTS as u64 + 51);
    }

    fn host(connections: u64, injected: &[(&str, u64)]) -> HostSummary {
        HostSummary {
            connections,
            requests: connections * 2,
            bytes_up: 10 * connections,
            injected: injected.iter().map(|(k, n)| (k.to_string(), *n)).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_commands_share_is_the_difference_and_unchanged_hosts_drop_out() {
        let before = Summary::from_hosts(
            [
                ("a".to_string(), host(1, &[("K", 2)])),
                ("b".into(), host(3, &[])),
            ]
            .into(),
            true,
        );
        let after = Summary::from_hosts(
            [
                ("a".to_string(), host(2, &[("K", 3), ("L", 1)])),
                ("b".into(), host(3, &[])),
                ("c".into(), host(1, &[])),
            ]
            .into(),
            true,
        );
        let share = after.since(&before);
        assert_eq!(share.hosts.keys().collect::<Vec<_>>(), ["a", "c"]);
        assert_eq!(share.hosts["a"], host(1, &[("K", 1), ("L", 1)]));
        assert_eq!(share.totals.connections, 2);
        assert_eq!(share.totals.bytes_up, 20);
        assert_eq!(
            share.totals.injected,
            host(0, &[("K", 1), ("L", 1)]).injected
        );
    }
}
