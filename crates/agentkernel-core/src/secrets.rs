//! Secret bindings (`-S`, `[secrets]`), `--secret-file` and
//! `--placeholder-secrets` resolved into the names-only [`EgressSpec`] half
//! and the [`SecretValues`] half of [`crate::egress`].
//!
//! Values come from the binding itself (`KEY=VALUE:HOST`, never stored), else
//! the vault, else agentkernel's own environment. A key found nowhere is an
//! error: a run never goes on without a secret it was told to use.

use std::collections::BTreeMap;

use crate::egress::{EgressSpec, SecretBinding, SecretValues};
use crate::vault::{validate_key_name, Vault};
use crate::{Error, Result};

/// Prefix of a per-run placeholder; 32 random hex digits follow.
pub const PLACEHOLDER_PREFIX: &str = "AGENTKERNEL_PLACEHOLDER_";
/// Where `--secret-file KEY` appears inside the sandbox, on a tmpfs.
pub const SECRETS_DIR: &str = "/run/agentkernel/secrets";
/// Set in the sandbox when it has secret files: their directory.
pub const SECRETS_PATH_ENV: &str = "AGENTKERNEL_SECRETS_PATH";

const FLAG_FORMS: &str = "expected KEY:HOST, KEY:HOST:HEADER or KEY=VALUE:HOST";

/// One `--secret-file` on its way to the sandbox: its name and what the
/// file holds (the value, or a placeholder). Travels only in memory (a
/// native plan's memfd, a VM's request over its port); a kept sandbox's
/// stored description never has it. Redacted in `Debug`.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct SecretFile {
    pub name: String,
    pub content: String,
}

impl SecretFile {
    /// The files of [`file_contents`]' (name, content) pairs.
    pub fn all(pairs: &[(String, String)]) -> Vec<SecretFile> {
        pairs
            .iter()
            .map(|(name, content)| SecretFile {
                name: name.clone(),
                content: content.clone(),
            })
            .collect()
    }
}

impl std::fmt::Debug for SecretFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretFile")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// One `-S` flag: the binding, plus its inline value for `KEY=VALUE:HOST`.
pub struct FlagBinding {
    pub binding: SecretBinding,
    pub inline_value: Option<String>,
}

/// `KEY:HOST` (Authorization: Bearer), `KEY:HOST:HEADER` (that header, no
/// prefix), or `KEY=VALUE:HOST` (split at the last colon, so the value may
/// hold colons; the host may not).
pub fn parse_flag(text: &str) -> Result<FlagBinding> {
    let bad = |why: &str| {
        Error::invalid(
            "--secret",
            redact_inline(text),
            format!("{why}; {FLAG_FORMS}"),
        )
    };
    let inline = text.split_once('=').filter(|(key, _)| !key.contains(':'));
    let (key, host, header, inline_value) = match inline {
        Some((key, rest)) => {
            let (value, host) = rest
                .rsplit_once(':')
                .ok_or_else(|| bad("KEY=VALUE needs :HOST"))?;
            if value.is_empty() {
                return Err(bad("the value is empty"));
            }
            (key, host, None, Some(value.to_string()))
        }
        None => {
            let mut parts = text.split(':');
            let key = parts.next().unwrap_or_default();
            let host = parts.next().ok_or_else(|| bad("no HOST"))?;
            let header = parts.next();
            if parts.next().is_some() {
                return Err(bad("too many colons (a host takes no port here)"));
            }
            (key, host, header, None)
        }
    };
    validate_key_name("--secret", key)
        .map_err(|_| bad("KEY must be letters, digits and _, not starting with a digit"))?;
    let host = normalize_host(host).map_err(|why| bad(&why))?;
    let header = header
        .map(|h| validate_header(h).map(|()| h.to_string()))
        .transpose()
        .map_err(|why| bad(&why))?;
    Ok(FlagBinding {
        binding: SecretBinding {
            key: key.to_string(),
            host,
            header,
        },
        inline_value,
    })
}

/// An error message never repeats an inline value.
fn redact_inline(text: &str) -> String {
    match text.split_once('=') {
        Some((key, rest)) if !key.contains(':') => match rest.rsplit_once(':') {
            Some((_, host)) => format!("{key}=…:{host}"),
            None => format!("{key}=…"),
        },
        _ => text.to_string(),
    }
}

/// A DNS name or IPv4 address, lower-cased. No wildcard (a secret goes to
/// named hosts only), no port, no scheme or path.
pub fn normalize_host(host: &str) -> std::result::Result<String, String> {
    let host = host.to_ascii_lowercase();
    let labels_ok = host
        .split('.')
        .all(|l| !l.is_empty() && !l.starts_with('-') && !l.ends_with('-'));
    let chars_ok = host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if host.is_empty() || host.len() > 253 || !labels_ok || !chars_ok {
        return Err(format!(
            "`{host}` is not a host name (no scheme, port, path or wildcard)"
        ));
    }
    Ok(host)
}

/// An HTTP field name (RFC 9110 token) that may carry a credential: not one
/// that frames the message or routes it.
fn validate_header(name: &str) -> std::result::Result<(), String> {
    let token = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c));
    if !token {
        return Err(format!("`{name}` is not an HTTP header name"));
    }
    let framing = [
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "upgrade",
        "te",
        "trailer",
        "keep-alive",
        "proxy-connection",
    ];
    if framing.contains(&name.to_ascii_lowercase().as_str()) {
        return Err(format!(
            "`{name}` frames or routes the request and cannot carry a secret"
        ));
    }
    Ok(())
}

/// `[secrets]`: `KEY = "host"`, or `KEY = { hosts = ["a", "b"], header =
/// "x-api-key" }` (thrashr888/agentkernel's template syntax). Errors are
/// `secrets.KEY: why`, for the config error that names the file.
pub fn parse_config(table: &toml::Table) -> std::result::Result<Vec<SecretBinding>, String> {
    let mut bindings = Vec::new();
    for (key, value) in table {
        let at = |why: String| format!("secrets.{key}: {why}");
        validate_key_name("secret name", key).map_err(|e| at(e.to_string()))?;
        let (hosts, header) = match value {
            toml::Value::String(host) => (vec![host.clone()], None),
            toml::Value::Table(t) => {
                if let Some(unknown) = t.keys().find(|k| *k != "hosts" && *k != "header") {
                    return Err(at(format!(
                        "unknown key `{unknown}` (expected hosts, header)"
                    )));
                }
                let hosts = match t.get("hosts") {
                    Some(toml::Value::Array(a)) if !a.is_empty() => a
                        .iter()
                        .map(|h| h.as_str().map(str::to_string))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| at("hosts must be strings".into()))?,
                    _ => return Err(at("hosts must be a non-empty array of host names".into())),
                };
                let header = match t.get("header") {
                    None => None,
                    Some(toml::Value::String(h)) => {
                        validate_header(h).map_err(at)?;
                        Some(h.clone())
                    }
                    Some(_) => return Err(at("header must be a string".into())),
                };
                (hosts, header)
            }
            _ => {
                return Err(at(
                    "expected \"host\" or { hosts = [\"host\"], header = \"x-api-key\" }".into(),
                ))
            }
        };
        for host in hosts {
            bindings.push(SecretBinding {
                key: key.clone(),
                host: normalize_host(&host).map_err(at)?,
                header: header.clone(),
            });
        }
    }
    Ok(bindings)
}

/// What `run` asked for, before any value is looked up.
pub struct Request<'a> {
    /// `-S` flags as given.
    pub flags: &'a [String],
    /// `[secrets]` from the config files.
    pub config: &'a [SecretBinding],
    /// `--secret-file` keys.
    pub files: &'a [String],
    pub placeholders: bool,
    /// Whether the sandbox has a network: bindings need one.
    pub network: bool,
}

/// Resolves `request`: `None` when it asks for nothing. Otherwise the
/// egress plan (names only), the values, and the sandbox's environment
/// with every bound key's variable holding its placeholder (and
/// `AGENTKERNEL_SECRETS_PATH` when there are files). `env` naming a bound
/// or file key is refused: it would put the value in the sandbox.
pub fn resolve(
    request: &Request,
    vault: &Vault,
    env: &mut Vec<(String, String)>,
) -> Result<Option<(EgressSpec, SecretValues)>> {
    let flags = request
        .flags
        .iter()
        .map(|f| parse_flag(f))
        .collect::<Result<Vec<_>>>()?;
    for file in request.files {
        validate_key_name("--secret-file", file)?;
    }
    if !flags.is_empty() && !request.network {
        return Err(Error::Conflict(
            "--secret needs a network (the proxy adds the secret to requests), but the sandbox has none; drop --no-network or use --profile moderate".into(),
        ));
    }
    // Config bindings follow the network: a sandbox without one sends nothing.
    let config: &[SecretBinding] = if request.network { request.config } else { &[] };
    if flags.is_empty() && config.is_empty() && request.files.is_empty() {
        if request.placeholders {
            return Err(Error::Conflict(
                "--placeholder-secrets needs a secret: add -S KEY:HOST or --secret-file KEY".into(),
            ));
        }
        return Ok(None);
    }

    let bindings = merge_bindings(config, &flags)?;
    let mut inline: BTreeMap<&str, &str> = BTreeMap::new();
    for f in &flags {
        if let Some(value) = &f.inline_value {
            let key = f.binding.key.as_str();
            if inline.insert(key, value).is_some_and(|old| old != value) {
                return Err(Error::Conflict(format!(
                    "--secret gives {key} two different inline values; give it one"
                )));
            }
        }
    }

    let bound: Vec<&str> = dedup(bindings.iter().map(|b| b.key.as_str()));
    let mut keys = bound.clone();
    keys.extend(request.files.iter().map(String::as_str));
    let keys = dedup(keys.into_iter());
    if request.placeholders {
        if let Some(unbound) = request.files.iter().find(|f| !bound.contains(&f.as_str())) {
            return Err(Error::Conflict(format!(
                "--placeholder-secrets: {unbound} is bound to no host, so no request could ever swap its placeholder back (substituting it for any host would hand the secret to whoever the code chooses); bind it with -S {unbound}:HOST or [secrets] {unbound} = \"host\""
            )));
        }
    }
    for (name, _) in env.iter() {
        if keys.contains(&name.as_str()) || name == SECRETS_PATH_ENV {
            return Err(Error::Conflict(format!(
                "the environment variable {name} is also a secret (or its directory); agentkernel sets it in the sandbox, so drop it from -e / [sandbox] env"
            )));
        }
    }

    let mut values = SecretValues::default();
    let mut stored: Option<BTreeMap<String, crate::vault::Entry>> = None;
    for key in &keys {
        let value = match inline.get(key) {
            Some(v) => v.to_string(),
            None => {
                if stored.is_none() {
                    stored = Some(vault.entries()?);
                }
                match stored.as_ref().and_then(|s| s.get(*key)) {
                    Some(entry) => entry.value.clone(),
                    None => std::env::var(key).ok().filter(|v| !v.is_empty()).ok_or_else(|| {
                        Error::Conflict(format!(
                            "secret {key} is not set: it is in neither the vault ({}) nor agentkernel's environment; set it with `agentkernel secret set {key}`",
                            vault.file().display()
                        ))
                    })?,
                }
            }
        };
        values.values.insert(key.to_string(), value);
    }
    // A bound value goes into an HTTP header: refuse now what the proxy
    // could never send (a newline would also split the request).
    for key in &bound {
        let sendable = values.values[*key]
            .bytes()
            .all(|b| b == b'\t' || (0x20..0x7f).contains(&b));
        if !sendable {
            return Err(Error::Conflict(format!(
                "secret {key} cannot be sent in an HTTP header: its value has a control or non-ASCII character (a trailing newline?); set it again with `agentkernel secret set {key}`"
            )));
        }
    }
    for key in &keys {
        if bound.contains(key) || request.placeholders {
            values.placeholders.insert(key.to_string(), placeholder()?);
        }
    }
    for key in &bound {
        env.push((key.to_string(), values.placeholders[*key].clone()));
    }
    if !request.files.is_empty() {
        env.push((SECRETS_PATH_ENV.to_string(), SECRETS_DIR.to_string()));
    }
    let egress = EgressSpec {
        bindings,
        secret_files: dedup(request.files.iter().map(String::as_str))
            .into_iter()
            .map(str::to_string)
            .collect(),
        placeholders: request.placeholders,
        ..EgressSpec::default()
    };
    Ok(Some((egress, values)))
}

/// What each `--secret-file` holds: its value, or with
/// `--placeholder-secrets` its placeholder. Empty without secret files.
pub fn file_contents(egress: Option<&EgressSpec>, values: &SecretValues) -> Vec<(String, String)> {
    let Some(egress) = egress else {
        return Vec::new();
    };
    egress
        .secret_files
        .iter()
        .filter_map(|key| {
            let source = if egress.placeholders {
                &values.placeholders
            } else {
                &values.values
            };
            Some((key.clone(), source.get(key)?.clone()))
        })
        .collect()
}

/// Config bindings, then flags; a flag naming the same key and host as the
/// config replaces it. Two keys sending the same header to one host would
/// overwrite each other: refused.
fn merge_bindings(config: &[SecretBinding], flags: &[FlagBinding]) -> Result<Vec<SecretBinding>> {
    let mut bindings: Vec<SecretBinding> = Vec::new();
    for b in config.iter().chain(flags.iter().map(|f| &f.binding)) {
        bindings.retain(|old| !(old.key == b.key && old.host == b.host));
        bindings.push(b.clone());
    }
    let header = |b: &SecretBinding| {
        b.header
            .as_deref()
            .unwrap_or("authorization")
            .to_ascii_lowercase()
    };
    for (i, a) in bindings.iter().enumerate() {
        if let Some(b) = bindings[..i]
            .iter()
            .find(|b| b.host == a.host && header(b) == header(a))
        {
            return Err(Error::Conflict(format!(
                "secrets {} and {} both set the {} header for {}; give one of them another header (-S KEY:HOST:HEADER)",
                b.key,
                a.key,
                header(a),
                a.host
            )));
        }
    }
    Ok(bindings)
}

fn dedup<'a>(items: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for item in items {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}

/// `AGENTKERNEL_PLACEHOLDER_` + 32 random hex digits.
fn placeholder() -> Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes)
        .map_err(|e| Error::Conflict(format!("no randomness for a placeholder: {e}")))?;
    Ok(format!("{PLACEHOLDER_PREFIX}{}", hex::encode(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_forms() {
        let b = parse_flag("GH_TOKEN:API.github.com").unwrap();
        assert_eq!(
            (
                b.binding.key.as_str(),
                b.binding.host.as_str(),
                b.binding.header
            ),
            ("GH_TOKEN", "api.github.com", None)
        );
        let b = parse_flag("K:h.example:x-api-key").unwrap();
        assert_eq!(b.binding.header.as_deref(), Some("x-api-key"));
        let b = parse_flag("K=a:b=c:h.example").unwrap();
        assert_eq!(b.inline_value.as_deref(), Some("a:b=c"));
        assert_eq!(b.binding.host, "h.example");
        for bad in [
            "",
            "K",
            ":host",
            "K:",
            "1K:host",
            "K:host:",
            "K:host:h:x",
            "K:*.example.com",
            "K:https://x",
            "K:host:Host",
            "K=:host",
            "K=v",
            "K-1:host",
            "K:ho st",
        ] {
            let e = parse_flag(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad} accepted"))
                .to_string();
            assert!(!e.contains('\n'));
        }
        let e = parse_flag("K=hunter2:").err().unwrap().to_string();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn config_forms() {
        let t: toml::Table = toml::from_str(
            "A = \"a.example\"\nB = { hosts = [\"b.example\", \"c.example\"], header = \"x-api-key\" }\n",
        )
        .unwrap();
        let b = parse_config(&t).unwrap();
        assert_eq!(b.len(), 3);
        assert_eq!(b[2].host, "c.example");
        assert_eq!(b[2].header.as_deref(), Some("x-api-key"));
        for bad in [
            "A = 1",
            "A = { hosts = [] }",
            "A = { host = \"x\" }",
            "A = { hosts = [\"x\"], header = \"bad header\" }",
            "9A = \"x\"",
        ] {
            let t: toml::Table = toml::from_str(bad).unwrap();
            assert!(parse_config(&t).is_err(), "{bad}");
        }
    }

    fn request<'a>(flags: &'a [String], files: &'a [String], placeholders: bool) -> Request<'a> {
        Request {
            flags,
            config: &[],
            files,
            placeholders,
            network: true,
        }
    }

    #[test]
    fn resolution() {
        let tmp = tempfile::tempdir().unwrap();
        let vault = Vault::new(tmp.path().to_path_buf());
        vault.set("STORED", "from-vault").unwrap();
        let flags = vec![
            "STORED:a.example".to_string(),
            "INL=in:line:b.example".to_string(),
        ];
        let files = vec!["STORED".to_string()];
        let mut env = vec![];
        let (egress, values) = resolve(&request(&flags, &files, true), &vault, &mut env)
            .unwrap()
            .unwrap();
        assert_eq!(egress.bindings.len(), 2);
        assert_eq!(values.values["STORED"], "from-vault");
        assert_eq!(values.values["INL"], "in:line");
        let p = &values.placeholders["STORED"];
        assert!(p.starts_with(PLACEHOLDER_PREFIX) && p.len() == PLACEHOLDER_PREFIX.len() + 32);
        assert!(env.contains(&("STORED".into(), p.clone())));
        assert!(env.contains(&(SECRETS_PATH_ENV.into(), SECRETS_DIR.into())));
        // The inline value never reached the vault.
        assert_eq!(vault.get("INL").unwrap(), None);

        let missing = vec!["AGENTKERNEL_SURELY_UNSET_SECRET:a.example".to_string()];
        let e = resolve(&request(&missing, &[], false), &vault, &mut vec![])
            .unwrap_err()
            .to_string();
        assert!(e.contains("AGENTKERNEL_SURELY_UNSET_SECRET"), "{e}");

        let e = resolve(&request(&[], &files, true), &vault, &mut vec![]).unwrap_err();
        assert!(e.to_string().contains("bound to no host"), "{e}");

        let clash = vec![
            "STORED:a.example".to_string(),
            "INL=x:a.example".to_string(),
        ];
        assert!(resolve(&request(&clash, &[], false), &vault, &mut vec![]).is_err());

        vault.set("MULTILINE", "a\nb").unwrap();
        let multiline = vec!["MULTILINE:a.example".to_string()];
        let e = resolve(&request(&multiline, &[], false), &vault, &mut vec![]).unwrap_err();
        assert!(e.to_string().contains("HTTP header"), "{e}");
        // As a file it is fine.
        let file = vec!["MULTILINE".to_string()];
        assert!(resolve(&request(&[], &file, false), &vault, &mut vec![]).is_ok());

        let mut leaking = vec![("STORED".to_string(), "x".to_string())];
        assert!(resolve(&request(&flags, &[], false), &vault, &mut leaking).is_err());

        assert!(resolve(&request(&[], &[], false), &vault, &mut vec![])
            .unwrap()
            .is_none());
    }
}
