//! A VM's link to the bridge: a tap device, the host's end of the VM's
//! virtio-net NIC. Where a container sandbox gets a veth pair, a VM gets a
//! tap: a bridge port like the veth's host side (isolated the same way) whose
//! frames go to and come from the VMM through a file descriptor.
//!
//! A container's kernel is the host's, so its `eth0` sends what the host's
//! kernel lets it. A VM's NIC sends whatever the guest's kernel writes, and
//! a guest kernel the command took over could write frames from another
//! sandbox's address or MAC — ARP that points the host at it for another
//! sandbox's traffic. So the tap's ingress accepts only the lease's MAC and
//! IPv4 address (IPv4 and ARP; nothing else), in an nftables `netdev` table
//! of its own, `agentkernel-<tap>`, removed with the lease.
//!
//! The tap is not persistent: it exists while a descriptor of it is open.
//! The caller hands the descriptor to the VMM and closes its own copy, so the
//! kernel deletes the tap (and its bridge port) when the VMM dies, however it
//! dies.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Write as _};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Command, Stdio};

use crate::error::{Error, Result};
use crate::netlink::Socket;
use crate::Lease;

// linux/if_tun.h
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// Creates the tap named `lease.host_veth`, enslaves it to the bridge,
/// isolates its port and brings it up. Returns its descriptor (close-on-exec:
/// the caller clears that for the VMM it starts).
pub fn create(host: &Socket, bridge_index: u32, lease: &Lease) -> Result<OwnedFd> {
    let name = &lease.host_veth;
    let what = |step: &str| format!("{step} tap {name} of sandbox {}", lease.sandbox_id);
    let fd = open(name).map_err(|e| Error::kernel(what("create"), e))?;
    let link = host
        .link(name)
        .map_err(|e| Error::kernel(what("find"), e))?;
    host.set_master(link.index, bridge_index)
        .map_err(|e| Error::kernel(what("attach to the bridge"), e))?;
    // Before it is up, so no frame ever crosses an unisolated port.
    host.isolate_bridge_port(name)
        .map_err(|e| Error::kernel(what("isolate bridge port"), e))?;
    guard(lease)?;
    host.set_up(link.index)
        .map_err(|e| Error::kernel(what("bring up"), e))?;
    Ok(fd)
}

/// `TUNSETIFF` on a new `/dev/net/tun` descriptor: a tap (Ethernet frames,
/// no packet-info header, with the virtio-net header QEMU uses to pass
/// checksum and segmentation offloads through).
fn open(name: &str) -> io::Result<OwnedFd> {
    let tun = File::options()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let cname = CString::new(name).map_err(io::Error::other)?;
    // struct ifreq: IFNAMSIZ bytes of name, then a union whose first member
    // here is the flags (short); 40 bytes in all on x86_64.
    let mut ifr = [0u8; 40];
    let bytes = cname.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ {
        return Err(io::Error::other("interface name too long"));
    }
    ifr[..bytes.len()].copy_from_slice(bytes);
    let flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    ifr[libc::IFNAMSIZ..libc::IFNAMSIZ + 2].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads (and writes back) a struct ifreq, which `ifr`
    // is large enough to hold.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF as _, ifr.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(OwnedFd::from(tun))
}

/// The MAC address the VM's NIC gets: locally administered, unicast, and
/// derived from the lease's address, so it is stable for the lease and
/// distinct between leases.
pub fn guest_mac(lease: &Lease) -> [u8; 6] {
    let ip = lease.ip.octets();
    [0x02, 0x61, ip[0], ip[1], ip[2], ip[3]]
}

/// The host side's name for a VM: `ak` + the same 24-bit hash as a veth's +
/// `t` + the host number in hex (so [`is_tap`] can tell, as `t` is no hex
/// digit). At most 15 bytes.
pub fn host_name(bridge: &str, sandbox_id: &str, host_number: u32) -> String {
    let h = crate::veth::fnv1a(&[bridge.as_bytes(), b"\0", sandbox_id.as_bytes()]) & 0xff_ffff;
    format!("ak{h:06x}t{host_number:x}")
}

/// Whether a lease's host side is a tap ([`host_name`]).
pub fn is_tap(name: &str) -> bool {
    name.len() > 9 && name.starts_with("ak") && name.as_bytes()[8] == b't'
}

fn table(lease: &Lease) -> String {
    format!("agentkernel-{}", lease.host_veth)
}

/// The tap's ingress filter: the lease's MAC with the lease's address, as
/// IPv4 or as ARP's sender; everything else dropped before the bridge sees it.
fn guard(lease: &Lease) -> Result<()> {
    let mac = guest_mac(lease)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    let (ip, dev, table) = (lease.ip, &lease.host_veth, table(lease));
    let script = format!(
        "table netdev {table} {{\n\
         \x20 chain guest {{\n\
         \x20   type filter hook ingress device \"{dev}\" priority -500; policy drop;\n\
         \x20   ether saddr {mac} ip saddr {ip} accept\n\
         \x20   ether saddr {mac} arp htype 1 arp ptype ip arp saddr ether {mac} arp saddr ip {ip} accept\n\
         \x20 }}\n\
         }}\n"
    );
    nft(&["-f", "-"], Some(&script)).map_err(|detail| Error::Nft {
        command: format!("nft -f - (the ingress filter of tap {dev})"),
        detail,
    })
}

/// Removes the tap's ingress filter (it outlives the tap); none is fine.
pub fn unguard(lease: &Lease) -> Result<()> {
    let table = table(lease);
    match nft(&["delete", "table", "netdev", &table], None) {
        Ok(()) => Ok(()),
        Err(e) if e.contains("No such file or directory") => Ok(()),
        Err(detail) => Err(Error::Nft {
            command: format!("nft delete table netdev {table}"),
            detail,
        }),
    }
}

fn nft(args: &[&str], input: Option<&str>) -> std::result::Result<(), String> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{e} (is nftables installed?)"))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| e.to_string())?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        let text = String::from_utf8_lossy(&out.stderr);
        Err(text.split_whitespace().collect::<Vec<_>>().join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_and_are_told_from_veths() {
        let n = host_name("agentkernel0", "vm-x", 0xff_fffe);
        assert!(n.len() <= 15, "{n}");
        assert!(is_tap(&n));
        assert!(!is_tap(&crate::veth::host_name(
            "agentkernel0",
            "vm-x",
            0xff_fffe
        )));
    }
}
