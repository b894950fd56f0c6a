//! The host bridge: created on first use, kept afterwards (like `docker0`).

use std::fs;
use std::io;

use crate::error::{Error, Result};
use crate::netlink::Socket;
use crate::veth::fnv1a;
use crate::NetConfig;

/// Makes sure the bridge exists, carries the gateway address and is up;
/// returns its ifindex. Safe against a concurrent caller doing the same:
/// `EEXIST` from either creation or address means the other one won.
/// Also enables IPv4 forwarding, and makes sure the bridge neither routes
/// loopback addresses (`route_localnet=0`: earlier versions set it, and with
/// it a packet to `127.0.0.1` from a sandbox reached the host's loopback
/// services) nor speaks IPv6 (`disable_ipv6=1`: sandboxes have IPv4 only, and
/// the bridge's link-local address would let them reach host services bound
/// to `::`).
pub fn ensure(sock: &Socket, cfg: &NetConfig) -> Result<u32> {
    let name = &cfg.bridge;
    let info = match sock.link(name) {
        Ok(info) => info,
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {
            match sock.create_bridge(name, mac(name)) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(Error::kernel(format!("create bridge {name}"), e)),
            }
            sock.link(name)
                .map_err(|e| Error::kernel(format!("find bridge {name}"), e))?
        }
        Err(e) => return Err(Error::kernel(format!("find bridge {name}"), e)),
    };
    let gw = cfg.subnet.gateway();
    match sock.add_addr(info.index, gw, cfg.subnet.prefix) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => {
            return Err(Error::kernel(
                format!("add address {gw}/{} to bridge {name}", cfg.subnet.prefix),
                e,
            ))
        }
    }
    if !info.up {
        sock.set_up(info.index)
            .map_err(|e| Error::kernel(format!("bring up bridge {name}"), e))?;
    }
    sysctl("net/ipv4/ip_forward", "1")?;
    sysctl(&format!("net/ipv4/conf/{name}/route_localnet"), "0")?;
    match sysctl(&format!("net/ipv6/conf/{name}/disable_ipv6"), "1") {
        // A kernel without IPv6 has no such key, and nothing to disable.
        Err(_) if !std::path::Path::new("/proc/sys/net/ipv6").exists() => {}
        other => other?,
    }
    Ok(info.index)
}

/// Deletes the bridge ([`crate::teardown`]); already gone is fine.
pub fn remove(cfg: &NetConfig) -> Result<()> {
    let sock = Socket::open().map_err(|e| Error::kernel("open a netlink socket", e))?;
    match sock.delete_link(&cfg.bridge) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(()),
        Err(e) => Err(Error::kernel(format!("delete bridge {}", cfg.bridge), e)),
    }
}

/// A fixed, locally administered unicast MAC derived from the bridge name.
fn mac(name: &str) -> [u8; 6] {
    let h = fnv1a(&[name.as_bytes()]).to_be_bytes();
    [0x02, h[0], h[1], h[2], h[3], h[4]]
}

/// Sets a sysctl (in the caller's network namespace), writing only when
/// needed so the common case is one read.
fn sysctl(key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{key}");
    let set = |e: io::Error| Error::kernel(format!("set {}={value}", key.replace('/', ".")), e);
    if fs::read_to_string(&path).map_err(set)?.trim() == value {
        return Ok(());
    }
    fs::write(&path, format!("{value}\n")).map_err(set)
}
