//! Config files (SPEC.md "Files"): `/etc/agentkernel/config.toml` <
//! `~/.config/agentkernel/config.toml` < `./agentkernel.toml` < `--config FILE`
//! < flags. Every file uses the same schema (docs/config.md); unknown keys and
//! bad values are errors naming the file, line and key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::parse;
use crate::policy::Profile;
use crate::spec::PullPolicy;
use crate::{Error, Result};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSchema {
    #[serde(default)]
    sandbox: SandboxSection,
    #[serde(default)]
    resources: ResourcesSection,
    #[serde(default)]
    network: NetworkSection,
    #[serde(default)]
    images: ImagesSection,
    #[serde(default)]
    pool: PoolSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SandboxSection {
    #[serde(alias = "base_image")]
    image: Option<String>,
    backend: Option<String>,
    profile: Option<String>,
    ttl: Option<String>,
    timeout: Option<String>,
    pull: Option<String>,
    workdir: Option<String>,
    fast: Option<bool>,
    env: Option<BTreeMap<String, String>>,
    volumes: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourcesSection {
    memory: Option<String>,
    /// thrashr888/agentkernel's spelling.
    memory_mb: Option<u64>,
    #[serde(alias = "vcpus")]
    cpus: Option<f64>,
    pids: Option<i64>,
    /// Cap of each writable layer, like `--disk` (e.g. "5g").
    disk: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkSection {
    enabled: Option<bool>,
    ports: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImagesSection {
    mirrors: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolSection {
    size: Option<u32>,
    idle_ttl: Option<String>,
    max_total: Option<u32>,
}

/// `[pool] max_total` when no file sets it: idle warm containers cost the
/// whole host (each is a running container with its network and cgroups), and
/// a few absorb an agent's loop.
pub const DEFAULT_POOL_MAX_TOTAL: u32 = 8;

/// The merged, validated configuration.
#[derive(Debug, Default, Clone)]
pub struct Config {
    pub image: Option<String>,
    pub backend: Option<String>,
    pub profile: Option<Profile>,
    pub ttl: Option<Duration>,
    pub timeout: Option<Duration>,
    pub pull: Option<PullPolicy>,
    pub workdir: Option<String>,
    pub fast: Option<bool>,
    pub env: BTreeMap<String, String>,
    pub volumes: Vec<parse::Volume>,
    pub memory_bytes: Option<u64>,
    pub cpus: Option<f64>,
    pub pids: Option<i64>,
    pub disk_bytes: Option<u64>,
    pub network: Option<bool>,
    pub ports: Vec<parse::PortMapping>,
    pub mirrors: Vec<String>,
    pub pool_size: Option<u32>,
    pub pool_idle_ttl: Option<Duration>,
    pub pool_max_total: Option<u32>,
    /// The files that contributed, in the order applied.
    pub sources: Vec<PathBuf>,
    /// `./agentkernel.toml`, when it was read as the project's file (not via `--config`).
    pub project: Option<ProjectFile>,
}

/// The project's `./agentkernel.toml` as it was applied: what it sets on its
/// own and what the files below it set, so `crate::trust` can tell whether it
/// loosens the sandbox the user would otherwise get.
#[derive(Debug, Clone)]
pub struct ProjectFile {
    pub path: PathBuf,
    /// sha256 of the exact bytes that were parsed, lowercase hex.
    pub sha256: String,
    /// The file's own settings (relative volume paths already resolved).
    pub settings: Box<Config>,
    /// The system's and the user's files merged, without this one.
    pub below: Box<Config>,
}

impl Config {
    /// Loads the standard files that exist, then `explicit` (which must exist).
    /// A project file named again with `--config` is applied once, as explicit.
    pub fn load(cwd: &Path, explicit: Option<&Path>) -> Result<Config> {
        let mut config = Config::default();
        for path in crate::paths::user_config_files() {
            if let Some(text) = read_if_exists(&path)? {
                config.apply_text(&path, &text)?;
            }
        }
        let project = crate::paths::project_config_file(cwd);
        let project_is_explicit = explicit.is_some_and(|e| same_file(e, &project));
        if !project_is_explicit {
            if let Some(text) = read_if_exists(&project)? {
                let mut settings = Config::default();
                settings.apply_text(&project, &text)?;
                let below = config.clone();
                config.apply_text(&project, &text)?;
                config.project = Some(ProjectFile {
                    sha256: crate::trust::sha256_hex(text.as_bytes()),
                    path: project,
                    settings: Box::new(settings),
                    below: Box::new(below),
                });
            }
        }
        if let Some(path) = explicit {
            let text = std::fs::read_to_string(path)
                .map_err(|e| config_err(path, format!("{e}; check the path given to --config")))?;
            config.apply_text(path, &text)?;
        }
        Ok(config)
    }

    /// Parses one file's text and lays its values over `self`.
    pub fn apply_text(&mut self, path: &Path, text: &str) -> Result<()> {
        let file: FileSchema = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| format!("line {}: ", text[..s.start].matches('\n').count() + 1))
                .unwrap_or_default();
            config_err(path, format!("{line}{}", e.message().replace('\n', " ")))
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let val = |key: &str, e: Error| config_err(path, format!("{key}: {e}"));

        let s = file.sandbox;
        if let Some(image) = s.image {
            crate::image::validate_reference(&image).map_err(|e| val("sandbox.image", e))?;
            self.image = Some(image);
        }
        if let Some(b) = s.backend {
            self.backend = Some(b);
        }
        if let Some(p) = s.profile {
            self.profile = Some(p.parse().map_err(|e| val("sandbox.profile", e))?);
        }
        if let Some(t) = s.ttl {
            self.ttl = Some(parse::duration("ttl", &t).map_err(|e| val("sandbox.ttl", e))?);
        }
        if let Some(t) = s.timeout {
            self.timeout =
                Some(parse::duration("timeout", &t).map_err(|e| val("sandbox.timeout", e))?);
        }
        if let Some(p) = s.pull {
            self.pull = Some(p.parse().map_err(|e| val("sandbox.pull", e))?);
        }
        if let Some(w) = s.workdir {
            if !w.starts_with('/') {
                return Err(config_err(
                    path,
                    format!("sandbox.workdir: `{w}` must be an absolute path"),
                ));
            }
            self.workdir = Some(w);
        }
        if let Some(f) = s.fast {
            self.fast = Some(f);
        }
        for (k, v) in s.env.unwrap_or_default() {
            parse::env_pair(&format!("{k}={v}")).map_err(|e| val("sandbox.env", e))?;
            self.env.insert(k, v);
        }
        for v in s.volumes.unwrap_or_default() {
            self.volumes
                .push(parse::volume(&v, base).map_err(|e| val("sandbox.volumes", e))?);
        }

        let r = file.resources;
        if let (Some(_), Some(_)) = (&r.memory, r.memory_mb) {
            return Err(config_err(
                path,
                "resources: set memory or memory_mb, not both".into(),
            ));
        }
        if let Some(m) = r.memory {
            self.memory_bytes =
                Some(parse::byte_size("memory", &m).map_err(|e| val("resources.memory", e))?);
        }
        if let Some(mb) = r.memory_mb {
            self.memory_bytes = Some(
                parse::byte_size("memory", &format!("{mb}m"))
                    .map_err(|e| val("resources.memory_mb", e))?,
            );
        }
        if let Some(c) = r.cpus {
            self.cpus = Some(parse::cpus(&c.to_string()).map_err(|e| val("resources.cpus", e))?);
        }
        if let Some(p) = r.pids {
            if p < 1 {
                return Err(config_err(
                    path,
                    format!("resources.pids: {p} must be at least 1"),
                ));
            }
            self.pids = Some(p);
        }
        if let Some(d) = r.disk {
            self.disk_bytes =
                Some(parse::byte_size("disk", &d).map_err(|e| val("resources.disk", e))?);
        }

        if let Some(enabled) = file.network.enabled {
            self.network = Some(enabled);
        }
        for p in file.network.ports.unwrap_or_default() {
            self.ports
                .push(parse::port(&p).map_err(|e| val("network.ports", e))?);
        }
        if let Some(m) = file.images.mirrors {
            self.mirrors = m;
        }
        if let Some(size) = file.pool.size {
            self.pool_size = Some(size);
        }
        if let Some(max) = file.pool.max_total {
            self.pool_max_total = Some(max);
        }
        if let Some(t) = file.pool.idle_ttl {
            self.pool_idle_ttl =
                Some(parse::duration("idle_ttl", &t).map_err(|e| val("pool.idle_ttl", e))?);
        }
        self.sources.push(path.to_path_buf());
        Ok(())
    }
}

fn read_if_exists(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(config_err(path, e.to_string())),
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b)
}

fn config_err(path: &Path, message: String) -> Error {
    Error::Config {
        path: path.to_path_buf(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_one(text: &str) -> Result<Config> {
        let mut c = Config::default();
        c.apply_text(Path::new("/tmp/agentkernel.toml"), text)?;
        Ok(c)
    }

    #[test]
    fn full_schema_parses() {
        let c = parse_one(
            r#"
[sandbox]
image = "python:3.12-alpine"
backend = "docker"
profile = "restrictive"
ttl = "30m"
timeout = "10s"
pull = "never"
workdir = "/src"
fast = false
env = { A = "1" }

[resources]
memory = "256m"
cpus = 0.5
pids = 64

[network]
enabled = false
ports = ["8080:80"]

[images]
mirrors = ["http://127.0.0.1:5000"]

[pool]
size = 3
idle_ttl = "5m"
max_total = 5
"#,
        )
        .unwrap();
        assert_eq!(c.image.as_deref(), Some("python:3.12-alpine"));
        assert_eq!(c.profile, Some(Profile::Restrictive));
        assert_eq!(c.pool_max_total, Some(5));
        assert_eq!(c.ttl, Some(Duration::from_secs(1800)));
        assert_eq!(c.pull, Some(PullPolicy::Never));
        assert_eq!(c.memory_bytes, Some(256 << 20));
        assert_eq!(c.network, Some(false));
        assert_eq!(c.ports.len(), 1);
        assert_eq!(c.env.get("A").map(String::as_str), Some("1"));
    }

    #[test]
    fn thrashr888_spellings() {
        let c = parse_one("[sandbox]\nbase_image = \"rust:1.85-alpine\"\n[resources]\nvcpus = 1\nmemory_mb = 512\n").unwrap();
        assert_eq!(c.image.as_deref(), Some("rust:1.85-alpine"));
        assert_eq!(c.memory_bytes, Some(512 << 20));
        assert_eq!(c.cpus, Some(1.0));
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e = parse_one("[sandbox]\nimgae = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("imgae") && e.contains("line 2"), "{e}");
        let e = parse_one("[sandbx]\n").unwrap_err().to_string();
        assert!(e.contains("sandbx"), "{e}");
        let e = parse_one("[sandbox]\nttl = \"forever\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sandbox.ttl"), "{e}");
        let e = parse_one("[sandbox]\nprofile = \"strict\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sandbox.profile"), "{e}");
        let e = parse_one("[resources]\nmemory = \"lots\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("resources.memory"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn later_files_win() {
        let mut c = Config::default();
        c.apply_text(
            Path::new("/a.toml"),
            "[sandbox]\nimage = \"a\"\nttl = \"1h\"\n",
        )
        .unwrap();
        c.apply_text(Path::new("/b.toml"), "[sandbox]\nimage = \"b\"\n")
            .unwrap();
        assert_eq!(c.image.as_deref(), Some("b"));
        assert_eq!(c.ttl, Some(Duration::from_secs(3600)));
    }
}
