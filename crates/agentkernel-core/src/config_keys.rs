//! Every key a config file may hold: thrashr888/agentkernel's schema (v0.18:
//! its `Config`, its documented keys and those its built-in templates use)
//! plus ours, which live in the same sections. A file is checked against this
//! tree before it is deserialised, so all unknown keys are reported at once,
//! each with the closest known spelling.

/// What a key holds.
enum Shape {
    /// A value whose type the typed schema (or nothing, when ignored) checks.
    Value,
    /// A table whose keys are the user's own (env names, build args, ports).
    FreeTable,
    Table(&'static [(&'static str, Shape)]),
    /// `[[name]]`: an array of tables with these keys.
    TableArray(&'static [(&'static str, Shape)]),
}

use Shape::{FreeTable, Table, TableArray, Value};

const SCHEMA: &[(&str, Shape)] = &[
    (
        "sandbox",
        Table(&[
            ("name", Value),
            ("runtime", Value),
            ("base_image", Value),
            ("image", Value),
            ("init_script", Value),
            ("backend", Value),
            ("profile", Value),
            ("ttl", Value),
            ("timeout", Value),
            ("pull", Value),
            ("workdir", Value),
            ("fast", Value),
            ("env", FreeTable),
            ("volumes", Value),
        ]),
    ),
    (
        "agent",
        Table(&[("preferred", Value), ("compatibility_mode", Value)]),
    ),
    (
        "resources",
        Table(&[
            ("vcpus", Value),
            ("cpus", Value),
            ("memory_mb", Value),
            ("memory", Value),
            ("pids", Value),
            ("disk", Value),
        ]),
    ),
    (
        "network",
        Table(&[
            ("enabled", Value),
            ("ports", Value),
            ("allow", Value),
            ("vsock_cid", Value),
        ]),
    ),
    (
        "security",
        Table(&[
            ("profile", Value),
            ("network", Value),
            ("mount_cwd", Value),
            ("mount_home", Value),
            ("pass_env", Value),
            ("read_only", Value),
            ("seccomp", Value),
            ("domains", Table(RULE_LIST)),
            ("commands", Table(RULE_LIST)),
            (
                "transport",
                Table(&[
                    ("ssh", Value),
                    ("vault_addr", Value),
                    ("vault_ssh_mount", Value),
                    ("vault_ssh_role", Value),
                    ("cert_ttl", Value),
                    ("require_encrypted", Value),
                ]),
            ),
        ]),
    ),
    (
        "qemu",
        Table(&[("kernel", Value), ("modules", Value), ("initrd", Value)]),
    ),
    (
        "build",
        Table(&[
            ("dockerfile", Value),
            ("context", Value),
            ("target", Value),
            ("args", FreeTable),
            ("no_cache", Value),
        ]),
    ),
    (
        "files",
        TableArray(&[("source", Value), ("dest", Value), ("mode", Value)]),
    ),
    (
        "orchestrator",
        Table(&[
            ("provider", Value),
            ("namespace", Value),
            ("kubeconfig", Value),
            ("context", Value),
            ("runtime_class", Value),
            ("service_account", Value),
            ("node_selector", FreeTable),
            ("nomad_addr", Value),
            ("nomad_token", Value),
            ("nomad_driver", Value),
            ("nomad_datacenter", Value),
            ("warm_pool_size", Value),
            ("max_pool_size", Value),
            ("warm_pool_images", Value),
            ("max_sandboxes", Value),
        ]),
    ),
    (
        "enterprise",
        Table(&[
            ("enabled", Value),
            ("policy_server", Value),
            ("org_id", Value),
            ("api_key_env", Value),
            ("offline_mode", Value),
            ("cache_max_age_hours", Value),
            ("trust_anchors", Table(&[("keys", Value)])),
            ("default_roles", Value),
            ("jwks_url", Value),
        ]),
    ),
    (
        "api",
        Table(&[
            (
                "tls",
                Table(&[
                    ("enabled", Value),
                    ("cert", Value),
                    ("key", Value),
                    ("require_tls", Value),
                ]),
            ),
            ("allow_sudo_exec", Value),
        ]),
    ),
    (
        "proxy",
        Table(&[
            ("ca_file", Value),
            ("resolve", FreeTable),
            (
                "hooks",
                TableArray(&[
                    ("name", Value),
                    ("event", Value),
                    (
                        "target",
                        Table(&[("type", Value), ("url", Value), ("path", Value)]),
                    ),
                ]),
            ),
        ]),
    ),
    ("secrets", FreeTable),
    ("llm_keys", FreeTable),
    (
        "ssh",
        Table(&[
            ("enabled", Value),
            ("port", Value),
            ("user", Value),
            ("cert_ttl", Value),
            ("vault_addr", Value),
            ("vault_ssh_mount", Value),
            ("vault_ssh_role", Value),
        ]),
    ),
    (
        "template",
        Table(&[
            ("description", Value),
            ("category", Value),
            ("help_text", Value),
            ("secret_files", Value),
            ("setup", Value),
        ]),
    ),
    ("ports", FreeTable),
    ("environment", FreeTable),
    (
        "images",
        Table(&[("mirrors", Value), ("max_layer_size", Value)]),
    ),
    (
        "pool",
        Table(&[("size", Value), ("idle_ttl", Value), ("max_total", Value)]),
    ),
    (
        "templates",
        Table(&[("github_base", Value), ("ca_file", Value)]),
    ),
    ("receipts", Table(&[("trusted_keys", Value)])),
];

const RULE_LIST: &[(&str, Shape)] = &[
    ("allow", Value),
    ("block", Value),
    ("allowlist_only", Value),
];

/// Every key of `file` that neither schema knows, rendered as
/// `line N: section.key (did you mean section.other?)`, in file order.
pub fn unknown_keys(file: &toml::Table, text: &str) -> Vec<String> {
    let mut found = Vec::new();
    walk(file, SCHEMA, "", &mut found);
    let mut rendered: Vec<(usize, String)> = found
        .into_iter()
        .map(|(path, key, hint)| {
            let full = join(&path, &key);
            let line = line_of(text, &path, &key);
            let mut entry = match line {
                Some(n) => format!("line {n}: {full}"),
                None => full,
            };
            if let Some(h) = hint {
                entry.push_str(&format!(" (did you mean {h}?)"));
            }
            (line.unwrap_or(usize::MAX), entry)
        })
        .collect();
    rendered.sort_by_key(|(line, _)| *line);
    rendered.into_iter().map(|(_, e)| e).collect()
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn walk(
    table: &toml::Table,
    known: &[(&str, Shape)],
    path: &str,
    found: &mut Vec<(String, String, Option<String>)>,
) {
    for (key, value) in table {
        match known.iter().find(|(k, _)| k == key) {
            None => found.push((path.to_string(), key.clone(), suggestion(key, known, path))),
            Some((_, Table(inner))) => {
                if let toml::Value::Table(t) = value {
                    walk(t, inner, &join(path, key), found);
                }
            }
            Some((_, TableArray(inner))) => {
                if let toml::Value::Array(items) = value {
                    for item in items {
                        if let toml::Value::Table(t) = item {
                            walk(t, inner, &join(path, key), found);
                        }
                    }
                }
            }
            Some((_, Value | FreeTable)) => {}
        }
    }
}

/// The closest known key beside `key`, else the same key in another section
/// (`[sandbox] memory_mb` → `resources.memory_mb`).
fn suggestion(key: &str, siblings: &[(&str, Shape)], path: &str) -> Option<String> {
    let close = siblings
        .iter()
        .map(|(k, _)| (strsim::jaro_winkler(key, k), *k))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0));
    if let Some((_, k)) = close {
        return Some(join(path, k));
    }
    SCHEMA.iter().find_map(|(section, shape)| match shape {
        Table(keys) if keys.iter().any(|(k, _)| *k == key) => Some(join(section, key)),
        _ => None,
    })
}

/// Where `path.key` is written: `key =` inside `[path]`, a `[path.key]`
/// header, or a dotted `key.` — best effort, for the message only.
fn line_of(text: &str, path: &str, key: &str) -> Option<usize> {
    let header = |l: &str| {
        l.trim_start_matches('[')
            .trim_end_matches(']')
            .trim()
            .to_string()
    };
    let full = join(path, key);
    let mut section = String::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with('[') {
            let name = header(line.split('#').next().unwrap_or("").trim());
            if name == full {
                return Some(n + 1);
            }
            section = name;
            continue;
        }
        let Some((lhs, _)) = line.split_once('=') else {
            continue;
        };
        let lhs = lhs.trim().trim_matches('"');
        let here = join(&section, lhs);
        if here == full || here.starts_with(&format!("{full}.")) {
            return Some(n + 1);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unknown(text: &str) -> Vec<String> {
        unknown_keys(&toml::from_str(text).unwrap(), text)
    }

    #[test]
    fn upstream_template_keys_are_known() {
        let text = r#"
[sandbox]
name = "x"
base_image = "node:22-alpine"
init_script = "true"
[agent]
preferred = "claude"
compatibility_mode = "claude"
[resources]
vcpus = 2
memory_mb = 1024
[secrets]
ANTHROPIC_API_KEY = "api.anthropic.com"
[security]
profile = "moderate"
[security.domains]
allow = ["api.anthropic.com"]
[ports]
5432 = 5432
[environment]
A = "1"
[template]
description = "d"
category = "c"
help_text = "h"
secret_files = ["K"]
[[files]]
source = "a"
dest = "/a"
[[proxy.hooks]]
name = "n"
event = "on_request"
[proxy.hooks.target]
type = "audit"
"#;
        assert_eq!(unknown(text), Vec::<String>::new());
    }

    #[test]
    fn all_unknown_keys_at_once_with_suggestions() {
        let found = unknown("[sandbox]\nimgae = \"x\"\nmemory_mb = 1\n[secuirty]\nprofile = \"moderate\"\n[build.args]\nANY = \"1\"\n");
        assert_eq!(
            found,
            vec![
                "line 2: sandbox.imgae (did you mean sandbox.image?)",
                "line 3: sandbox.memory_mb (did you mean resources.memory_mb?)",
                "line 4: secuirty (did you mean security?)",
            ]
        );
        assert_eq!(unknown("[zzz]\n"), vec!["line 1: zzz"]);
    }
}
