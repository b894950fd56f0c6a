//! agentkernel's host-side egress proxy.
//!
//! A sandbox with secrets or an allow-list reaches the outside only through
//! this proxy (HTTP CONNECT, or absolute-form plain HTTP). Per host it either
//! refuses (allow-list), tunnels uninspected, or — for hosts a secret is
//! bound to — terminates TLS with a leaf of the per-sandbox CA, verifies the
//! upstream itself, and adds the secret to requests whose Host/`:authority`
//! is the CONNECT host. Secret values exist only in this process.

mod ca;
mod log;
mod placeholders;
mod serve;
pub mod summary;
mod upstream;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use agentkernel_core::egress::{EgressSpec, HostPattern, SecretBinding, SecretValues};
use serde::{Deserialize, Serialize};

pub use ca::CertificateAuthority;
pub use serve::Proxy;

/// Request bodies up to this size are read for placeholders; larger ones are
/// streamed untouched (and never substituted).
pub const BODY_SCAN_LIMIT: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("egress proxy CA: {0}")]
    Ca(String),
    #[error("egress proxy configuration: {0}")]
    Config(String),
    #[error("egress proxy: {0}")]
    Io(String),
}

/// What the proxy process receives from the run that starts it (through a
/// pipe, never argv or the environment): the egress plan and the values.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct ProxyConfig {
    pub egress: EgressSpec,
    pub values: BTreeMap<String, String>,
    pub placeholders: BTreeMap<String, String>,
    /// Where to answer report requests (a kept sandbox's, for the receipts
    /// of its commands); see `summary`.
    #[serde(default)]
    pub report_socket: Option<std::path::PathBuf>,
    /// Whether the run reads a final report at the proxy's end (one-shot
    /// with `--receipt`), on the descriptor the starter passes for it.
    #[serde(default)]
    pub final_report: bool,
}

impl ProxyConfig {
    pub fn new(egress: &EgressSpec, secrets: &SecretValues) -> Self {
        ProxyConfig {
            egress: egress.clone(),
            values: secrets.values.clone(),
            placeholders: secrets.placeholders.clone(),
            report_socket: None,
            final_report: false,
        }
    }

    /// Everything that could fail per request, checked once before the
    /// proxy accepts a connection: a bad configuration never starts.
    pub fn validate(&self) -> Result<(), Error> {
        for binding in &self.egress.bindings {
            let value = self.values.get(&binding.key).ok_or_else(|| {
                Error::Config(format!(
                    "no value for secret {} (bound to {})",
                    binding.key, binding.host
                ))
            })?;
            let (name, value) = header_for(binding, value);
            http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                Error::Config(format!(
                    "{name:?} (secret {}) is not a valid header name",
                    binding.key
                ))
            })?;
            http::HeaderValue::from_str(&value).map_err(|_| {
                Error::Config(format!(
                    "the value of secret {} cannot be sent in a header (control characters or non-ASCII)",
                    binding.key
                ))
            })?;
        }
        for (host, address) in &self.egress.resolve {
            address.parse::<SocketAddr>().map_err(|_| {
                Error::Config(format!(
                    "proxy.resolve: {host} = {address:?} is not ADDRESS:PORT (e.g. \"127.0.0.1:8443\")"
                ))
            })?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyConfig")
            .field("egress", &self.egress)
            .field("keys", &self.values.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// The header a binding sends: `Authorization: Bearer <value>` by default.
pub(crate) fn header_for(binding: &SecretBinding, value: &str) -> (String, String) {
    match &binding.header {
        Some(name) => (name.to_ascii_lowercase(), value.to_string()),
        None => ("authorization".to_string(), format!("Bearer {value}")),
    }
}

pub(crate) fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Lower case, no trailing dot, no IPv6 brackets: the form hosts are compared in.
pub fn normalize_host(host: &str) -> String {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

/// `api.example.com`, `*.example.com` (sub-domains, not the apex), with or
/// without a port.
pub fn pattern_matches(pattern: &HostPattern, host: &str, port: u16) -> bool {
    if pattern.port.is_some_and(|p| p != port) {
        return false;
    }
    let wanted = normalize_host(&pattern.host);
    match wanted.strip_prefix("*.") {
        Some(domain) => host
            .strip_suffix(domain)
            .is_some_and(|prefix| prefix.len() > 1 && prefix.ends_with('.')),
        None => host == wanted,
    }
}

/// Parses one allow-list entry (`--allow-host`, `[network] allow`).
pub fn parse_host_pattern(text: &str) -> Result<HostPattern, String> {
    let fail = |why: &str| {
        Err(format!(
            "{why} (expected HOST, *.DOMAIN or either with :PORT)"
        ))
    };
    let (host, port) = match text.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') || host.ends_with(']') => {
            match port.parse::<u16>() {
                Ok(p) if p > 0 => (host, Some(p)),
                _ => return fail("bad port"),
            }
        }
        _ => (text, None),
    };
    let host = normalize_host(host);
    let name = host.strip_prefix("*.").unwrap_or(&host);
    let valid_name = !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if !valid_name && name.parse::<std::net::IpAddr>().is_err() {
        return fail("not a host name");
    }
    Ok(HostPattern { host, port })
}

/// What the proxy does with a connection to `host:port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The allow-list does not name it: 403.
    Deny,
    /// A secret is bound to it: TLS terminated here, upstream verified here.
    Intercept,
    /// Bytes through, uninspected.
    Tunnel,
}

pub fn route(egress: &EgressSpec, host: &str, port: u16) -> Route {
    if egress.bindings.iter().any(|b| b.host == host) {
        Route::Intercept
    } else if egress.allow_hosts.is_empty()
        || egress
            .allow_hosts
            .iter()
            .any(|p| pattern_matches(p, host, port))
    {
        Route::Tunnel
    } else {
        Route::Deny
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(text: &str) -> HostPattern {
        parse_host_pattern(text).unwrap()
    }

    #[test]
    fn wildcards_match_subdomains_only() {
        let p = pattern("*.Example.com");
        assert!(pattern_matches(&p, "api.example.com", 443));
        assert!(pattern_matches(&p, "a.b.example.com", 80));
        assert!(!pattern_matches(&p, "example.com", 443));
        assert!(!pattern_matches(&p, "evilexample.com", 443));
        let p = pattern("api.example.com:8443");
        assert!(pattern_matches(&p, "api.example.com", 8443));
        assert!(!pattern_matches(&p, "api.example.com", 443));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in ["", "a b", "host:0", "host:x", "*.", "exa$mple.com"] {
            assert!(parse_host_pattern(bad).is_err(), "{bad}");
        }
        assert_eq!(pattern("[::1]:8080").host, "::1");
    }

    #[test]
    fn bound_hosts_are_allowed_and_intercepted() {
        let egress = EgressSpec {
            bindings: vec![SecretBinding {
                key: "K".into(),
                host: "api.example.com".into(),
                header: None,
            }],
            allow_hosts: vec![pattern("pypi.org")],
            ..Default::default()
        };
        assert_eq!(route(&egress, "api.example.com", 443), Route::Intercept);
        assert_eq!(route(&egress, "pypi.org", 443), Route::Tunnel);
        assert_eq!(route(&egress, "evil.com", 443), Route::Deny);
        let open = EgressSpec::default();
        assert_eq!(route(&open, "evil.com", 443), Route::Tunnel);
    }
}
