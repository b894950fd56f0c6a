//! The egress plan of a sandbox: which secrets the host-side proxy adds to
//! which hosts' requests, and which hosts the sandbox may reach at all.
//!
//! Two halves meet here. Resolution (flags, config, vault) produces an
//! [`EgressSpec`] — names and hosts only, safe to print with `--dry-run` and
//! to store in records — and a [`SecretValues`] that holds the values and
//! never leaves the host process that starts the proxy. The proxy consumes
//! both. `SandboxSpec::egress` is `None` when no secret and no allow-list was
//! given: then nothing is started and a plain run pays nothing.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `-S KEY:HOST[:HEADER]` / `[secrets] KEY = ...`: the value of `key` is sent
/// to `host` — as `Authorization: Bearer <value>` when `header` is `None`,
/// else as `<header>: <value>` with no prefix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretBinding {
    pub key: String,
    /// Lower-case host name, without port (injection is on TLS to port 443
    /// or the port the CONNECT names).
    pub host: String,
    pub header: Option<String>,
}

/// One entry of the egress allow-list: `api.example.com`, `*.example.com`
/// (any sub-domain, not the apex), optionally with `:port` (any port when
/// absent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPattern {
    pub host: String,
    pub port: Option<u16>,
}

/// Everything about a sandbox's egress except secret values.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressSpec {
    pub bindings: Vec<SecretBinding>,
    /// Empty: no allow-list (any host, unbound hosts tunnelled uninspected).
    /// Non-empty: only these hosts (plus every binding's host), through the
    /// proxy only; no direct route and no DNS out.
    pub allow_hosts: Vec<HostPattern>,
    /// `--secret-file KEY`: the value (or placeholder) appears at
    /// `/run/agentkernel/secrets/KEY` on a tmpfs inside the sandbox.
    pub secret_files: Vec<String>,
    /// `--placeholder-secrets`: files and env vars hold placeholders, which
    /// the proxy swaps for values only in requests to the key's bound hosts.
    pub placeholders: bool,
    /// `--egress-log FILE`: one JSON line per connection/request.
    pub log: Option<PathBuf>,
    /// `[proxy] ca_file`: extra roots the proxy trusts upstream.
    pub upstream_ca_file: Option<PathBuf>,
    /// `[proxy] resolve`: host → `ADDR:PORT`, like curl's `--resolve`.
    pub resolve: BTreeMap<String, String>,
}

impl EgressSpec {
    /// Whether a proxy must run: a binding, an allow-list or a log
    /// (`--secret-file` alone needs none).
    pub fn needs_proxy(&self) -> bool {
        !self.bindings.is_empty() || !self.allow_hosts.is_empty() || self.log.is_some()
    }
}

/// Secret values by key, plus each key's per-run placeholder. Deliberately not
/// `Serialize` and redacted in `Debug`: values reach only the proxy (through
/// a pipe, never argv or the environment) and `--secret-file`'s tmpfs.
#[derive(Default)]
pub struct SecretValues {
    pub values: BTreeMap<String, String>,
    /// `AGENTKERNEL_PLACEHOLDER_` + 32 random hex, new per run: every bound
    /// key's (its environment variable in the sandbox holds it), and with
    /// `--placeholder-secrets` every `--secret-file` key's too (each such key
    /// is bound to a host: resolution refuses one that is not).
    pub placeholders: BTreeMap<String, String>,
}

impl std::fmt::Debug for SecretValues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretValues")
            .field("keys", &self.values.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}
