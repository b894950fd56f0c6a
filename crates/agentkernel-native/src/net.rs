//! The sandbox's network: loopback only, or a veth to agentkernel's bridge
//! with NAT and published ports (the `agentkernel-net` crate).

use std::io;

use agentkernel_net::{Lease, NetConfig, PortMapping, Protocol};

use crate::plan::Plan;

/// Brings up `lo` in the current network namespace (a new one starts with it down).
pub fn loopback_up() -> io::Result<()> {
    agentkernel_net::loopback_up().map_err(|e| io::Error::other(e.to_string()))
}

pub fn config(plan: &Plan) -> NetConfig {
    NetConfig::new(&plan.state_dir)
}

/// Connects the sandbox whose init is `pid` (already in its own netns).
pub fn attach(plan: &Plan, pid: libc::pid_t) -> io::Result<Lease> {
    let ports: Vec<PortMapping> = plan
        .ports
        .iter()
        .map(|p| PortMapping {
            host_ip: p.host_ip,
            host_port: p.host_port,
            container_port: p.container_port,
            protocol: if p.udp { Protocol::Udp } else { Protocol::Tcp },
        })
        .collect();
    agentkernel_net::attach(&config(plan), &plan.id, pid, &ports)
        .map_err(|e| io::Error::other(e.to_string()))
}

/// After the sandbox ended: its namespace, and with it the veth, is going away.
pub fn release(plan: &Plan, lease: &Lease) {
    if let Err(e) = agentkernel_net::release_exited(&config(plan), lease) {
        eprintln!("agentkernel: warning: {e}");
    }
}

/// Tells the user where published ports landed (on stderr, like the Docker backend).
pub fn print_ports(lease: &Lease) {
    for p in &lease.ports {
        eprintln!(
            "agentkernel: port {}:{} -> {}/{}",
            p.host_ip, p.host_port, p.container_port, p.protocol
        );
    }
}
