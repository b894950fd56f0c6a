//! Networking for agentkernel's native runtime: gives a sandbox's network
//! namespace an address on a host bridge, a route out through NAT, and
//! published ports, with blocking code and no daemon.
//!
//! # Shape
//!
//! ```text
//!  host netns                                   sandbox netns (pid P)
//!  ┌──────────────────────────────────────┐    ┌───────────────────────┐
//!  │ agentkernel0  10.209.0.1/16 (bridge) │    │ lo  up                │
//!  │   └─ ak1f2e3d-2 (veth, host side) ───┼────┼─ eth0 10.209.0.2/16   │
//!  │ iptables: MASQUERADE out, DNAT ports │    │ default via 10.209.0.1│
//!  └──────────────────────────────────────┘    └───────────────────────┘
//! ```
//!
//! [`attach`] is called from the host namespace while the sandbox's init
//! waits in its new, empty network namespace. Its netlink work is nine round
//! trips on two sockets: one in the host namespace, and one opened inside the
//! sandbox's namespace by a throwaway thread (a netlink socket stays bound to
//! the namespace it was created in), so the caller's thread never `setns`es.
//! The veth pair is created with its sandbox end already inside the sandbox
//! and named `eth0`. Measured on a 2-core VM: about 1.5 ms, of which the
//! kernel's own veth creation is about 1 ms and the helper thread 0.2 ms.
//! The firewall part is nothing once the bridge's rules were verified since
//! boot; else, or when ports are published, one `iptables-save` and one
//! `iptables-restore` (a few ms each).
//!
//! # Addresses and leases
//!
//! The gateway is the subnet's first host address (`.0.1` of the default
//! `10.209.0.0/16`); sandboxes get the others, never the network or broadcast
//! address. A lease is a file `STATE/net/leases/<ip>` holding the serialized
//! [`Lease`]. It is created complete and atomically (written to a temporary
//! file, then `link(2)`ed to its name, which fails with `EEXIST` if another
//! process took that address first), so concurrent attaches in any number of
//! processes never share an address and a reader never sees half a lease.
//! Allocation continues after the last address handed out
//! (`STATE/net/next-<bridge>`) rather than reusing the lowest free one, so a
//! just-released address is not immediately given to a new sandbox whose MAC
//! the host's ARP cache does not know yet.
//!
//! # Firewall rules
//!
//! Everything lives in chains of our own, each jumped to once:
//! `AGENTKERNEL-POSTROUTING` and `AGENTKERNEL-DNAT` (nat table),
//! `AGENTKERNEL-FORWARD` (filter, inserted first in `FORWARD` because Docker
//! sets the `FORWARD` policy to DROP) and `AGENTKERNEL-INPUT` (filter, first
//! in `INPUT`), plus one rule in raw `PREROUTING`. Every rule carries a
//! comment tag: `ak:<bridge>:<what>` for a bridge's setup rules,
//! `ak:<bridge>:<ip>:<id>` for one lease's port rules; removal finds rules by
//! tag, so it does not depend on how `iptables-save` spells them. Changes go
//! through `iptables-restore --noflush` (one atomic batch) under an `flock`
//! on `/run/agentkernel-net.lock`, so concurrent attaches neither duplicate
//! rules nor publish the same port twice.
//!
//! # Isolation
//!
//! A sandbox reaches the outside world and nothing of the host's or of other
//! sandboxes' but published ports (docs/security.md, "Network"):
//! - host loopback: the bridge has `route_localnet=0`, and raw `PREROUTING`
//!   drops `127.0.0.0/8` arriving on it (CVE-2020-8558);
//! - host IPv6: disabled on the bridge;
//! - the host's own addresses: `AGENTKERNEL-INPUT` rejects what comes from the
//!   bridge except replies, ping, DNS and published ports;
//! - other sandboxes: each veth's bridge port is isolated
//!   (`IFLA_BRPORT_ISOLATED`), and `AGENTKERNEL-FORWARD` rejects what the host
//!   would route from the bridge back into it.
//!
//! Published ports: each is a socket bound on the host and held while the
//! sandbox lives; connections to the host's non-loopback addresses are
//! DNATed to the sandbox, those to loopback addresses (and those from
//! sandboxes) reach the socket and a relay on threads of the process that
//! attached (`forward.rs`) carries them in.
//!
//! # What persists
//!
//! Like `docker0`: the bridge with its gateway address, our chains with their
//! jumps and the bridge's setup rules, `net.ipv4.ip_forward=1`,
//! `route_localnet=0` and `disable_ipv6=1` on the bridge. [`release`] removes
//! everything else: the lease's port rules and relay, its host veth (the
//! kernel deletes the pair anyway once the sandbox namespace dies) and its
//! lease file. [`gc`] does the same for leases of sandboxes that died without
//! a release (their relays died with them). [`teardown`] removes a bridge and
//! its setup rules too.

mod bridge;
mod error;
mod forward;
mod lease;
mod nat;
mod netlink;
mod ports;
mod resolv;
mod tap;
mod veth;

use std::fmt;
use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;

pub use error::{Error, Result};
pub use lease::Lease;
pub use resolv::resolv_conf;
pub use tap::guest_mac;

/// An IPv4 subnet, `ADDR/PREFIX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Net {
    /// A subnet usable for sandboxes: prefix 8..=30, given by its network
    /// address (host bits zero).
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Ipv4Net> {
        if !(8..=30).contains(&prefix) {
            return Err(Error::Invalid(format!(
                "subnet {addr}/{prefix}: the prefix must be between 8 and 30"
            )));
        }
        let net = Ipv4Net { addr, prefix };
        if net.network() != addr {
            return Err(Error::Invalid(format!(
                "subnet {addr}/{prefix}: host bits are set; use {}/{prefix}",
                net.network()
            )));
        }
        Ok(net)
    }

    fn mask(&self) -> u32 {
        u32::MAX << (32 - self.prefix)
    }

    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask())
    }

    /// The bridge's address: the first host address.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network()) + 1)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network())
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Net {
    type Err = Error;
    fn from_str(s: &str) -> Result<Ipv4Net> {
        let bad = || {
            Error::Invalid(format!(
                "subnet {s:?}: expected ADDR/PREFIX like 10.209.0.0/16"
            ))
        };
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        Ipv4Net::new(a.parse().map_err(|_| bad())?, p.parse().map_err(|_| bad())?)
    }
}

/// Where sandboxes are attached and where leases are kept.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// The host bridge, created on first use (≤ 15 characters).
    pub bridge: String,
    /// The sandbox subnet; the bridge gets its first host address.
    pub subnet: Ipv4Net,
    /// The runtime's state directory; leases live under `state_dir/net`.
    pub state_dir: PathBuf,
}

impl NetConfig {
    /// The defaults (bridge `agentkernel0`, `10.209.0.0/16`) with the
    /// caller's state directory.
    pub fn new(state_dir: impl Into<PathBuf>) -> NetConfig {
        NetConfig {
            state_dir: state_dir.into(),
            ..NetConfig::default()
        }
    }

    fn validate(&self) -> Result<()> {
        let b = &self.bridge;
        if b.is_empty()
            || b.len() > 15
            || !b
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        {
            return Err(Error::Invalid(format!(
                "bridge name {b:?}: use 1 to 15 letters, digits, '-' or '_'"
            )));
        }
        Ipv4Net::new(self.subnet.addr, self.subnet.prefix).map(drop)
    }
}

impl Default for NetConfig {
    /// Bridge `agentkernel0`, subnet `10.209.0.0/16`, and an empty state
    /// directory: set `state_dir` (or use [`NetConfig::new`]).
    fn default() -> NetConfig {
        NetConfig {
            bridge: "agentkernel0".into(),
            subnet: Ipv4Net {
                addr: Ipv4Addr::new(10, 209, 0, 0),
                prefix: 16,
            },
            state_dir: PathBuf::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = Error;
    fn from_str(s: &str) -> Result<Protocol> {
        match s {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => Err(Error::Invalid(format!("protocol {s:?}: use tcp or udp"))),
        }
    }
}

/// `host_ip:host_port` on the host forwards to `container_port` in the
/// sandbox. `host_ip` 0.0.0.0 means every host address (loopback included).
/// `host_port` 0 picks a free port; the [`Lease`] records the one chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMapping {
    pub host_ip: Ipv4Addr,
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: Protocol,
}

/// Connects the network namespace of process `netns_pid` to the bridge:
/// leases an address, creates the veth pair (the sandbox side becomes `eth0`
/// with the address and a default route; `lo` is brought up), and publishes
/// `ports`. On error, everything done so far is undone.
///
/// The namespace must be fresh (no `eth0` yet). Call it from the host network
/// namespace; it never changes the calling thread's namespace.
pub fn attach(
    cfg: &NetConfig,
    sandbox_id: &str,
    netns_pid: i32,
    ports: &[PortMapping],
) -> Result<Lease> {
    cfg.validate()?;
    lease::validate_id(sandbox_id)?;
    ports::validate(ports)?;
    // Open the namespace first: if the sandbox is already gone there is
    // nothing to allocate.
    let netns =
        File::open(format!("/proc/{netns_pid}/ns/net")).map_err(|source| Error::NoNetns {
            pid: netns_pid,
            source,
        })?;
    let netns = SandboxNetns::open(netns)
        .map_err(|e| Error::kernel("open a netlink socket in the sandbox's namespace", e))?;
    attach_netns(cfg, sandbox_id, &netns, ports)
}

/// A sandbox's network namespace as attaching it needs it: its `nsfs`
/// file (the veth's peer is created in it) and a netlink socket bound to
/// it (eth0's address and routes are set through that).
pub struct SandboxNetns {
    file: File,
    inside: netlink::Socket,
}

impl SandboxNetns {
    /// The calling thread's network namespace, `file` being its nsfs file:
    /// for the thread that has just unshared it, which opens the socket
    /// here for free instead of from a throwaway thread later (~0.3 ms).
    pub fn current(file: File) -> io::Result<Self> {
        Ok(SandboxNetns {
            file,
            inside: netlink::Socket::open()?,
        })
    }

    /// The namespace of the nsfs file `file`, from any thread: the socket
    /// is opened by a short-lived thread that joins the namespace.
    pub fn open(file: File) -> io::Result<Self> {
        let inside = netlink::Socket::open_in_netns(&file)?;
        Ok(SandboxNetns { file, inside })
    }
}

/// [`attach`] for the network namespace `netns`: no process needs to be in
/// it yet.
pub fn attach_netns(
    cfg: &NetConfig,
    sandbox_id: &str,
    netns: &SandboxNetns,
    ports: &[PortMapping],
) -> Result<Lease> {
    let (lease, ()) = lease_and_connect(cfg, sandbox_id, ports, false, |host, bridge, lease| {
        veth::connect(host, bridge, &netns.file, &netns.inside, lease)
    })?;
    Ok(lease)
}

/// The steps every sandbox's network takes, in order: a lease for
/// `sandbox_id` (a VM's when `for_vm`), `ports` published on the host,
/// the sandbox connected to the bridge by `connect` (a veth into its
/// namespace, or a VM's tap), then the published ports' relay. On error,
/// everything done so far is undone.
fn lease_and_connect<T>(
    cfg: &NetConfig,
    sandbox_id: &str,
    ports: &[PortMapping],
    for_vm: bool,
    connect: impl FnOnce(&netlink::Socket, u32, &Lease) -> Result<T>,
) -> Result<(Lease, T)> {
    cfg.validate()?;
    lease::validate_id(sandbox_id)?;
    ports::validate(ports)?;
    let host = netlink::Socket::open().map_err(|e| Error::kernel("open a netlink socket", e))?;
    let bridge_index = bridge::ensure(&host, cfg)?;

    // The lease records the requested ports before any rule exists, so a
    // crash after publishing still leaves gc a lease that names them.
    let mut lease = lease::allocate(cfg, sandbox_id, ports, for_vm)?;
    let result = (|| {
        let published = nat::setup_and_publish(cfg, &lease)?;
        let chosen: Vec<PortMapping> = published.iter().map(|p| p.mapping).collect();
        if chosen != lease.ports {
            // Rewrite the lease with the host ports actually chosen.
            lease.ports = chosen;
            lease::store(cfg, &lease)?;
        }
        let connected = connect(&host, bridge_index, &lease)?;
        if !published.is_empty() {
            let held = published
                .into_iter()
                .map(|p| (p.socket, p.mapping.container_port))
                .collect();
            let fwd = forward::start(lease.ip, held)
                .map_err(|e| Error::kernel("start the published ports' relay", e))?;
            forwarders().push((nat::lease_tag(&lease), fwd));
        }
        Ok(connected)
    })();
    match result {
        Ok(connected) => Ok((lease, connected)),
        Err(e) => {
            // Best effort: the original error is the one worth reporting.
            let _ = release(cfg, &lease);
            Err(e)
        }
    }
}

/// What [`attach`] does for a VM: leases an address, publishes `ports`, and
/// creates a tap device on the bridge (its port isolated, as a veth's is)
/// for the VM's NIC, which accepts only frames from the lease's MAC
/// ([`guest_mac`]) and address (`tap.rs`: a guest is a whole kernel that
/// can forge either). Returns the lease and the tap's descriptor, which the
/// caller hands to the VMM and then closes: the tap lives as long as the
/// VMM holds it. The guest configures its own `eth0` from the lease
/// ([`configure_interface`], MAC [`guest_mac`]). Published ports are relayed
/// by threads of the calling process, as for [`attach`]. On error,
/// everything done so far is undone.
pub fn attach_tap(
    cfg: &NetConfig,
    sandbox_id: &str,
    ports: &[PortMapping],
) -> Result<(Lease, std::os::fd::OwnedFd)> {
    lease_and_connect(cfg, sandbox_id, ports, true, |host, bridge, lease| {
        tap::create(host, bridge, lease)
    })
}

/// Inside a VM (the calling thread's network namespace): gives interface
/// `name` the address `ip/prefix`, brings it and `lo` up, and routes
/// everything via `gateway` — what [`attach`] does to a container's `eth0`
/// from the host.
pub fn configure_interface(name: &str, ip: Ipv4Addr, prefix: u8, gateway: Ipv4Addr) -> Result<()> {
    let s = netlink::Socket::open().map_err(|e| Error::kernel("open a netlink socket", e))?;
    let link = s
        .link(name)
        .map_err(|e| Error::kernel(format!("find {name}"), e))?;
    s.add_addr(link.index, ip, prefix)
        .map_err(|e| Error::kernel(format!("add address {ip}/{prefix} to {name}"), e))?;
    s.set_up(link.index)
        .map_err(|e| Error::kernel(format!("bring up {name}"), e))?;
    s.set_up(netlink::LOOPBACK_INDEX)
        .map_err(|e| Error::kernel("bring up lo", e))?;
    s.add_default_route(link.index, gateway)
        .map_err(|e| Error::kernel(format!("add default route via {gateway}"), e))
}

/// Whether interface `name` exists in the calling thread's network namespace.
pub fn interface_exists(name: &str) -> bool {
    netlink::Socket::open().is_ok_and(|s| s.link(name).is_ok())
}

/// Undoes [`attach`]: removes the lease's port rules, its host veth and its
/// lease file. Idempotent; safe to call from another process with a lease
/// read back by [`Lease::parse`] or [`Lease::load`]. If the address has since
/// been leased to another sandbox, that sandbox's rules and file are left
/// alone.
pub fn release(cfg: &NetConfig, lease: &Lease) -> Result<()> {
    stop_forwarder(lease);
    let owner = lease::owner(cfg, lease)?;
    // Port rules are tagged with address and sandbox id, so removing them
    // is right whoever holds the address now.
    if !lease.ports.is_empty() {
        nat::unpublish(lease)?;
    }
    if owner == lease::Owner::Other {
        return Ok(());
    }
    veth::disconnect(lease)?;
    if tap::is_tap(&lease.host_veth) {
        tap::unguard(lease)?;
    }
    if owner == lease::Owner::This {
        lease::remove(cfg, lease)?;
    }
    Ok(())
}

/// [`release`] for a sandbox whose network namespace has no process left:
/// the kernel deletes the veth pair itself when it destroys the namespace,
/// so this skips the explicit delete — which costs tens of milliseconds
/// (the kernel waits for in-flight packets) on the path of every run.
pub fn release_exited(cfg: &NetConfig, lease: &Lease) -> Result<()> {
    stop_forwarder(lease);
    let owner = lease::owner(cfg, lease)?;
    if !lease.ports.is_empty() {
        nat::unpublish(lease)?;
    }
    if owner == lease::Owner::This {
        lease::remove(cfg, lease)?;
    }
    Ok(())
}

/// The relays of the leases this process attached, by lease tag.
fn forwarders() -> std::sync::MutexGuard<'static, Vec<(String, forward::Forwarder)>> {
    static FORWARDERS: std::sync::Mutex<Vec<(String, forward::Forwarder)>> =
        std::sync::Mutex::new(Vec::new());
    FORWARDERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Stops the lease's relays (if this process runs them), freeing its ports.
fn stop_forwarder(lease: &Lease) {
    let tag = nat::lease_tag(lease);
    let mine: Vec<forward::Forwarder> = {
        let mut all = forwarders();
        let (mine, rest) = std::mem::take(&mut *all)
            .into_iter()
            .partition(|(t, _)| *t == tag);
        *all = rest;
        mine.into_iter().map(|(_, f)| f).collect()
    };
    for f in mine {
        f.stop();
    }
}

/// Releases every lease under `cfg.state_dir` whose sandbox is dead
/// (`is_alive(id)` false), and removes abandoned temporary lease files.
/// Returns how many leases were released.
///
/// `is_alive` must already be true for a sandbox whose [`attach`] is running,
/// or gc may release its address mid-attach.
pub fn gc(cfg: &NetConfig, is_alive: &dyn Fn(&str) -> bool) -> Result<usize> {
    let mut released = 0;
    for lease in lease::list(cfg)? {
        if !is_alive(&lease.sandbox_id) {
            release(cfg, &lease)?;
            released += 1;
        }
    }
    Ok(released)
}

/// Removes what [`attach`] leaves on purpose: the bridge, its setup rules,
/// and our chains once no bridge uses them. Refuses while leases remain.
pub fn teardown(cfg: &NetConfig) -> Result<()> {
    cfg.validate()?;
    let held: Vec<_> = lease::list(cfg)?
        .into_iter()
        .filter(|l| l.bridge == cfg.bridge)
        .collect();
    if let Some(l) = held.first() {
        return Err(Error::Invalid(format!(
            "bridge {} still has {} lease(s), e.g. {} for sandbox {}; release them (or run gc) first",
            cfg.bridge,
            held.len(),
            l.ip,
            l.sandbox_id
        )));
    }
    nat::teardown(cfg)?;
    bridge::remove(cfg)
}

/// Brings `lo` up in the calling thread's network namespace: the whole
/// network of a `--no-network` sandbox.
pub fn loopback_up() -> Result<()> {
    let s = netlink::Socket::open().map_err(|e| Error::kernel("open a netlink socket", e))?;
    s.set_up(netlink::LOOPBACK_INDEX)
        .map_err(|e| Error::kernel("bring up the loopback interface", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_math() {
        let n: Ipv4Net = "10.209.0.0/16".parse().unwrap();
        assert_eq!(n.gateway(), Ipv4Addr::new(10, 209, 0, 1));
        assert_eq!(n.broadcast(), Ipv4Addr::new(10, 209, 255, 255));
        assert!(n.contains(Ipv4Addr::new(10, 209, 3, 4)));
        assert!(!n.contains(Ipv4Addr::new(10, 210, 0, 1)));
        assert!("10.209.0.1/16".parse::<Ipv4Net>().is_err());
        assert!("10.0.0.0/31".parse::<Ipv4Net>().is_err());
    }
}
