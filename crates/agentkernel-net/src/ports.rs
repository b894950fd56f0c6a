//! Published ports: each is a socket bound on the host and held while the
//! sandbox lives (so no host program can take the port meanwhile; `bind`
//! failing is also how a port already in use is found), plus, unless it is
//! on a loopback address, a DNAT rule in `AGENTKERNEL-DNAT`, which
//! `PREROUTING` (traffic from outside and from sandboxes) and `OUTPUT` (the
//! host's own connections) jump to for the host's non-loopback addresses.
//! Connections to a loopback address reach the held socket, whose relay
//! (`forward.rs`) carries them to the sandbox.
//!
//! A port taken by another sandbox is named by its holder: read from the
//! DNAT rules and the other leases.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};

use crate::forward::Held;

use crate::error::{Error, Result};
use crate::nat::{comment, lease_tag, Batch, Ruleset, CHAIN_DNAT, CHAIN_INPUT};
use crate::{Lease, PortMapping, Protocol};

/// Rejects mappings that can never work, before anything is created.
pub fn validate(ports: &[PortMapping]) -> Result<()> {
    for (i, p) in ports.iter().enumerate() {
        if p.container_port == 0 {
            return Err(Error::Invalid(format!(
                "published port {}:{}: the sandbox port must not be 0",
                p.host_ip, p.host_port
            )));
        }
        if p.host_port == 0 {
            continue;
        }
        if let Some(q) = ports[..i]
            .iter()
            .find(|q| clash(q, p.host_ip, p.host_port, p.protocol))
        {
            return Err(Error::Invalid(format!(
                "host port {}:{}/{} is published twice (also as {}:{}); publish each host port once",
                p.host_ip, p.host_port, p.protocol, q.host_ip, q.host_port
            )));
        }
    }
    Ok(())
}

fn overlaps(a: Ipv4Addr, b: Ipv4Addr) -> bool {
    a == b || a.is_unspecified() || b.is_unspecified()
}

fn clash(q: &PortMapping, ip: Ipv4Addr, port: u16, protocol: Protocol) -> bool {
    q.protocol == protocol && q.host_port == port && overlaps(q.host_ip, ip)
}

/// A published port as read back from a saved DNAT rule.
struct Existing {
    ip: Ipv4Addr,
    port: u16,
    protocol: Protocol,
    /// The sandbox id from the rule's tag.
    holder: String,
}

fn existing(rs: &Ruleset) -> Vec<Existing> {
    let head = format!("-A {CHAIN_DNAT} ");
    rs.lines("nat")
        .iter()
        .filter(|l| l.starts_with(&head))
        .filter_map(|l| {
            let tag = comment(l)?;
            let holder = tag.splitn(4, ':').nth(3)?.to_string();
            let words: Vec<&str> = l.split(' ').collect();
            let after = |flag: &str| {
                words
                    .iter()
                    .position(|w| *w == flag)
                    .and_then(|i| words.get(i + 1).copied())
            };
            let ip = match after("-d") {
                Some(d) => d.trim_end_matches("/32").parse().ok()?,
                None => Ipv4Addr::UNSPECIFIED,
            };
            Some(Existing {
                ip,
                port: after("--dport")?.parse().ok()?,
                protocol: after("-p")?.parse().ok()?,
                holder,
            })
        })
        .collect()
}

/// The ports of other sandboxes' leases (host port 0: not chosen yet).
fn leased(others: &[Lease], this: &Lease) -> Vec<Existing> {
    others
        .iter()
        .filter(|l| l.sandbox_id != this.sandbox_id)
        .flat_map(|l| {
            l.ports
                .iter()
                .filter(|p| p.host_port != 0)
                .map(|p| Existing {
                    ip: p.host_ip,
                    port: p.host_port,
                    protocol: p.protocol,
                    holder: l.sandbox_id.clone(),
                })
        })
        .collect()
}

/// A published port, ready: the mapping with its host port chosen, and its
/// socket bound on the host.
pub struct Published {
    pub mapping: PortMapping,
    pub socket: Held,
}

/// Binds the lease's ports and adds their rules to `b`; host port 0 is
/// replaced by a free port. `others` are the leases on this machine.
pub fn publish(
    lease: &Lease,
    rs: &Ruleset,
    others: &[Lease],
    b: &mut Batch,
) -> Result<Vec<Published>> {
    let mut taken = existing(rs);
    taken.extend(leased(others, lease));
    let tag = lease_tag(lease);
    let mut out: Vec<Published> = Vec::with_capacity(lease.ports.len());
    for p in &lease.ports {
        let socket = if p.host_port == 0 {
            pick_free(p, &taken, &out)?
        } else {
            if let Some(t) = taken.iter().find(|t| {
                t.protocol == p.protocol && t.port == p.host_port && overlaps(t.ip, p.host_ip)
            }) {
                return Err(in_use(p, p.host_port, format!(" by sandbox {}", t.holder)));
            }
            hold(p, p.host_port)?
        };
        let host_port = socket
            .port()
            .map_err(|e| Error::kernel(format!("read the port bound for {}", p.host_ip), e))?;
        // Loopback addresses get no rules (the DNAT chain skips them
        // anyway): their connections reach the held socket and its relay.
        if !p.host_ip.is_loopback() {
            let dst = if p.host_ip.is_unspecified() {
                String::new()
            } else {
                format!("-d {}/32 ", p.host_ip)
            };
            let proto = p.protocol;
            let port =
                format!("-p {proto} -m {proto} --dport {host_port} -m comment --comment \"{tag}\"");
            b.nat(format!(
                "-A {CHAIN_DNAT} {dst}{port} -j DNAT --to-destination {}:{}",
                lease.ip, p.container_port
            ));
            // From sandboxes the port is reached through the relay too (the
            // DNAT chain skips them: a DNATed packet between two isolated
            // bridge ports would be dropped), so the host accepts it.
            b.filter(format!(
                "-I {CHAIN_INPUT} 1 -i {} {dst}{port} -j ACCEPT",
                lease.bridge
            ));
        }
        out.push(Published {
            mapping: PortMapping { host_port, ..*p },
            socket,
        });
    }
    Ok(out)
}

fn in_use(p: &PortMapping, port: u16, by: String) -> Error {
    Error::PortInUse {
        ip: p.host_ip,
        port,
        protocol: p.protocol,
        by,
    }
}

/// Binds `host_ip:port` (`port` 0 lets the kernel pick one).
fn hold(p: &PortMapping, port: u16) -> Result<Held> {
    let addr = SocketAddrV4::new(p.host_ip, port);
    let bound = match p.protocol {
        Protocol::Tcp => TcpListener::bind(addr).map(Held::Tcp),
        Protocol::Udp => UdpSocket::bind(addr).map(Held::Udp),
    };
    match bound {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(in_use(p, port, String::new())),
        Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable => Err(Error::Invalid(format!(
            "host address {} of published port {}: it is not an address of this host; use 127.0.0.1, 0.0.0.0 or one of the host's addresses",
            p.host_ip, p.host_port
        ))),
        Err(e) => Err(Error::kernel(
            format!("check host port {addr}/{}", p.protocol),
            e,
        )),
    }
}

/// A port the kernel considers free that no sandbox publishes either.
fn pick_free(p: &PortMapping, taken: &[Existing], ours: &[Published]) -> Result<Held> {
    for _ in 0..16 {
        let socket = hold(p, 0)?;
        let Ok(port) = socket.port() else { continue };
        let used = taken
            .iter()
            .any(|t| t.protocol == p.protocol && t.port == port && overlaps(t.ip, p.host_ip))
            || ours
                .iter()
                .any(|q| clash(&q.mapping, p.host_ip, port, p.protocol));
        if !used {
            return Ok(socket);
        }
    }
    Err(in_use(p, 0, " (no free port found)".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pm(ip: [u8; 4], hp: u16) -> PortMapping {
        PortMapping {
            host_ip: ip.into(),
            host_port: hp,
            container_port: 80,
            protocol: Protocol::Tcp,
        }
    }

    #[test]
    fn duplicate_host_ports_rejected() {
        assert!(validate(&[pm([127, 0, 0, 1], 8080), pm([127, 0, 0, 1], 8081)]).is_ok());
        assert!(validate(&[pm([127, 0, 0, 1], 8080), pm([0, 0, 0, 0], 8080)]).is_err());
        assert!(validate(&[pm([127, 0, 0, 1], 0), pm([127, 0, 0, 1], 0)]).is_ok());
        let mut zero = pm([127, 0, 0, 1], 1);
        zero.container_port = 0;
        assert!(validate(&[zero]).is_err());
    }
}
