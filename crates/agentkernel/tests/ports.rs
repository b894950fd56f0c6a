//! Published ports (`-P/--publish`). The servers run as one-shot `run`s in
//! the background of the test, which ends them with SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use common::*;

fn httpd_script(content: &str) -> String {
    format!("echo {content} > /tmp/index.html && exec httpd -f -p 8080 -h /tmp")
}

/// Ends a background server run and checks it cleans up after itself.
fn stop(t: Tracked) {
    t.signal(libc::SIGTERM);
    let owner = t.owner.clone();
    let out = t.wait_output(Duration::from_secs(30));
    assert!(
        out.stdout.is_empty(),
        "agentkernel wrote to stdout: {}",
        stdout(&out)
    );
    assert!(
        containers_of_owner(&owner).is_empty(),
        "the server's container remains"
    );
}

#[test]
fn publish_host_port_to_container_port() {
    let env = TestEnv::new();
    let port = free_port();
    let publish = format!("{port}:8080");
    let content = unique_name("hello-ports");
    let t = env.spawn(&[
        "run",
        "-P",
        &publish,
        "-i",
        BUSYBOX,
        "sh",
        "-c",
        &httpd_script(&content),
    ]);
    let resp = http_get_until(port, &content, Duration::from_secs(30));
    assert!(resp.starts_with("HTTP/1."), "{resp}");
    stop(t);
}

#[test]
fn publish_without_host_port_reports_the_chosen_one() {
    let env = TestEnv::new();
    let content = unique_name("hello-any");
    let mut cmd = env.std_cmd();
    cmd.args([
        "run",
        "-P",
        "8080",
        "-i",
        BUSYBOX,
        "sh",
        "-c",
        &httpd_script(&content),
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let mut t = Tracked::spawn(cmd);
    let stderr = t.child().stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // "agentkernel: port 127.0.0.1:NNNN -> 8080/tcp"
    let mut seen = Vec::new();
    let port: u16 = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no port line on stderr; saw {seen:?}"));
        if let Some(rest) = line.split("port 127.0.0.1:").nth(1) {
            let (port, target) = rest.split_once(" -> ").expect("NNNN -> PORT/PROTO");
            assert_eq!(target.trim(), "8080/tcp", "{line}");
            break port
                .parse()
                .unwrap_or_else(|_| panic!("bad port in {line}"));
        }
        seen.push(line);
    };
    assert_ne!(port, 0);
    let resp = http_get_until(port, &content, Duration::from_secs(30));
    assert!(resp.starts_with("HTTP/1."), "{resp}");
    stop(t);
}

#[test]
fn publish_binds_loopback_only_by_default() {
    let env = TestEnv::new();
    let port = free_port();
    let publish = format!("{port}:8080");
    let content = unique_name("loopback");
    let t = env.spawn(&[
        "run",
        "-P",
        &publish,
        "-i",
        BUSYBOX,
        "sh",
        "-c",
        &httpd_script(&content),
    ]);
    http_get_until(port, &content, Duration::from_secs(30));
    // From another of the host's addresses, the port must not answer.
    let host_ips = std::process::Command::new("hostname")
        .arg("-I")
        .output()
        .unwrap();
    for ip in String::from_utf8_lossy(&host_ips.stdout).split_whitespace() {
        let Ok(addr) = format!("{ip}:{port}").parse::<std::net::SocketAddr>() else {
            continue;
        };
        if addr.is_ipv4() && !addr.ip().is_loopback() {
            assert!(
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err(),
                "the port answers on {addr}: published beyond loopback"
            );
        }
    }
    if !uses_own_image_store() {
        let name = t.containers().pop().expect("server container");
        let ports = engine_ok(&["port", &name, "8080/tcp"]);
        assert!(
            !ports.trim().is_empty() && ports.lines().all(|l| l.starts_with("127.0.0.1:")),
            "published beyond loopback: {ports}"
        );
    }
    stop(t);
}

#[test]
fn publish_with_no_network_is_125() {
    let env = TestEnv::new();
    let out = env.run(&["run", "-P", "80", "--no-network", "-i", BUSYBOX, "true"]);
    let line = assert_one_line_error(&out);
    assert!(line.contains("--no-network"), "{line}");
}

#[test]
fn publish_under_restrictive_is_125() {
    let env = TestEnv::new();
    let out = env.run(&[
        "run",
        "-P",
        "80",
        "-p",
        "restrictive",
        "-i",
        BUSYBOX,
        "true",
    ]);
    let line = assert_one_line_error(&out);
    assert!(line.contains("restrictive"), "{line}");
}
