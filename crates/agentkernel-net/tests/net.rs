//! Real-kernel tests: root only, no mocks. Each test gets its own bridge
//! (`akt<pid%1000>-<n>`), its own /24 inside 10.210.0.0/16 (two bridges with
//! one subnet would fight over the host's routes) and a temporary state
//! directory, and removes all of it on drop, even when it fails: leases via
//! `gc`, then the bridge and its rules via `teardown`. Sandbox namespaces are
//! `unshare --net sleep` processes, killed by pid.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use agentkernel_net::{
    attach, gc, release, teardown, Error, Ipv4Net, Lease, NetConfig, PortMapping, Protocol,
};

static NEXT: AtomicU8 = AtomicU8::new(1);

/// One test's bridge, subnet and state directory.
struct Env {
    cfg: NetConfig,
    _dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        assert!(
            is_root(),
            "these tests need root (network namespaces, bridges, iptables)"
        );
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = tempfile::tempdir().unwrap();
        let cfg = NetConfig {
            bridge: format!("akt{}-{n}", std::process::id() % 1000),
            subnet: Ipv4Net::new(Ipv4Addr::new(10, 210, n, 0), 24).unwrap(),
            state_dir: dir.path().to_path_buf(),
        };
        Env { cfg, _dir: dir }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let r1 = gc(&self.cfg, &|_| false);
        let r2 = teardown(&self.cfg);
        if !std::thread::panicking() {
            r1.unwrap();
            r2.unwrap();
            assert!(!link_exists(&self.cfg.bridge), "bridge left behind");
            let tag = format!("ak:{}:", self.cfg.bridge);
            assert!(!iptables_save().contains(&tag), "rules left behind");
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A killed-on-drop child process.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A process sitting in a fresh network namespace, like a sandbox's init.
struct Netns {
    proc: Proc,
}

impl Netns {
    fn new() -> Netns {
        let child = Command::new("unshare")
            .args(["--net", "sleep", "120"])
            .spawn()
            .expect("spawn unshare");
        let pid = child.id();
        let ns = Netns { proc: Proc(child) };
        // Wait until unshare(2) has happened.
        let host = std::fs::read_link("/proc/self/ns/net").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_link(format!("/proc/{pid}/ns/net"))
            .ok()
            .as_ref()
            == Some(&host)
        {
            assert!(Instant::now() < deadline, "unshare did not create a netns");
            std::thread::sleep(Duration::from_millis(2));
        }
        ns
    }

    fn pid(&self) -> i32 {
        self.proc.0.id() as i32
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/proc/{}/ns/net", self.pid()))
            .args(args);
        c
    }

    /// Runs a command inside; returns (success, stdout).
    fn run(&self, args: &[&str]) -> (bool, String) {
        let out = self.cmd(args).stderr(Stdio::inherit()).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// Starts a python TCP server inside on `port` that greets each client
    /// with "hello <client address>\n"; returns once it listens.
    fn serve(&self, port: u16) -> Proc {
        serve_with(self.cmd(&[]), "0.0.0.0", port)
    }
}

fn serve_with(mut cmd: Command, addr: &str, port: u16) -> Proc {
    let script = format!(
        "import socket,sys\n\
         s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('{addr}',{port})); s.listen(16)\n\
         print('ready', flush=True)\n\
         while True:\n\
         \x20   c,a=s.accept(); c.sendall(('hello %s\\n' % a[0]).encode()); c.close()\n"
    );
    let mut child = cmd
        .args(["python3", "-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready", "server did not start");
    Proc(child)
}

/// Connects and returns the server's greeting.
fn fetch(addr: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out.trim().to_string())
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn iptables_save() -> String {
    String::from_utf8(Command::new("iptables-save").output().unwrap().stdout).unwrap()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn tcp(host_ip: Ipv4Addr, host_port: u16, container_port: u16) -> PortMapping {
    PortMapping {
        host_ip,
        host_port,
        container_port,
        protocol: Protocol::Tcp,
    }
}

#[test]
fn attach_gives_eth0_address_route_and_connectivity() {
    let env = Env::new();
    let ns = Netns::new();
    let t = Instant::now();
    let lease = attach(&env.cfg, "sb-basic", ns.pid(), &[]).unwrap();
    eprintln!("attach took {:?} (no ports)", t.elapsed());

    assert!(env.cfg.subnet.contains(lease.ip));
    assert_eq!(lease.gateway, env.cfg.subnet.gateway());
    assert_ne!(lease.ip, lease.gateway);
    assert!(lease.host_veth.len() <= 15);
    assert!(link_exists(&lease.host_veth));

    let (ok, addrs) = ns.run(&["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
    assert!(ok);
    assert!(addrs.contains(&format!("inet {}/24", lease.ip)), "{addrs}");
    let (_, route) = ns.run(&["ip", "-4", "route", "show", "default"]);
    assert!(
        route.contains(&format!("default via {} dev eth0", lease.gateway)),
        "{route}"
    );
    let (_, lo) = ns.run(&["ip", "-o", "link", "show", "lo"]);
    assert!(lo.contains("UP"), "{lo}");

    // Host → sandbox (ICMP and TCP), sandbox → gateway.
    let ip = lease.ip.to_string();
    assert!(Command::new("busybox")
        .args(["ping", "-c1", "-W2", &ip])
        .status()
        .unwrap()
        .success());
    let _srv = ns.serve(8000);
    let greeting = fetch(&format!("{ip}:8000")).unwrap();
    assert_eq!(greeting, format!("hello {}", lease.gateway));
    let gw = lease.gateway.to_string();
    assert!(ns.run(&["busybox", "ping", "-c1", "-W2", &gw]).0);

    release(&env.cfg, &lease).unwrap();
    assert!(!link_exists(&lease.host_veth));
    assert!(!lease.file(&env.cfg).exists());
    let (_, links) = ns.run(&["ip", "-o", "link"]);
    assert!(!links.contains("eth0"), "{links}");
}

#[test]
fn two_attaches_get_different_addresses_and_cannot_reach_each_other() {
    let env = Env::new();
    let (a, b) = (Netns::new(), Netns::new());
    let la = attach(&env.cfg, "sb-a", a.pid(), &[]).unwrap();
    let lb = attach(&env.cfg, "sb-b", b.pid(), &[]).unwrap();
    assert_ne!(la.ip, lb.ip);
    assert_ne!(la.host_veth, lb.host_veth);
    // Both reach the gateway, so the network works...
    let gw = la.gateway.to_string();
    assert!(a.run(&["busybox", "ping", "-c1", "-W2", &gw]).0);
    assert!(b.run(&["busybox", "ping", "-c1", "-W2", &gw]).0);
    // ...but not each other: not across the bridge (isolated ports)...
    let ip_b = lb.ip.to_string();
    assert!(!a.run(&["busybox", "ping", "-c1", "-W2", &ip_b]).0);
    // ...nor routed through the host (a host route via the gateway, so the
    // packet goes to the gateway's MAC: the firewall's part).
    assert!(
        a.run(&["ip", "route", "add", &format!("{ip_b}/32"), "via", &gw])
            .0
    );
    assert!(!a.run(&["busybox", "ping", "-c1", "-W2", &ip_b]).0);
    let _srv = b.serve(8000);
    let script = format!("import socket; socket.create_connection(('{ip_b}',8000),3)");
    let (ok, _) = a.run(&["python3", "-c", &script]);
    assert!(!ok, "sandbox a connected to a server in sandbox b");
    // The host still can.
    assert_eq!(
        fetch(&format!("{ip_b}:8000")).unwrap(),
        format!("hello {gw}")
    );
    release(&env.cfg, &la).unwrap();
    release(&env.cfg, &lb).unwrap();
}

#[test]
fn twenty_concurrent_attaches_are_distinct() {
    let env = Env::new();
    let nss: Vec<Netns> = (0..20).map(|_| Netns::new()).collect();
    let leases: Vec<Lease> = std::thread::scope(|s| {
        let handles: Vec<_> = nss
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                let cfg = &env.cfg;
                s.spawn(move || attach(cfg, &format!("sb-{i}"), ns.pid(), &[]).unwrap())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ips: Vec<_> = leases.iter().map(|l| l.ip).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 20);
    for (l, ns) in leases.iter().zip(&nss) {
        let (_, a) = ns.run(&["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
        assert!(a.contains(&format!("inet {}/", l.ip)), "{a}");
    }
    for l in &leases {
        release(&env.cfg, l).unwrap();
    }
}

#[test]
fn release_leaves_nothing_and_is_idempotent() {
    let env = Env::new();
    let ns = Netns::new();
    let port = free_port();
    let lease = attach(
        &env.cfg,
        "sb-rel",
        ns.pid(),
        &[tcp(Ipv4Addr::UNSPECIFIED, port, 80)],
    )
    .unwrap();
    let tag = format!("ak:{}:{}:sb-rel", env.cfg.bridge, lease.ip);
    assert!(iptables_save().contains(&tag));
    // The port is held while the sandbox lives.
    assert!(TcpListener::bind(("0.0.0.0", port)).is_err());
    assert!(lease.file(&env.cfg).exists());

    // A different process could do this: round-trip through the file.
    let reread = Lease::load(&lease.file(&env.cfg)).unwrap();
    assert_eq!(reread, lease);
    release(&env.cfg, &reread).unwrap();
    assert!(!iptables_save().contains(&tag));
    assert!(
        TcpListener::bind(("0.0.0.0", port)).is_ok(),
        "port still held"
    );
    assert!(!link_exists(&lease.host_veth));
    assert!(!lease.file(&env.cfg).exists());
    release(&env.cfg, &lease).unwrap();
}

#[test]
fn gc_releases_dead_sandboxes_only() {
    let env = Env::new();
    let (a, b) = (Netns::new(), Netns::new());
    let alive = attach(&env.cfg, "alive", a.pid(), &[]).unwrap();
    let dead = attach(
        &env.cfg,
        "dead",
        b.pid(),
        &[tcp(Ipv4Addr::LOCALHOST, 0, 80)],
    )
    .unwrap();
    assert_ne!(dead.ports[0].host_port, 0);
    drop(b); // the sandbox dies: the kernel removes its veth pair with it
    let n = gc(&env.cfg, &|id| id == "alive").unwrap();
    assert_eq!(n, 1);
    assert!(!dead.file(&env.cfg).exists());
    assert!(!link_exists(&dead.host_veth));
    assert!(!iptables_save().contains(&format!(":{}:dead", dead.ip)));
    assert!(alive.file(&env.cfg).exists());
    assert!(link_exists(&alive.host_veth));
    assert_eq!(gc(&env.cfg, &|id| id == "alive").unwrap(), 0);
    release(&env.cfg, &alive).unwrap();
}

#[test]
fn published_loopback_port_reaches_the_sandbox() {
    let env = Env::new();
    let ns = Netns::new();
    let _srv = ns.serve(8080);
    let port = free_port();
    let lease = attach(
        &env.cfg,
        "sb-port",
        ns.pid(),
        &[tcp(Ipv4Addr::LOCALHOST, port, 8080)],
    )
    .unwrap();
    assert_eq!(lease.ports[0].host_port, port);
    // The sandbox sees the connection come from the gateway (masqueraded).
    assert_eq!(
        fetch(&format!("127.0.0.1:{port}")).unwrap(),
        format!("hello {}", lease.gateway)
    );

    // The same port for a second sandbox is refused, naming the holder,
    // and that failed attach leaves no lease behind.
    let other = Netns::new();
    let err = attach(
        &env.cfg,
        "sb-port2",
        other.pid(),
        &[tcp(Ipv4Addr::LOCALHOST, port, 80)],
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::PortInUse { .. }), "{msg}");
    assert!(
        msg.contains(&port.to_string()) && msg.contains("sb-port"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read_dir(env.cfg.state_dir.join("net/leases"))
            .unwrap()
            .count(),
        1
    );

    release(&env.cfg, &lease).unwrap();
    assert!(fetch(&format!("127.0.0.1:{port}")).is_err());
}

/// `0.0.0.0` publishes on every host address: loopback, the host's other
/// addresses, and the gateway as seen from another sandbox (hairpin NAT).
#[test]
fn published_wildcard_port_reaches_the_sandbox_from_everywhere() {
    let env = Env::new();
    let (a, b) = (Netns::new(), Netns::new());
    let _srv = a.serve(7000);
    let port = free_port();
    let la = attach(
        &env.cfg,
        "sb-wild",
        a.pid(),
        &[tcp(Ipv4Addr::UNSPECIFIED, port, 7000)],
    )
    .unwrap();
    let lb = attach(&env.cfg, "sb-client", b.pid(), &[]).unwrap();
    let gw = la.gateway;
    assert_eq!(
        fetch(&format!("127.0.0.1:{port}")).unwrap(),
        format!("hello {gw}")
    );
    assert_eq!(
        fetch(&format!("{gw}:{port}")).unwrap(),
        format!("hello {gw}")
    );
    let script = format!(
        "import socket; s=socket.create_connection(('{gw}',{port}),3); print(s.recv(100).decode().strip())"
    );
    let (ok, got) = b.run(&["python3", "-c", &script]);
    assert!(
        ok,
        "sandbox b could not reach the published port via the gateway"
    );
    assert_eq!(got.trim(), format!("hello {gw}"));
    release(&env.cfg, &la).unwrap();
    release(&env.cfg, &lb).unwrap();
}

#[test]
fn published_udp_port_reaches_the_sandbox() {
    let env = Env::new();
    let ns = Netns::new();
    let script = "import socket\n\
                  s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('0.0.0.0',5353))\n\
                  print('ready', flush=True)\n\
                  while True:\n\
                  \x20   d,a=s.recvfrom(100); s.sendto(('hello %s' % a[0]).encode(), a)\n";
    let mut cmd = ns.cmd(&["python3", "-c", script]);
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _srv = Proc(child);
    assert_eq!(line.trim(), "ready");

    let udp = PortMapping {
        protocol: Protocol::Udp,
        ..tcp(Ipv4Addr::LOCALHOST, 0, 5353)
    };
    let lease = attach(&env.cfg, "sb-udp", ns.pid(), &[udp]).unwrap();
    let port = lease.ports[0].host_port;
    assert_ne!(port, 0);
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.send_to(b"hi", ("127.0.0.1", port)).unwrap();
    let mut buf = [0u8; 100];
    let n = s.recv(&mut buf).unwrap();
    assert_eq!(
        std::str::from_utf8(&buf[..n]).unwrap(),
        format!("hello {}", lease.gateway)
    );
    release(&env.cfg, &lease).unwrap();
}

#[test]
fn port_used_by_a_host_program_is_an_error_naming_it() {
    let env = Env::new();
    let ns = Netns::new();
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let err = attach(
        &env.cfg,
        "sb-busy",
        ns.pid(),
        &[tcp(Ipv4Addr::LOCALHOST, port, 80)],
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("127.0.0.1:{port}/tcp is already in use")),
        "{msg}"
    );
    assert!(!msg.contains('\n'));
    // Rolled back: no lease, no veth, nothing in the sandbox.
    assert_eq!(
        std::fs::read_dir(env.cfg.state_dir.join("net/leases"))
            .unwrap()
            .count(),
        0
    );
    let (_, links) = ns.run(&["ip", "-o", "link"]);
    assert!(!links.contains("eth0"), "{links}");
}

#[test]
fn dead_sandbox_pid_is_a_clear_error() {
    let env = Env::new();
    let err = attach(&env.cfg, "sb-gone", i32::MAX, &[]).unwrap_err();
    assert!(matches!(err, Error::NoNetns { .. }), "{err}");
    assert!(err.to_string().contains("sandbox exited"), "{err}");
}

/// Outbound traffic is forwarded and masqueraded even though Docker set the
/// FORWARD policy to DROP. The destination is a second namespace ("outside")
/// behind its own veth, with no route back to the sandbox subnet: a reply can
/// only arrive if the host forwarded the packet and masqueraded its source.
#[test]
fn outbound_is_forwarded_and_masqueraded_despite_forward_drop() {
    let env = Env::new();
    let save = iptables_save();
    if !save.contains(":FORWARD DROP") {
        eprintln!(
            "note: FORWARD policy is not DROP here; the test still checks forwarding and NAT"
        );
    }
    let sandbox = Netns::new();
    let outside = Netns::new();
    let n = env.cfg.subnet.addr.octets()[2];
    let host_if = format!("akto{}-{n}", std::process::id() % 1000);
    let (host_ip, out_ip) = (format!("10.212.{n}.1"), format!("10.212.{n}.2"));
    let ip = |args: &[&str]| {
        assert!(
            Command::new("ip").args(args).status().unwrap().success(),
            "ip {args:?}"
        )
    };
    ip(&[
        "link",
        "add",
        &host_if,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &outside.pid().to_string(),
    ]);
    struct DelLink(String);
    impl Drop for DelLink {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["link", "del", &self.0]).status();
        }
    }
    let _del = DelLink(host_if.clone());
    ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &host_if]);
    ip(&["link", "set", &host_if, "up"]);
    assert!(
        outside
            .run(&["ip", "addr", "add", &format!("{out_ip}/24"), "dev", "eth0"])
            .0
    );
    assert!(outside.run(&["ip", "link", "set", "eth0", "up"]).0);
    let _srv = outside.serve(9000);

    let lease = attach(&env.cfg, "sb-out", sandbox.pid(), &[]).unwrap();
    let script = format!(
        "import socket; s=socket.create_connection(('{out_ip}',9000),3); print(s.recv(100).decode().strip())"
    );
    let (ok, got) = sandbox.run(&["python3", "-c", &script]);
    assert!(ok, "sandbox could not reach {out_ip}:9000 through the host");
    assert_eq!(
        got.trim(),
        format!("hello {host_ip}"),
        "source was not masqueraded"
    );
    release(&env.cfg, &lease).unwrap();
}

#[test]
fn loopback_up_in_a_fresh_netns() {
    std::thread::spawn(|| {
        // SAFETY: unshare(CLONE_NEWNET) affects only this thread, which does
        // nothing else and exits.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        assert!(
            TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(),
            "lo is down in a new netns"
        );
        agentkernel_net::loopback_up().unwrap();
        let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).unwrap();
        let (mut s, _) = listener.accept().unwrap();
        c.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
    })
    .join()
    .unwrap();
}

#[test]
fn resolv_conf_has_a_reachable_nameserver() {
    let text = agentkernel_net::resolv_conf();
    let servers: Vec<Ipv4Addr> = text
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver "))
        .map(|a| a.parse().unwrap())
        .collect();
    assert!(!servers.is_empty(), "{text}");
    assert!(servers.iter().all(|a| !a.is_loopback()), "{text}");
}
