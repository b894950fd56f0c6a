//! The sandbox's side of the egress proxy (see the `agentkernel-egress`
//! crate): the proxy's listening socket is created *inside* the sandbox's
//! network namespace — bound to its loopback, so nothing else on the machine
//! can reach it — and handed to the proxy process, which runs on the host;
//! the proxy's CA is added to the root's trust stores.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use serde::{Deserialize, Serialize};

use crate::sys;

/// Where the proxy listens inside the sandbox (its own loopback).
pub const PROXY_PORT: u16 = 3128;

/// Everything the sandbox's trust store needs and the `*_CA_*` variables name.
pub const CA_FILE: &str = "/etc/agentkernel/egress-ca.crt";
pub const BUNDLE_FILE: &str = "/etc/agentkernel/ca-bundle.crt";

/// The system bundles the CA is appended to when the image has them
/// (Debian/Alpine, RHEL/Fedora); tools that ignore the variables read these.
const SYSTEM_BUNDLES: &[&str] = &[
    "etc/ssl/certs/ca-certificates.crt",
    "etc/pki/tls/certs/ca-bundle.crt",
];

const LISTENER: u8 = b'l';

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
    crate::sandbox::send_message(&handoff, LISTENER, &[listener.as_raw_fd()]).map_err(sys::context(
        "hand the listening socket to the egress proxy",
    ))
}

/// The proxy process's end: the listening socket, once the sandbox exists.
pub fn receive_listener(handoff: &OwnedFd) -> io::Result<std::net::TcpListener> {
    match crate::sandbox::recv_message(handoff)? {
        (LISTENER, mut fds) if fds.len() == 1 => Ok(std::net::TcpListener::from(fds.remove(0))),
        _ => Err(io::Error::other("no listening socket from the sandbox")),
    }
}

/// Adds the CA to the root being built (its copy-on-write layer: never the
/// host's or the image store's files): `/etc/agentkernel/egress-ca.crt`,
/// `/etc/agentkernel/ca-bundle.crt` (the system bundle plus the CA), and
/// appended to each system bundle the image has.
pub(crate) fn install_ca(root: &OwnedFd, ca_pem: &str) -> io::Result<()> {
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
    let path = sys::cstr(rel);
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
    crate::sandbox::socketpair()
}
