//! Network isolation attacks (docs/security.md, "Network"): a sandbox tries
//! to reach the host's loopback with a hand-made packet, the host's own
//! services, and another sandbox. Each attack is checked to fail, and the
//! probe itself is checked to work against something it may reach, so a
//! broken probe cannot pass.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use common::*;

/// Sends one hand-made TCP SYN per `IP:PORT` argument, as an Ethernet frame
/// from the sandbox's `eth0` straight to the gateway's MAC address (what a
/// process with CAP_NET_RAW can do whatever the routing table says), and
/// prints `IP:PORT synack` if a SYN-ACK comes back within 2 s, else
/// `IP:PORT silent`. Needs only python3's standard library.
const RAW_SYN_PROBE: &str = r#"
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

/// After [`FIND_GATEWAY`]: prints the sandbox's address, then greets each
/// TCP client on port 8080 with "hello".
const SERVER: &str = r#"
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.connect((gw, 9))
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080))
s.listen(16)
print(u.getsockname()[0], flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b"hello\n")
    c.close()
"#;

/// Python that sets `gw` to the sandbox's default gateway.
const FIND_GATEWAY: &str = "import socket, struct\n\
    gw = [l.split() for l in open('/proc/net/route').read().splitlines()[1:] if l.split()[1] == '00000000'][0][2]\n\
    gw = socket.inet_ntoa(struct.pack('<I', int(gw, 16)))\n";

/// Runs `script` (after [`FIND_GATEWAY`]) with python3 in a permissive
/// sandbox, which keeps CAP_NET_RAW, with [`RAW_SYN_PROBE`] as its first
/// argument; returns its stdout.
fn permissive_python(env: &TestEnv, publish: &[&str], script: &str) -> String {
    let script = format!("{FIND_GATEWAY}{script}");
    let mut args = vec!["run", "-p", "permissive"];
    args.extend_from_slice(publish);
    args.extend(["-i", PYTHON, "python3", "-c", &script, RAW_SYN_PROBE]);
    let out = env.run(&args);
    assert_code(&out, 0);
    stdout(&out)
}

/// A listener on the host that counts the connections it accepts.
struct HostListener {
    port: u16,
    accepted: Arc<AtomicUsize>,
}

fn host_listener(ip: Ipv4Addr) -> HostListener {
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

/// A port free on every host address right now.
fn free_port() -> u16 {
    TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The result the probe printed for `target` ("synack" or "silent").
fn probe_result<'a>(out: &'a str, target: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{target} ")))
        .unwrap_or_else(|| panic!("the probe printed nothing for {target}: {out:?}"))
}

/// A sandbox serving [`SERVER`] with `publish`; returns it and its address.
fn start_server(env: &TestEnv, publish: &str) -> (Tracked, Ipv4Addr) {
    let script = format!("{FIND_GATEWAY}{SERVER}");
    let mut t = env.spawn(&["run", "-P", publish, "-i", PYTHON, "python3", "-c", &script]);
    let stdout = t.child().stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the server sandbox never printed its address");
    let ip = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("not an address: {line:?}"));
    (t, ip)
}

/// Reads the server's greeting at `addr`.
fn greeting(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out.trim().to_string())
}

/// CVE-2020-8558: a SYN to 127.0.0.1 sent to the gateway's MAC must not
/// reach a service the host binds to loopback only. The same probe to one
/// of the sandbox's own published ports through the gateway is answered.
/// (Native and Docker: on Podman no profile has CAP_NET_RAW.)
fn raw_syn_to_host_loopback_is_never_answered() {
    let env = TestEnv::new();
    let secret = host_listener(Ipv4Addr::LOCALHOST);
    let published = free_port();
    // The sandbox listens on 8080 (published on every host address, so
    // reachable at the gateway) and probes both.
    let script = format!(
        "import subprocess, sys\n\
         s = socket.socket(); s.bind(('0.0.0.0', 8080)); s.listen(4)\n\
         sys.exit(subprocess.call(['python3', '-c', sys.argv[1], gw + ':{published}', '127.0.0.1:{}']))\n",
        secret.port
    );
    let text = permissive_python(&env, &["-P", &format!("0.0.0.0:{published}:8080")], &script);
    assert_eq!(
        probe_result(&text, &format!("127.0.0.1:{}", secret.port)),
        "silent",
        "the host's loopback answered a packet from the sandbox"
    );
    let control = text
        .lines()
        .find(|l| !l.contains("127.0.0.1"))
        .unwrap_or_else(|| panic!("no control result: {text:?}"));
    assert!(
        control.ends_with(" synack"),
        "the probe got no answer from the sandbox's own published port, so it proves nothing: {text:?}"
    );
    assert_eq!(secret.accepted.load(Ordering::SeqCst), 0);
}

/// A server in one sandbox, a client in another: no connection, not even
/// with a hand-made packet routed through the gateway; the server's
/// published port still works from the host.
fn sandboxes_cannot_reach_each_other() {
    sandboxes_cannot_reach_each_other_probing(true);
}

/// As above; `raw_probe` adds the hand-made packet (a backend whose
/// sandboxes cannot open raw sockets, Podman, runs without it).
fn sandboxes_cannot_reach_each_other_probing(raw_probe: bool) {
    let env = TestEnv::new();
    let port = free_port();
    let (server, server_ip) = start_server(&env, &format!("{port}:8080"));
    assert_eq!(
        greeting(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).unwrap(),
        "hello",
        "the published port does not work from the host"
    );
    // The server listens on that address: the host can reach it there.
    assert_eq!(
        greeting(SocketAddr::from((server_ip, 8080))).unwrap(),
        "hello"
    );

    let target = format!("{server_ip}:8080");
    let connect = format!(
        "import subprocess, sys\n\
         try:\n\
         \x20   socket.create_connection(('{server_ip}', 8080), 3); print('connected')\n\
         except OSError as e:\n\
         \x20   print('refused', e)\n\
         sys.stdout.flush()\n\
         sys.exit(subprocess.call(['python3', '-c', sys.argv[1], '{target}']) if {raw} else 0)\n",
        raw = if raw_probe { "True" } else { "False" }
    );
    let text = permissive_python(&env, &[], &connect);
    assert!(
        text.starts_with("refused"),
        "a sandbox connected to a server in another: {text:?}"
    );
    if raw_probe {
        assert_eq!(
            probe_result(&text, &target),
            "silent",
            "a SYN routed through the gateway reached the other sandbox"
        );
    }
    drop(server);
}

mod native_only {
    use super::*;

    #[test]
    fn raw_syn_to_host_loopback_is_never_answered() {
        super::raw_syn_to_host_loopback_is_never_answered();
    }

    #[test]
    fn sandboxes_cannot_reach_each_other() {
        super::sandboxes_cannot_reach_each_other();
    }

    /// Services the host binds to its own addresses (the gateway's, the
    /// host's other interfaces') are not for sandboxes.
    #[test]
    fn host_services_on_host_addresses_are_unreachable() {
        let env = TestEnv::new();
        let service = host_listener(Ipv4Addr::UNSPECIFIED);
        let script = format!(
            "for host in [gw] + '{}'.split():\n\
             \x20   try:\n\
             \x20       socket.create_connection((host, {}), 3); print(host, 'connected')\n\
             \x20   except OSError as e:\n\
             \x20       print(host, 'refused', e)\n",
            host_ipv4_addresses().join(" "),
            service.port
        );
        let text = permissive_python(&env, &[], &script);
        assert!(text.lines().count() >= 2, "{text:?}");
        assert!(
            text.lines().all(|l| l.contains(" refused ")),
            "a sandbox reached a host service: {text:?}"
        );
        assert_eq!(service.accepted.load(Ordering::SeqCst), 0);
    }

    /// The host's non-loopback IPv4 addresses (the bridge's gateway aside).
    fn host_ipv4_addresses() -> Vec<String> {
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
}

mod docker_only {
    #[test]
    fn sandboxes_cannot_reach_each_other() {
        super::sandboxes_cannot_reach_each_other();
    }

    #[test]
    fn raw_syn_to_host_loopback_is_never_answered() {
        super::raw_syn_to_host_loopback_is_never_answered();
    }

    /// Sandboxes share agentkernel's own network, nobody else's, and its
    /// bridge does not route loopback addresses.
    #[test]
    fn sandboxes_join_agentkernels_own_network() {
        let env = super::TestEnv::new();
        let out = env.run(&["run", "-i", super::BUSYBOX, "ip", "-4", "route"]);
        super::assert_code(&out, 0);
        assert!(
            super::stdout(&out).contains("default via 10.208.0.1"),
            "{}",
            super::stdout(&out)
        );
        let options = super::engine_ok(&[
            "network",
            "inspect",
            "agentkernel",
            "--format",
            "{{json .Options}}",
        ]);
        assert!(
            options.contains(r#""com.docker.network.bridge.enable_icc":"false""#),
            "{options}"
        );
        let localnet =
            std::fs::read_to_string("/proc/sys/net/ipv4/conf/ak-docker0/route_localnet").unwrap();
        assert_eq!(localnet.trim(), "0");
    }
}

mod podman_only {
    /// netavark alone lets two containers of one network talk; agentkernel's
    /// FORWARD rule on the network's bridge stops it (no raw probe: Podman
    /// sandboxes cannot open raw sockets, see below).
    #[test]
    fn sandboxes_cannot_reach_each_other() {
        super::sandboxes_cannot_reach_each_other_probing(false);
    }

    /// The loopback attack needs a raw socket (netavark's bridge routes
    /// 127.0.0.1 once a port is published there): agentkernel drops
    /// CAP_NET_RAW on Podman under every profile, so even permissive cannot
    /// open one.
    #[test]
    fn raw_sockets_are_refused_even_to_permissive() {
        let env = super::TestEnv::new();
        let script = "import socket\n\
            try:\n\
            \x20   socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n\
            \x20   print('opened')\n\
            except PermissionError:\n\
            \x20   print('refused')\n";
        for profile in ["permissive", "moderate"] {
            let out = env.run(&[
                "run",
                "-p",
                profile,
                "-i",
                super::PYTHON,
                "python3",
                "-c",
                script,
            ]);
            super::assert_code(&out, 0);
            assert_eq!(super::stdout(&out).trim(), "refused", "{profile}");
        }
    }
}
