//! The sandbox's side of the egress proxy (see the `agentkernel-egress`
//! crate): the proxy's listening socket is created *inside* the sandbox's
//! network namespace — bound to its loopback, so nothing else on the machine
//! can reach it — and handed to the proxy process, which runs on the host;
//! the proxy's CA is added to the root's trust stores.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Stdio;

use agentkernel_core::egress::{EgressSpec, SecretValues};
use agentkernel_core::spec::SandboxSpec;
use agentkernel_core::{Error, Result};
use agentkernel_egress::ProxyConfig;

use serde::{Deserialize, Serialize};

use crate::sys;

/// Where the proxy listens inside the sandbox (its own loopback).
pub const PROXY_PORT: u16 = 3128;

/// Everything the sandbox's trust store needs and the `*_CA_*` variables name.
pub const CA_FILE: &str = "/etc/agentkernel/egress-ca.crt";
pub const BUNDLE_FILE: &str = "/etc/agentkernel/ca-bundle.crt";

/// The system bundles the CA is appended to when the image has them
/// (Debian/Alpine, RHEL/Fedora); tools that ignore the variables read these.
pub const SYSTEM_BUNDLES: &[&str] = &[
    "etc/ssl/certs/ca-certificates.crt",
    "etc/pki/tls/certs/ca-bundle.crt",
];

const LISTENER: u8 = b'l';
const CONNECTIONS: u8 = b'C';
const CONNECTION: u8 = b'c';

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EgressPlan {
    /// The proxy's CA certificate (public; its key stays in the proxy).
    pub ca_pem: String,
    /// Our end of a socket pair with the proxy process: the listening
    /// socket goes to it over SCM_RIGHTS. Inherited across the exec into the
    /// helper; init closes it with every other inherited fd.
    pub handoff_fd: RawFd,
    /// The write end of a pipe whose read end the proxy watches: the proxy
    /// exits when the last holder (the supervisor) is gone.
    pub lifeline_fd: RawFd,
}

/// The variables every common client reads: the proxy, and the bundle.
pub fn environment() -> Vec<(&'static str, String)> {
    let proxy = format!("http://127.0.0.1:{PROXY_PORT}");
    let mut env = Vec::new();
    for key in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
        env.push((key, proxy.clone()));
    }
    env.push(("NO_PROXY", "localhost,127.0.0.1".to_string()));
    env.push(("no_proxy", "localhost,127.0.0.1".to_string()));
    env.push(("NODE_USE_ENV_PROXY", "1".to_string()));
    for key in [
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "GIT_SSL_CAINFO",
    ] {
        env.push((key, BUNDLE_FILE.to_string()));
    }
    env.push(("NODE_EXTRA_CA_CERTS", CA_FILE.to_string()));
    env
}

/// In a thread that is in the sandbox's (new) network namespace: brings up
/// loopback, binds the proxy's port on it and sends the socket to the proxy.
pub(crate) fn listen_here(egress: &EgressPlan) -> io::Result<()> {
    crate::net::loopback_up()?;
    let listener = std::net::TcpListener::bind(("127.0.0.1", PROXY_PORT))
        .map_err(sys::context("bind the egress proxy's port in the sandbox"))?;
    // SAFETY: the fd was inherited for this purpose (see `EgressPlan`) and
    // is only borrowed here; the supervisor closes it after.
    let handoff = unsafe { std::os::fd::BorrowedFd::borrow_raw(egress.handoff_fd) };
    let handoff = handoff.try_clone_to_owned()?;
    send_listener(&handoff, &listener, None).map_err(sys::context(
        "hand the listening socket to the egress proxy",
    ))
}

/// Sends the listening socket to the proxy process. With `sandbox_process`
/// (a pidfd: an engine's kept container, which no agentkernel process
/// holds), the proxy ends when that process does instead of at the
/// lifeline's end.
pub fn send_listener(
    handoff: &OwnedFd,
    listener: &std::net::TcpListener,
    sandbox_process: Option<&OwnedFd>,
) -> io::Result<()> {
    let mut fds = vec![listener.as_raw_fd()];
    fds.extend(sandbox_process.map(AsRawFd::as_raw_fd));
    crate::process::channel::send_message(handoff, LISTENER, &fds)
}

/// Tells the proxy that connections will come one by one
/// ([`send_connection`]) instead of a listening socket: a VM's (qemu),
/// which has no network namespace the proxy could listen in. Sent before
/// the VM boots, so the proxy serves (and reports) from then on.
pub fn expect_connections(handoff: &OwnedFd) -> io::Result<()> {
    crate::process::channel::send_message(handoff, CONNECTIONS, &[])
}

/// Sends the proxy one connection to serve, already accepted: the VM's
/// agent listens in the guest and the run carries each connection to the
/// proxy over a socket pair, whose other end is the caller's. No address
/// anyone else could connect to exists on the host.
pub fn send_connection(
    handoff: &OwnedFd,
    stream: &std::os::unix::net::UnixStream,
) -> io::Result<()> {
    crate::process::channel::send_message(handoff, CONNECTION, &[stream.as_raw_fd()])
}

/// What the proxy serves: a listening socket (native, Docker, Podman) or
/// connections sent one by one ([`send_connection`]).
pub enum Handed {
    /// The listening socket, and the sandbox's process to outlive no
    /// longer than, if one was sent.
    Listener(std::net::TcpListener, Option<OwnedFd>),
    /// Connections, each sent on the handoff socket ([`receive_connection`]).
    Connections,
}

/// The proxy process's end: what it serves, once the sandbox exists.
pub fn receive_listener(handoff: &OwnedFd) -> io::Result<Handed> {
    match crate::process::channel::recv_message(handoff)? {
        (LISTENER, fds) if (1..=2).contains(&fds.len()) => {
            let mut fds = fds.into_iter();
            let listener = std::net::TcpListener::from(fds.next().expect("one fd"));
            Ok(Handed::Listener(listener, fds.next()))
        }
        (CONNECTIONS, fds) if fds.is_empty() => Ok(Handed::Connections),
        _ => Err(io::Error::other("no listening socket from the sandbox")),
    }
}

/// The next connection ([`Handed::Connections`]); `None` once the run has
/// closed its end.
pub fn receive_connection(handoff: &OwnedFd) -> Option<std::os::unix::net::UnixStream> {
    match crate::process::channel::recv_message(handoff) {
        Ok((CONNECTION, fds)) if fds.len() == 1 => fds.into_iter().next().map(Into::into),
        _ => None,
    }
}

/// Adds the CA to the root being built (its copy-on-write layer: never the
/// host's or the image store's files): `/etc/agentkernel/egress-ca.crt`,
/// `/etc/agentkernel/ca-bundle.crt` (the system bundle plus the CA), and
/// appended to each system bundle the image has.
pub fn install_ca(root: &OwnedFd, ca_pem: &str) -> io::Result<()> {
    let mut system = String::new();
    for bundle in SYSTEM_BUNDLES {
        let Some(file) = open_in_root(root, bundle, libc::O_RDWR | libc::O_APPEND)? else {
            continue;
        };
        let mut file = std::fs::File::from(file);
        if system.is_empty() {
            file.read_to_string(&mut system)
                .map_err(sys::context(format_args!("read /{bundle}")))?;
        }
        io::Write::write_all(&mut file, format!("\n{ca_pem}").as_bytes())
            .map_err(sys::context(format_args!("add the egress CA to /{bundle}")))?;
    }
    let ca_rel = CA_FILE.trim_start_matches('/');
    let bundle_rel = BUNDLE_FILE.trim_start_matches('/');
    sys::write_beneath(root, ca_rel, ca_pem)?;
    sys::write_beneath(root, bundle_rel, &format!("{system}\n{ca_pem}"))
}

/// Opens `rel` with every symlink resolved inside `root` and on the root's
/// own filesystem (a bundle that links into /proc or a mount is skipped
/// with an error, never written through); `None` when it does not exist.
fn open_in_root(root: &OwnedFd, rel: &str, flags: i32) -> io::Result<Option<OwnedFd>> {
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    const RESOLVE_NO_XDEV: u64 = 0x01;
    const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
    const RESOLVE_IN_ROOT: u64 = 0x10;
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV,
    };
    let path = sys::cstr(rel)?;
    // SAFETY: valid dir fd, C string and open_how of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ENOTDIR) => Ok(None),
            _ => Err(sys::context(format_args!("open /{rel}"))(e)),
        };
    }
    // SAFETY: just opened, ours.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }))
}

/// The two ends of the socket the listening socket travels over: ours
/// (kept through the exec into the helper) and the proxy's.
pub fn handoff_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    crate::process::channel::socketpair()
}

/// Caught in `main()` before clap, like the native helper.
pub const PROXY_SUBCOMMAND: &str = "__egress-proxy";

/// The proxy process's descriptors: its configuration (a pipe), the socket
/// its listening socket arrives on, and the lifeline (EOF: the sandbox's
/// owner is gone).
pub const CONFIG_FD: RawFd = 3;
pub const HANDOFF_FD: RawFd = 4;
pub const LIFELINE_FD: RawFd = 5;
/// The proxy's final report (`ProxyConfig::final_report`), when asked for.
pub const REPORT_FD: RawFd = 6;

/// The kept sandbox's socket its proxy answers report requests on (its
/// state directory is private to its owner and hidden from every sandbox).
pub fn report_socket(store: &agentkernel_core::state::Store, name: &str) -> std::path::PathBuf {
    store.sandbox_dir(name).join("egress-report.sock")
}

/// What the run wants to learn from the proxy (only with `--receipt`).
#[derive(Debug, Default)]
pub struct Reports {
    /// A kept sandbox's report socket.
    pub socket: Option<std::path::PathBuf>,
    /// A one-shot run's final report, read once the proxy has drained.
    pub final_report: bool,
}

/// `--branch` reusing a sandbox: its proxy (or none) was set when it was
/// created; egress options given now would silently not apply.
pub fn refuse_on_reuse(spec: &SandboxSpec, name: &str) -> Result<()> {
    if spec.egress.as_ref().is_some_and(EgressSpec::needs_proxy) {
        return Err(Error::Conflict(format!(
            "sandbox {name} exists: -S, --allow-host and --egress-log apply when a sandbox is created; drop them, or remove {name} first"
        )));
    }
    Ok(())
}

/// A started proxy process, waiting for its listening socket.
pub struct StartedProxy {
    pub ca_pem: String,
    /// Where the listening socket goes (see `receive_listener`).
    pub handoff: OwnedFd,
    /// Held while the sandbox lives; its closing ends the proxy.
    pub lifeline: OwnedFd,
    /// Where the final report arrives (`Reports::final_report`).
    pub final_report: Option<OwnedFd>,
}

/// Starts `agentkernel __egress-proxy` on the host: configuration and values
/// through a pipe, the CA certificate back on its stdout. Fails closed: any
/// error is the run's error, and the process is gone.
pub fn start(
    egress: &EgressSpec,
    secrets: &SecretValues,
    reports: Reports,
) -> Result<StartedProxy> {
    let fail = |why: String| Error::Backend {
        backend: "egress proxy",
        message: why,
    };
    let mut config = ProxyConfig::new(egress, secrets);
    config.report_socket = reports.socket;
    config.final_report = reports.final_report;
    // Before a process exists: a bad configuration is the caller's one line.
    config.validate().map_err(|e| fail(e.to_string()))?;
    let io = |what: &'static str| move |e: std::io::Error| fail(format!("{what}: {e}"));
    let (config_read, config_write) = crate::sys::pipe().map_err(io("pipe"))?;
    let (lifeline_read, lifeline) = crate::sys::pipe().map_err(io("pipe"))?;
    let (handoff, proxy_handoff) = handoff_pair().map_err(io("socketpair"))?;
    let (final_report, report_write) = match reports.final_report {
        true => {
            let (read, write) = crate::sys::pipe().map_err(io("pipe"))?;
            (Some(read), Some(write))
        }
        false => (None, None),
    };
    let mut inherited = vec![
        config_read.as_raw_fd(),
        proxy_handoff.as_raw_fd(),
        lifeline_read.as_raw_fd(),
    ];
    inherited.extend(report_write.as_ref().map(AsRawFd::as_raw_fd));
    let mut command = std::process::Command::new("/proc/self/exe");
    command
        .arg0("agentkernel")
        .arg(PROXY_SUBCOMMAND)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        // It may outlive this command (a kept sandbox's): holding the
        // caller's stderr would keep a `$(agentkernel run …)` waiting.
        .stderr(Stdio::null());
    // SAFETY: only async-signal-safe calls (fcntl, dup2, setsid) between
    // fork and exec.
    unsafe {
        command.pre_exec(move || {
            // Out of the way first (a source may be 3..5 itself), then into place.
            let mut high = [0; 4];
            for (i, fd) in inherited.iter().enumerate() {
                high[i] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 10);
                if high[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, fd) in high[..inherited.len()].iter().enumerate() {
                if libc::dup2(*fd, CONFIG_FD + i as RawFd) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // Its own session: the terminal's Ctrl-C is the sandbox's, and
            // the proxy must serve until the sandbox is gone.
            libc::setsid();
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(io("cannot start it"))?;
    drop((config_read, proxy_handoff, lifeline_read, report_write));
    let result = (|| {
        let json = serde_json::to_vec(&config).map_err(|e| fail(e.to_string()))?;
        std::fs::File::from(config_write)
            .write_all(&json)
            .map_err(io("cannot send its configuration"))?;
        let mut out = String::new();
        child
            .stdout
            .take()
            .expect("piped")
            .read_to_string(&mut out)
            .map_err(io("cannot read its CA"))?;
        match out.strip_prefix("error: ") {
            None if out.starts_with("-----BEGIN CERTIFICATE-----") => Ok(out),
            Some(why) => Err(fail(why.trim().to_string())),
            None => Err(fail("it exited during start-up".into())),
        }
    })();
    match result {
        Ok(ca_pem) => Ok(StartedProxy {
            ca_pem,
            handoff,
            lifeline,
            final_report,
        }),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

/// The proxy's final report: read from `pipe` once it has drained (it
/// ends when the sandbox does, drains for at most `DRAIN_LIMIT`). `None`
/// when it ended without one.
pub fn read_final_report(pipe: OwnedFd) -> Option<agentkernel_egress::summary::Summary> {
    let limit = agentkernel_egress::summary::DRAIN_LIMIT + std::time::Duration::from_secs(3);
    let deadline = std::time::Instant::now() + limit;
    let mut json = Vec::new();
    let mut file = std::fs::File::from(pipe);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut poll = libc::pollfd {
            fd: file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut poll, 1, left.as_millis() as i32) } <= 0 {
            return None;
        }
        let mut buffer = [0u8; 8192];
        match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => json.extend_from_slice(&buffer[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    serde_json::from_slice(&json).ok()
}

/// A report as a receipt records it; a proxy that ended without one is
/// said so, never shown as no traffic.
pub fn report_json(summary: Option<agentkernel_egress::summary::Summary>) -> serde_json::Value {
    match summary.map(serde_json::to_value) {
        Some(Ok(value)) => value,
        _ => serde_json::json!({
            "complete": false,
            "error": "the egress proxy ended without reporting",
        }),
    }
}

/// Runs one command in the kept sandbox `name` and, when a receipt observes
/// it and the sandbox has a proxy, records the proxy's traffic during the
/// command: the difference of its reports before and after.
pub async fn observing_kept<T>(
    store: &agentkernel_core::state::Store,
    name: &str,
    command: impl std::future::Future<Output = T>,
) -> T {
    if !agentkernel_core::observe::enabled() {
        return command.await;
    }
    let socket = report_socket(store, name);
    let ask = |socket: std::path::PathBuf| async move {
        tokio::task::spawn_blocking(move || agentkernel_egress::summary::request_report(&socket))
            .await
            .ok()
            .flatten()
    };
    let before = ask(socket.clone()).await;
    let result = command.await;
    if let Some(before) = before {
        let after = ask(socket).await;
        agentkernel_core::observe::egress(report_json(after.map(|a| a.since(&before))));
    }
    result
}

impl EgressPlan {
    /// The run process's own copies of the descriptors the helper took
    /// over: closed once the helper (an observed run's child) has ended, so
    /// the proxy's lifeline is held by the sandbox alone.
    pub fn close_ours(&self) {
        for fd in [self.handoff_fd, self.lifeline_fd] {
            // SAFETY: these were released from `StartedProxy` by `into_plan`
            // for the helper; the helper has its own copies.
            unsafe { libc::close(fd) };
        }
    }
}

impl StartedProxy {
    /// Makes the two descriptors survive the exec into the native helper
    /// and hands their numbers to the plan.
    pub fn into_plan(self) -> std::io::Result<EgressPlan> {
        for fd in [&self.handoff, &self.lifeline] {
            // SAFETY: clears FD_CLOEXEC on an fd we own.
            if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(EgressPlan {
            ca_pem: self.ca_pem,
            handoff_fd: self.handoff.into_raw_fd(),
            lifeline_fd: self.lifeline.into_raw_fd(),
        })
    }
}
