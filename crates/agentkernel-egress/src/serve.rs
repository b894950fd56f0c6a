//! The proxy's listener: CONNECT (refuse, tunnel or intercept) and
//! absolute-form plain HTTP (forwarded, never injected).

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, BodyStream, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::{http1 as client_h1, http2 as client_h2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::ca::CertificateAuthority;
use crate::log::{Counted, EgressLog, Entry};
use crate::placeholders::{Foreign, Placeholders};
use crate::summary::{CountedIo, Counters, Summary, Tally, DRAIN_LIMIT};
use crate::upstream::Upstream;
use crate::{header_for, normalize_host, route, Error, ProxyConfig, Route, BODY_SCAN_LIMIT};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const TUNNEL_BUFFER: usize = 256 * 1024;
type Body = BoxBody<Bytes, BoxError>;

/// A started proxy: its CA exists; `serve` accepts connections.
#[derive(Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
}

struct Shared {
    config: ProxyConfig,
    ca: CertificateAuthority,
    upstream: Upstream,
    log: Option<Arc<EgressLog>>,
    tally: Arc<Tally>,
}

impl Proxy {
    pub fn new(config: ProxyConfig) -> Result<Self, Error> {
        config.validate()?;
        let upstream = Upstream::new(
            config.egress.upstream_ca_file.as_deref(),
            config.egress.resolve.clone(),
        )?;
        let log = config
            .egress
            .log
            .as_deref()
            .map(EgressLog::open)
            .transpose()?
            .map(Arc::new);
        Ok(Proxy {
            shared: Arc::new(Shared {
                ca: CertificateAuthority::generate()?,
                config,
                upstream,
                log,
                tally: Arc::default(),
            }),
        })
    }

    /// The CA certificate (PEM) the sandbox must trust.
    pub fn ca_cert_pem(&self) -> String {
        self.shared.ca.cert_pem()
    }

    /// What went through so far, once open connections ended (or at the
    /// drain limit): the proxy's report (see `summary`).
    pub async fn report(&self) -> Summary {
        self.shared.tally.drained(DRAIN_LIMIT).await
    }

    /// Answers report requests on a kept sandbox's socket (`summary::bind_reports`).
    pub async fn serve_reports(&self, listener: std::os::unix::net::UnixListener) {
        let listener = listener
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixListener::from_std(listener));
        match listener {
            Ok(listener) => {
                crate::summary::serve_reports(listener, self.shared.tally.clone()).await
            }
            // Nobody can ask: keep serving the sandbox.
            Err(_) => std::future::pending().await,
        }
    }

    /// Accepts connections until the listener fails.
    pub async fn serve(&self, listener: TcpListener) -> std::io::Result<()> {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                // Out of descriptors and the like: transient, keep serving.
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            self.spawn_connection(stream);
        }
    }

    /// Serves connections accepted elsewhere (a VM's, carried to us one by
    /// one) until `connections` ends.
    pub async fn serve_connections(
        &self,
        mut connections: tokio::sync::mpsc::Receiver<std::os::unix::net::UnixStream>,
    ) {
        while let Some(stream) = connections.recv().await {
            let stream = stream
                .set_nonblocking(true)
                .and_then(|()| tokio::net::UnixStream::from_std(stream));
            if let Ok(stream) = stream {
                self.spawn_connection(stream);
            }
        }
        // The run stopped sending: keep serving what is open until the end.
        std::future::pending::<()>().await
    }

    fn spawn_connection<S>(&self, stream: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let shared = self.shared.clone();
        let active = shared.tally.active();
        tokio::spawn(async move {
            let _active = active;
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(shared.handle(req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

fn incoming(body: Incoming) -> Body {
    body.map_err(BoxError::from).boxed()
}

/// A response of the proxy's own: one line saying why.
fn refusal(status: StatusCode, line: String) -> Response<Body> {
    let mut response = Response::new(full(format!("{line}\n")));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn not_allowed(host: &str) -> String {
    format!("agentkernel: egress to {host} is not allowed; add --allow-host {host} to allow it")
}

fn foreign_placeholder(key: &str, host: &str) -> String {
    format!("agentkernel: the placeholder of secret {key} may only be sent to its bound hosts, not {host}; request refused")
}

impl Shared {
    fn log(&self, entry: Entry) {
        if let Some(log) = &self.log {
            log.write(entry);
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        if req.method() == Method::CONNECT {
            self.connect(req).await
        } else {
            self.plain_http(req).await
        }
    }

    async fn connect(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let Some(authority) = req.uri().authority().cloned() else {
            return refusal(
                StatusCode::BAD_REQUEST,
                "agentkernel: CONNECT needs HOST:PORT".into(),
            );
        };
        let host = normalize_host(authority.host());
        let port = authority.port_u16().unwrap_or(443);
        let counters = self.tally.host(&host);
        counters.connection();
        let entry = |kind, status: StatusCode| Entry {
            kind,
            host: host.clone(),
            port,
            method: Some("CONNECT".into()),
            status: status.as_u16(),
            ..Default::default()
        };
        match route(&self.config.egress, &host, port) {
            Route::Deny => {
                self.log(entry("deny", StatusCode::FORBIDDEN));
                counters.status(403);
                let mut response = refusal(StatusCode::FORBIDDEN, not_allowed(&host));
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                response
            }
            Route::Tunnel => {
                let mut upstream = match self.upstream.connect_tcp(&host, port).await {
                    Ok(stream) => stream,
                    Err(e) => {
                        let mut failed = entry("tunnel", StatusCode::BAD_GATEWAY);
                        failed.error = Some(e.to_string());
                        self.log(failed);
                        counters.status(502);
                        return refusal(
                            StatusCode::BAD_GATEWAY,
                            format!("agentkernel: cannot connect to {host}:{port}: {e}"),
                        );
                    }
                };
                let mut done = entry("tunnel", StatusCode::OK);
                let active = self.tally.active();
                tokio::spawn(async move {
                    let _active = active;
                    let Ok(upgraded) = hyper::upgrade::on(req).await else {
                        return;
                    };
                    let mut client = CountedIo::new(TokioIo::new(upgraded), counters);
                    // Larger buffers than tokio's 8 KiB default: a bulk
                    // download then moves in fewer, larger reads and writes.
                    if let Ok((sent, received)) = tokio::io::copy_bidirectional_with_sizes(
                        &mut client,
                        &mut upstream,
                        TUNNEL_BUFFER,
                        TUNNEL_BUFFER,
                    )
                    .await
                    {
                        done.bytes_sent = sent;
                        done.bytes_received = received;
                    }
                    self.log(done);
                });
                Response::new(empty())
            }
            Route::Intercept => {
                let tls = match self.ca.server_config(&host) {
                    Ok(config) => tokio_rustls::TlsAcceptor::from(config),
                    Err(e) => return refusal(StatusCode::BAD_GATEWAY, format!("agentkernel: {e}")),
                };
                let active = self.tally.active();
                tokio::spawn(async move {
                    let _active = active;
                    let Ok(upgraded) = hyper::upgrade::on(req).await else {
                        return;
                    };
                    let client = CountedIo::new(TokioIo::new(upgraded), counters.clone());
                    let Ok(stream) = tls.accept(client).await else {
                        return;
                    };
                    let client_h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                    let connection = Arc::new(Intercepted {
                        shared: self,
                        host,
                        port,
                        client_h2,
                        upstream: tokio::sync::Mutex::new(Pool::default()),
                        counters,
                    });
                    let service = service_fn(move |req| {
                        let connection = connection.clone();
                        async move { Ok::<_, Infallible>(connection.handle(req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
                Response::new(empty())
            }
        }
    }

    /// `GET http://host/path` through the proxy: forwarded from the host's
    /// network, never injected (the value would travel in clear).
    async fn plain_http(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let uri = req.uri().clone();
        let (Some(authority), Some("http")) = (uri.authority(), uri.scheme_str()) else {
            return refusal(
                StatusCode::BAD_REQUEST,
                "agentkernel: this is an egress proxy: send absolute-form http:// requests or CONNECT".into(),
            );
        };
        let host = normalize_host(authority.host());
        let port = authority.port_u16().unwrap_or(80);
        let mut entry = Entry {
            kind: "http",
            host: host.clone(),
            port,
            method: Some(req.method().to_string()),
            path: Some(uri.path().to_string()),
            ..Default::default()
        };
        let counters = self.tally.host(&host);
        counters.connection();
        counters.request();
        if route(&self.config.egress, &host, port) == Route::Deny {
            entry.kind = "deny";
            entry.status = 403;
            self.log(entry);
            counters.status(403);
            return refusal(StatusCode::FORBIDDEN, not_allowed(&host));
        }
        let placeholders = Placeholders::for_host(&self.config, &host, false);
        let (mut parts, body) = req.into_parts();
        let body = match scrub_request(&placeholders, &mut parts, body).await {
            Ok((body, _)) => count_frames(body, &counters, true),
            Err(Scrub::Foreign(Foreign(key))) => {
                entry.status = 403;
                self.log(entry);
                counters.status(403);
                return refusal(StatusCode::FORBIDDEN, foreign_placeholder(&key, &host));
            }
            Err(Scrub::Body(e)) => {
                return refusal(
                    StatusCode::BAD_REQUEST,
                    format!("agentkernel: request body: {e}"),
                )
            }
        };
        strip_hop_by_hop(&mut parts.headers);
        parts.uri = origin_form(&parts.uri);
        parts.version = Version::HTTP_11;
        let result = async {
            let tcp = self.upstream.connect_tcp(&host, port).await?;
            let (mut sender, connection) = client_h1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(connection);
            Ok::<_, BoxError>(
                sender
                    .send_request(Request::from_parts(parts, body))
                    .await?,
            )
        }
        .await;
        self.respond(result, entry, &host, port, Some(&counters))
    }

    /// `plain_http`: the request's counters, for the response body's bytes
    /// (an intercepted connection counts its bytes itself).
    fn respond(
        &self,
        result: Result<Response<Incoming>, BoxError>,
        mut entry: Entry,
        host: &str,
        port: u16,
        plain_http: Option<&Arc<Counters>>,
    ) -> Response<Body> {
        match result {
            Ok(response) => {
                entry.status = response.status().as_u16();
                let response = match plain_http {
                    Some(counters) => response.map(|b| count_frames(incoming(b), counters, false)),
                    None => response.map(incoming),
                };
                match &self.log {
                    Some(log) => response.map(|b| Counted::new(b, log.clone(), entry).boxed()),
                    None => response,
                }
            }
            Err(e) => {
                if let Some(counters) = plain_http {
                    counters.status(502);
                }
                entry.status = 502;
                entry.error = Some(e.to_string());
                self.log(entry);
                refusal(
                    StatusCode::BAD_GATEWAY,
                    format!("agentkernel: upstream {host}:{port}: {e}"),
                )
            }
        }
    }
}

/// A plain-HTTP body whose data counts toward its host: `up` the
/// request's, else the response's.
fn count_frames(body: Body, counters: &Arc<Counters>, up: bool) -> Body {
    let counters = counters.clone();
    body.map_frame(move |frame| {
        if let Some(data) = frame.data_ref() {
            let total = if up {
                &counters.bytes_up
            } else {
                &counters.bytes_down
            };
            total.fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        frame
    })
    .boxed()
}

enum Scrub {
    Foreign(Foreign),
    Body(BoxError),
}

/// Placeholders in the header values, the URI (query substituted) and a
/// readable body; returns the body to send and the keys substituted.
async fn scrub_request(
    placeholders: &Placeholders<'_>,
    parts: &mut http::request::Parts,
    body: Incoming,
) -> Result<(Body, BTreeSet<String>), Scrub> {
    let mut used = BTreeSet::new();
    if placeholders.is_empty() {
        return Ok((incoming(body), used));
    }
    for value in parts.headers.values_mut() {
        if let Some(replaced) = placeholders
            .apply(value.as_bytes(), &mut used)
            .map_err(Scrub::Foreign)?
        {
            *value = HeaderValue::from_bytes(&replaced).map_err(|e| Scrub::Body(Box::new(e)))?;
        }
    }
    // The path is only checked (a placeholder there is refused when foreign);
    // the query string is substituted.
    placeholders
        .apply(parts.uri.path().as_bytes(), &mut BTreeSet::new())
        .map_err(Scrub::Foreign)?;
    if let Some(query) = parts.uri.query() {
        if let Some(replaced) = placeholders
            .apply(query.as_bytes(), &mut used)
            .map_err(Scrub::Foreign)?
        {
            let replaced = String::from_utf8(replaced).map_err(|e| Scrub::Body(Box::new(e)))?;
            let mut uri = parts.uri.clone().into_parts();
            uri.path_and_query = Some(
                format!("{}?{replaced}", parts.uri.path())
                    .parse()
                    .map_err(|e: http::uri::InvalidUri| Scrub::Body(Box::new(e)))?,
            );
            parts.uri = Uri::from_parts(uri).map_err(|e| Scrub::Body(Box::new(e)))?;
        }
    }
    // Compressed bodies and bodies over the limit go through untouched.
    let encoded = parts
        .headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|e| e.as_bytes() != b"identity");
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if encoded || declared.is_some_and(|n| n > BODY_SCAN_LIMIT as u64) {
        return Ok((incoming(body), used));
    }
    let mut body = body;
    let mut data = Vec::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Scrub::Body(Box::new(e)))?;
        match frame.into_data() {
            Ok(chunk) => {
                data.extend_from_slice(&chunk);
                if data.len() > BODY_SCAN_LIMIT {
                    // Too large to hold: what was read, then the rest, as is.
                    let read = futures_util::stream::once(async move {
                        Ok::<_, BoxError>(Frame::data(Bytes::from(data)))
                    });
                    let rest = BodyStream::new(body.map_err(BoxError::from));
                    use futures_util::StreamExt;
                    return Ok((BodyExt::boxed(StreamBody::new(read.chain(rest))), used));
                }
            }
            Err(frame) => {
                trailers = frame.into_trailers().ok();
                break;
            }
        }
    }
    if let Some(replaced) = placeholders
        .apply(&data, &mut used)
        .map_err(Scrub::Foreign)?
    {
        data = replaced;
        parts.headers.remove(header::TRANSFER_ENCODING);
        if parts.headers.contains_key(header::CONTENT_LENGTH) {
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(data.len()));
        }
    }
    let mut frames = vec![Ok::<_, BoxError>(Frame::data(Bytes::from(data)))];
    if let Some(trailers) = trailers {
        frames.push(Ok(Frame::trailers(trailers)));
    }
    Ok((
        BodyExt::boxed(StreamBody::new(futures_util::stream::iter(frames))),
        used,
    ))
}

fn origin_form(uri: &Uri) -> Uri {
    uri.path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .parse()
        .unwrap_or_else(|_| Uri::from_static("/"))
}

/// Connection-level headers are the proxy's own business on each side.
fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// Upstream connections of one intercepted client connection.
#[derive(Default)]
struct Pool {
    h2: Option<client_h2::SendRequest<Body>>,
    h1: Vec<client_h1::SendRequest<Body>>,
}

enum Sender {
    H1(client_h1::SendRequest<Body>),
    H2(client_h2::SendRequest<Body>),
}

/// One TLS connection from the sandbox to a host a secret is bound to.
struct Intercepted {
    shared: Arc<Shared>,
    host: String,
    port: u16,
    client_h2: bool,
    upstream: tokio::sync::Mutex<Pool>,
    /// The host's counters (its bytes are counted on the connection itself).
    counters: Arc<Counters>,
}

impl Intercepted {
    /// The authority as the upstream should see it.
    fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == 443 {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// Host and `:authority` must both (where present) name the CONNECT host.
    fn names_connect_host(&self, req: &Request<Incoming>) -> bool {
        let matches = |text: &str| match text.parse::<http::uri::Authority>() {
            Ok(a) => {
                normalize_host(a.host()) == self.host && a.port_u16().unwrap_or(443) == self.port
            }
            Err(_) => false,
        };
        let from_uri = req.uri().authority().map(|a| matches(a.as_str()));
        let from_header = req
            .headers()
            .get(header::HOST)
            .map(|h| h.to_str().is_ok_and(matches));
        match (from_uri, from_header) {
            (None, None) => false,
            (a, b) => a.unwrap_or(true) && b.unwrap_or(true),
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let shared = &self.shared;
        let mut entry = Entry {
            kind: "intercept",
            host: self.host.clone(),
            port: self.port,
            method: Some(req.method().to_string()),
            path: Some(req.uri().path().to_string()),
            ..Default::default()
        };
        self.counters.request();
        if !self.names_connect_host(&req) {
            entry.status = 421;
            shared.log(entry);
            self.counters.status(421);
            return refusal(
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "agentkernel: this connection is to {}; a request for another host gets nothing injected and is not forwarded",
                    self.host
                ),
            );
        }
        let placeholders = Placeholders::for_host(&shared.config, &self.host, true);
        let (mut parts, body) = req.into_parts();
        let (body, mut injected) = match scrub_request(&placeholders, &mut parts, body).await {
            Ok(scrubbed) => scrubbed,
            Err(Scrub::Foreign(Foreign(key))) => {
                entry.status = 403;
                shared.log(entry);
                self.counters.status(403);
                return refusal(StatusCode::FORBIDDEN, foreign_placeholder(&key, &self.host));
            }
            Err(Scrub::Body(e)) => {
                return refusal(
                    StatusCode::BAD_REQUEST,
                    format!("agentkernel: request body: {e}"),
                )
            }
        };
        let upgrade = !self.client_h2 && parts.headers.contains_key(header::UPGRADE);
        let upgrade_protocol = parts.headers.get(header::UPGRADE).cloned();
        strip_hop_by_hop(&mut parts.headers);
        for binding in shared
            .config
            .egress
            .bindings
            .iter()
            .filter(|b| b.host == self.host)
        {
            let value = &shared.config.values[&binding.key];
            let (name, value) = header_for(binding, value);
            // Checked in `ProxyConfig::validate` before the proxy started.
            let name = HeaderName::from_bytes(name.as_bytes()).expect("validated header name");
            let value = HeaderValue::from_str(&value).expect("validated header value");
            parts.headers.insert(name, value);
            injected.insert(binding.key.clone());
        }
        entry.injected = injected.into_iter().collect();
        self.counters.injected(&entry.injected);
        if upgrade {
            let client_upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            if let Some(protocol) = upgrade_protocol {
                parts.headers.insert(header::UPGRADE, protocol);
            }
            let result = self.upgrade(parts, body, client_upgrade).await;
            return self.respond(result, entry);
        }
        let result = self.send(parts, body).await;
        self.respond(result, entry)
    }

    fn respond(
        &self,
        result: Result<Response<Incoming>, BoxError>,
        entry: Entry,
    ) -> Response<Body> {
        if result.is_err() {
            self.counters.status(502);
        }
        self.shared
            .respond(result, entry, &self.host, self.port, None)
    }

    async fn sender(&self) -> Result<Sender, BoxError> {
        let mut pool = self.upstream.lock().await;
        if let Some(h2) = pool.h2.as_ref().filter(|s| !s.is_closed()) {
            return Ok(Sender::H2(h2.clone()));
        }
        while let Some(mut h1) = pool.h1.pop() {
            // An HTTP/1.1 client sends one request at a time: wait for the
            // previous response to finish. An h2 client's concurrent
            // requests take a new connection instead.
            if !self.client_h2 && h1.ready().await.is_ok() || h1.is_ready() {
                return Ok(Sender::H1(h1));
            }
        }
        let tls = self
            .shared
            .upstream
            .connect_tls(&self.host, self.port, self.client_h2)
            .await?;
        if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
            let (sender, connection) =
                client_h2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
            tokio::spawn(connection);
            pool.h2 = Some(sender.clone());
            Ok(Sender::H2(sender))
        } else {
            let (sender, connection) = client_h1::handshake(TokioIo::new(tls)).await?;
            tokio::spawn(connection);
            Ok(Sender::H1(sender))
        }
    }

    async fn send(
        &self,
        mut parts: http::request::Parts,
        body: Body,
    ) -> Result<Response<Incoming>, BoxError> {
        match self.sender().await? {
            Sender::H2(mut sender) => {
                parts.headers.remove(header::HOST);
                parts.version = Version::HTTP_2;
                parts.uri =
                    format!("https://{}{}", self.authority(), origin_form(&parts.uri)).parse()?;
                Ok(sender
                    .send_request(Request::from_parts(parts, body))
                    .await?)
            }
            Sender::H1(mut sender) => {
                parts
                    .headers
                    .insert(header::HOST, HeaderValue::from_str(&self.authority())?);
                parts.version = Version::HTTP_11;
                parts.uri = origin_form(&parts.uri);
                let response = sender.send_request(Request::from_parts(parts, body)).await;
                self.upstream.lock().await.h1.push(sender);
                Ok(response?)
            }
        }
    }

    /// A WebSocket (or other HTTP/1.1 upgrade) handshake: the header is
    /// injected into it, then the bytes are tunnelled on a connection of its own.
    async fn upgrade(
        &self,
        mut parts: http::request::Parts,
        body: Body,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Result<Response<Incoming>, BoxError> {
        let tls = self
            .shared
            .upstream
            .connect_tls(&self.host, self.port, false)
            .await?;
        let (mut sender, connection) = client_h1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(connection.with_upgrades());
        parts
            .headers
            .insert(header::HOST, HeaderValue::from_str(&self.authority())?);
        parts.version = Version::HTTP_11;
        parts.uri = origin_form(&parts.uri);
        let mut response = sender
            .send_request(Request::from_parts(parts, body))
            .await?;
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            if let Some(client_upgrade) = client_upgrade {
                let active = self.shared.tally.active();
                tokio::spawn(async move {
                    let _active = active;
                    if let (Ok(client), Ok(upstream)) =
                        (client_upgrade.await, upstream_upgrade.await)
                    {
                        let _ = tokio::io::copy_bidirectional(
                            &mut TokioIo::new(client),
                            &mut TokioIo::new(upstream),
                        )
                        .await;
                    }
                });
            }
        }
        Ok(response)
    }
}
