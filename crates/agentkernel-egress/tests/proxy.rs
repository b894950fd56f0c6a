//! The proxy with real TLS on loopback: a local HTTPS upstream with its own
//! CA, curl and a Rust client through the proxy, and assertions on what
//! arrived upstream.

mod support;

use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use support::{connect, curl, read_head, start, tls, Bound, API, EVIL, OTHER};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const VALUE: &str = "sk-live-0123456789";
const OTHER_VALUE: &str = "x-api-secret-987";

fn api_key() -> Bound {
    Bound {
        key: "API_KEY",
        host: API,
        header: None,
        value: VALUE,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_keys_bound_to_one_host_are_both_injected_over_http1() {
    let setup = start(
        &[
            api_key(),
            Bound {
                key: "SECOND",
                host: API,
                header: Some("X-Api-Key"),
                value: OTHER_VALUE,
            },
        ],
        &[],
        &[],
    )
    .await;
    let (status, body) = curl(&setup, &["--http1.1", &format!("https://{API}/v1/models")]).await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let seen = setup.upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].sni.as_deref(), Some(API));
    assert_eq!(
        seen[0].header("authorization"),
        Some(&*format!("Bearer {VALUE}"))
    );
    assert_eq!(seen[0].header("x-api-key"), Some(OTHER_VALUE));
    assert_eq!(seen[0].version, http::Version::HTTP_11);
    // The log names the secrets, never their values.
    let log = std::fs::read_to_string(&setup.log).unwrap();
    assert!(!log.contains(VALUE) && !log.contains(OTHER_VALUE), "{log}");
    let lines = setup.log_lines();
    let request = lines.iter().find(|l| l["kind"] == "intercept").unwrap();
    assert_eq!(
        request["injected"],
        serde_json::json!(["API_KEY", "SECOND"])
    );
    assert_eq!(request["path"], "/v1/models");
    assert_eq!(request["status"], 200);
    assert_eq!(request["bytes_received"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_requests_are_injected() {
    let setup = start(&[api_key()], &[], &[]).await;
    let (status, _) = curl(&setup, &["--http2", &format!("https://{API}/h2")]).await;
    assert_eq!(status, 200);
    let seen = setup.upstream.seen();
    assert_eq!(seen[0].version, http::Version::HTTP_2);
    assert_eq!(
        seen[0].header("authorization"),
        Some(&*format!("Bearer {VALUE}"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_header_of_the_same_name_is_replaced_not_doubled() {
    let setup = start(&[api_key()], &[], &[]).await;
    let (status, _) = curl(
        &setup,
        &[
            "-H",
            "Authorization: Bearer sandbox-made-up",
            &format!("https://{API}/"),
        ],
    )
    .await;
    assert_eq!(status, 200);
    let seen = setup.upstream.seen();
    let values: Vec<_> = seen[0].headers.get_all("authorization").iter().collect();
    assert_eq!(values, [&*format!("Bearer {VALUE}")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoofed_host_inside_the_connect_gets_421_and_nothing_is_sent() {
    let setup = start(&[api_key()], &[], &[]).await;
    for args in [
        vec!["--http1.1", "-H", "Host: evil.example.test"],
        vec!["--http2", "-H", "Host: evil.example.test"],
        vec!["--http1.1", "-H", "Host: api.example.test:8443"],
    ] {
        let url = format!("https://{API}/steal");
        let (status, body) = curl(&setup, &[args.as_slice(), &[url.as_str()]].concat()).await;
        assert_eq!(status, 421, "{args:?}: {body}");
    }
    assert!(setup.upstream.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allow_list_refuses_unlisted_hosts_connect_and_plain_http() {
    let setup = start(&[api_key()], &["other.example.test"], &[]).await;
    let (status, body) = curl(&setup, &[&format!("https://{EVIL}/")]).await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = connect(setup.proxy_addr, &format!("{EVIL}:443"))
        .await
        .unwrap_err();
    assert_eq!(status, 403);
    assert_eq!(
        body,
        "agentkernel: egress to evil.example.test is not allowed; add --allow-host evil.example.test to allow it\n"
    );
    let (status, body) = curl(&setup, &[&format!("http://{EVIL}/")]).await;
    assert_eq!(status, 403);
    assert!(body.contains("--allow-host evil.example.test"), "{body}");
    // A listed host and the bound host (implicitly allowed) go through.
    assert_eq!(curl(&setup, &[&format!("https://{OTHER}/")]).await.0, 200);
    assert_eq!(curl(&setup, &[&format!("https://{API}/")]).await.0, 200);
    assert_eq!(setup.upstream.seen().len(), 2);
    let denied = setup
        .log_lines()
        .iter()
        .filter(|l| l["kind"] == "deny")
        .count();
    assert_eq!(denied, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbound_hosts_are_tunnelled_uninspected_and_redirects_carry_nothing() {
    let setup = start(&[api_key()], &[], &[]).await;
    let (status, body) = curl(&setup, &["-L", &format!("https://{API}/redirect")]).await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let seen = setup.upstream.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[0].header("authorization"),
        Some(&*format!("Bearer {VALUE}"))
    );
    assert_eq!(seen[1].sni.as_deref(), Some(OTHER));
    assert_eq!(seen[1].header("authorization"), None);
    let tunnel = setup.log_with("tunnel").await;
    let tunnel = tunnel.iter().find(|l| l["kind"] == "tunnel").unwrap();
    assert_eq!(tunnel["host"], OTHER);
    assert!(tunnel["bytes_received"].as_u64().unwrap() > 0);
    // The tunnel is end-to-end TLS with the upstream: the sandbox CA alone
    // cannot verify it, the upstream's own CA can.
    let stream = connect(setup.proxy_addr, &format!("{OTHER}:443"))
        .await
        .unwrap();
    let mut stream = tls(stream, OTHER, &setup.upstream.ca_pem, &[b"http/1.1"]).await;
    stream
        .write_all(
            format!("GET /direct HTTP/1.1\r\nHost: {OTHER}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    assert!(read_head(&mut stream).await.starts_with("HTTP/1.1 200"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placeholders_are_swapped_only_for_their_bound_host() {
    const PH: &str = "AGENTKERNEL_PLACEHOLDER_00112233445566778899aabbccddeeff";
    let setup = start(
        &[
            api_key(),
            Bound {
                key: "OTHER_KEY",
                host: OTHER,
                header: Some("x-other"),
                value: OTHER_VALUE,
            },
        ],
        &[],
        &[("API_KEY", PH)],
    )
    .await;
    let (status, _) = curl(
        &setup,
        &[
            "-H",
            &format!("X-Echo: {PH}"),
            "--data",
            &format!("{{\"key\":\"{PH}\"}}"),
            &format!("https://{API}/q?key={PH}"),
        ],
    )
    .await;
    assert_eq!(status, 200);
    let seen = setup.upstream.seen();
    assert_eq!(seen[0].header("x-echo"), Some(VALUE));
    assert!(
        seen[0].uri.ends_with(&format!("/q?key={VALUE}")),
        "{}",
        seen[0].uri
    );
    assert_eq!(seen[0].body, format!("{{\"key\":\"{VALUE}\"}}").as_bytes());
    // To another intercepted host, in a header, the query or the body: refused.
    for args in [
        vec![
            "-H".to_string(),
            format!("X-Leak: {PH}"),
            format!("https://{OTHER}/"),
        ],
        vec![format!("https://{OTHER}/?leak={PH}")],
        vec![
            "--data".to_string(),
            PH.to_string(),
            format!("https://{OTHER}/"),
        ],
        vec![
            "--http2".to_string(),
            "--data".to_string(),
            PH.to_string(),
            format!("https://{OTHER}/"),
        ],
        vec![format!("http://{OTHER}/?leak={PH}")],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (status, body) = curl(&setup, &args).await;
        assert_eq!(status, 403, "{args:?}");
        assert!(body.contains("placeholder of secret API_KEY"), "{body}");
    }
    assert_eq!(setup.upstream.seen().len(), 1);
    assert!(!setup.upstream.everything().contains(PH));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_handshake_is_injected_then_tunnelled() {
    let setup = start(&[api_key()], &[], &[]).await;
    let stream = connect(setup.proxy_addr, &format!("{API}:443"))
        .await
        .unwrap();
    let ca = std::fs::read_to_string(&setup.sandbox_ca).unwrap();
    let mut stream = tls(stream, API, &ca, &[b"http/1.1"]).await;
    stream
        .write_all(
            format!(
                "GET /ws HTTP/1.1\r\nHost: {API}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    stream.write_all(b"frames go both ways").await.unwrap();
    let mut echoed = [0u8; 19];
    stream.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"frames go both ways");
    let seen = setup.upstream.seen();
    assert_eq!(
        seen[0].header("authorization"),
        Some(&*format!("Bearer {VALUE}"))
    );
    assert_eq!(seen[0].header("upgrade"), Some("websocket"));
    assert_eq!(
        seen[0].header("sec-websocket-key"),
        Some("dGhlIHNhbXBsZSBub25jZQ==")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_client_keeps_one_connection_for_many_requests() {
    let setup = start(&[api_key()], &[], &[]).await;
    let stream = connect(setup.proxy_addr, &format!("{API}:443"))
        .await
        .unwrap();
    let ca = std::fs::read_to_string(&setup.sandbox_ca).unwrap();
    let stream = tls(stream, API, &ca, &[b"h2"]).await;
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    for i in 0..5 {
        let request = http::Request::get(format!("https://{API}/n/{i}"))
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.unwrap();
    }
    let seen = setup.upstream.seen();
    assert_eq!(seen.len(), 5);
    assert!(seen
        .iter()
        .all(|s| s.header("authorization") == Some(&*format!("Bearer {VALUE}"))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_the_proxy_cannot_verify_gets_nothing() {
    // No [proxy] ca_file: the upstream's test CA is not trusted.
    let upstream = support::start_upstream().await;
    let config = agentkernel_egress::ProxyConfig {
        egress: agentkernel_core::egress::EgressSpec {
            bindings: vec![agentkernel_core::egress::SecretBinding {
                key: "API_KEY".into(),
                host: API.into(),
                header: None,
            }],
            resolve: [(API.to_string(), upstream.addr.to_string())].into(),
            ..Default::default()
        },
        values: [("API_KEY".to_string(), VALUE.to_string())].into(),
        ..Default::default()
    };
    let proxy = agentkernel_egress::Proxy::new(config).unwrap();
    let ca = proxy.ca_cert_pem();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { proxy.serve(listener).await });
    let stream = connect(addr, &format!("{API}:443")).await.unwrap();
    let mut stream = tls(stream, API, &ca, &[b"http/1.1"]).await;
    stream
        .write_all(format!("GET / HTTP/1.1\r\nHost: {API}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    assert!(read_head(&mut stream).await.starts_with("HTTP/1.1 502"));
    assert!(upstream.seen().is_empty());
}

/// The proxy's report (a receipt's egress summary): per host its
/// connections, requests, refusals and the names of the secrets injected;
/// a tunnel's bytes are exactly those the sandbox's side sent and received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_counts_each_host_and_names_the_injected_secrets() {
    let setup = start(&[api_key()], &[OTHER], &[]).await;
    for path in ["a", "b"] {
        assert_eq!(
            curl(&setup, &[&format!("https://{API}/{path}")]).await.0,
            200
        );
    }
    assert_eq!(curl(&setup, &[&format!("https://{EVIL}/")]).await.0, 403);
    // Not TLS: the upstream answers with an alert and closes.
    let mut tunnel = connect(setup.proxy_addr, &format!("{OTHER}:443"))
        .await
        .unwrap();
    tunnel.write_all(b"hello\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = tunnel.read_to_end(&mut answer).await;
    drop(tunnel);
    let report = setup.proxy.report().await;
    assert!(report.complete, "{report:?}");
    let api = &report.hosts[API];
    assert_eq!((api.connections, api.requests, api.refused), (2, 2, 0));
    assert_eq!(api.injected, [("API_KEY".to_string(), 2)].into());
    assert!(api.bytes_up > 0 && api.bytes_down > 0, "{api:?}");
    let evil = &report.hosts[EVIL];
    assert_eq!((evil.connections, evil.refused), (1, 1));
    let other = &report.hosts[OTHER];
    assert_eq!(other.connections, 1);
    assert_eq!(other.requests, 0, "a tunnel's requests are not seen");
    assert_eq!(
        (other.bytes_up, other.bytes_down),
        (9, answer.len() as u64),
        "{other:?}"
    );
    assert_eq!(report.totals.connections, 4);
    assert_eq!(report.totals.refused, 1);
    assert_eq!(report.totals.injected, api.injected);
}

/// A connection still open when the report is taken (a kept sandbox's
/// background process): the report waits at most the drain limit, says it
/// is incomplete, and has the bytes so far.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_with_a_connection_still_open_is_marked_incomplete() {
    let setup = start(&[], &[], &[]).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    let mut tunnel = connect(setup.proxy_addr, &target.to_string())
        .await
        .unwrap();
    let (mut far, _) = listener.accept().await.unwrap();
    tunnel.write_all(b"hello").await.unwrap();
    let mut got = [0u8; 5];
    far.read_exact(&mut got).await.unwrap();
    let started = std::time::Instant::now();
    let report = setup.proxy.report().await;
    let waited = started.elapsed();
    assert!(!report.complete, "{report:?}");
    assert!(
        waited >= agentkernel_egress::summary::DRAIN_LIMIT && waited.as_secs() < 5,
        "{waited:?}"
    );
    let host = &report.hosts["127.0.0.1"];
    assert_eq!((host.connections, host.bytes_up), (1, 5), "{host:?}");
    // Once it closes, the report is complete again.
    drop((tunnel, far));
    assert!(setup.proxy.report().await.complete);
}
