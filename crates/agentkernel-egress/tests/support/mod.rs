//! A real HTTPS upstream on loopback with its own CA, and the proxy in front
//! of it: what the tests (and bench/egress.sh's figures) measure against.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use agentkernel_core::egress::{EgressSpec, SecretBinding};
use agentkernel_egress::{parse_host_pattern, Proxy, ProxyConfig};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Names the upstream answers for (its certificate holds all of them).
pub const API: &str = "api.example.test";
pub const OTHER: &str = "other.example.test";
pub const EVIL: &str = "evil.example.test";

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub sni: Option<String>,
    pub method: String,
    pub uri: String,
    pub version: http::Version,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub ca_pem: String,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Every byte the upstream received, for "the value never got there".
    pub fn everything(&self) -> String {
        self.seen()
            .iter()
            .map(|s| format!("{s:?}{}", String::from_utf8_lossy(&s.body)))
            .collect()
    }
}

/// `/redirect` → 302 to https://other.example.test/landed; `/bytes/N` → N
/// bytes; `/ws` with `Upgrade` → 101 and an echo; anything else → "ok".
pub async fn start_upstream() -> Upstream {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test upstream CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![API.into(), OTHER.into(), EVIL.into()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from(leaf.der().to_vec())],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
    )
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let record = record.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let sni = tls.get_ref().1.server_name().map(str::to_string);
                let service = service_fn(move |req| answer(req, sni.clone(), record.clone()));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    Upstream {
        addr,
        ca_pem: ca.pem(),
        seen,
    }
}

async fn answer(
    mut req: Request<Incoming>,
    sni: Option<String>,
    record: Arc<Mutex<Vec<Seen>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let upgrade = hyper::upgrade::on(&mut req);
    let (parts, body) = req.into_parts();
    let wants_upgrade = parts.headers.contains_key(http::header::UPGRADE);
    let body = if wants_upgrade {
        Vec::new()
    } else {
        body.collect()
            .await
            .map(|b| b.to_bytes().to_vec())
            .unwrap_or_default()
    };
    record.lock().unwrap().push(Seen {
        sni,
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        version: parts.version,
        headers: parts.headers.clone(),
        body,
    });
    let path = parts.uri.path();
    if wants_upgrade {
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        return Ok(Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("upgrade", "websocket")
            .header("connection", "upgrade")
            .body(Full::default())
            .unwrap());
    }
    if path == "/redirect" {
        return Ok(Response::builder()
            .status(StatusCode::FOUND)
            .header("location", format!("https://{OTHER}/landed"))
            .body(Full::default())
            .unwrap());
    }
    if let Some(n) = path.strip_prefix("/bytes/") {
        let n: usize = n.parse().unwrap();
        return Ok(Response::new(Full::new(Bytes::from(vec![b'x'; n]))));
    }
    Ok(Response::new(Full::new(Bytes::from_static(b"ok\n"))))
}

pub struct Bound {
    pub key: &'static str,
    pub host: &'static str,
    pub header: Option<&'static str>,
    pub value: &'static str,
}

pub struct Setup {
    pub proxy: Proxy,
    pub upstream: Upstream,
    pub proxy_addr: SocketAddr,
    pub dir: tempfile::TempDir,
    /// The sandbox CA alone, and a bundle of it plus the upstream's CA (what
    /// a sandbox's system bundle is: the tunnel path needs the real roots).
    pub sandbox_ca: PathBuf,
    pub bundle: PathBuf,
    pub log: PathBuf,
}

impl Setup {
    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The log once a line of `kind` is in it (tunnels log when they close).
    pub async fn log_with(&self, kind: &str) -> Vec<serde_json::Value> {
        for _ in 0..100 {
            let lines = self.log_lines();
            if lines.iter().any(|l| l["kind"] == kind) {
                return lines;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("no {kind} line in {:?}", self.log_lines());
    }

    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.proxy_addr)
    }
}

pub async fn start(bound: &[Bound], allow: &[&str], placeholders: &[(&str, &str)]) -> Setup {
    let upstream = start_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let upstream_ca = dir.path().join("upstream-ca.pem");
    std::fs::write(&upstream_ca, &upstream.ca_pem).unwrap();
    let log = dir.path().join("egress.log");
    let resolve: BTreeMap<String, String> = [API, OTHER, EVIL]
        .iter()
        .map(|h| (h.to_string(), upstream.addr.to_string()))
        .collect();
    let config = ProxyConfig {
        egress: EgressSpec {
            bindings: bound
                .iter()
                .map(|b| SecretBinding {
                    key: b.key.into(),
                    host: b.host.into(),
                    header: b.header.map(str::to_string),
                })
                .collect(),
            allow_hosts: allow
                .iter()
                .map(|a| parse_host_pattern(a).unwrap())
                .collect(),
            secret_files: vec![],
            placeholders: !placeholders.is_empty(),
            log: Some(log.clone()),
            upstream_ca_file: Some(upstream_ca),
            resolve,
        },
        values: bound
            .iter()
            .map(|b| (b.key.to_string(), b.value.to_string()))
            .collect(),
        placeholders: placeholders
            .iter()
            .map(|(k, p)| (k.to_string(), p.to_string()))
            .collect(),
        ..Default::default()
    };
    let proxy = Proxy::new(config).unwrap();
    let sandbox_ca = dir.path().join("sandbox-ca.pem");
    std::fs::write(&sandbox_ca, proxy.ca_cert_pem()).unwrap();
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(
        &bundle,
        format!("{}{}", proxy.ca_cert_pem(), upstream.ca_pem),
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = listener.local_addr().unwrap();
    let serving = proxy.clone();
    tokio::spawn(async move { serving.serve(listener).await });
    Setup {
        proxy,
        upstream,
        proxy_addr,
        dir,
        sandbox_ca,
        bundle,
        log,
    }
}

/// curl through the proxy, trusting the bundle; returns (HTTP status, body).
pub async fn curl(setup: &Setup, args: &[&str]) -> (u16, String) {
    let output = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "--proxy",
            &setup.proxy_url(),
            "--cacert",
        ])
        .arg(&setup.bundle)
        .args(["-w", "\n%{http_code} %{http_connect}"])
        .args(args)
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let (body, codes) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    // A refused CONNECT has no HTTP code of its own: report the CONNECT's.
    let (code, connect_code) = codes.split_once(' ').unwrap_or((codes, "0"));
    let code = match code.parse().unwrap_or(0) {
        0 => connect_code.trim().parse().unwrap_or(0),
        code => code,
    };
    (code, body.to_string())
}

/// A raw CONNECT; returns the stream after a 200, or the status and body.
pub async fn connect(proxy: SocketAddr, authority: &str) -> Result<TcpStream, (u16, String)> {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream
        .write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut stream).await;
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    if status == 200 {
        Ok(stream)
    } else {
        let length: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|n| n.trim().parse().unwrap())
            })
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        stream.read_exact(&mut body).await.unwrap();
        Err((status, String::from_utf8(body).unwrap()))
    }
}

/// Reads up to the blank line that ends an HTTP/1.1 head.
pub async fn read_head<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.unwrap() == 0 {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

/// TLS over a CONNECTed stream, trusting `ca_pem`, offering `alpn`.
pub async fn tls(
    stream: TcpStream,
    host: &str,
    ca_pem: &str,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(host.to_string().try_into().unwrap(), stream)
        .await
        .unwrap()
}
