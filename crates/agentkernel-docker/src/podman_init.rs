//! Which init Podman puts in agentkernel's containers (all of them are
//! created with `init`).
//!
//! Podman bind-mounts `[containers] init_path` from containers.conf (default
//! `/usr/libexec/podman/catatonit`) into the container as `/run/podman-init`.
//! Debian's `apt-get install podman` recommends catatonit *or* tini and
//! usually brings tini, so there every container fails with "container-init
//! binary not found". When the configured init is missing, agentkernel's
//! private `podman system service` gets a containers.conf of its own — the
//! host's files merged the way Podman merges them, plus an `init_path` that
//! exists — through `CONTAINERS_CONF` (Podman 4.3 has no
//! `CONTAINERS_CONF_OVERRIDE`; `CONTAINERS_CONF` replaces the host's files,
//! hence the merge).
//!
//! The two inits take different arguments when they are not PID 1 (an exec):
//! tini needs `-s` to become a subreaper (and warns without it), catatonit
//! becomes one by itself and refuses `-s`.

use std::path::{Path, PathBuf};

use agentkernel_core::Error;

/// Forces the init the private service uses (a path on the host), whatever
/// containers.conf says; for tests and for administrators. The private
/// service started with it lives in a directory of its own.
pub const FORCE_ENV: &str = "AGENTKERNEL_PODMAN_INIT";

/// Podman's built-in default `init_path`.
pub const PODMAN_DEFAULT_INIT: &str = "/usr/libexec/podman/catatonit";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitKind {
    Catatonit,
    Tini,
}

impl InitKind {
    pub fn name(self) -> &'static str {
        match self {
            InitKind::Catatonit => "catatonit",
            InitKind::Tini => "tini",
        }
    }

    pub fn from_name(name: &str) -> Option<InitKind> {
        [InitKind::Catatonit, InitKind::Tini]
            .into_iter()
            .find(|k| k.name() == name)
    }

    /// What follows `/run/podman-init` when it is not the container's PID 1.
    pub fn exec_args(self) -> &'static [&'static str] {
        match self {
            InitKind::Catatonit => &["--"],
            InitKind::Tini => &["-s", "--"],
        }
    }

    /// Which init the binary at `path` is: catatonit answers `--version`
    /// with "tini version 0.1.7_catatonit", tini (and docker-init) with
    /// "tini version 0.19.0".
    pub fn of(path: &Path) -> InitKind {
        let version = std::process::Command::new(path)
            .arg("--version")
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if version.contains("catatonit") || (version.is_empty() && name.contains("catatonit")) {
            InitKind::Catatonit
        } else if version.contains("tini") || name.contains("tini") || name == "docker-init" {
            InitKind::Tini
        } else {
            InitKind::Catatonit
        }
    }
}

/// The init a Podman service uses for our containers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Init {
    pub path: PathBuf,
    pub kind: InitKind,
    /// Whether the service must be told (the configured init is not it).
    pub override_config: bool,
}

/// Inits Podman can use, best first: catatonit where distributions put it,
/// then static tini builds (the init is bind-mounted into images that may
/// have no glibc), then Debian's dynamically linked tini.
pub fn candidates() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = [
        PODMAN_DEFAULT_INIT,
        "/usr/libexec/catatonit/catatonit",
        "/usr/bin/catatonit",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    for name in ["tini-static", "docker-init", "tini"] {
        out.extend(crate::podman::find_in_path(name));
    }
    out.push(PathBuf::from("/usr/libexec/docker/docker-init"));
    out
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The init to use: the forced one, else the configured one when it exists,
/// else the first of `candidates` that exists.
pub fn pick(
    forced: Option<PathBuf>,
    configured: &Path,
    candidates: &[PathBuf],
) -> Result<Init, Error> {
    if let Some(path) = forced {
        let kind = InitKind::of(&path);
        return Ok(Init {
            path,
            kind,
            override_config: true,
        });
    }
    if is_executable(configured) {
        return Ok(Init {
            path: configured.to_path_buf(),
            kind: InitKind::of(configured),
            override_config: false,
        });
    }
    let found = candidates.iter().find(|p| is_executable(p)).ok_or_else(|| {
        Error::BackendUnavailable {
            backend: "podman".into(),
            why: format!(
                "Podman's container init {} is missing and no other (catatonit, tini-static, tini, docker-init) is installed",
                configured.display()
            ),
            fix: "install one: `apt-get install catatonit` (or tini)".into(),
        }
    })?;
    Ok(Init {
        path: found.clone(),
        kind: InitKind::of(found),
        override_config: true,
    })
}

/// The init for a private service on this host.
pub fn choose() -> Result<Init, Error> {
    let forced = std::env::var_os(FORCE_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let configured = configured_init_path().unwrap_or_else(|| PODMAN_DEFAULT_INIT.into());
    pick(forced, &configured, &candidates())
}

/// The containers.conf files Podman 4.x reads, in order (later keys win).
fn config_files() -> Vec<PathBuf> {
    if let Some(only) = std::env::var_os("CONTAINERS_CONF").filter(|v| !v.is_empty()) {
        return vec![PathBuf::from(only)];
    }
    let mut files = vec![
        PathBuf::from("/usr/share/containers/containers.conf"),
        PathBuf::from("/etc/containers/containers.conf"),
    ];
    files.extend(drop_ins(Path::new("/etc/containers/containers.conf.d")));
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let config_home = std::env::var_os("XDG_CONFIG_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")));
        if let Some(home) = config_home {
            files.push(home.join("containers/containers.conf"));
            files.extend(drop_ins(&home.join("containers/containers.conf.d")));
        }
    }
    files
}

fn drop_ins(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "conf"))
        .collect();
    files.sort();
    files
}

/// Merges `overlay` into `base` as Podman does: tables merge key by key,
/// anything else is replaced.
pub fn merge(base: &mut toml::Table, overlay: toml::Table) {
    for (key, value) in overlay {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(into)), toml::Value::Table(from)) => merge(into, from),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// The host's containers.conf, merged; files that are missing are skipped.
fn merged_config() -> Result<toml::Table, Error> {
    let mut merged = toml::Table::new();
    for file in config_files() {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| Error::BackendUnavailable {
                    backend: "podman".into(),
                    why: format!(
                        "{} is not valid TOML: {}",
                        file.display(),
                        e.message().replace('\n', " ")
                    ),
                    fix: "fix that file (Podman reads it too)".into(),
                })?;
        merge(&mut merged, table);
    }
    Ok(merged)
}

/// Podman 4.3's API service takes the init from `[engine] init_path`; its
/// CLI (and the documentation) from `[containers] init_path`.
const INIT_PATH_SECTIONS: [&str; 2] = ["engine", "containers"];

fn configured_init_path() -> Option<PathBuf> {
    let config = merged_config().ok()?;
    INIT_PATH_SECTIONS.iter().find_map(|section| {
        config
            .get(*section)?
            .get("init_path")?
            .as_str()
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
    })
}

/// Writes the host's merged containers.conf with `init_path` set to
/// `dir/containers.conf`, for the service's `CONTAINERS_CONF`.
pub fn write_service_config(dir: &Path, init: &Init) -> Result<PathBuf, Error> {
    let mut config = merged_config()?;
    for section in INIT_PATH_SECTIONS {
        let table = config
            .entry(section)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::Table(table) = table {
            table.insert(
                "init_path".into(),
                toml::Value::String(init.path.display().to_string()),
            );
        }
    }
    let path = dir.join("containers.conf");
    let text = format!(
        "# Written by agentkernel for its private `podman system service`: the host's\n\
         # containers.conf with an init_path that exists on this host.\n{}",
        toml::to_string(&config).map_err(|e| Error::state(&path, std::io::Error::other(e)))?
    );
    std::fs::write(&path, text).map_err(|e| Error::state(&path, e))?;
    Ok(path)
}

/// The one line for Podman's "container-init binary not found on the host:
/// stat PATH: …" (a service whose containers.conf names a missing init).
pub fn missing_init_error(message: &str) -> Option<Error> {
    let rest = message
        .split_once("container-init binary not found on the host: stat ")?
        .1;
    let path = rest.split(':').next().unwrap_or(rest);
    Some(Error::BackendUnavailable {
        backend: "podman".into(),
        why: format!("Podman's container init {path} does not exist"),
        fix: "install catatonit or tini (`apt-get install catatonit`), or point init_path in containers.conf at one that exists".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn executable(dir: &Path, name: &str, script: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "ak-init-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_missing_configured_init_falls_back_to_tini() {
        let dir = tempdir();
        let tini = executable(&dir, "tini", "echo 'tini version 0.19.0'");
        let missing = dir.join("catatonit");
        let init = pick(None, &missing, &[missing.clone(), tini.clone()]).unwrap();
        assert_eq!(init.path, tini);
        assert_eq!(init.kind, InitKind::Tini);
        assert!(init.override_config);
        assert_eq!(init.kind.exec_args(), ["-s", "--"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_existing_configured_init_is_left_alone() {
        let dir = tempdir();
        let catatonit = executable(&dir, "catatonit", "echo 'tini version 0.1.7_catatonit'");
        let tini = executable(&dir, "tini", "echo 'tini version 0.19.0'");
        let init = pick(None, &catatonit, &[tini]).unwrap();
        assert_eq!(init.path, catatonit);
        assert_eq!(init.kind, InitKind::Catatonit);
        assert!(!init.override_config);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn no_init_at_all_is_one_line_naming_the_package() {
        let dir = tempdir();
        let missing = dir.join("catatonit");
        let not_executable = dir.join("tini");
        std::fs::write(&not_executable, "").unwrap();
        let e = pick(None, &missing, &[missing.clone(), not_executable])
            .unwrap_err()
            .to_string();
        assert!(!e.contains('\n'), "{e}");
        assert!(e.contains("apt-get install catatonit"), "{e}");
        assert!(e.contains(&missing.display().to_string()), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn later_files_win_key_by_key() {
        let mut base: toml::Table = "[containers]\ninit_path = \"/a\"\nlog_driver = \"k8s-file\"\n[engine]\nruntime = \"crun\"\n"
            .parse()
            .unwrap();
        merge(
            &mut base,
            "[containers]\ninit_path = \"/b\"\n".parse().unwrap(),
        );
        assert_eq!(base["containers"]["init_path"].as_str(), Some("/b"));
        assert_eq!(base["containers"]["log_driver"].as_str(), Some("k8s-file"));
        assert_eq!(base["engine"]["runtime"].as_str(), Some("crun"));
    }

    #[test]
    fn podmans_missing_init_message_becomes_one_line() {
        let e = missing_init_error(
            "container-init binary not found on the host: stat /usr/libexec/podman/catatonit: no such file or directory",
        )
        .unwrap()
        .to_string();
        assert!(
            e.contains("/usr/libexec/podman/catatonit does not exist"),
            "{e}"
        );
        assert!(e.contains("apt-get install catatonit"), "{e}");
        assert!(missing_init_error("something else").is_none());
    }
}
