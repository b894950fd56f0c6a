//! A VM's link to the bridge: a tap device, the host's end of the VM's
//! virtio-net NIC. Where a container sandbox gets a veth pair, a VM gets a
//! tap: a bridge port like the veth's host side (isolated the same way) whose
//! frames go to and come from the VMM through a file descriptor.
//!
//! The tap is not persistent: it exists while a descriptor of it is open.
//! The caller hands the descriptor to the VMM and closes its own copy, so the
//! kernel deletes the tap (and its bridge port) when the VMM dies, however it
//! dies.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

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
