//! Network probes shared by the isolation tests of every backend: a
//! hand-made SYN (what CAP_NET_RAW allows whatever the routing table says),
//! host listeners that count what reaches them, the host's own addresses.

use std::net::{Ipv4Addr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Sends one hand-made TCP SYN per `IP:PORT` argument, as an Ethernet frame
/// from the sandbox's `eth0` straight to the gateway's MAC address (what a
/// process with CAP_NET_RAW can do whatever the routing table says), and
/// prints `IP:PORT synack` if a SYN-ACK comes back within 2 s, else
/// `IP:PORT silent`. Needs only python3's standard library.
pub const RAW_SYN_PROBE: &str = r#"
import os, socket, struct, sys, time

def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF

for line in open("/proc/net/route").read().splitlines()[1:]:
    f = line.split()
    if f[1] == "00000000":
        dev, gw = f[0], socket.inet_ntoa(struct.pack("<I", int(f[2], 16)))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.connect((gw, 9))
src = u.getsockname()[0]
u.send(b"x")  # resolves the gateway's MAC address
gw_mac = None
for _ in range(50):
    for line in open("/proc/net/arp").read().splitlines()[1:]:
        f = line.split()
        if f[0] == gw and f[3] != "00:00:00:00:00:00":
            gw_mac = f[3]
    if gw_mac:
        break
    time.sleep(0.1)
assert gw_mac, "no ARP entry for the gateway " + gw
my_mac = open("/sys/class/net/%s/address" % dev).read().strip()
raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
raw.bind((dev, 0))
raw.settimeout(0.2)

def probe(dst, dport, sport):
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, 0x02, 64240, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", csum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, 6, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    eth = bytes.fromhex(gw_mac.replace(":", "")) + bytes.fromhex(my_mac.replace(":", "")) + b"\x08\x00"
    raw.send(eth + ip + tcp)
    end = time.time() + 2
    while time.time() < end:
        try:
            frame = raw.recv(4096)
        except socket.timeout:
            continue
        iph = frame[14:]
        if len(iph) < 40 or iph[9] != 6:
            continue
        t = iph[(iph[0] & 15) * 4:]
        sp, dp = struct.unpack("!HH", t[:4])
        if sp == dport and dp == sport and t[13] & 0x12 == 0x12:
            return "synack"
    return "silent"

for i, arg in enumerate(sys.argv[1:]):
    host, port = arg.rsplit(":", 1)
    print(arg, probe(host, int(port), 40000 + i), flush=True)
"#;

/// Python that sets `gw` to the sandbox's default gateway.
pub const FIND_GATEWAY: &str = "import socket, struct\n\
    gw = [l.split() for l in open('/proc/net/route').read().splitlines()[1:] if l.split()[1] == '00000000'][0][2]\n\
    gw = socket.inet_ntoa(struct.pack('<I', int(gw, 16)))\n";

/// A listener on the host that counts the connections it accepts.
pub struct HostListener {
    pub port: u16,
    pub accepted: Arc<AtomicUsize>,
}

pub fn host_listener(ip: Ipv4Addr) -> HostListener {
    let l = TcpListener::bind((ip, 0)).unwrap();
    let port = l.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    // Ends with the test process.
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            counter.fetch_add(1, Ordering::SeqCst);
            drop(c);
        }
    });
    HostListener { port, accepted }
}

/// The result the probe printed for `target` ("synack" or "silent").
pub fn probe_result<'a>(out: &'a str, target: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{target} ")))
        .unwrap_or_else(|| panic!("the probe printed nothing for {target}: {out:?}"))
}

/// The host's non-loopback IPv4 addresses (the bridge's gateway aside).
pub fn host_ipv4_addresses() -> Vec<String> {
    let out = std::process::Command::new("hostname")
        .arg("-I")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|a| a.parse::<Ipv4Addr>().ok())
        .filter(|a| !a.is_loopback() && a.octets()[..2] != [10, 209])
        .map(|a| a.to_string())
        .collect()
}
