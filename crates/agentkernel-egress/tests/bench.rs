//! `bench/egress.sh`: the proxy's cost beside a direct connection to the
//! same loopback upstream. Ignored in the normal suite (figures, not checks);
//! run with `--ignored --nocapture` in release mode.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use support::{connect, start, tls, Bound, Setup, API, OTHER};
use tokio::net::TcpStream;

type Sender = http1::SendRequest<Empty<Bytes>>;

/// A TLS connection to API or OTHER: direct, or through the proxy.
async fn open(setup: &Setup, host: &str, via_proxy: bool, ca: &str) -> Sender {
    let tcp = if via_proxy {
        connect(setup.proxy_addr, &format!("{host}:443"))
            .await
            .unwrap()
    } else {
        TcpStream::connect(setup.upstream.addr).await.unwrap()
    };
    tcp.set_nodelay(true).unwrap();
    let stream = tls(tcp, host, ca, &[b"http/1.1"]).await;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    sender
}

async fn get(sender: &mut Sender, host: &str, path: &str) -> usize {
    let request = http::Request::get(path)
        .header("host", host)
        .body(Empty::new())
        .unwrap();
    sender.ready().await.unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .len()
}

fn percentile(times: &mut [Duration], p: f64) -> Duration {
    times.sort();
    times[((times.len() - 1) as f64 * p) as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: bench/egress.sh runs it"]
async fn egress_proxy_benchmark() {
    let setup = start(
        &[Bound {
            key: "API_KEY",
            host: API,
            header: None,
            value: "sk-bench",
        }],
        &[],
        &[],
    )
    .await;
    let sandbox_ca = std::fs::read_to_string(&setup.sandbox_ca).unwrap();
    let upstream_ca = setup.upstream.ca_pem.clone();
    const REQUESTS: usize = 2000;

    // Kept-alive connection: per-request latency.
    let mut rows = Vec::new();
    for (label, via_proxy, ca) in [
        ("direct", false, &upstream_ca),
        ("intercepted", true, &sandbox_ca),
    ] {
        let mut sender = open(&setup, API, via_proxy, ca).await;
        for _ in 0..100 {
            get(&mut sender, API, "/warm").await;
        }
        let mut times = Vec::with_capacity(REQUESTS);
        for _ in 0..REQUESTS {
            let start = Instant::now();
            get(&mut sender, API, "/k").await;
            times.push(start.elapsed());
        }
        let p50 = percentile(&mut times, 0.5);
        let p99 = percentile(&mut times, 0.99);
        println!("keep-alive {label:12} p50 {} p99 {}", ms(p50), ms(p99));
        rows.push(p50);
    }
    println!(
        "added latency per request (p50): {}",
        ms(rows[1].saturating_sub(rows[0]))
    );

    // First request on a new connection (TLS handshake included; the
    // proxy's includes its own handshake upstream).
    for (label, via_proxy, ca) in [
        ("direct", false, &upstream_ca),
        ("intercepted", true, &sandbox_ca),
    ] {
        let mut times = Vec::new();
        for _ in 0..50 {
            let start = Instant::now();
            let mut sender = open(&setup, API, via_proxy, ca).await;
            get(&mut sender, API, "/first").await;
            times.push(start.elapsed());
        }
        println!(
            "first request {label:12} p50 {}",
            ms(percentile(&mut times, 0.5))
        );
    }

    // 100 MB download: direct, through the tunnel (unbound host), and intercepted.
    const SIZE: usize = 100 << 20;
    for (label, host, via_proxy, ca) in [
        ("direct", OTHER, false, &upstream_ca),
        ("tunnel", OTHER, true, &upstream_ca),
        ("intercepted", API, true, &sandbox_ca),
    ] {
        let mut sender = open(&setup, host, via_proxy, ca).await;
        let start = Instant::now();
        let got = get(&mut sender, host, &format!("/bytes/{SIZE}")).await;
        let elapsed = start.elapsed();
        assert_eq!(got, SIZE);
        println!(
            "100 MB download {label:12} {:.0} MB/s",
            SIZE as f64 / (1 << 20) as f64 / elapsed.as_secs_f64()
        );
    }
}
