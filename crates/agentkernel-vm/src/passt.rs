//! A VM's network without root: `passt`, the user-mode network stack made
//! for QEMU (Debian's `passt`). It turns the guest's frames into ordinary
//! sockets of the calling user on the host — no tap, bridge or firewall
//! rule, so no privilege — as slirp4netns does for a rootless native
//! sandbox, and the guest gets the same addresses such a sandbox gets
//! (10.0.2.100/24, gateway 10.0.2.2, DNS 10.0.2.3).
//!
//! Why not QEMU's own `-netdev user`: it maps the gateway's address to the
//! host's loopback and has no switch to stop that; passt has one
//! (`--no-map-gw`), so the host's loopback services stay out of reach, as
//! they do from every other sandbox. DNS sent to 10.0.2.3 is forwarded to
//! the host's resolver (`--dns-forward`), port 53 only.
//!
//! Wiring: two socket pairs, one to passt (`--fd`), one to QEMU (`-netdev
//! socket,fd=N`: both speak QEMU's length-prefixed frames), and between
//! them a relay in this process that drops the guest's frames for the
//! host's own addresses ([`crate::frames`]: `--no-map-gw` alone does not
//! stop a hand-made packet for 127.0.0.1). No socket file anyone else could
//! connect to. Lifetime: passt serves that one connection and exits when it
//! closes (`--one-off`), i.e. when QEMU dies, however it dies; it also gets
//! SIGKILL if its parent does. passt confines itself (namespaces, seccomp)
//! as it starts.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use crate::protocol::GuestNetwork;
use crate::{fail, Result};

/// The guest's address, gateway and DNS forwarder: slirp4netns's, which a
/// rootless native sandbox has.
const GUEST_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 0, 2, 100);
const GATEWAY: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 0, 2, 2);
const DNS: &str = "10.0.2.3";
const PREFIX: u8 = 24;
/// A locally administered MAC; each VM has its own passt, so one will do.
const GUEST_MAC: &str = "52:54:00:ac:00:64";

/// `Ok` when a VM without root can have a network here; else why not, with the fix.
pub fn usable() -> std::result::Result<PathBuf, String> {
    agentkernel_core::paths::on_path("passt").ok_or_else(|| {
        "passt is not installed (apt-get install passt), which a VM's network without root needs"
            .to_string()
    })
}

/// A running passt serving one VM.
#[derive(Debug)]
pub(crate) struct Passt {
    child: Child,
}

impl Passt {
    /// Starts passt and the relay to it for a VM this process will start;
    /// returns it and the descriptor QEMU's NIC is to use.
    pub(crate) fn start() -> Result<(Passt, OwnedFd)> {
        let binary = usable().or_else(|why| fail(format!("{why}; or pass --no-network")))?;
        let pair = || {
            UnixStream::pair()
                .or_else(|e| fail(format!("cannot make a socket pair for passt: {e}")))
        };
        let (ours, theirs) = pair()?;
        let (relay_end, qemu_end) = pair()?;
        let fd = theirs.as_raw_fd();
        let mut command = Command::new(binary);
        command
            .args(["--foreground", "--quiet", "--one-off", "--ipv4-only"])
            .args(["--fd", &fd.to_string()])
            .args(["--address", &GUEST_IP.to_string()])
            .args(["--netmask", &PREFIX.to_string()])
            .args(["--gateway", &GATEWAY.to_string()])
            .args(["--dns-forward", DNS])
            // The point of passt here: the gateway is not the host's loopback.
            .arg("--no-map-gw")
            // The agent configures eth0 itself, as on the bridge.
            .args(["--no-dhcp", "--no-ndp", "--no-dhcpv6", "--no-ra"])
            // Nothing from the host into the VM (no -P without root).
            .args(["--tcp-ports", "none", "--udp-ports", "none"])
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: prctl and fcntl are async-signal-safe.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // passt keeps its end of the pair across exec.
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .or_else(|e| fail(format!("cannot start passt: {e}")))?;
        // Only passt holds its end now: if it dies, the relay sees the end.
        drop(theirs);
        let mut passt = Passt { child };
        if let Err(e) = crate::frames::relay(relay_end, ours) {
            passt.kill();
            return fail(format!("cannot relay the VM's frames: {e}"));
        }
        Ok((passt, qemu_end.into()))
    }

    /// What the guest agent gives its `eth0`.
    pub(crate) fn guest() -> GuestNetwork {
        GuestNetwork {
            mac: GUEST_MAC.to_string(),
            ip: GUEST_IP,
            prefix: PREFIX,
            gateway: GATEWAY,
            resolv_conf: format!("nameserver {DNS}\n"),
        }
    }

    pub(crate) fn mac() -> String {
        GUEST_MAC.to_string()
    }

    /// Ends passt (by its pid, through our handle) and reaps it. Once QEMU
    /// is gone passt is exiting anyway; this makes it certain.
    pub(crate) fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
