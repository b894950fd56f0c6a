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
/// Also enables IPv4 forwarding and `route_localnet` on the bridge (needed to
/// DNAT `127.0.0.1` to a sandbox).
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
    sysctl("net/ipv4/ip_forward")?;
    sysctl(&format!("net/ipv4/conf/{name}/route_localnet"))?;
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

/// Sets a boolean sysctl to 1 (in the caller's network namespace), writing
/// only when needed so the common case is one read.
fn sysctl(key: &str) -> Result<()> {
    let path = format!("/proc/sys/{key}");
    let set = |e: io::Error| Error::kernel(format!("set {}=1", key.replace('/', ".")), e);
    if fs::read_to_string(&path).map_err(set)?.trim() == "1" {
        return Ok(());
    }
    fs::write(&path, "1\n").map_err(set)
}
