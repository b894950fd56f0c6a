//! Templates (`--template NAME`): an `agentkernel.toml` in the same schema as
//! the config files, applied as one more layer between the files and the
//! flags (config < template < flags) through the same `Config::apply_text`,
//! so every key a config file honours (secrets, allow-lists, …) a template
//! honours too.
//!
//! `NAME` is looked up in this order: an existing path (it contains `/` or
//! ends in `.toml`); a local template `NAME.toml` in the user's template
//! directories; a built-in; `github:OWNER/REPO/PATH[@REF]`, fetched once and
//! then used from a pinned cache (the fetch itself is the binary's: it needs
//! an HTTP client).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::{paths, state, Error, Result};

/// Built-in templates: `(name, text)`, embedded in the binary.
pub const BUILTINS: &[(&str, &str)] = &[
    ("python", include_str!("../templates/python.toml")),
    ("node", include_str!("../templates/node.toml")),
    ("go", include_str!("../templates/go.toml")),
    ("ruby", include_str!("../templates/ruby.toml")),
    ("rust-ci", include_str!("../templates/rust-ci.toml")),
    ("secure", include_str!("../templates/secure.toml")),
    (
        "claude-sandbox",
        include_str!("../templates/claude-sandbox.toml"),
    ),
    (
        "codex-sandbox",
        include_str!("../templates/codex-sandbox.toml"),
    ),
];

/// The raw-content endpoint `github:` templates come from unless
/// `[templates] github_base` names another.
pub const DEFAULT_GITHUB_BASE: &str = "https://raw.githubusercontent.com";

/// Where a template was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    File,
    Local,
    BuiltIn,
    Github,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::File => "file",
            Source::Local => "local",
            Source::BuiltIn => "built-in",
            Source::Github => "github",
        }
    }
}

/// Which template shaped a sandbox: recorded in the spec (and so in
/// `--dry-run` and receipts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateRef {
    pub name: String,
    pub source: Source,
    /// The file's path, `built-in:NAME`, or the `github:` spec.
    pub location: String,
    /// sha256 of the template's exact bytes, lowercase hex.
    pub sha256: String,
    /// `github:` with a 40-hex REF: the commit it is pinned to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
}

/// A template's text and where it came from.
#[derive(Debug, Clone)]
pub struct Template {
    pub reference: TemplateRef,
    pub text: String,
}

impl Template {
    fn new(
        name: &str,
        source: Source,
        location: String,
        text: String,
        commit: Option<String>,
    ) -> Self {
        Template {
            reference: TemplateRef {
                name: name.to_string(),
                source,
                location,
                sha256: crate::trust::sha256_hex(text.as_bytes()),
                commit,
            },
            text,
        }
    }
}

/// `github:OWNER/REPO/PATH[@REF]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GithubSpec {
    pub owner: String,
    pub repo: String,
    /// Path in the repository, always ending in `.toml`.
    pub path: String,
    /// Branch, tag or commit; `main` when absent.
    pub reference: Option<String>,
}

impl GithubSpec {
    pub fn parse(spec: &str) -> Result<GithubSpec> {
        let bad = |why: &str| Error::Template {
            template: spec.to_string(),
            message: format!("{why}; write github:OWNER/REPO/PATH[@REF]"),
        };
        let rest = spec
            .strip_prefix("github:")
            .ok_or_else(|| bad("not a github: spec"))?;
        let (rest, reference) = match rest.rsplit_once('@') {
            Some((r, reference)) => (r, Some(reference.to_string())),
            None => (rest, None),
        };
        let mut parts = rest.splitn(3, '/');
        let (owner, repo, path) = (
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
        );
        let word = |w: &str| {
            !w.is_empty()
                && w != "."
                && w != ".."
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        if !word(owner) || !word(repo) {
            return Err(bad("OWNER and REPO are GitHub names"));
        }
        if path.is_empty() || !path.split('/').all(word) {
            return Err(bad("PATH is a file in the repository"));
        }
        if reference.as_deref().is_some_and(|r| {
            r.is_empty() || r.starts_with('/') || !r.split('/').all(word) || r.contains("..")
        }) {
            return Err(bad("REF is a branch, tag or commit"));
        }
        let path = if path.ends_with(".toml") {
            path.to_string()
        } else {
            format!("{path}.toml")
        };
        Ok(GithubSpec {
            owner: owner.to_string(),
            repo: repo.to_string(),
            path,
            reference,
        })
    }

    /// The canonical spelling (with `.toml`, and `@REF` when given).
    pub fn spec(&self) -> String {
        let mut s = format!("github:{}/{}/{}", self.owner, self.repo, self.path);
        if let Some(r) = &self.reference {
            s.push('@');
            s.push_str(r);
        }
        s
    }

    pub fn url(&self, base: &str) -> String {
        format!(
            "{}/{}/{}/{}/{}",
            base.trim_end_matches('/'),
            self.owner,
            self.repo,
            self.reference.as_deref().unwrap_or("main"),
            self.path
        )
    }

    /// A 40-hex REF names a commit: its content never changes.
    pub fn commit(&self) -> Option<String> {
        self.reference
            .as_ref()
            .filter(|r| r.len() == 40 && r.chars().all(|c| c.is_ascii_hexdigit()))
            .map(|r| r.to_ascii_lowercase())
    }

    fn name(&self) -> String {
        let file = self.path.rsplit('/').next().unwrap_or(&self.path);
        file.trim_end_matches(".toml").to_string()
    }

    fn cache_stem(&self) -> PathBuf {
        let reference = self
            .reference
            .as_deref()
            .unwrap_or("main")
            .replace('/', "%2F");
        github_cache_dir()
            .join(&self.owner)
            .join(&self.repo)
            .join(reference)
            .join(&self.path)
    }
}

/// What the first fetch of a `github:` template recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pin {
    pub spec: String,
    pub url: String,
    pub sha256: String,
    pub commit: Option<String>,
    pub fetched_unix: u64,
}

/// The result of a lookup: a template, or a `github:` one not fetched yet.
pub enum Lookup {
    Found(Template),
    Fetch(GithubSpec),
}

/// The user's template directories, the one `template add` writes first:
/// `~/.config/agentkernel/templates` (or `$XDG_CONFIG_HOME`), then
/// `~/.local/share/agentkernel/templates` (or `$XDG_DATA_HOME`), as upstream.
pub fn local_dirs() -> Vec<PathBuf> {
    let home = paths::home_dir();
    let xdg = |var: &str, default: &str| {
        std::env::var_os(var)
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(default)))
    };
    [
        xdg("XDG_CONFIG_HOME", ".config"),
        xdg("XDG_DATA_HOME", ".local/share"),
    ]
    .into_iter()
    .flatten()
    .map(|d| d.join("agentkernel/templates"))
    .collect()
}

/// `<state>/templates/github`: fetched `github:` templates and their pins.
pub fn github_cache_dir() -> PathBuf {
    paths::state_dir().join("templates/github")
}

/// True for `NAME` that can be a local template's file name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Finds `spec` in upstream's order (see the module docs).
pub fn lookup(spec: &str) -> Result<Lookup> {
    let err = |message: String| Error::Template {
        template: spec.to_string(),
        message,
    };
    if spec.starts_with("github:") {
        let gh = GithubSpec::parse(spec)?;
        return Ok(match read_cached(&gh)? {
            Some(t) => Lookup::Found(t),
            None => Lookup::Fetch(gh),
        });
    }
    if spec.contains('/') || spec.ends_with(".toml") {
        let path = Path::new(spec);
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(format!("{e}; give an existing template file, or a template name (`agentkernel template list`)")))?;
        let name = path
            .file_stem()
            .map_or(spec.to_string(), |s| s.to_string_lossy().into_owned());
        let location = path
            .canonicalize()
            .unwrap_or_else(|_| path.to_path_buf())
            .display()
            .to_string();
        return Ok(Lookup::Found(Template::new(
            &name,
            Source::File,
            location,
            text,
            None,
        )));
    }
    if !valid_name(spec) {
        return Err(err(
            "not a template name (letters, digits, `-`, `_`, `.`), path or github: spec; `agentkernel template list` shows the names".into(),
        ));
    }
    if let Some((path, text)) = read_local(spec)? {
        return Ok(Lookup::Found(Template::new(
            spec,
            Source::Local,
            path.display().to_string(),
            text,
            None,
        )));
    }
    if let Some(t) = builtin(spec) {
        return Ok(Lookup::Found(t));
    }
    Err(err(format!(
        "no such template (looked for {}.toml in {} and among the built-ins); `agentkernel template list` shows what there is",
        spec,
        local_dirs()
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(" and ")
    )))
}

pub fn builtin(name: &str) -> Option<Template> {
    BUILTINS.iter().find(|(n, _)| *n == name).map(|(n, text)| {
        Template::new(
            n,
            Source::BuiltIn,
            format!("built-in:{n}"),
            text.to_string(),
            None,
        )
    })
}

/// A local template `NAME.toml`, from the first directory that has one.
pub fn read_local(name: &str) -> Result<Option<(PathBuf, String)>> {
    for dir in local_dirs() {
        let path = dir.join(format!("{name}.toml"));
        match std::fs::read_to_string(&path) {
            Ok(text) => return Ok(Some((path, text))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::state(&path, e)),
        }
    }
    Ok(None)
}

/// The pinned copy of a `github:` template, checked against its pin.
pub fn read_cached(gh: &GithubSpec) -> Result<Option<Template>> {
    let Some(pin) = read_pin(gh)? else {
        return Ok(None);
    };
    let stem = gh.cache_stem();
    let text = match std::fs::read_to_string(&stem) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::state(&stem, e)),
    };
    let digest = crate::trust::sha256_hex(text.as_bytes());
    if digest != pin.sha256 {
        return Err(Error::Template {
            template: gh.spec(),
            message: format!(
                "the cached copy {} no longer matches its pin (sha256 {} recorded, {digest} now); run `agentkernel template update {}`",
                stem.display(),
                pin.sha256,
                gh.spec()
            ),
        });
    }
    Ok(Some(Template::new(
        &gh.name(),
        Source::Github,
        gh.spec(),
        text,
        pin.commit,
    )))
}

pub fn read_pin(gh: &GithubSpec) -> Result<Option<Pin>> {
    let path = pin_path(gh);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::state(&path, std::io::Error::other(e))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::state(&path, e)),
    }
}

fn pin_path(gh: &GithubSpec) -> PathBuf {
    let stem = gh.cache_stem();
    let mut name = stem.file_name().unwrap_or_default().to_os_string();
    name.push(".pin.json");
    stem.with_file_name(name)
}

/// Checks fetched bytes (UTF-8, TOML, the schema), then caches them with
/// their pin. Later lookups use the cache, offline.
pub fn pin_fetched(gh: &GithubSpec, url: &str, bytes: Vec<u8>) -> Result<Template> {
    let text = String::from_utf8(bytes).map_err(|_| Error::Template {
        template: gh.spec(),
        message: format!("{url} is not UTF-8 text, so not a template; check the path"),
    })?;
    let template = Template::new(&gh.name(), Source::Github, gh.spec(), text, gh.commit());
    validate(&template)?;
    let stem = gh.cache_stem();
    let dir = stem.parent().expect("cache path has a parent");
    state::create_private_dir_all(dir).map_err(|e| Error::state(dir, e))?;
    state::write_atomic(&stem, template.text.as_bytes())?;
    let pin = Pin {
        spec: gh.spec(),
        url: url.to_string(),
        sha256: template.reference.sha256.clone(),
        commit: gh.commit(),
        fetched_unix: state::now_unix(),
    };
    let json = serde_json::to_vec_pretty(&pin).expect("pin serialises");
    state::write_atomic(&pin_path(gh), &json)?;
    Ok(template)
}

/// Forgets a `github:` template's cached copy and pin.
pub fn forget_cached(gh: &GithubSpec) -> Result<bool> {
    let mut removed = false;
    for path in [gh.cache_stem(), pin_path(gh)] {
        match std::fs::remove_file(&path) {
            Ok(()) => removed = true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::state(&path, e)),
        }
    }
    Ok(removed)
}

/// Parses the template as a config file on its own: unknown keys, bad values
/// and a bad `setup` are errors naming the template.
pub fn validate(template: &Template) -> Result<()> {
    let mut config = Config::default();
    apply(&mut config, template).map(|_| ())
}

/// Lays `template` over `config` (the files), before the flags. Returns the
/// template's `setup` command lines.
///
/// Differences from a config file, all deliberate: `[sandbox] name` names
/// the template, not a kept sandbox (upstream's templates set it); a CPU
/// count means "at most", like a profile's (a template sized for a big CI
/// machine still runs on a laptop); `[template]` metadata and `setup` are
/// this layer's own, so no notice says they are ignored.
pub fn apply(config: &mut Config, template: &Template) -> Result<Vec<String>> {
    let reference = &template.reference;
    let as_template_error = |e: Error| match e {
        Error::Config { message, .. } => Error::Template {
            template: reference.location.clone(),
            message: format!(
                "{message}; fix the template (`agentkernel template show {}` prints it)",
                reference.name
            ),
        },
        other => other,
    };
    let table: toml::Table = toml::from_str(&template.text).map_err(|e| Error::Template {
        template: reference.location.clone(),
        message: format!("not TOML: {}", e.message().replace('\n', " ")),
    })?;
    // A template may be fetched from anywhere (`github:`): it names no host
    // file to copy in and runs no build on the host.
    if let Some(key) = ["files", "build"]
        .into_iter()
        .find(|k| table.contains_key(*k))
    {
        return Err(Error::Template {
            template: reference.location.clone(),
            message: format!(
                "[{key}] is not taken from a template (it would read host files or build on the host); put it in agentkernel.toml or a --config file"
            ),
        });
    }
    let setup = setup_lines(&table).map_err(|message| Error::Template {
        template: reference.location.clone(),
        message,
    })?;
    let name = config.name.clone();
    let cpus = config.cpus;
    let notices_before = config.notices.len();
    config
        .apply_text(Path::new(&reference.location), &template.text)
        .map_err(as_template_error)?;
    config.name = name;
    let section = |s: &str| table.get(s).and_then(toml::Value::as_table);
    let sets_cpus =
        section("resources").is_some_and(|r| r.contains_key("cpus") || r.contains_key("vcpus"));
    if sets_cpus {
        let online = std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64);
        config.cpus = config.cpus.map(|c| c.min(online)).or(cpus);
    }
    let own: Vec<String> = ["description", "category", "help_text", "setup"]
        .iter()
        .map(|k| format!("template.{k} "))
        .chain(["sandbox.init_script ", "resources.vcpus "].map(String::from))
        .map(|key| format!("{}: {key}", reference.location))
        .collect();
    let mut index = 0;
    config.notices.retain(|n| {
        index += 1;
        index <= notices_before || !own.iter().any(|o| n.starts_with(o.as_str()))
    });
    Ok(setup)
}

/// `[sandbox] init_script` (upstream's) then `[template] setup` (ours: an
/// array of shell command lines).
fn setup_lines(table: &toml::Table) -> std::result::Result<Vec<String>, String> {
    let get = |section: &str, key: &str| {
        table
            .get(section)
            .and_then(toml::Value::as_table)
            .and_then(|t| t.get(key))
    };
    let mut lines = Vec::new();
    match get("sandbox", "init_script") {
        None => {}
        Some(toml::Value::String(s)) => lines.push(s.clone()),
        Some(_) => return Err("sandbox.init_script: expected a string (a shell script)".into()),
    }
    match get("template", "setup") {
        None => {}
        Some(toml::Value::Array(items)) => {
            for item in items {
                match item.as_str() {
                    Some(s) => lines.push(s.to_string()),
                    None => {
                        return Err(
                            "template.setup: expected an array of strings (shell command lines)"
                                .into(),
                        )
                    }
                }
            }
        }
        Some(_) => {
            return Err("template.setup: expected an array of strings (shell command lines)".into())
        }
    }
    if lines.iter().any(|l| l.contains('\0')) {
        return Err("template.setup: a command line contains a NUL byte".into());
    }
    Ok(lines)
}

/// The command that runs a template's setup in a new kept sandbox: one shell,
/// stopping at the first failing line, its output on stderr (stdout stays
/// the command's own).
pub fn setup_argv(lines: &[String]) -> Vec<String> {
    let mut script = String::from("exec 1>&2\nset -e\n");
    for line in lines {
        script.push_str(line);
        script.push('\n');
    }
    vec!["/bin/sh".into(), "-c".into(), script]
}

/// The error when a new kept sandbox's setup fails (it is then removed).
pub fn setup_failed(name: &str, code: i32) -> String {
    format!("the template's setup failed (exit {code}) in the new sandbox {name}, which was removed; fix the template's setup lines (`agentkernel template show`) and run again")
}

/// What `template list` and `show` print about a template.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub image: Option<String>,
    pub profile: Option<String>,
    pub description: Option<String>,
    pub category: Option<String>,
    pub help_text: Option<String>,
}

pub fn summary(text: &str) -> Summary {
    let Ok(table) = toml::from_str::<toml::Table>(text) else {
        return Summary::default();
    };
    let get = |section: &str, key: &str| {
        table
            .get(section)
            .and_then(toml::Value::as_table)
            .and_then(|t| t.get(key))
            .and_then(toml::Value::as_str)
            .map(|s| s.trim().to_string())
    };
    Summary {
        image: get("sandbox", "image").or_else(|| get("sandbox", "base_image")),
        profile: get("security", "profile").or_else(|| get("sandbox", "profile")),
        description: get("template", "description"),
        category: get("template", "category"),
        help_text: get("template", "help_text"),
    }
}

/// Keys that differ between two template texts, as `+ key = v`, `- key = v`
/// and `~ key: old -> new` lines, in key order.
pub fn changed_keys(old: &str, new: &str) -> Vec<String> {
    let flat = |text: &str| {
        let mut out = std::collections::BTreeMap::new();
        if let Ok(table) = toml::from_str::<toml::Table>(text) {
            flatten("", &toml::Value::Table(table), &mut out);
        }
        out
    };
    let (old, new) = (flat(old), flat(new));
    let mut lines = Vec::new();
    for (k, v) in &old {
        match new.get(k) {
            None => lines.push(format!("- {k} = {v}")),
            Some(n) if n != v => lines.push(format!("~ {k}: {v} -> {n}")),
            _ => {}
        }
    }
    for (k, v) in &new {
        if !old.contains_key(k) {
            lines.push(format!("+ {k} = {v}"));
        }
    }
    lines.sort_by(|a, b| a[2..].cmp(&b[2..]));
    lines
}

fn flatten(
    prefix: &str,
    value: &toml::Value,
    out: &mut std::collections::BTreeMap<String, String>,
) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_is_valid_and_applies() {
        for (name, _) in BUILTINS {
            let t = builtin(name).unwrap();
            let mut config = Config::default();
            let setup = apply(&mut config, &t).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(setup.is_empty(), "{name}");
            assert!(config.image.is_some(), "{name} sets no image");
            assert!(
                !config.notices.iter().any(|n| n.contains("template.")),
                "{name}: {:?}",
                config.notices
            );
            assert!(summary(&t.text).description.is_some(), "{name}");
        }
    }

    #[test]
    fn builtins_mean_what_upstreams_do() {
        let get = |n: &str| {
            let mut c = Config::default();
            apply(&mut c, &builtin(n).unwrap()).unwrap();
            c
        };
        assert_eq!(get("python").image.as_deref(), Some("python:3.12-alpine"));
        assert_eq!(get("node").image.as_deref(), Some("node:22-alpine"));
        assert_eq!(get("rust-ci").image.as_deref(), Some("rust:1.85-alpine"));
        let secure = get("secure");
        assert_eq!(secure.image.as_deref(), Some("alpine:3.20"));
        assert_eq!(secure.profile, Some(crate::policy::Profile::Restrictive));
        assert_eq!(secure.network, Some(false));
        for (n, text) in [
            ("python", "files.pythonhosted.org"),
            ("rust-ci", "index.crates.io"),
            (
                "claude-sandbox",
                "ANTHROPIC_API_KEY = \"api.anthropic.com\"",
            ),
            ("codex-sandbox", "OPENAI_API_KEY = \"api.openai.com\""),
        ] {
            assert!(builtin(n).unwrap().text.contains(text), "{n}");
        }
    }

    #[test]
    fn github_specs() {
        let gh = GithubSpec::parse("github:acme/tpl/dir/py@v1").unwrap();
        assert_eq!(gh.path, "dir/py.toml");
        assert_eq!(gh.spec(), "github:acme/tpl/dir/py.toml@v1");
        assert_eq!(
            gh.url("https://h:1/"),
            "https://h:1/acme/tpl/v1/dir/py.toml"
        );
        assert_eq!(gh.commit(), None);
        let sha = "a".repeat(40);
        let gh = GithubSpec::parse(&format!("github:acme/tpl/x.toml@{sha}")).unwrap();
        assert_eq!(gh.commit(), Some(sha));
        assert_eq!(
            GithubSpec::parse("github:acme/tpl/x")
                .unwrap()
                .url(DEFAULT_GITHUB_BASE),
            "https://raw.githubusercontent.com/acme/tpl/main/x.toml"
        );
        for bad in [
            "github:acme",
            "github:acme/tpl",
            "github:acme/tpl/../x",
            "github:a b/tpl/x",
            "github:acme/tpl/x@",
            "github:acme/tpl/x@../y",
        ] {
            assert!(GithubSpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn template_layer_differs_from_a_file_only_where_documented() {
        let t = Template::new(
            "t",
            Source::File,
            "/t.toml".into(),
            "[sandbox]\nname = \"tpl\"\ninit_script = \"echo a\"\n[resources]\nvcpus = 4096\n[template]\nsetup = [\"echo b\"]\ndescription = \"d\"\nsecret_files = [\"K\"]\n".into(),
            None,
        );
        let mut c = Config {
            name: Some("mine".into()),
            ..Config::default()
        };
        let setup = apply(&mut c, &t).unwrap();
        assert_eq!(setup, vec!["echo a".to_string(), "echo b".to_string()]);
        assert_eq!(c.name.as_deref(), Some("mine"));
        assert!(c.cpus.unwrap() < 4096.0);
        // secret_files is still not acted on: its notice stays.
        assert_eq!(c.notices.len(), 1, "{:?}", c.notices);
        assert!(c.notices[0].contains("template.secret_files"));
    }

    #[test]
    fn bad_templates_name_the_template_and_key() {
        let bad = |text: &str| {
            let t = Template::new("t", Source::File, "/t.toml".into(), text.into(), None);
            let e = validate(&t).unwrap_err().to_string();
            assert!(e.starts_with("template /t.toml: "), "{e}");
            assert!(!e.contains('\n'), "{e}");
            e
        };
        assert!(bad("[sandbox]\nimgae = \"x\"\n").contains("sandbox.imgae"));
        assert!(bad("[resources]\nmemory = \"lots\"\n").contains("resources.memory"));
        assert!(bad("[template]\nsetup = \"echo\"\n").contains("template.setup"));
        assert!(bad("<html>").contains("not TOML"));
    }

    #[test]
    fn templates_section_of_the_config() {
        let mut c = Config::default();
        c.apply_text(
            Path::new("/etc/a.toml"),
            "[templates]\ngithub_base = \"https://mirror.example/raw/\"\nca_file = \"ca.pem\"\n",
        )
        .unwrap();
        assert_eq!(
            c.template_github_base.as_deref(),
            Some("https://mirror.example/raw")
        );
        assert_eq!(c.template_ca_file, Some(PathBuf::from("/etc/ca.pem")));
        let e = Config::default()
            .apply_text(
                Path::new("/etc/a.toml"),
                "[templates]\ngithub_base = \"http://mirror.example\"\n",
            )
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("templates.github_base") && e.contains("https://"),
            "{e}"
        );
    }

    #[test]
    fn changed_keys_lists_each_difference() {
        let lines = changed_keys(
            "[sandbox]\nimage = \"a\"\n[resources]\ncpus = 1\n",
            "[sandbox]\nimage = \"b\"\n[network]\nenabled = false\n",
        );
        assert_eq!(
            lines,
            vec![
                "+ network.enabled = false",
                "- resources.cpus = 1",
                "~ sandbox.image: \"a\" -> \"b\"",
            ]
        );
    }

    #[test]
    fn setup_stops_at_the_first_failure() {
        let argv = setup_argv(&["true".into(), "false".into(), "echo never".into()]);
        let out = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(out.stdout.is_empty() && out.stderr.is_empty());
    }
}
