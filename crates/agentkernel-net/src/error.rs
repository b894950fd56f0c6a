//! One error type for the crate. Every variant renders as a single line that
//! names what failed and what to do about it, because the CLI prints it as is.

use std::io;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use crate::Protocol;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A kernel request (netlink, setns, sysctl) failed.
    #[error("cannot {action}: {}; {}", os_text(source), hint(source))]
    Kernel { action: String, source: io::Error },

    /// The sandbox's init process is gone (or was never there).
    #[error("cannot open the network namespace of sandbox process {pid}: {}; the sandbox exited before its network was set up", os_text(source))]
    NoNetns { pid: i32, source: io::Error },

    /// `iptables`/`iptables-save`/`iptables-restore` failed or is missing.
    #[error("{command} failed: {detail}; install iptables (nf_tables or legacy backend) and run as root, or use --no-network")]
    Iptables { command: String, detail: String },

    /// `nft` (a VM tap's ingress filter) failed or is missing.
    #[error("{command} failed: {detail}; install nftables (the nft command) and run as root, or use --no-network")]
    Nft { command: String, detail: String },

    /// A published host port is taken, by another program or another sandbox.
    #[error("host port {ip}:{port}/{protocol} is already in use{by}; choose another host port in --publish")]
    PortInUse {
        ip: Ipv4Addr,
        port: u16,
        protocol: Protocol,
        /// " by sandbox X" when the holder is one of ours, else empty.
        by: String,
    },

    /// Every address of the subnet is leased.
    #[error("no free address left in {subnet} (all leases under {dir} are taken); run `agentkernel sandbox gc` to release dead sandboxes' leases or configure a larger subnet")]
    SubnetExhausted { subnet: String, dir: PathBuf },

    /// Reading or writing the lease store failed.
    #[error(
        "cannot {action} {path}: {}; check that the state directory is writable by this user",
        os_text(source)
    )]
    State {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },

    /// A lease file exists but is not one we wrote.
    #[error("invalid lease file {path}: {reason}; delete it if no sandbox uses that address")]
    BadLease { path: PathBuf, reason: String },

    /// Caller input the crate cannot work with (bad subnet, sandbox id, port).
    #[error("invalid network setting: {0}")]
    Invalid(String),
}

impl Error {
    pub(crate) fn kernel(action: impl Into<String>, source: io::Error) -> Self {
        Error::Kernel {
            action: action.into(),
            source,
        }
    }

    pub(crate) fn state(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::State {
            action,
            path: path.into(),
            source,
        }
    }
}

/// `strerror` without std's " (os error N)" suffix, so messages stay short.
fn os_text(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// The fix for the common errnos; the generic one otherwise.
fn hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => "run as root or use --no-network",
        Some(libc::EOPNOTSUPP) | Some(libc::EAFNOSUPPORT) | Some(libc::EPROTONOSUPPORT) => {
            "the kernel lacks bridge/veth support (load the `bridge` and `veth` modules) or use --no-network"
        }
        Some(libc::EEXIST) => "an interface with that name already exists; remove it (`ip link del NAME`) and retry",
        _ => "check `ip link` and `dmesg`, or use --no-network",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_error_is_one_line_with_fix() {
        let e = Error::kernel(
            "create bridge agentkernel0",
            io::Error::from_raw_os_error(libc::EPERM),
        );
        assert_eq!(
            e.to_string(),
            "cannot create bridge agentkernel0: Operation not permitted; run as root or use --no-network"
        );
    }
}
