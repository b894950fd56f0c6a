//! A VM's network: the native backend's, through a tap instead of a veth.
//!
//! The process that starts QEMU (the CLI for a one-shot run, the holder for
//! a kept or warm VM) leases an address from the same allocator as native
//! sandboxes (`agentkernel_net`, machine-wide leases under
//! `/run/agentkernel`), publishes the ports and creates a tap on
//! `agentkernel0` whose bridge port is isolated like a veth's. QEMU gets the
//! tap as an inherited descriptor (`-netdev tap,fd=N` and a virtio-net NIC
//! with the lease's MAC); the guest agent gives `eth0` the lease's address,
//! route and `/etc/resolv.conf`. The host's rules (agentkernel-net's
//! `nat.rs`) match on the bridge, so a VM gets exactly what a native
//! sandbox gets: out through NAT, its published ports in, never the host's
//! loopback or its other addresses, never another sandbox.
//!
//! Lifetime: QEMU holds the tap's only descriptor, so the kernel deletes the
//! tap when QEMU dies, however it dies. The lease (address, port rules,
//! relay) is released when QEMU is reaped ([`crate::session::VmProcess`]);
//! its id names the process that holds it, so if that process is killed
//! `sandbox gc` (agentkernel_native::net::collect_dead) releases it.

use std::os::fd::OwnedFd;

use agentkernel_core::state::Owner;
use agentkernel_native::plan::Port;
use agentkernel_net::Lease;
use serde::{Deserialize, Serialize};

use crate::passt::Passt;
use crate::protocol::GuestNetwork;
use crate::{fail, Result};

/// A VM's network as the run asks for it: fixed when it boots, so part of
/// a warm VM's pool key (where `ports` is always empty: a run that
/// publishes ports boots its own VM).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub ports: Vec<Port>,
}

/// A booted VM's hold on the network: released once, when QEMU is gone.
#[derive(Debug)]
pub(crate) enum Attached {
    /// As root: a lease and a tap on agentkernel's bridge.
    Bridge(Lease),
    /// Without root: passt ([`crate::passt`]).
    UserMode(Passt),
}

/// How QEMU reaches the network: what the descriptor it inherits is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NicBackend {
    /// A tap device (`-netdev tap,fd=N`).
    Tap,
    /// A stream socket speaking QEMU's framed protocol (`-netdev socket,fd=N`).
    Stream,
}

impl Attached {
    pub(crate) fn guest(&self) -> GuestNetwork {
        match self {
            Attached::Bridge(lease) => GuestNetwork {
                mac: mac_text(agentkernel_net::guest_mac(lease)),
                ip: lease.ip,
                prefix: lease.prefix,
                gateway: lease.gateway,
                resolv_conf: agentkernel_net::resolv_conf(),
            },
            Attached::UserMode(_) => Passt::guest(),
        }
    }

    pub(crate) fn mac(&self) -> String {
        match self {
            Attached::Bridge(lease) => mac_text(agentkernel_net::guest_mac(lease)),
            Attached::UserMode(_) => Passt::mac(),
        }
    }

    pub(crate) fn backend(&self) -> NicBackend {
        match self {
            Attached::Bridge(_) => NicBackend::Tap,
            Attached::UserMode(_) => NicBackend::Stream,
        }
    }

    /// Where the published ports landed (on stderr, as native says it).
    pub fn port_lines(&self) -> Vec<String> {
        let Attached::Bridge(lease) = self else {
            return Vec::new();
        };
        lease
            .ports
            .iter()
            .map(|p| {
                format!(
                    "agentkernel: port {}:{} -> {}/{}",
                    p.host_ip, p.host_port, p.container_port, p.protocol
                )
            })
            .collect()
    }

    /// Frees the address, the port rules and relay, and the tap if QEMU's
    /// death has not already taken it; or ends passt.
    pub(crate) fn release(self) {
        let lease = match self {
            Attached::Bridge(lease) => lease,
            Attached::UserMode(passt) => return passt.stop(),
        };
        if let Err(e) = agentkernel_net::release(&agentkernel_native::net::config(), &lease) {
            eprintln!("agentkernel: warning: {e}");
        }
    }
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// As root, leases an address and creates the tap for a VM this process
/// will start (and hold: the lease's id names this process); without root,
/// starts passt for it. Returns the descriptor QEMU's NIC uses.
pub(crate) fn attach(network: &Network) -> Result<(Attached, OwnedFd)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        if !network.ports.is_empty() {
            // The CLI refuses -P without root before this; never dropped.
            return fail("a VM without root cannot publish ports; run agentkernel as root");
        }
        return Passt::start().map(|(passt, fd)| (Attached::UserMode(passt), fd));
    }
    let ports = agentkernel_native::net::port_mappings(&network.ports);
    let id = lease_id();
    agentkernel_net::attach_tap(&agentkernel_native::net::config(), &id, &ports)
        .map(|(lease, tap)| (Attached::Bridge(lease), tap))
        .or_else(|e| fail(format!("the VM's network: {e}")))
}

/// `vm-<nanos>.<boot>.<pid>.<start>`: the form native's lease ids have, so
/// `agentkernel_native::net::lease_holder_alive` tells a dead holder's
/// lease from a live one.
fn lease_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "vm-{:x}{nanos:x}.{}",
        std::process::id(),
        Owner::current().0.replace(':', ".")
    )
}
