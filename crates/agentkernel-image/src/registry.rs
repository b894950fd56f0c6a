//! The registry HTTP API v2 client: endpoints (mirrors first for Docker
//! Hub), anonymous bearer-token authentication, and status mapping.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;
use std::time::Duration;

use reqwest::header::{ACCEPT, CONTENT_TYPE, WWW_AUTHENTICATE};
use reqwest::{Response, StatusCode, Url};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::manifest::MANIFEST_ACCEPT;
use crate::reference::{Digest, Reference};

/// Environment variable with comma-separated registry mirrors.
pub const MIRRORS_ENV: &str = "AGENTKERNEL_REGISTRY_MIRRORS";

/// The mirrors listed in `AGENTKERNEL_REGISTRY_MIRRORS` (comma-separated,
/// blanks ignored), unvalidated: pass them to
/// [`PullOptions::mirrors`](crate::PullOptions::mirrors), which checks them.
pub fn mirrors_from_env() -> Vec<String> {
    std::env::var(MIRRORS_ENV)
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Where dockerd keeps its configuration, `registry-mirrors` included.
pub const DOCKERD_CONFIG: &str = "/etc/docker/daemon.json";

/// The mirrors dockerd is configured with (`registry-mirrors` in
/// [`DOCKERD_CONFIG`]): a machine set up to pull through a mirror is set up
/// for agentkernel's own pulls too. Mirrors a pull would refuse (plain HTTP
/// off loopback, which dockerd allows for its "insecure registries") are
/// left out rather than failing every pull.
pub fn mirrors_from_dockerd() -> Vec<String> {
    mirrors_in_dockerd_config(&std::fs::read_to_string(DOCKERD_CONFIG).unwrap_or_default())
}

fn mirrors_in_dockerd_config(text: &str) -> Vec<String> {
    let Ok(config) = serde_json::from_str::<serde_json::Value>(text) else {
        return Vec::new();
    };
    config["registry-mirrors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m.as_str())
        .filter(|m| parse_mirror(m).is_ok())
        .map(str::to_string)
        .collect()
}

/// What a registry's `/v2/` endpoint answered.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The URL asked.
    pub url: String,
    /// The HTTP status, when it answered (200, or 401 asking for a token:
    /// both mean images can be pulled from it).
    pub status: Option<u16>,
    /// How long the answer took.
    pub millis: u64,
    /// Why it did not answer.
    pub error: Option<String>,
}

/// The registry API base URL for a mirror (as a pull would use it), or for
/// Docker Hub when `mirror` is `None`.
pub fn api_base(mirror: Option<&str>) -> Result<String> {
    match mirror {
        Some(m) => parse_mirror(m).map(|e| e.base),
        None => Ok(format!("https://{}", crate::reference::DOCKER_HUB_REGISTRY)),
    }
}

/// GETs `BASE/v2/` within `timeout`: any HTTP answer means reachable.
pub async fn probe(base: &str, timeout: Duration) -> Probe {
    let url = format!("{base}/v2/");
    let started = std::time::Instant::now();
    let answer = match http_client() {
        Ok(client) => client
            .get(&url)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| root_cause(&e)),
        Err(e) => Err(e.to_string()),
    };
    let millis = started.elapsed().as_millis() as u64;
    match answer {
        Ok(response) => Probe {
            url,
            status: Some(response.status().as_u16()),
            millis,
            error: None,
        },
        Err(error) => Probe {
            url,
            status: None,
            millis,
            error: Some(error),
        },
    }
}

/// Whether `host` (as in a URL or reference: `localhost`, `127.0.0.1`,
/// `[::1]`, optionally with `:port`) is a loopback address, the only kind
/// plain HTTP is allowed to.
pub fn is_loopback_host(host: &str) -> bool {
    let host = strip_port(host);
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6.parse::<Ipv6Addr>().is_ok_and(|a| a.is_loopback());
    }
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<Ipv4Addr>().is_ok_and(|a| a.is_loopback())
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |i| &host[..=i]);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// Refuses `http://` to anything but loopback.
fn check_scheme(url: &Url) -> Result<()> {
    let host = url.host_str().unwrap_or("").to_string();
    match url.scheme() {
        "https" => Ok(()),
        "http" if is_loopback_host(&host) => Ok(()),
        "http" => Err(Error::InsecureRegistry { host }),
        other => Err(Error::InvalidMirror {
            url: url.to_string(),
            reason: format!("scheme `{other}` is not http(s)"),
        }),
    }
}

/// Where to send registry API requests.
#[derive(Clone, Debug)]
pub(crate) struct Endpoint {
    /// `scheme://host[:port][/prefix]`, no trailing slash.
    pub base: String,
    /// How errors name it.
    pub label: String,
    pub mirror: bool,
}

/// Validates a mirror URL (`http://127.0.0.1:5000`, `https://mirror.example`).
/// Without a scheme, loopback hosts get `http`, others `https`.
pub(crate) fn parse_mirror(input: &str) -> Result<Endpoint> {
    let invalid = |reason: String| Error::InvalidMirror {
        url: input.to_string(),
        reason,
    };
    let with_scheme = if input.contains("://") {
        input.to_string()
    } else if is_loopback_host(input.split('/').next().unwrap_or("")) {
        format!("http://{input}")
    } else {
        format!("https://{input}")
    };
    let url = Url::parse(&with_scheme).map_err(|e| invalid(e.to_string()))?;
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("it has no host".into()));
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(invalid(
            "it must be scheme://host[:port][/path] (no query, fragment or credentials)".into(),
        ));
    }
    check_scheme(&url)?;
    let base = url.as_str().trim_end_matches('/').to_string();
    Ok(Endpoint {
        label: base.clone(),
        base,
        mirror: true,
    })
}

/// Mirrors first (for Docker Hub images only, as dockerd's
/// `registry-mirrors`), then the image's own registry.
pub(crate) fn endpoints(reference: &Reference, mirrors: &[String]) -> Result<Vec<Endpoint>> {
    let mut out = Vec::new();
    if reference.is_docker_hub() {
        for m in mirrors {
            out.push(parse_mirror(m)?);
        }
    }
    let host = reference.registry_host();
    // Loopback registries are plain HTTP, as the usual test and cache
    // registries are; everything else must be HTTPS.
    let scheme = if is_loopback_host(host) {
        "http"
    } else {
        "https"
    };
    out.push(Endpoint {
        base: format!("{scheme}://{host}"),
        label: host.to_string(),
        mirror: false,
    });
    Ok(out)
}

/// Builds the HTTP client: rustls, timeouts for stalled connections, and
/// redirects (blob downloads go to CDNs) that may not downgrade to plain
/// HTTP off loopback.
pub(crate) fn http_client() -> Result<reqwest::Client> {
    let policy = reqwest::redirect::Policy::custom(|attempt| {
        if attempt.previous().len() >= 10 {
            return attempt.error("more than 10 redirects");
        }
        let url = attempt.url();
        if url.scheme() != "https"
            && !(url.scheme() == "http" && is_loopback_host(url.host_str().unwrap_or("")))
        {
            let msg =
                format!("refusing redirect to {url}: only https, or http to loopback, is allowed");
            return attempt.error(msg);
        }
        attempt.follow()
    });
    reqwest::Client::builder()
        .user_agent(concat!("agentkernel/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(30))
        // Per read, not per request: a layer may take minutes, a stall may not.
        .read_timeout(Duration::from_secs(120))
        .redirect(policy)
        .build()
        .map_err(|e| Error::Connect {
            registry: "(client setup)".into(),
            detail: error_chain(&e),
        })
}

/// `reqwest`'s Display stops at the outermost error; the cause (refused,
/// DNS, certificate) is further down the chain.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// The innermost error of a chain (`failed to lookup address information:
/// Name or service not known`, `Connection refused`): what a short report
/// needs.
pub(crate) fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    if e.is_timeout_like() {
        return "timed out".into();
    }
    cause.to_string()
}

trait TimeoutLike {
    fn is_timeout_like(&self) -> bool;
}

impl TimeoutLike for dyn std::error::Error + 'static {
    fn is_timeout_like(&self) -> bool {
        self.downcast_ref::<reqwest::Error>()
            .is_some_and(reqwest::Error::is_timeout)
    }
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Challenge {
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    Basic {
        realm: String,
    },
    Other(String),
}

/// Parses `Bearer realm="…",service="…",scope="…"` (RFC 7235 auth-params,
/// quoted strings may contain commas and `\"`).
pub(crate) fn parse_challenge(header: &str) -> Challenge {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let mut params: Vec<(String, String)> = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String =
            std::iter::from_fn(|| chars.next_if(|c| *c != '=' && *c != ',')).collect();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.next_if_eq(&'=').is_some() {
            if chars.next_if_eq(&'"').is_some() {
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => value.extend(chars.next()),
                        '"' => break,
                        c => value.push(c),
                    }
                }
            } else {
                value = std::iter::from_fn(|| chars.next_if(|c| *c != ','))
                    .collect::<String>()
                    .trim()
                    .to_string();
            }
        }
        params.push((key.trim().to_ascii_lowercase(), value));
    }
    let get = |k: &str| {
        params
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    match scheme.to_ascii_lowercase().as_str() {
        "bearer" => Challenge::Bearer {
            realm: get("realm").unwrap_or_default(),
            service: get("service"),
            scope: get("scope"),
        },
        "basic" => Challenge::Basic {
            realm: get("realm").unwrap_or_default(),
        },
        _ => Challenge::Other(header.to_string()),
    }
}

/// One image's conversation with one endpoint. The token is shared by the
/// concurrent layer downloads and refreshed when a request is challenged.
pub(crate) struct Session<'a> {
    http: &'a reqwest::Client,
    pub endpoint: Endpoint,
    repository: String,
    reference: String,
    token: Mutex<Option<String>>,
}

impl<'a> Session<'a> {
    pub fn new(
        http: &'a reqwest::Client,
        endpoint: Endpoint,
        reference: &Reference,
    ) -> Session<'a> {
        Session {
            http,
            endpoint,
            repository: reference.repository().to_string(),
            reference: reference.to_string(),
            token: Mutex::new(None),
        }
    }

    fn connect_error(&self, e: &reqwest::Error) -> Error {
        Error::Connect {
            registry: self.endpoint.label.clone(),
            detail: root_cause(e),
        }
    }

    /// GET with the anonymous token dance: on a Bearer challenge fetch a
    /// token from the realm and retry once.
    async fn get(&self, url: &str, accept: Option<&str>) -> Result<Response> {
        for attempt in 0..2 {
            let token = self.token.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let mut req = self.http.get(url);
            if let Some(accept) = accept {
                req = req.header(ACCEPT, accept);
            }
            if let Some(token) = &token {
                req = req.bearer_auth(token);
            }
            let resp = req.send().await.map_err(|e| self.connect_error(&e))?;
            if resp.status() != StatusCode::UNAUTHORIZED || attempt == 1 {
                return Ok(resp);
            }
            let challenge = resp
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .map(parse_challenge);
            match challenge {
                Some(Challenge::Bearer {
                    realm,
                    service,
                    scope,
                }) => {
                    let token = self
                        .fetch_token(&realm, service.as_deref(), scope.as_deref())
                        .await?;
                    *self.token.lock().unwrap_or_else(|e| e.into_inner()) = Some(token);
                }
                Some(Challenge::Basic { realm }) => {
                    return Err(Error::BasicAuthRequired {
                        registry: self.endpoint.label.clone(),
                        realm,
                    });
                }
                _ => return Ok(resp),
            }
        }
        unreachable!("the second attempt always returns")
    }

    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: Option<&str>,
    ) -> Result<String> {
        let token_error = |detail: String| Error::Token {
            registry: self.endpoint.label.clone(),
            realm: realm.to_string(),
            detail,
        };
        let mut url = Url::parse(realm).map_err(|e| token_error(format!("invalid realm: {e}")))?;
        check_scheme(&url)?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(service) = service {
                q.append_pair("service", service);
            }
            let default_scope = format!("repository:{}:pull", self.repository);
            for s in scope
                .unwrap_or(&default_scope)
                .split(' ')
                .filter(|s| !s.is_empty())
            {
                q.append_pair("scope", s);
            }
        }
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| token_error(error_chain(&e)))?;
        let status = resp.status();
        let body = read_limited(resp, 1 << 20)
            .await
            .map_err(|e| token_error(error_chain(&e)))?;
        if !status.is_success() {
            return Err(token_error(format!(
                "HTTP {}{}",
                status.as_u16(),
                registry_message(&body)
            )));
        }
        #[derive(Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
        }
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| token_error(format!("invalid JSON from token endpoint: {e}")))?;
        parsed
            .token
            .or(parsed.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| token_error("the response has no token".into()))
    }

    /// Maps unsuccessful statuses to errors; `blob` says which 404 it is.
    async fn check(&self, resp: Response, url: &str, blob: Option<&Digest>) -> Result<Response> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = read_limited(resp, 64 << 10).await.unwrap_or_default();
        let detail = registry_message(&body);
        Err(match (status, blob) {
            (StatusCode::NOT_FOUND, None) => Error::NotFound {
                reference: self.reference.clone(),
                registry: self.endpoint.label.clone(),
            },
            (StatusCode::NOT_FOUND, Some(d)) => Error::BlobNotFound {
                reference: self.reference.clone(),
                digest: d.to_string(),
                registry: self.endpoint.label.clone(),
            },
            (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN, _) => Error::Unauthorized {
                reference: self.reference.clone(),
                registry: self.endpoint.label.clone(),
                status: status.as_u16(),
                detail,
            },
            _ => Error::Http {
                registry: self.endpoint.label.clone(),
                url: url.to_string(),
                status: status.as_u16(),
                detail,
            },
        })
    }

    /// Fetches a manifest or index by tag or digest. Returns the body and
    /// its Content-Type. The digest is checked by the caller.
    pub async fn manifest(&self, target: &str) -> Result<(Vec<u8>, String)> {
        let url = format!(
            "{}/v2/{}/manifests/{}",
            self.endpoint.base, self.repository, target
        );
        let resp = self.get(&url, Some(MANIFEST_ACCEPT)).await?;
        let resp = self.check(resp, &url, None).await?;
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let limit = crate::manifest::MAX_MANIFEST_SIZE;
        let body = read_limited(resp, limit)
            .await
            .map_err(|e| self.connect_error(&e))?;
        if body.len() as u64 > limit {
            return Err(Error::InvalidImage {
                reference: self.reference.clone(),
                detail: format!("its manifest is larger than {} MiB", limit >> 20),
            });
        }
        Ok((body, content_type))
    }

    /// Starts a blob download; the caller streams and verifies the body.
    pub async fn blob(&self, digest: &Digest) -> Result<Response> {
        let url = format!(
            "{}/v2/{}/blobs/{}",
            self.endpoint.base, self.repository, digest
        );
        let resp = self.get(&url, None).await?;
        self.check(resp, &url, Some(digest)).await
    }

    pub fn stream_error(&self, e: &reqwest::Error) -> Error {
        self.connect_error(e)
    }
}

/// Reads a body up to `limit` bytes (one more, so the caller can tell it
/// was cut).
async fn read_limited(mut resp: Response, limit: u64) -> Result<Vec<u8>, reqwest::Error> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        out.extend_from_slice(&chunk);
        if out.len() as u64 > limit {
            break;
        }
    }
    Ok(out)
}

/// `: CODE: message` from a registry's `{"errors":[…]}` body, else empty.
fn registry_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Errors {
        errors: Vec<ErrorItem>,
    }
    #[derive(Deserialize)]
    struct ErrorItem {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    match serde_json::from_slice::<Errors>(body) {
        Ok(e) if !e.errors.is_empty() => {
            let parts: Vec<String> = e
                .errors
                .iter()
                .map(|i| match (i.code.is_empty(), i.message.is_empty()) {
                    (false, false) => format!("{}: {}", i.code, i.message),
                    (false, true) => i.code.clone(),
                    _ => i.message.clone(),
                })
                .collect();
            let mut s = format!(": {}", parts.join("; "));
            s.truncate(300);
            s
        }
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for h in [
            "localhost",
            "localhost:5000",
            "127.0.0.1",
            "127.1.2.3:80",
            "[::1]",
            "[::1]:5000",
            "LOCALHOST",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in [
            "example.com",
            "10.0.0.1:5000",
            "[::2]:5000",
            "localhost.example.com",
            "128.0.0.1",
            "0.0.0.0",
        ] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }

    #[test]
    fn dockerds_mirrors_are_read_and_unusable_ones_left_out() {
        let config = r#"{"registry-mirrors": ["https://mirror.gcr.io", "http://10.0.0.5:5000", "http://127.0.0.1:5000"], "debug": true}"#;
        assert_eq!(
            mirrors_in_dockerd_config(config),
            ["https://mirror.gcr.io", "http://127.0.0.1:5000"]
        );
        assert!(mirrors_in_dockerd_config("{}").is_empty());
        assert!(mirrors_in_dockerd_config("not json").is_empty());
    }

    #[test]
    fn mirrors_are_validated() {
        let e = parse_mirror("http://127.0.0.1:5000/").unwrap();
        assert_eq!(e.base, "http://127.0.0.1:5000");
        assert_eq!(
            parse_mirror("localhost:5000").unwrap().base,
            "http://localhost:5000"
        );
        assert_eq!(
            parse_mirror("mirror.gcr.io").unwrap().base,
            "https://mirror.gcr.io"
        );
        assert_eq!(
            parse_mirror("https://m.example/prefix/").unwrap().base,
            "https://m.example/prefix"
        );
        assert_eq!(
            parse_mirror("http://[::1]:5000").unwrap().base,
            "http://[::1]:5000"
        );
        let err = parse_mirror("http://mirror.example.com:5000")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("mirror.example.com") && err.contains("plain HTTP"),
            "{err}"
        );
        assert!(parse_mirror("ftp://x").is_err());
        assert!(parse_mirror("http://").is_err());
        assert!(parse_mirror("https://user:pw@x").is_err());
    }

    #[test]
    fn endpoints_put_mirrors_first_for_docker_hub_only() {
        let mirrors = vec!["http://127.0.0.1:5000".to_string()];
        let hub = Reference::parse("alpine:3.20").unwrap();
        let eps = endpoints(&hub, &mirrors).unwrap();
        assert_eq!(eps.len(), 2);
        assert!(eps[0].mirror && eps[0].base == "http://127.0.0.1:5000");
        assert_eq!(eps[1].base, "https://registry-1.docker.io");

        let other = Reference::parse("ghcr.io/a/b").unwrap();
        let eps = endpoints(&other, &mirrors).unwrap();
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].base, "https://ghcr.io");

        let local = Reference::parse("localhost:5000/a/b").unwrap();
        assert_eq!(
            endpoints(&local, &[]).unwrap()[0].base,
            "http://localhost:5000"
        );

        let bad = vec!["http://10.0.0.1:5000".to_string()];
        let err = endpoints(&hub, &bad).unwrap_err().to_string();
        assert!(err.contains("10.0.0.1"), "{err}");
    }

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#
            ),
            Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull".into()),
            }
        );
        // Commas inside quotes, spaces after commas, escapes, unquoted values.
        assert_eq!(
            parse_challenge(
                r#"bearer realm="http://127.0.0.1:1/t", scope="repository:a:pull,push",service=x\"y"#
            ),
            Challenge::Bearer {
                realm: "http://127.0.0.1:1/t".into(),
                service: Some(r#"x\"y"#.into()),
                scope: Some("repository:a:pull,push".into()),
            }
        );
        assert_eq!(
            parse_challenge(r#"Bearer realm="a\"b""#),
            Challenge::Bearer {
                realm: "a\"b".into(),
                service: None,
                scope: None
            }
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Challenge::Basic {
                realm: "Registry Realm".into()
            }
        );
        assert!(matches!(parse_challenge("Negotiate"), Challenge::Other(_)));
    }

    #[test]
    fn registry_messages() {
        let body =
            br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{}}]}"#;
        assert_eq!(
            registry_message(body),
            ": MANIFEST_UNKNOWN: manifest unknown"
        );
        assert_eq!(registry_message(b"not json"), "");
    }
}
