//! The sandbox's network: loopback only, or a veth to agentkernel's bridge
//! with NAT and published ports (the `agentkernel-net` crate).

use std::io;

use agentkernel_net::{Lease, NetConfig, PortMapping, Protocol};

use agentkernel_core::state::Owner;

use crate::plan::Plan;

/// Brings up `lo` in the current network namespace (a new one starts with it down).
pub fn loopback_up() -> io::Result<()> {
    agentkernel_net::loopback_up().map_err(io::Error::other)
}

/// In a network namespace just made for a sandbox on the bridge: the links
/// made in it from now on (its eth0) get no IPv6. Sandboxes are IPv4 only
/// (the bridge does not carry IPv6), and an eth0 with IPv6 on costs the
/// kernel address autoconfiguration, duplicate address detection and
/// multicast listener reports for every run. Loopback, which exists
/// already, keeps `::1` (a program may listen on `localhost` there). A
/// kernel without IPv6 has nothing to turn off.
pub fn no_ipv6_on_new_links() -> io::Result<()> {
    match std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1") {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        written => written,
    }
}

/// Addresses and port rules are machine-wide (one bridge), so their leases
/// are too: every agentkernel, whatever its state directory, allocates from
/// `/run/agentkernel/net` (tmpfs: gone at reboot, like the veths and rules).
pub const NET_STATE_DIR: &str = "/run/agentkernel";

pub fn config() -> NetConfig {
    NetConfig::new(NET_STATE_DIR)
}

/// The id a lease carries: the sandbox and the process that holds it
/// (`run-1a2b3c4d.<boot>.<pid>.<start>`), so any agentkernel can tell a dead
/// holder's lease from a live one.
pub fn lease_id(plan: &Plan) -> String {
    format!("{}.{}", plan.id, Owner::current().0.replace(':', "."))
}

/// Whether the holder named in a lease id is alive.
pub fn lease_holder_alive(lease_id: &str) -> bool {
    let parts: Vec<&str> = lease_id.split('.').collect();
    match parts.as_slice() {
        [_, boot, pid, start] => !Owner(format!("{boot}:{pid}:{start}")).is_dead(),
        // Not one of ours: never release it.
        _ => true,
    }
}

/// Releases the leases (port rules, veths) of sandboxes whose holder died.
pub fn collect_dead() -> usize {
    // Only root creates bridge leases (rootless sandboxes use slirp4netns).
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !std::path::Path::new(NET_STATE_DIR).join("net").exists() {
        return 0;
    }
    match agentkernel_net::gc(&config(), &lease_holder_alive) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("agentkernel: warning: network cleanup: {e}");
            0
        }
    }
}

/// How a sandbox with a network is connected.
#[derive(Debug)]
pub enum Link {
    /// As root: a veth to agentkernel's bridge, under a machine-wide lease.
    Bridge(Lease),
    /// Rootless: slirp4netns.
    UserMode(crate::slirp::Slirp),
}

impl Link {
    /// After the sandbox ended (or failed to start).
    pub fn release(&self) {
        match self {
            Link::Bridge(lease) => release(lease),
            Link::UserMode(slirp) => slirp.stop(),
        }
    }

    /// Tells the user where published ports landed (on stderr, like the Docker backend).
    pub fn print_ports(&self) {
        if let Link::Bridge(lease) = self {
            print_ports(lease);
        }
    }
}

/// Connects the sandbox whose init is `pid` (already in its own netns).
pub fn connect(plan: &Plan, pid: libc::pid_t) -> io::Result<Link> {
    if plan.rootless.is_some() {
        return crate::slirp::attach(pid).map(Link::UserMode);
    }
    attach(plan, pid).map(Link::Bridge)
}

/// Whether the supervisor connects the sandbox's network namespace as soon
/// as it exists, by its nsfs file, without waiting for init to join it
/// (a bridge lease, as root); slirp4netns (rootless) needs init's pid.
pub fn connects_before_init_joins(plan: &Plan) -> bool {
    plan.network && plan.rootless.is_none()
}

/// Connects the network namespace `netns` to the bridge (see
/// [`connects_before_init_joins`]). Call it from the host's network namespace.
pub fn connect_netns(plan: &Plan, netns: &agentkernel_net::SandboxNetns) -> io::Result<Link> {
    agentkernel_net::attach_netns(
        &config(),
        &lease_id(plan),
        netns,
        &port_mappings(&plan.ports),
    )
    .map(Link::Bridge)
    .map_err(io::Error::other)
}

/// `-P` mappings as the network layer takes them (a VM's too).
pub fn port_mappings(ports: &[crate::plan::Port]) -> Vec<PortMapping> {
    ports
        .iter()
        .map(|p| PortMapping {
            host_ip: p.host_ip,
            host_port: p.host_port,
            container_port: p.container_port,
            protocol: if p.udp { Protocol::Udp } else { Protocol::Tcp },
        })
        .collect()
}

fn attach(plan: &Plan, pid: libc::pid_t) -> io::Result<Lease> {
    agentkernel_net::attach(&config(), &lease_id(plan), pid, &port_mappings(&plan.ports))
        .map_err(io::Error::other)
}

/// After the sandbox ended: its namespace, and with it the veth, is going away.
fn release(lease: &Lease) {
    if let Err(e) = agentkernel_net::release_exited(&config(), lease) {
        eprintln!("agentkernel: warning: {e}");
    }
}

fn print_ports(lease: &Lease) {
    for p in &lease.ports {
        eprintln!(
            "agentkernel: port {}:{} -> {}/{}",
            p.host_ip, p.host_port, p.container_port, p.protocol
        );
    }
}
