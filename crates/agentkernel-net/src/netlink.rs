//! A minimal rtnetlink client over a raw `NETLINK_ROUTE` socket.
//!
//! Why by hand: a sandbox start needs nine small requests; a blocking socket
//! and a few byte buffers add microseconds to what the kernel itself spends,
//! with no async runtime and no dependency. Every request carries `NLM_F_ACK`, so each
//! call returns the kernel's own errno.
//!
//! A netlink socket stays bound to the network namespace it was created in,
//! whichever thread later uses it. [`Socket::open_in_netns`] exploits that:
//! a throwaway thread `setns`es into the sandbox's namespace, opens the socket
//! and exits; the caller then configures the sandbox from the host thread.

use std::cell::Cell;
use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

// Message types and flags (linux/netlink.h, linux/rtnetlink.h).
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;

// Link attributes (linux/if_link.h, linux/veth.h).
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_NUM_TX_QUEUES: u16 = 31;
const IFLA_NUM_RX_QUEUES: u16 = 32;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const IFLA_INFO_SLAVE_KIND: u16 = 4;
const IFLA_INFO_SLAVE_DATA: u16 = 5;
const IFLA_BRPORT_ISOLATED: u16 = 33;
const VETH_INFO_PEER: u16 = 1;
const NLA_F_NESTED: u16 = 1 << 15;

// Address and route attributes (linux/if_addr.h, linux/rtnetlink.h).
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_BROADCAST: u16 = 4;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;

const IFF_UP: u32 = libc::IFF_UP as u32;
const NLMSG_HDRLEN: usize = 16;

/// The loopback device is always ifindex 1 in every network namespace.
pub const LOOPBACK_INDEX: u32 = 1;

/// What `RTM_GETLINK` tells us about one interface.
#[derive(Debug, Clone, Copy)]
pub struct LinkInfo {
    pub index: u32,
    pub up: bool,
}

/// A blocking `NETLINK_ROUTE` socket, bound to the netns it was opened in.
pub struct Socket {
    fd: OwnedFd,
    seq: Cell<u32>,
}

impl Socket {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Socket> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Socket {
            fd,
            seq: Cell::new(1),
        })
    }

    /// Opens a socket inside the network namespace `netns` (an open
    /// `/proc/PID/ns/net`). The `setns` happens on a short-lived thread, so the
    /// caller's thread never leaves its own namespace.
    pub fn open_in_netns(netns: &File) -> io::Result<Socket> {
        let ns = netns.try_clone()?;
        std::thread::Builder::new()
            .name("ak-netns".into())
            .spawn(move || {
                // SAFETY: setns on this thread only (CLONE_NEWNET is allowed for
                // one thread of a multithreaded process); the thread ends right
                // after opening the socket, so nothing else runs in that netns.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                Socket::open()
            })?
            .join()
            .map_err(|_| io::Error::other("netns helper thread panicked"))?
    }

    /// Looks an interface up by name.
    pub fn link(&self, name: &str) -> io::Result<LinkInfo> {
        let mut m = Msg::new(RTM_GETLINK, NLM_F_REQUEST);
        m.ifinfomsg(0, 0, 0);
        m.attr_str(IFLA_IFNAME, name);
        let reply = self.roundtrip(m, false)?;
        // ifinfomsg: family u8, pad u8, type u16, index i32, flags u32, change u32
        let body = reply
            .get(NLMSG_HDRLEN..NLMSG_HDRLEN + 16)
            .ok_or_else(|| io::Error::other("short RTM_NEWLINK reply"))?;
        let index = u32::from_ne_bytes(body[4..8].try_into().unwrap());
        let flags = u32::from_ne_bytes(body[8..12].try_into().unwrap());
        Ok(LinkInfo {
            index,
            up: flags & IFF_UP != 0,
        })
    }

    /// Creates a bridge that is up from birth, with a fixed MAC address: a
    /// bridge without one takes the lowest MAC of its ports, and that changing
    /// as sandboxes come and go would invalidate their ARP caches.
    pub fn create_bridge(&self, name: &str, mac: [u8; 6]) -> io::Result<()> {
        let mut m = Msg::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL);
        m.ifinfomsg(0, IFF_UP, IFF_UP);
        m.attr_str(IFLA_IFNAME, name);
        m.attr(IFLA_ADDRESS, &mac);
        let info = m.nest_begin(IFLA_LINKINFO);
        m.attr_str(IFLA_INFO_KIND, "bridge");
        m.nest_end(info);
        self.ack(m)
    }

    /// Sets `IFF_UP` on an interface.
    pub fn set_up(&self, index: u32) -> io::Result<()> {
        let mut m = Msg::new(RTM_NEWLINK, NLM_F_REQUEST);
        m.ifinfomsg(index, IFF_UP, IFF_UP);
        self.ack(m)
    }

    /// Adds `addr/prefix` to an interface (with the broadcast address, like
    /// `ip addr add ... brd +`).
    pub fn add_addr(&self, index: u32, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let mut m = Msg::new(RTM_NEWADDR, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL);
        // ifaddrmsg: family, prefixlen, flags, scope, index
        m.put(&[libc::AF_INET as u8, prefix, 0, RT_SCOPE_UNIVERSE]);
        m.put(&index.to_ne_bytes());
        m.attr(IFA_LOCAL, &addr.octets());
        m.attr(IFA_ADDRESS, &addr.octets());
        let host_mask = if prefix >= 32 { 0 } else { u32::MAX >> prefix };
        let brd = Ipv4Addr::from(u32::from(addr) | host_mask);
        m.attr(IFA_BROADCAST, &brd.octets());
        self.ack(m)
    }

    /// Adds the default route via `gateway` out of interface `index`.
    pub fn add_default_route(&self, index: u32, gateway: Ipv4Addr) -> io::Result<()> {
        let mut m = Msg::new(RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL);
        // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags u32
        m.put(&[
            libc::AF_INET as u8,
            0,
            0,
            0,
            RT_TABLE_MAIN,
            RTPROT_BOOT,
            RT_SCOPE_UNIVERSE,
            RTN_UNICAST,
        ]);
        m.put(&0u32.to_ne_bytes());
        m.attr(RTA_GATEWAY, &gateway.octets());
        m.attr(RTA_OIF, &index.to_ne_bytes());
        self.ack(m)
    }

    /// Creates a veth pair in one request: `host` enslaved to `master` and up
    /// in this socket's netns, `peer` created directly inside `peer_netns`
    /// (an open `/proc/PID/ns/net`) under its final name, down. One message
    /// instead of create + move + rename.
    pub fn create_veth(
        &self,
        host: &str,
        master: u32,
        peer: &str,
        peer_netns: &File,
    ) -> io::Result<()> {
        let mut m = Msg::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL);
        m.ifinfomsg(0, IFF_UP, IFF_UP);
        m.attr_str(IFLA_IFNAME, host);
        m.attr(IFLA_MASTER, &master.to_ne_bytes());
        // One queue each way, from the start: a veth otherwise gets one per
        // CPU and is cut down to one after registration, which waits for an
        // RCU grace period per side (about a millisecond each, every run).
        let one: u32 = 1;
        m.attr(IFLA_NUM_TX_QUEUES, &one.to_ne_bytes());
        m.attr(IFLA_NUM_RX_QUEUES, &one.to_ne_bytes());
        let info = m.nest_begin(IFLA_LINKINFO);
        m.attr_str(IFLA_INFO_KIND, "veth");
        let data = m.nest_begin(IFLA_INFO_DATA);
        let p = m.nest_begin(VETH_INFO_PEER);
        // The peer stays down: bringing it up inside this same request fails
        // with ENOTCONN (veth_open runs before the pair is fully registered).
        m.ifinfomsg(0, 0, 0);
        m.attr_str(IFLA_IFNAME, peer);
        m.attr(IFLA_NUM_TX_QUEUES, &one.to_ne_bytes());
        m.attr(IFLA_NUM_RX_QUEUES, &one.to_ne_bytes());
        let fd: u32 = peer_netns.as_fd().as_raw_fd() as u32;
        m.attr(IFLA_NET_NS_FD, &fd.to_ne_bytes());
        m.nest_end(p);
        m.nest_end(data);
        m.nest_end(info);
        self.ack(m)
    }

    /// Marks the bridge port `name` isolated (`IFLA_BRPORT_ISOLATED`, Linux
    /// 4.18+): the bridge forwards nothing between two isolated ports, only
    /// between them and the bridge itself, so sandboxes cannot reach each
    /// other at layer 2. What `ip link set NAME type bridge_slave isolated on`
    /// sends.
    pub fn isolate_bridge_port(&self, name: &str) -> io::Result<()> {
        let mut m = Msg::new(RTM_NEWLINK, NLM_F_REQUEST);
        m.ifinfomsg(0, 0, 0);
        m.attr_str(IFLA_IFNAME, name);
        let info = m.nest_begin(IFLA_LINKINFO);
        m.attr_str(IFLA_INFO_SLAVE_KIND, "bridge");
        let data = m.nest_begin(IFLA_INFO_SLAVE_DATA);
        m.attr(IFLA_BRPORT_ISOLATED, &[1]);
        m.nest_end(data);
        m.nest_end(info);
        self.ack(m)
    }

    /// Enslaves interface `index` to the bridge `master` (it stays down).
    pub fn set_master(&self, index: u32, master: u32) -> io::Result<()> {
        let mut m = Msg::new(RTM_NEWLINK, NLM_F_REQUEST);
        m.ifinfomsg(index, 0, 0);
        m.attr(IFLA_MASTER, &master.to_ne_bytes());
        self.ack(m)
    }

    /// Deletes an interface by name (its veth peer goes with it).
    pub fn delete_link(&self, name: &str) -> io::Result<()> {
        let mut m = Msg::new(RTM_DELLINK, NLM_F_REQUEST);
        m.ifinfomsg(0, 0, 0);
        m.attr_str(IFLA_IFNAME, name);
        self.ack(m)
    }

    fn ack(&self, m: Msg) -> io::Result<()> {
        self.roundtrip(m, true).map(drop)
    }

    /// Sends one request and returns the reply that answers it: the ACK (an
    /// `NLMSG_ERROR` with errno 0) or, without `ack`, the first data message.
    fn roundtrip(&self, mut m: Msg, ack: bool) -> io::Result<Vec<u8>> {
        let seq = self.seq.get();
        self.seq.set(seq.wrapping_add(1));
        if ack {
            m.add_flags(NLM_F_ACK);
        }
        let buf = m.finish(seq);
        send_all(self.fd.as_raw_fd(), &buf)?;
        let mut rx = vec![0u8; 32 * 1024];
        loop {
            let n = recv(self.fd.as_raw_fd(), &mut rx)?;
            let mut off = 0;
            while off + NLMSG_HDRLEN <= n {
                let len = u32::from_ne_bytes(rx[off..off + 4].try_into().unwrap()) as usize;
                if len < NLMSG_HDRLEN || off + len > n {
                    return Err(io::Error::other("malformed netlink reply"));
                }
                let ty = u16::from_ne_bytes(rx[off + 4..off + 6].try_into().unwrap());
                let rseq = u32::from_ne_bytes(rx[off + 8..off + 12].try_into().unwrap());
                let msg = &rx[off..off + len];
                off += align(len);
                if rseq != seq {
                    continue; // a stale reply to an earlier request
                }
                if ty == NLMSG_ERROR {
                    let code = i32::from_ne_bytes(
                        msg.get(NLMSG_HDRLEN..NLMSG_HDRLEN + 4)
                            .ok_or_else(|| io::Error::other("short netlink error"))?
                            .try_into()
                            .unwrap(),
                    );
                    return if code == 0 {
                        Ok(Vec::new())
                    } else {
                        Err(io::Error::from_raw_os_error(-code))
                    };
                }
                return Ok(msg.to_vec());
            }
        }
    }
}

fn send_all(fd: RawFd, buf: &[u8]) -> io::Result<()> {
    loop {
        // SAFETY: buf is a valid slice for its length; the kernel address is
        // implicit (netlink socket, destination pid 0 by default).
        let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), 0) };
        if n >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is a valid, writable slice for its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

const fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// A request under construction: header placeholder, body, attributes.
struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    fn new(ty: u16, flags: u16) -> Msg {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // len, filled by finish
        buf.extend_from_slice(&ty.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // seq
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: kernel fills
        Msg { buf }
    }

    fn add_flags(&mut self, f: u16) {
        let cur = u16::from_ne_bytes(self.buf[6..8].try_into().unwrap());
        self.buf[6..8].copy_from_slice(&(cur | f).to_ne_bytes());
    }

    fn put(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        self.pad();
    }

    fn pad(&mut self) {
        let n = align(self.buf.len()) - self.buf.len();
        self.buf.extend(std::iter::repeat_n(0u8, n));
    }

    fn ifinfomsg(&mut self, index: u32, flags: u32, change: u32) {
        self.buf.push(libc::AF_UNSPEC as u8);
        self.buf.push(0);
        self.buf.extend_from_slice(&0u16.to_ne_bytes()); // type
        self.buf.extend_from_slice(&index.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&change.to_ne_bytes());
    }

    fn attr(&mut self, ty: u16, data: &[u8]) {
        let len = (4 + data.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.put(data);
    }

    /// A NUL-terminated string attribute, as the kernel expects for names.
    fn attr_str(&mut self, ty: u16, s: &str) {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        debug_assert!(CStr::from_bytes_with_nul(&v).is_ok());
        self.attr(ty, &v);
    }

    fn nest_begin(&mut self, ty: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        at
    }

    fn nest_end(&mut self, at: usize) {
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn finish(mut self, seq: u32) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}
