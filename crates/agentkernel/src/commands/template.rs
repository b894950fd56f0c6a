//! `--template` and `agentkernel template …`: finding a template (core
//! `template.rs`), fetching `github:` ones over HTTPS, laying one over the
//! config, and running its setup in a new kept sandbox.

use std::path::{Path, PathBuf};
use std::time::Duration;

use agentkernel_core::config::Config;
use agentkernel_core::spec::SandboxSpec;
use agentkernel_core::state::{self, Store};
use agentkernel_core::template::{self, GithubSpec, Lookup, Source, Template, TemplateRef};
use agentkernel_core::{parse, Error, Result};

use crate::cli::TemplateCommand;

/// A fetched template larger than this is not a config file.
const MAX_TEMPLATE_BYTES: usize = 1 << 20;
const FETCH_TIMEOUT: Duration = Duration::from_secs(15);

/// A template applied to the config, for the spec.
pub struct Applied {
    pub reference: TemplateRef,
    pub setup: Vec<String>,
    /// The template names the image (so `--dry-run` says `template`, not `config`).
    pub sets_image: bool,
    /// The template sets a memory / CPU limit (see [`attach`]).
    pub sets_memory: bool,
    pub sets_cpus: bool,
}

/// `run --template SPEC`: finds (fetching once if needed) and lays the
/// template over `config`.
pub async fn apply(spec: &str, config: &mut Config) -> Result<Applied> {
    let template = resolve(spec, config).await?;
    let setup = template::apply(config, &template)?;
    let resources: toml::Table = toml::from_str::<toml::Table>(&template.text)
        .ok()
        .and_then(|t| t.get("resources").and_then(|r| r.as_table()).cloned())
        .unwrap_or_default();
    Ok(Applied {
        sets_memory: resources.contains_key("memory") || resources.contains_key("memory_mb"),
        sets_cpus: resources.contains_key("cpus") || resources.contains_key("vcpus"),
        sets_image: template::summary(&template.text).image.is_some(),
        reference: template.reference,
        setup,
    })
}

/// Puts what the template decided into the spec: its reference (for
/// `--dry-run` and receipts) and, for a kept sandbox, its setup.
///
/// A template's memory and CPU limits are a preset's, like a profile's own:
/// enforced the same, but not a demand the user made. So where they cannot
/// be enforced (a rootless native sandbox) they are dropped with a notice,
/// as a profile's are, while `--memory`/`--cpus` given as flags
/// (`limit_flags`) are still refused there.
pub fn attach(spec: &mut SandboxSpec, applied: Applied, limit_flags: (bool, bool)) {
    let (memory_flag, cpus_flag) = limit_flags;
    if applied.sets_memory && !memory_flag {
        spec.policy.user_limits.memory_bytes = None;
    }
    if applied.sets_cpus && !cpus_flag {
        spec.policy.user_limits.cpus = None;
    }
    match spec.keep.as_mut() {
        Some(keep) => keep.setup = applied.setup,
        None if !applied.setup.is_empty() => eprintln!(
            "agentkernel: notice: template {}: its setup runs when a kept sandbox is created (--keep, --name, --branch); this one-shot run skips it",
            applied.reference.name
        ),
        None => {}
    }
    spec.template = Some(applied.reference);
}

async fn resolve(spec: &str, config: &Config) -> Result<Template> {
    match template::lookup(spec)? {
        Lookup::Found(t) => Ok(t),
        Lookup::Fetch(gh) => fetch_and_pin(&gh, config).await,
    }
}

async fn fetch_and_pin(gh: &GithubSpec, config: &Config) -> Result<Template> {
    let base = config
        .template_github_base
        .as_deref()
        .unwrap_or(template::DEFAULT_GITHUB_BASE);
    let url = gh.url(base);
    let bytes = fetch(gh, &url, config.template_ca_file.as_deref()).await?;
    template::pin_fetched(gh, &url, bytes)
}

/// GETs `url` over HTTPS (the system's roots plus `[templates] ca_file`).
async fn fetch(gh: &GithubSpec, url: &str, ca_file: Option<&Path>) -> Result<Vec<u8>> {
    let fail = |message: String| Error::Template {
        template: gh.spec(),
        message,
    };
    let mut client = reqwest::Client::builder()
        .https_only(true)
        .timeout(FETCH_TIMEOUT)
        .connect_timeout(Duration::from_secs(5));
    if let Some(ca) = ca_file {
        let pem = std::fs::read(ca).map_err(|e| {
            fail(format!(
                "templates.ca_file {}: {e}; fix the path in the config",
                ca.display()
            ))
        })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            fail(format!(
                "templates.ca_file {}: not PEM certificates ({e}); fix the file",
                ca.display()
            ))
        })?;
        for cert in certs {
            client = client.add_root_certificate(cert);
        }
    }
    let client = client
        .build()
        .map_err(|e| fail(format!("cannot set up HTTPS: {e}")))?;
    let unreachable = |e: reqwest::Error| {
        fail(format!(
            "cannot fetch {url}: {}; check the network, the spec, or [templates] github_base / ca_file",
            root_cause(&e)
        ))
    };
    let mut response = client.get(url).send().await.map_err(unreachable)?;
    let status = response.status();
    if !status.is_success() {
        return Err(fail(format!(
            "{url} answered {status}; check OWNER/REPO/PATH and @REF (the default ref is main)"
        )));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(unreachable)? {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_TEMPLATE_BYTES {
            return Err(fail(format!(
                "{url} is larger than 1 MiB, so not a template; check the path"
            )));
        }
    }
    Ok(body)
}

/// The innermost cause (refused, unknown CA, …): reqwest's Display stops at the outermost.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    cause.to_string()
}

pub async fn template(cmd: TemplateCommand) -> Result<i32> {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    match cmd {
        TemplateCommand::List { json } => list(json),
        TemplateCommand::Show { name } => {
            let config = Config::load(&cwd, None)?;
            let t = resolve(&name, &config).await?;
            let r = &t.reference;
            let mut out = format!(
                "# template {} ({}: {})\n# sha256 {}\n",
                r.name,
                r.source.as_str(),
                r.location,
                r.sha256
            );
            if let Some(commit) = &r.commit {
                out.push_str(&format!("# commit {commit}\n"));
            }
            out.push_str(&t.text);
            super::print_stdout(out.as_bytes())?;
            Ok(0)
        }
        TemplateCommand::Add { spec, name } => add(&cwd, &spec, name).await,
        TemplateCommand::Remove { name } => remove(&name),
        TemplateCommand::Update { name } => update(&cwd, &name).await,
        TemplateCommand::Save { from, env, name } => save(&from, &env, &name),
    }
}

/// One row of `template list`.
#[derive(serde::Serialize)]
struct Row {
    name: String,
    source: &'static str,
    location: String,
    sha256: String,
    #[serde(flatten)]
    summary: template::Summary,
}

fn list(json: bool) -> Result<i32> {
    let mut rows: Vec<Row> = Vec::new();
    let mut push = |t: Template| {
        if !rows.iter().any(|r| r.name == t.reference.name) {
            rows.push(Row {
                summary: template::summary(&t.text),
                name: t.reference.name,
                source: t.reference.source.as_str(),
                location: t.reference.location,
                sha256: t.reference.sha256,
            });
        }
    };
    // Lookup order: a local template hides a built-in of the same name.
    for dir in template::local_dirs() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".toml"))
                    .map(str::to_string)
            })
            .filter(|n| template::valid_name(n))
            .collect();
        names.sort();
        for name in names {
            if let Ok(Lookup::Found(t)) = template::lookup(&name) {
                push(t);
            }
        }
    }
    for (name, _) in template::BUILTINS {
        push(template::builtin(name).expect("listed built-in"));
    }
    for spec in cached_github_specs() {
        if let Ok(Some(t)) = GithubSpec::parse(&spec).and_then(|gh| template::read_cached(&gh)) {
            rows.push(Row {
                summary: template::summary(&t.text),
                name: spec,
                source: Source::Github.as_str(),
                location: t.reference.location,
                sha256: t.reference.sha256,
            });
        }
    }
    let out = if json {
        format!(
            "{:#}\n",
            serde_json::to_value(&rows).expect("rows serialise")
        )
    } else {
        let mut out = format!(
            "{:<24} {:<9} {:<22} DESCRIPTION\n",
            "NAME", "SOURCE", "IMAGE"
        );
        for r in &rows {
            out.push_str(&format!(
                "{:<24} {:<9} {:<22} {}\n",
                r.name,
                r.source,
                r.summary.image.as_deref().unwrap_or("-"),
                r.summary.description.as_deref().unwrap_or("")
            ));
        }
        out
    };
    super::print_stdout(out.as_bytes())?;
    Ok(0)
}

/// The `github:` specs with a pinned copy in the cache.
fn cached_github_specs() -> Vec<String> {
    let mut specs = Vec::new();
    let mut stack = vec![template::github_cache_dir()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.to_string_lossy().ends_with(".pin.json") {
                if let Ok(pin) = std::fs::read(&path)
                    .map_err(|_| ())
                    .and_then(|b| serde_json::from_slice::<template::Pin>(&b).map_err(|_| ()))
                {
                    specs.push(pin.spec);
                }
            }
        }
    }
    specs.sort();
    specs
}

/// Where `template add` and `save` write: the first local directory.
fn local_path(name: &str) -> Result<PathBuf> {
    if !template::valid_name(name) {
        return Err(Error::invalid(
            "template name",
            name,
            "use letters, digits, `-`, `_` and `.` (not first)",
        ));
    }
    let dir = template::local_dirs().into_iter().next().ok_or_else(|| {
        Error::Conflict(
            "no home directory: set HOME (templates are stored in ~/.config/agentkernel/templates)"
                .into(),
        )
    })?;
    let path = dir.join(format!("{name}.toml"));
    if path.exists() {
        return Err(Error::Conflict(format!(
            "template {name} already exists ({}); remove it first with `agentkernel template remove {name}`, or pick another --name",
            path.display()
        )));
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::state(&dir, e))?;
    Ok(path)
}

/// The `github:` spec a local template was added from, kept beside it.
fn source_file(template_path: &Path) -> PathBuf {
    template_path.with_extension("source")
}

async fn add(cwd: &Path, spec: &str, name: Option<String>) -> Result<i32> {
    let config = Config::load(cwd, None)?;
    let t = resolve(spec, &config).await?;
    template::validate(&t)?;
    let name = name.unwrap_or_else(|| t.reference.name.clone());
    let path = local_path(&name)?;
    state::write_atomic_mode(&path, t.text.as_bytes(), 0o644)?;
    if t.reference.source == Source::Github {
        state::write_atomic_mode(
            &source_file(&path),
            format!("{}\n", t.reference.location).as_bytes(),
            0o644,
        )?;
    }
    eprintln!(
        "agentkernel: template {name} added ({}, sha256 {}); use it with --template {name}",
        path.display(),
        t.reference.sha256
    );
    Ok(0)
}

fn remove(name: &str) -> Result<i32> {
    if name.starts_with("github:") {
        let gh = GithubSpec::parse(name)?;
        if !template::forget_cached(&gh)? {
            return Err(Error::Conflict(format!(
                "{name} has not been fetched; `agentkernel template list` shows the fetched ones"
            )));
        }
        eprintln!("agentkernel: removed the cached copy of {}", gh.spec());
        return Ok(0);
    }
    match template::read_local(name)? {
        Some((path, _)) => {
            std::fs::remove_file(&path).map_err(|e| Error::state(&path, e))?;
            let _ = std::fs::remove_file(source_file(&path));
            eprintln!("agentkernel: removed template {name} ({})", path.display());
            Ok(0)
        }
        None if template::builtin(name).is_some() => Err(Error::Conflict(format!(
            "{name} is a built-in template and cannot be removed; a local {name}.toml would take its place"
        ))),
        None => Err(Error::Conflict(format!(
            "no local template {name}; `agentkernel template list` shows them"
        ))),
    }
}

async fn update(cwd: &Path, name: &str) -> Result<i32> {
    let config = Config::load(cwd, None)?;
    let (gh, local) = if name.starts_with("github:") {
        (GithubSpec::parse(name)?, None)
    } else {
        let Some((path, text)) = template::read_local(name)? else {
            return Err(Error::Conflict(format!(
                "{name} is neither a github: spec nor a local template added from one; `agentkernel template list` shows them"
            )));
        };
        let spec = std::fs::read_to_string(source_file(&path)).map_err(|_| {
            Error::Conflict(format!(
                "template {name} ({}) was not added from github:, so there is nothing to fetch",
                path.display()
            ))
        })?;
        (GithubSpec::parse(spec.trim())?, Some((path, text)))
    };
    let old = match &local {
        Some((_, text)) => Some(text.clone()),
        None => template::read_cached(&gh).ok().flatten().map(|t| t.text),
    };
    let fresh = fetch_and_pin(&gh, &config).await?;
    if let Some((path, _)) = &local {
        state::write_atomic_mode(path, fresh.text.as_bytes(), 0o644)?;
    }
    let mut out = String::new();
    match &old {
        Some(old) if *old == fresh.text => out.push_str(&format!(
            "{}: unchanged (sha256 {})\n",
            gh.spec(),
            fresh.reference.sha256
        )),
        Some(old) => {
            out.push_str(&format!(
                "{}: changed, sha256 {} -> {}\n",
                gh.spec(),
                agentkernel_core::trust::sha256_hex(old.as_bytes()),
                fresh.reference.sha256
            ));
            let changes = template::changed_keys(old, &fresh.text);
            if changes.is_empty() {
                out.push_str("  (comments or formatting only)\n");
            }
            for line in changes {
                out.push_str(&format!("  {line}\n"));
            }
        }
        None => out.push_str(&format!(
            "{}: fetched and pinned (sha256 {})\n",
            gh.spec(),
            fresh.reference.sha256
        )),
    }
    super::print_stdout(out.as_bytes())?;
    Ok(0)
}

/// `template save --from SANDBOX NAME`: the kept sandbox's recorded settings
/// as a template. Environment values may be secrets and are never read from
/// the sandbox; only `-e` given here goes in.
fn save(from: &str, env: &[String], name: &str) -> Result<i32> {
    agentkernel_core::names::validate(from)?;
    let record = Store::open_default()
        .load(from)?
        .ok_or_else(|| Error::NoSuchSandbox(from.to_string()))?;
    let mut doc = toml::Table::new();
    let mut sandbox = toml::Table::new();
    sandbox.insert("image".into(), record.image.clone().into());
    sandbox.insert("profile".into(), record.profile.clone().into());
    sandbox.insert(
        "ttl".into(),
        parse::format_duration(Duration::from_secs(record.ttl_secs)).into(),
    );
    let mut vars = toml::Table::new();
    for e in env {
        let (k, v) = parse::env_pair(e)?;
        vars.insert(k, v.into());
    }
    if !vars.is_empty() {
        sandbox.insert("env".into(), vars.into());
    }
    doc.insert("sandbox".into(), sandbox.into());
    if let Some(memory) = record.memory_bytes {
        let mut resources = toml::Table::new();
        resources.insert(
            "memory".into(),
            format!("{}m", memory.div_ceil(1 << 20)).into(),
        );
        doc.insert("resources".into(), resources.into());
    }
    let mut meta = toml::Table::new();
    meta.insert(
        "description".into(),
        format!(
            "Saved from the kept sandbox {from} ({} backend)",
            record.backend
        )
        .into(),
    );
    doc.insert("template".into(), meta.into());
    let text = format!(
        "# Saved by `agentkernel template save --from {from}`.\n{}",
        toml::to_string(&doc).expect("a table serialises")
    );
    let path = local_path(name)?;
    let t = Template {
        reference: TemplateRef {
            name: name.to_string(),
            source: Source::Local,
            location: path.display().to_string(),
            sha256: agentkernel_core::trust::sha256_hex(text.as_bytes()),
            commit: None,
        },
        text,
    };
    template::validate(&t)?;
    state::write_atomic_mode(&path, t.text.as_bytes(), 0o644)?;
    eprintln!(
        "agentkernel: template {name} saved ({}); use it with --template {name}",
        path.display()
    );
    Ok(0)
}
