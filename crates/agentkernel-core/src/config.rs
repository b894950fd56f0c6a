//! Config files (docs/config.md): `/etc/agentkernel/config.toml` <
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

/// One file, after `config_keys` has refused unknown keys. Sections we do not
/// implement are kept as raw values: each present key is named in a notice
/// (or refused where ignoring it would weaken the sandbox).
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
    security: SecuritySection,
    #[serde(default)]
    images: ImagesSection,
    #[serde(default)]
    pool: PoolSection,
    #[serde(default)]
    templates: TemplatesSection,
    #[serde(default)]
    receipts: ReceiptsSection,
    #[serde(default)]
    qemu: QemuSection,
    /// Upstream's templates: `NAME = "value"`, the same as `sandbox.env`.
    #[serde(default)]
    environment: BTreeMap<String, String>,
    /// Upstream's templates: `HOST_PORT = CONTAINER_PORT`.
    #[serde(default)]
    ports: BTreeMap<String, u16>,
    agent: Option<toml::Table>,
    build: Option<BuildSection>,
    files: Option<Vec<FileEntry>>,
    orchestrator: Option<toml::Table>,
    enterprise: Option<toml::Table>,
    api: Option<toml::Table>,
    proxy: Option<toml::Table>,
    secrets: Option<toml::Table>,
    llm_keys: Option<toml::Table>,
    ssh: Option<toml::Table>,
    template: Option<toml::Table>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SandboxSection {
    /// Upstream requires it; here it names a kept sandbox created from this file.
    name: Option<String>,
    /// Upstream's image shorthand (python, node, …); the image is detected instead.
    runtime: Option<String>,
    #[serde(alias = "base_image")]
    image: Option<String>,
    init_script: Option<String>,
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

/// Upstream's `[build]`: the engine builds the image (see `image_build`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BuildSection {
    dockerfile: Option<String>,
    context: Option<String>,
    target: Option<String>,
    #[serde(default)]
    args: BTreeMap<String, String>,
    #[serde(default)]
    no_cache: bool,
}

/// One upstream `[[files]]` entry (see `files`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    source: String,
    dest: String,
    mode: Option<String>,
}

/// Upstream's `[security]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecuritySection {
    profile: Option<String>,
    network: Option<bool>,
    mount_cwd: Option<bool>,
    mount_home: Option<bool>,
    pass_env: Option<bool>,
    read_only: Option<bool>,
    seccomp: Option<String>,
    domains: Option<RuleLists>,
    commands: Option<RuleLists>,
    transport: Option<TransportSection>,
}

/// `[security.domains]` and `[security.commands]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleLists {
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    block: Vec<String>,
    #[serde(default)]
    allowlist_only: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TransportSection {
    ssh: Option<bool>,
    vault_addr: Option<String>,
    vault_ssh_mount: Option<String>,
    vault_ssh_role: Option<String>,
    cert_ttl: Option<String>,
    #[serde(default)]
    require_encrypted: bool,
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
    /// The egress allow-list (hosts, `*.domain`, optional `:port`).
    allow: Option<Vec<String>>,
    /// Firecracker's vsock CID upstream; no backend here uses one.
    vsock_cid: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImagesSection {
    mirrors: Option<Vec<String>>,
    max_layer_size: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReceiptsSection {
    /// Public keys (base64) or files holding one.
    #[serde(default)]
    trusted_keys: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolSection {
    size: Option<u32>,
    idle_ttl: Option<String>,
    max_total: Option<u32>,
}

/// `[qemu]`: the guest kernel the qemu backend boots instead of Debian's.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct QemuSection {
    kernel: Option<String>,
    modules: Option<String>,
    initrd: Option<toml::Value>,
}

/// `[templates]`: where `--template github:…` is fetched from.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplatesSection {
    github_base: Option<String>,
    ca_file: Option<String>,
}

/// `[pool] max_total` for warm VMs and warm native sandboxes when no file
/// sets it: each warm VM holds its guest's RAM, and a few absorb an agent's
/// loop. An engine's warm containers have a larger default of their own
/// (agentkernel-docker's `pool::DEFAULT_MAX_TOTAL`), since each run uses one up
/// and engines make them slowly. This is the lowest of the defaults, so a
/// project file's cap above it loosens some pool (see trust.rs).
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
    /// `[images] max_layer_size`: the most one image layer may expand to.
    pub max_layer_size: Option<u64>,
    pub pool_size: Option<u32>,
    pub pool_idle_ttl: Option<Duration>,
    /// `[sandbox] name`: the name of a kept sandbox created from this config
    /// when the command line names none.
    pub name: Option<String>,
    /// `[security] mount_cwd`: false = no workspace at all.
    pub mount_cwd: Option<bool>,
    /// `[security] mount_home`: false = never the read-only home view.
    pub mount_home: Option<bool>,
    /// `[security] read_only`: checked against the profile in `resolve`.
    pub read_only_root: Option<bool>,
    /// `[security] seccomp`: accepted only where our filter is at least as strict.
    pub seccomp: Option<String>,
    /// Egress rules we do not enforce (`[security.domains]` block lists and
    /// allow-list-only mode), as `file: key`: refused when the sandbox has a
    /// network, a notice when it has none.
    pub unenforced_egress_rules: Vec<String>,
    /// `[network] allow` and upstream's `[security.domains] allow` (with
    /// `allowlist_only`): the egress allow-list, as written (parsed in `run`).
    pub egress_allow: Vec<String>,
    /// `[proxy] ca_file`: roots the egress proxy trusts upstream, besides the system's.
    pub proxy_ca_file: Option<PathBuf>,
    /// `[proxy] resolve`: host → `ADDRESS:PORT` for the egress proxy.
    pub proxy_resolve: BTreeMap<String, String>,
    /// `[security.transport] require_encrypted`: refused with published ports.
    pub require_encrypted_ports: Option<PathBuf>,
    /// One line each: keys accepted for compatibility but not acted on.
    pub notices: Vec<String>,
    pub pool_max_total: Option<u32>,
    /// `[qemu] kernel` and `[qemu] modules`: the guest kernel (bzImage or
    /// an ELF vmlinux) and its modules directory (`/lib/modules/VERSION`);
    /// no modules directory means the drivers the agent needs are built in.
    /// Relative paths are relative to the naming file's directory.
    pub qemu_kernel: Option<QemuKernel>,
    /// `[templates] github_base`: the raw-content endpoint `github:` templates
    /// are fetched from (a mirror, or a test server).
    pub template_github_base: Option<String>,
    /// `[templates] ca_file`: PEM roots trusted for `github:` fetches, besides the system's.
    pub template_ca_file: Option<PathBuf>,
    /// `[secrets]`: keys the proxy adds to requests to their hosts. A later
    /// file's entry for a key replaces the earlier files' for that key.
    pub secret_bindings: Vec<crate::egress::SecretBinding>,
    /// `[receipts] trusted_keys`, each with the file that named it (a
    /// project's file may not add signers: `receipt verify` takes them only
    /// from the user's and the system's files). A relative file path is
    /// relative to the naming file's directory.
    pub receipt_trusted_keys: Vec<(PathBuf, String)>,
    /// `[[files]]`: host files copied in when the sandbox is created, in
    /// order (every file's entries; a later copy to the same path wins).
    pub files: Vec<crate::files::FileCopy>,
    /// `[build]`: the last file's section.
    pub build: Option<crate::image_build::BuildSpec>,
    /// The files that contributed, in the order applied.
    pub sources: Vec<PathBuf>,
    /// `./agentkernel.toml`, when it was read as the project's file (not via `--config`).
    pub project: Option<ProjectFile>,
}

/// `[qemu] kernel` with its `modules`, set together by one file: a kernel
/// named by one file and modules by another would be a mismatched pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuKernel {
    pub image: PathBuf,
    pub modules: Option<PathBuf>,
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
        let syntax = |e: toml::de::Error| {
            let line = e
                .span()
                .map(|s| format!("line {}: ", text[..s.start].matches('\n').count() + 1))
                .unwrap_or_default();
            config_err(path, format!("{line}{}", e.message().replace('\n', " ")))
        };
        let table: toml::Table = toml::from_str(text).map_err(syntax)?;
        let unknown = crate::config_keys::unknown_keys(&table, text);
        if !unknown.is_empty() {
            return Err(config_err(
                path,
                format!(
                    "unknown key{} {}; see docs/config.md for the schema",
                    if unknown.len() == 1 { "" } else { "s" },
                    unknown.join(", ")
                ),
            ));
        }
        let mut file: FileSchema = toml::from_str(text).map_err(syntax)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let val = |key: &str, e: Error| config_err(path, format!("{key}: {e}"));
        self.apply_proxy(path, base, &mut file)?;

        self.apply_security(path, &file)?;
        self.note_ignored(path, &file);

        let s = file.sandbox;
        if let Some(name) = s.name {
            self.name = Some(name);
        }
        if let Some(image) = s.image {
            crate::image::validate_reference(&image).map_err(|e| val("sandbox.image", e))?;
            self.image = Some(image);
        }
        if let Some(b) = s.backend {
            self.backend = Some(b);
        }
        if let Some(p) = s.profile {
            let profile = p.parse().map_err(|e| val("sandbox.profile", e))?;
            if file.security.profile.is_some() && self.profile != Some(profile) {
                return Err(config_err(
                    path,
                    "sandbox.profile and security.profile differ; keep one".into(),
                ));
            }
            self.profile = Some(profile);
        }
        if let Some(t) = s.ttl {
            self.ttl = Some(parse::ttl("ttl", &t).map_err(|e| val("sandbox.ttl", e))?);
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
        for (key, env) in [
            ("sandbox.env", s.env.unwrap_or_default()),
            ("environment", file.environment),
        ] {
            for (k, v) in env {
                parse::env_pair(&format!("{k}={v}")).map_err(|e| val(key, e))?;
                self.env.insert(k, v);
            }
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
            let mut cpus = parse::cpus(&c.to_string()).map_err(|e| val("resources.cpus", e))?;
            // Upstream's `vcpus` sizes a VM, which runs on fewer host CPUs:
            // "at most", like a profile's count (our `cpus` stays exact).
            let vcpus = table
                .get("resources")
                .and_then(toml::Value::as_table)
                .is_some_and(|t| t.contains_key("vcpus"));
            let online = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
            if vcpus && cpus > online {
                self.notices.push(format!(
                    "{}: resources.vcpus = {cpus} is more than this machine's {online} CPUs; {online} are used",
                    path.display()
                ));
                cpus = online;
            }
            self.cpus = Some(cpus);
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

        let network = match (file.network.enabled, file.security.network) {
            (Some(a), Some(b)) if a != b => {
                return Err(config_err(
                    path,
                    "network.enabled and security.network differ; keep one".into(),
                ))
            }
            (a, b) => a.or(b),
        };
        if let Some(enabled) = network {
            self.network = Some(enabled);
        }
        self.egress_allow
            .extend(file.network.allow.unwrap_or_default());
        for p in file.network.ports.unwrap_or_default() {
            self.ports
                .push(parse::port(&p).map_err(|e| val("network.ports", e))?);
        }
        for (host, container) in file.ports {
            self.ports
                .push(parse::port(&format!("{host}:{container}")).map_err(|e| val("ports", e))?);
        }
        if let Some(m) = file.images.mirrors {
            self.mirrors = m;
        }
        if let Some(size) = file.images.max_layer_size {
            self.max_layer_size = Some(
                parse::byte_size("max_layer_size", &size)
                    .map_err(|e| val("images.max_layer_size", e))?,
            );
        }
        for key in &file.receipts.trusted_keys {
            self.receipt_trusted_keys
                .push((path.to_path_buf(), key.clone()));
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
        let q = file.qemu;
        if q.initrd.is_some() {
            return Err(config_err(
                path,
                "qemu.initrd: agentkernel builds the guest's initramfs itself (the agent is its /init); build the drivers into the kernel or name its modules directory with qemu.modules".into(),
            ));
        }
        match (q.kernel, q.modules) {
            (Some(kernel), modules) => {
                self.qemu_kernel = Some(QemuKernel {
                    image: base.join(kernel),
                    modules: modules.map(|m| base.join(m)),
                })
            }
            (None, Some(_)) => return Err(config_err(
                path,
                "qemu.modules: name the kernel they belong to with qemu.kernel in the same file"
                    .into(),
            )),
            (None, None) => {}
        }
        if let Some(base) = file.templates.github_base {
            if !base.starts_with("https://") {
                return Err(config_err(
                    path,
                    format!("templates.github_base: `{base}` must be an https:// URL"),
                ));
            }
            self.template_github_base = Some(base.trim_end_matches('/').to_string());
        }
        if let Some(ca) = file.templates.ca_file {
            self.template_ca_file = Some(base.join(ca));
        }
        for f in file.files.take().unwrap_or_default() {
            self.files.push(
                crate::files::entry(base, &f.source, &f.dest, f.mode.as_deref())
                    .map_err(|why| config_err(path, why))?,
            );
        }
        if let Some(b) = file.build.take() {
            self.build = Some(crate::image_build::BuildSpec::new(
                path,
                base,
                b.dockerfile.as_deref(),
                b.context.as_deref(),
                b.target,
                b.args,
                b.no_cache,
            ));
        }
        if let Some(table) = &file.secrets {
            let bindings =
                crate::secrets::parse_config(table).map_err(|why| config_err(path, why))?;
            self.secret_bindings.retain(|b| !table.contains_key(&b.key));
            self.secret_bindings.extend(bindings);
        }
        self.sources.push(path.to_path_buf());
        Ok(())
    }
}

impl Config {
    /// `[security]`: what we honour, and what we refuse because ignoring it
    /// would leave the sandbox weaker than the file asks.
    fn apply_security(&mut self, path: &Path, file: &FileSchema) -> Result<()> {
        let sec = &file.security;
        let at = path.display();
        if let Some(p) = &sec.profile {
            // Upstream's "custom" is its moderate permission set.
            let profile = if p == "custom" {
                self.notices.push(format!(
                    "{at}: security.profile = \"custom\" is upstream's name for the moderate defaults; moderate is used"
                ));
                crate::policy::Profile::Moderate
            } else {
                p.parse()
                    .map_err(|e| config_err(path, format!("security.profile: {e}")))?
            };
            self.profile = Some(profile);
        }
        if let Some(m) = sec.mount_cwd {
            self.mount_cwd = Some(m);
        }
        if let Some(m) = sec.mount_home {
            self.mount_home = Some(m);
        }
        if let Some(r) = sec.read_only {
            self.read_only_root = Some(r);
        }
        if let Some(s) = &sec.seccomp {
            self.seccomp = Some(s.clone());
        }
        if sec.pass_env == Some(true) {
            self.notices.push(format!(
                "{at}: security.pass_env = true is not supported: no host variable is passed (give them with -e)"
            ));
        }
        if let Some(domains) = &sec.domains {
            if domains.allowlist_only && !domains.allow.is_empty() {
                // Upstream documents this allow-list; here the proxy enforces it.
                self.egress_allow.extend(domains.allow.iter().cloned());
            } else if domains.allowlist_only {
                self.unenforced_egress_rules
                    .push(format!("{at}: security.domains.allowlist_only = true"));
            }
            if !domains.block.is_empty() {
                self.unenforced_egress_rules
                    .push(format!("{at}: security.domains.block"));
            }
            if !domains.allow.is_empty() && !domains.allowlist_only {
                // Upstream's own rule: without allowlist_only, `allow` restricts nothing.
                self.notices.push(format!(
                    "{at}: security.domains.allow has no effect without allowlist_only (as upstream); ignored"
                ));
            }
        }
        if let Some(commands) = &sec.commands {
            if commands.allowlist_only || !commands.block.is_empty() {
                return Err(Error::not_supported_hint(
                    format!("{at}: security.commands (command filtering)"),
                    "remove the block list and allowlist_only: running the command unfiltered would be weaker than the file asks",
                ));
            }
            if !commands.allow.is_empty() {
                self.notices.push(format!(
                    "{at}: security.commands.allow has no effect without allowlist_only (as upstream); ignored"
                ));
            }
        }
        if let Some(t) = &sec.transport {
            if t.require_encrypted {
                self.require_encrypted_ports = Some(path.to_path_buf());
            }
            let set = [
                (t.ssh.is_some(), "ssh"),
                (t.vault_addr.is_some(), "vault_addr"),
                (t.vault_ssh_mount.is_some(), "vault_ssh_mount"),
                (t.vault_ssh_role.is_some(), "vault_ssh_role"),
                (t.cert_ttl.is_some(), "cert_ttl"),
            ];
            for (_, key) in set.iter().filter(|(given, _)| *given) {
                self.notices.push(format!(
                    "{at}: security.transport.{key} is not supported yet (no SSH certificates: run --ssh uses per-sandbox keys); ignored"
                ));
            }
        }
        if let Some(enterprise) = &file.enterprise {
            if enterprise.get("enabled").and_then(toml::Value::as_bool) == Some(true) {
                return Err(Error::not_supported_hint(
                    format!("{at}: enterprise.enabled = true (a policy server)"),
                    "remove it: its policies could only restrict, and running without them would be weaker than the file asks",
                ));
            }
        }
        Ok(())
    }

    /// `[proxy] ca_file` and `[proxy] resolve` (the egress proxy's); the
    /// section's other keys (upstream's hooks) stay noticed as ignored.
    fn apply_proxy(&mut self, path: &Path, base: &Path, file: &mut FileSchema) -> Result<()> {
        let Some(proxy) = file.proxy.as_mut() else {
            return Ok(());
        };
        if let Some(ca_file) = proxy.remove("ca_file") {
            let ca_file = ca_file.as_str().ok_or_else(|| {
                config_err(path, "proxy.ca_file: expected a path (string)".into())
            })?;
            self.proxy_ca_file = Some(base.join(ca_file));
        }
        if let Some(resolve) = proxy.remove("resolve") {
            let bad = || {
                config_err(
                    path,
                    "proxy.resolve: expected a table of \"host\" = \"ADDRESS:PORT\"".into(),
                )
            };
            for (host, address) in resolve.as_table().ok_or_else(bad)? {
                let address = address.as_str().ok_or_else(bad)?;
                self.proxy_resolve
                    .insert(host.to_ascii_lowercase(), address.to_string());
            }
        }
        Ok(())
    }

    /// One notice per key we accept for compatibility but do not act on.
    fn note_ignored(&mut self, path: &Path, file: &FileSchema) {
        let at = path.display();
        let mut note = |key: String, why: &str| {
            self.notices
                .push(format!("{at}: {key} is not supported yet; ignored ({why})"))
        };
        let s = &file.sandbox;
        if let Some(r) = &s.runtime {
            if r != "base" {
                note(
                    format!("sandbox.runtime = {r:?}"),
                    "the image is detected from the project, or set with base_image",
                );
            }
        }
        if s.init_script.is_some() {
            note(
                "sandbox.init_script".into(),
                "run it as part of the command",
            );
        }
        if file.network.vsock_cid.is_some() {
            note("network.vsock_cid".into(), "no backend here uses vsock");
        }
        let tables = [
            ("agent", &file.agent, "agent profiles are not built in"),
            (
                "orchestrator",
                &file.orchestrator,
                "no Kubernetes or Nomad backend",
            ),
            ("enterprise", &file.enterprise, "no policy server"),
            ("api", &file.api, "no HTTP API server"),
            ("proxy", &file.proxy, "no request hooks"),
            ("llm_keys", &file.llm_keys, "no secret injection"),
            (
                "ssh",
                &file.ssh,
                "SSH is asked per run: run --ssh [--ssh-port N]",
            ),
            ("template", &file.template, "template metadata"),
        ];
        for (section, table, why) in tables {
            for key in table.iter().flat_map(|t| t.keys()) {
                if section == "enterprise" && key == "enabled" {
                    continue;
                }
                note(format!("{section}.{key}"), why);
            }
        }
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
    fn qemu_kernel_is_a_pair_relative_to_its_file() {
        let path = Path::new("/etc/agentkernel/config.toml");
        let mut c = Config::default();
        c.apply_text(
            path,
            "[qemu]\nkernel = \"k/vmlinux\"\nmodules = \"/lib/modules/6.1\"\n",
        )
        .unwrap();
        assert_eq!(
            c.qemu_kernel,
            Some(QemuKernel {
                image: "/etc/agentkernel/k/vmlinux".into(),
                modules: Some("/lib/modules/6.1".into()),
            })
        );
        // A later file's kernel replaces the pair: its modules are its own.
        c.apply_text(path, "[qemu]\nkernel = \"/k2\"\n").unwrap();
        assert_eq!(c.qemu_kernel.as_ref().unwrap().modules, None);
        let err = |text: &str| {
            Config::default()
                .apply_text(path, text)
                .unwrap_err()
                .to_string()
        };
        assert!(err("[qemu]\nmodules = \"/m\"\n").contains("qemu.modules: name the kernel"));
        let initrd = err("[qemu]\nkernel = \"/k\"\ninitrd = \"/i\"\n");
        assert!(
            initrd.contains("qemu.initrd:") && !initrd.contains('\n'),
            "{initrd}"
        );
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
max_layer_size = "8g"

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
        assert_eq!(c.max_layer_size, Some(8 << 30));
        assert_eq!(c.network, Some(false));
        assert_eq!(c.ports.len(), 1);
        assert_eq!(c.env.get("A").map(String::as_str), Some("1"));
    }

    #[test]
    fn upstream_vcpus_means_at_most_cpus_is_exact() {
        let online = std::thread::available_parallelism().unwrap().get() as f64;
        let c = parse_one("[resources]\nvcpus = 4096\n").unwrap();
        assert_eq!(c.cpus, Some(online));
        assert!(
            c.notices[0].contains("resources.vcpus = 4096"),
            "{:?}",
            c.notices
        );
        let c = parse_one("[resources]\ncpus = 4096\n").unwrap();
        assert_eq!(
            c.cpus,
            Some(4096.0),
            "refused later, naming the host's count"
        );
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
    fn upstream_schema_is_honoured_or_noticed() {
        let c = parse_one(
            r#"
[sandbox]
name = "my-project"
runtime = "python"
base_image = "python:3.12-alpine"
init_script = "pip install x"
[agent]
preferred = "claude"
[security]
profile = "restrictive"
network = false
mount_cwd = false
seccomp = "default"
[security.domains]
allow = ["pypi.org"]
block = ["169.254.169.254"]
[environment]
A = "1"
[ports]
5432 = 5432
[secrets]
KEY = "api.example.com"
[template]
description = "d"
"#,
        )
        .unwrap();
        assert_eq!(c.name.as_deref(), Some("my-project"));
        assert_eq!(c.profile, Some(Profile::Restrictive));
        assert_eq!(c.network, Some(false));
        assert_eq!(c.mount_cwd, Some(false));
        assert_eq!(c.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(c.ports.len(), 1);
        assert_eq!(c.ports[0].host_port, 5432);
        assert_eq!(c.unenforced_egress_rules.len(), 1);
        // `[secrets]` is honoured, not noticed.
        assert_eq!(c.secret_bindings.len(), 1);
        assert_eq!(c.secret_bindings[0].host, "api.example.com");
        let notices = c.notices.join("\n");
        for key in [
            "sandbox.runtime",
            "sandbox.init_script",
            "agent.preferred",
            "security.domains.allow",
            "template.description",
        ] {
            assert!(notices.contains(key), "{key} not in {notices}");
        }
    }

    #[test]
    fn upstream_keys_that_would_weaken_are_refused() {
        let e = parse_one("[security.commands]\nblock = [\"rm\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("security.commands"), "{e}");
        let e = parse_one("[enterprise]\nenabled = true\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("enterprise.enabled"), "{e}");
        let e =
            parse_one("[sandbox]\nprofile = \"moderate\"\n[security]\nprofile = \"restrictive\"\n")
                .unwrap_err()
                .to_string();
        assert!(e.contains("differ"), "{e}");
        let e = parse_one("[network]\nenabled = true\n[security]\nnetwork = false\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("differ"), "{e}");
    }

    #[test]
    fn every_unknown_key_in_one_line() {
        let e = parse_one("[sandbox]\nnmae = \"x\"\n[resources]\nmemroy_mb = 1\n[securty]\n")
            .unwrap_err()
            .to_string();
        assert!(!e.contains('\n'), "{e}");
        for part in [
            "sandbox.nmae (did you mean sandbox.name?)",
            "resources.memroy_mb (did you mean resources.memory_mb?)",
            "securty (did you mean security?)",
        ] {
            assert!(e.contains(part), "{part} not in {e}");
        }
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
