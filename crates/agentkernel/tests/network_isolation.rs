//! Network isolation attacks (docs/security.md, "Network"): a sandbox tries
//! to reach the host's loopback with a hand-made packet, the host's own
//! services, and another sandbox. Each attack is checked to fail, and the
//! probe itself is checked to work against something it may reach, so a
//! broken probe cannot pass.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use common::netprobe::*;
use common::*;

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

/// A sandbox serving [`SERVER`] with `publish`; returns it and its address.
fn start_server(env: &TestEnv, publish: &str) -> (Tracked, Ipv4Addr) {
    start_server_with(env, &["-P", publish])
}

/// A sandbox serving [`SERVER`], `options` after `run`.
fn start_server_with(env: &TestEnv, options: &[&str]) -> (Tracked, Ipv4Addr) {
    let script = format!("{FIND_GATEWAY}{SERVER}");
    let mut args = vec!["run"];
    args.extend_from_slice(options);
    args.extend(["-i", PYTHON, "python3", "-c", &script]);
    let mut t = env.spawn(&args);
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
    raw_syn_to_host_loopback_is_never_answered_in(&TestEnv::new(), None);
}

/// As above, in `env`; with `namespaces`, the sandbox's network namespace
/// must be one of them (see `native_only::keeper_namespaces`).
fn raw_syn_to_host_loopback_is_never_answered_in(env: &TestEnv, namespaces: Option<&[String]>) {
    let secret = host_listener(Ipv4Addr::LOCALHOST);
    let published = free_port();
    // The sandbox listens on 8080 (published on every host address, so
    // reachable at the gateway) and probes both.
    let script = format!(
        "import subprocess, sys, os\n\
         print('NETNS', os.readlink('/proc/self/ns/net'), flush=True)\n\
         s = socket.socket(); s.bind(('0.0.0.0', 8080)); s.listen(4)\n\
         sys.exit(subprocess.call(['python3', '-c', sys.argv[1], gw + ':{published}', '127.0.0.1:{}']))\n",
        secret.port
    );
    let text = permissive_python(env, &["-P", &format!("0.0.0.0:{published}:8080")], &script);
    let (netns, text) = text.split_once('\n').unwrap_or_default();
    if let Some(namespaces) = namespaces {
        let netns = netns.strip_prefix("NETNS ").unwrap_or(netns);
        assert!(
            namespaces.iter().any(|n| n == netns),
            "{netns} is not from {namespaces:?}"
        );
    }
    assert_eq!(
        probe_result(text, &format!("127.0.0.1:{}", secret.port)),
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

    attack_server(&env, &[], server_ip, raw_probe);
    drop(server);
}

/// From a permissive sandbox (`options` after `run`): a TCP connection to
/// the server at `server_ip`:8080, and with `raw_probe` a hand-made SYN to
/// it through the gateway. Both must fail.
fn attack_server(env: &TestEnv, options: &[&str], server_ip: Ipv4Addr, raw_probe: bool) {
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
    let text = permissive_python(env, options, &connect);
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
}

mod native_only {
    use super::*;

    #[test]
    fn raw_syn_to_host_loopback_is_never_answered() {
        super::raw_syn_to_host_loopback_is_never_answered();
    }

    /// The network namespaces native's disk keeper made ahead (in `env`'s
    /// state dir, started by a moderate run) once it holds two.
    fn keeper_namespaces(env: &TestEnv) -> Vec<String> {
        assert_code(&env.run(&["run", "-i", BUSYBOX, "true"]), 0);
        let mut held = Vec::new();
        poll_until(
            Duration::from_secs(20),
            "the disk keeper holds two network namespaces",
            || {
                held = env.keeper_namespaces();
                held.len() == 2
            },
        );
        held
    }

    /// The same attack from a network namespace the keeper made ahead.
    #[test]
    fn raw_syn_to_host_loopback_is_never_answered_from_a_keeper_namespace() {
        let env = TestEnv::new();
        let namespaces = keeper_namespaces(&env);
        super::raw_syn_to_host_loopback_is_never_answered_in(&env, Some(&namespaces));
    }

    #[test]
    fn sandboxes_cannot_reach_each_other() {
        super::sandboxes_cannot_reach_each_other();
    }

    /// Runs served by warm sandboxes (`--fast`) are as far apart as any:
    /// a server in one pooled sandbox, a client in another of the same key,
    /// built side by side by the same refill.
    #[test]
    fn pooled_sandboxes_cannot_reach_each_other() {
        let env = TestEnv::new();
        std::fs::write(
            env.project_dir().join("agentkernel.toml"),
            "[pool]\nsize = 2\nidle_ttl = \"120s\"\n",
        )
        .unwrap();
        let pooled = ["--fast", "-p", "permissive"];
        let mut warm_up = vec!["run"];
        warm_up.extend(pooled);
        warm_up.extend(["-i", PYTHON, "true"]);
        assert_code(&env.run(&warm_up), 0);
        poll_until(
            Duration::from_secs(90),
            "the pool should hold two warm sandboxes",
            || env.ready_warm_sandboxes().len() == 2,
        );
        env.wait_for_refills(Duration::from_secs(60));

        let (server, server_ip) = start_server_with(&env, &pooled);
        assert_eq!(
            greeting(SocketAddr::from((server_ip, 8080))).unwrap(),
            "hello",
            "the host cannot reach the pooled server, so the attack proves nothing"
        );
        attack_server(&env, &["--fast"], server_ip, true);
        drop(server);
        // Both were served by warm sandboxes (the warm-up run was the miss).
        let status = env.run(&["pool", "status", "--json"]);
        let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
        let keys = &status["sandboxes"]["keys"];
        assert_eq!(keys.as_array().map(Vec::len), Some(1), "{status}");
        assert_eq!(keys[0]["hits"], 2, "{status}");
    }

    /// A sandbox on the bridge has IPv4 only on its eth0 — no IPv6 address,
    /// nothing to send IPv6 from, whether its namespace was made for the
    /// run or by the disk keeper ahead — while loopback keeps `::1` for
    /// programs that listen on `localhost`.
    #[test]
    fn eth0_is_ipv4_only_and_loopback_keeps_ipv6() {
        let env = TestEnv::new();
        let script = "import socket\n\
            print('addresses', sorted(l.split()[5] for l in open('/proc/net/if_inet6')))\n\
            print('eth0 ipv6 off', open('/proc/sys/net/ipv6/conf/eth0/disable_ipv6').read().strip())\n\
            s = socket.create_server(('::1', 0), family=socket.AF_INET6)\n\
            c = socket.create_connection(('::1', s.getsockname()[1]), 2)\n\
            print('loopback ipv6 ok')\n\
            u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n\
            try:\n\
            \x20   u.sendto(b'x', ('ff02::1%eth0', 9)); print('sent on eth0')\n\
            except OSError as e:\n\
            \x20   print('eth0 ipv6 refused', e.errno)\n";
        let check = |text: &str| {
            assert!(text.contains("addresses ['lo']"), "{text}");
            assert!(text.contains("eth0 ipv6 off 1"), "{text}");
            assert!(text.contains("loopback ipv6 ok"), "{text}");
            assert!(text.contains("eth0 ipv6 refused"), "{text}");
        };
        // The trace says whose namespace a run got.
        let traced_run = || {
            env.cmd()
                .env("AGENTKERNEL_TRACE_STARTUP", "1")
                .args(["run", "-i", PYTHON, "--", "python3", "-c", script])
                .timeout(Duration::from_secs(120))
                .output()
                .unwrap()
        };
        const FROM_THE_KEEPER: &str = "network: namespace from the keeper sent";
        // The first run of a state dir makes its own namespace.
        let first = traced_run();
        assert_code(&first, 0);
        assert!(!String::from_utf8_lossy(&first.stderr).contains(FROM_THE_KEEPER));
        check(&stdout(&first));
        // Later ones take the keeper's.
        keeper_namespaces(&env);
        let later = traced_run();
        assert_code(&later, 0);
        assert!(
            String::from_utf8_lossy(&later.stderr).contains(FROM_THE_KEEPER),
            "precondition: this run's namespace came from the keeper"
        );
        check(&stdout(&later));
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
