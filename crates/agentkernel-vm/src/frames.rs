//! The frames a VM without root sends to its user-mode network stack,
//! filtered on the way. passt (like slirp4netns) opens a host socket to
//! whatever address a guest's packet is for; a guest that hand-makes a
//! packet for 127.0.0.1 (its root has CAP_NET_RAW, and a guest kernel can
//! send anything) would have passt connect to the host's loopback — seen
//! here: a SYN for a host loopback port got its SYN-ACK. So QEMU's NIC is
//! not connected to passt directly but to a relay in the process that
//! started QEMU, which passes the guest's ARP and IPv4 frames except those
//! for `0.0.0.0/8` or `127.0.0.0/8` (the host itself, to a host socket) and
//! drops everything else (IPv6, VLAN tags: the VM is IPv4-only). What passt
//! sends the guest passes unchanged.
//!
//! Both sides speak QEMU's stream framing: a 4-byte big-endian length, then
//! the Ethernet frame. Either side's end ends both directions, so passt
//! (`--one-off`) exits when QEMU does, and QEMU's NIC sees the end if
//! passt dies.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown};
use std::os::unix::net::UnixStream;

/// No Ethernet frame QEMU sends is larger (a 64 KiB frame and headers).
const MAX_FRAME: usize = 65_536 + 64;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;

/// Whether a frame from the guest may reach the user-mode stack.
pub(crate) fn guest_frame_allowed(frame: &[u8]) -> bool {
    let Some(ethertype) = frame.get(12..14) else {
        return false;
    };
    match u16::from_be_bytes([ethertype[0], ethertype[1]]) {
        ETHERTYPE_ARP => true,
        ETHERTYPE_IPV4 => {
            // The destination sits at a fixed place in the IPv4 header,
            // whatever options follow it, and in every fragment.
            let Some(dst) = frame.get(30..34) else {
                return false;
            };
            let dst = Ipv4Addr::new(dst[0], dst[1], dst[2], dst[3]);
            !(dst.is_loopback() || dst.octets()[0] == 0)
        }
        _ => false,
    }
}

/// Relays frames between QEMU's end and passt's end on two threads, the
/// guest's filtered by [`guest_frame_allowed`]; returns at once.
pub(crate) fn relay(qemu: UnixStream, passt: UnixStream) -> io::Result<()> {
    let (qemu_in, passt_in) = (qemu.try_clone()?, passt.try_clone()?);
    spawn(qemu_in, passt, guest_frame_allowed)?;
    spawn(passt_in, qemu, |_| true)?;
    Ok(())
}

fn spawn(from: UnixStream, to: UnixStream, allowed: fn(&[u8]) -> bool) -> io::Result<()> {
    std::thread::Builder::new()
        .name("vm-frames".into())
        .spawn(move || {
            let _ = copy_frames(&from, &to, allowed);
            // One side ended or broke the framing: end both directions.
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
        })
        .map(drop)
}

fn copy_frames(
    mut from: &UnixStream,
    mut to: &UnixStream,
    allowed: fn(&[u8]) -> bool,
) -> io::Result<()> {
    let mut frame = vec![0u8; MAX_FRAME];
    loop {
        let mut length = [0u8; 4];
        from.read_exact(&mut length)?;
        let length = u32::from_be_bytes(length) as usize;
        if length > MAX_FRAME {
            return Err(io::Error::other("a frame larger than any NIC sends"));
        }
        from.read_exact(&mut frame[..length])?;
        if allowed(&frame[..length]) {
            // One write per frame: the other side never sees half a header.
            let mut message = Vec::with_capacity(4 + length);
            message.extend_from_slice(&(length as u32).to_be_bytes());
            message.extend_from_slice(&frame[..length]);
            to.write_all(&message)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4_frame(dst: [u8; 4]) -> Vec<u8> {
        let mut frame = vec![0u8; 14 + 20];
        frame[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        frame[14] = 0x45;
        frame[30..34].copy_from_slice(&dst);
        frame
    }

    #[test]
    fn frames_for_the_hosts_own_addresses_are_dropped() {
        assert!(!guest_frame_allowed(&ipv4_frame([127, 0, 0, 1])));
        assert!(!guest_frame_allowed(&ipv4_frame([127, 8, 9, 10])));
        assert!(!guest_frame_allowed(&ipv4_frame([0, 0, 0, 0])));
        assert!(guest_frame_allowed(&ipv4_frame([10, 0, 2, 2])));
        assert!(guest_frame_allowed(&ipv4_frame([192, 0, 2, 2])));
    }

    #[test]
    fn only_arp_and_ipv4_pass_and_short_frames_do_not() {
        let mut arp = vec![0u8; 42];
        arp[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
        assert!(guest_frame_allowed(&arp));
        let mut ipv6 = vec![0u8; 60];
        ipv6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        assert!(!guest_frame_allowed(&ipv6));
        // A VLAN tag would move the IPv4 header: dropped, not parsed.
        let mut tagged = ipv4_frame([192, 0, 2, 2]);
        tagged[12..14].copy_from_slice(&0x8100u16.to_be_bytes());
        assert!(!guest_frame_allowed(&tagged));
        assert!(!guest_frame_allowed(&ipv4_frame([192, 0, 2, 2])[..30]));
        assert!(!guest_frame_allowed(&[0u8; 10]));
    }
}
