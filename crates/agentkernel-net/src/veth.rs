//! The veth pair that connects one sandbox: host side on the bridge, sandbox
//! side `eth0` with the lease's address and a default route.

use std::fs::File;
use std::io;

use crate::error::{Error, Result};
use crate::netlink::{Socket, LOOPBACK_INDEX};
use crate::Lease;

/// The name of the sandbox side, inside its namespace.
pub const SANDBOX_IFNAME: &str = "eth0";

/// The host side's name: `ak` + 24 bits of a hash of bridge and sandbox id +
/// `-` + the address's host number in hex. At most 15 bytes (IFNAMSIZ - 1)
/// even for a /8, unique per leased address, and recognisable in `ip link`.
pub fn host_name(bridge: &str, sandbox_id: &str, host_number: u32) -> String {
    let h = fnv1a(&[bridge.as_bytes(), b"\0", sandbox_id.as_bytes()]) & 0xff_ffff;
    format!("ak{h:06x}-{host_number:x}")
}

pub(crate) fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in parts.iter().flat_map(|p| p.iter()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Creates the pair and configures the sandbox side. `host` is a netlink
/// socket in the host namespace, `netns` the sandbox's nsfs file and `ns`
/// a socket bound to it.
pub fn connect(
    host: &Socket,
    bridge_index: u32,
    netns: &File,
    ns: &Socket,
    lease: &Lease,
) -> Result<()> {
    let create = || host.create_veth(&lease.host_veth, bridge_index, SANDBOX_IFNAME, netns);
    let what = || {
        format!(
            "create veth pair {} <-> {SANDBOX_IFNAME} of sandbox {}",
            lease.host_veth, lease.sandbox_id
        )
    };
    match create() {
        Ok(()) => {}
        // A host veth of ours with this exact name (same sandbox id, same
        // address) leaked from an earlier attach: remove it and retry once.
        // If the sandbox already has an eth0 the retry fails the same way.
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            delete(host, &lease.host_veth)?;
            create().map_err(|e| Error::kernel(what(), e))?;
        }
        Err(e) => return Err(Error::kernel(what(), e)),
    }
    // Before the sandbox side is up, so no frame ever crosses an
    // unisolated port.
    host.isolate_bridge_port(&lease.host_veth).map_err(|e| {
        Error::kernel(
            format!(
                "isolate bridge port {} of sandbox {}",
                lease.host_veth, lease.sandbox_id
            ),
            e,
        )
    })?;

    let in_sandbox = |what: &str, e: io::Error| {
        Error::kernel(format!("{what} in sandbox {}", lease.sandbox_id), e)
    };
    let eth0 = ns
        .link(SANDBOX_IFNAME)
        .map_err(|e| in_sandbox("find eth0", e))?;
    ns.add_addr(eth0.index, lease.ip, lease.prefix)
        .map_err(|e| {
            in_sandbox(
                &format!("add address {}/{} to eth0", lease.ip, lease.prefix),
                e,
            )
        })?;
    ns.set_up(eth0.index)
        .map_err(|e| in_sandbox("bring up eth0", e))?;
    ns.set_up(LOOPBACK_INDEX)
        .map_err(|e| in_sandbox("bring up lo", e))?;
    ns.add_default_route(eth0.index, lease.gateway)
        .map_err(|e| in_sandbox(&format!("add default route via {}", lease.gateway), e))?;
    Ok(())
}

/// Deletes the host side (the sandbox side goes with it). Already gone is
/// fine: the kernel deletes the pair when the sandbox namespace dies.
pub fn disconnect(lease: &Lease) -> Result<()> {
    let host = Socket::open().map_err(|e| Error::kernel("open a netlink socket", e))?;
    delete(&host, &lease.host_veth)
}

fn delete(host: &Socket, name: &str) -> Result<()> {
    match host.delete_link(name) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(()),
        Err(e) => Err(Error::kernel(format!("delete veth {name}"), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_ifnamsiz() {
        let n = host_name("agentkernel0", "some-sandbox", 0xff_fffe);
        assert!(n.len() <= 15, "{n}");
        assert!(n.starts_with("ak"));
        assert_ne!(host_name("b", "x", 2), host_name("b", "y", 2));
        assert_ne!(host_name("b", "x", 2), host_name("b", "x", 3));
    }
}
