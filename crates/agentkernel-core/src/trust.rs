//! Trust for the project's `./agentkernel.toml`.
//!
//! The project file comes with the directory — often a repository someone
//! else wrote — so it may only tighten the sandbox on its own: a stricter
//! profile, less network, lower limits. Whatever it would loosen compared
//! with what the user gets without it (a weaker profile, host paths outside
//! the project, published ports, higher limits) needs the user's consent:
//! `agentkernel trust` (which records the file's sha256, like direnv's
//! `allow`; a changed file needs trust again), naming the file with
//! `--config`, or giving the setting as a flag.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::io::AsRawFd as _;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::config::{Config, ProjectFile};
use crate::parse::{PortMapping, Volume};
use crate::policy::{Policy, Profile, WorkspaceMode};
use crate::{Error, Result};

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// What the command line decides itself: the project file's say on these
/// does not count, and a volume or port given again as a flag is consented to.
#[derive(Debug, Default)]
pub struct Flags<'a> {
    pub profile: Option<Profile>,
    pub memory: bool,
    pub cpus: bool,
    pub disk: bool,
    pub timeout: bool,
    /// `--no-network`: the file's network switch then does not count.
    pub no_network: bool,
    pub volumes: &'a [Volume],
    pub ports: &'a [PortMapping],
}

/// A limit the project file may set: its key, whether a flag set it, the
/// file's value, the value without the file, and how to print it.
type LimitCheck<'a> = (&'a str, bool, Option<u64>, Option<u64>, fn(u64) -> String);

/// Higher is stricter.
fn strictness(profile: Profile) -> u8 {
    match profile {
        Profile::Permissive => 0,
        Profile::Moderate => 1,
        Profile::Restrictive => 2,
    }
}

/// The settings of `project` that loosen the sandbox the user would get
/// without it (the system's and user's files plus the flags), each rendered
/// as `key value`. Empty when the file only tightens.
///
/// Not counted: `env` (literal values the command could set itself; a file
/// cannot pass the host's variables through), the image, backend (every
/// backend enforces the same policy), workdir, pull, ttl, mirrors (the file
/// already picks the image), and the pool's size and idle time (bounded by
/// `pool.max_total`, which is counted: warm containers cost the whole host).
pub fn loosening(project: &ProjectFile, project_dir: &Path, flags: &Flags) -> Vec<String> {
    let (own, below) = (&project.settings, &project.below);
    let baseline_profile = flags.profile.or(below.profile).unwrap_or_default();
    let baseline = Policy::for_profile(baseline_profile).with_overrides(
        false,
        crate::policy::Limits {
            memory_bytes: below.memory_bytes,
            cpus: below.cpus,
            pids: below.pids,
            disk_bytes: below.disk_bytes,
        },
    );
    let mut found = Vec::new();
    if let (None, Some(p)) = (flags.profile, own.profile) {
        if strictness(p) < strictness(baseline_profile) {
            found.push(format!("sandbox.profile = {p}"));
        }
    }
    // A limit above the one the user gets without the file loosens (none
    // below it: any limit tightens), unless the flag itself sets it.
    let bytes = |b: u64| crate::parse::format_bytes(b);
    let limits: [LimitCheck; 3] = [
        (
            "resources.memory",
            flags.memory,
            own.memory_bytes,
            baseline.limits.memory_bytes,
            bytes,
        ),
        (
            "resources.disk",
            flags.disk,
            own.disk_bytes,
            baseline.limits.disk_bytes,
            bytes,
        ),
        (
            "resources.pids",
            false,
            own.pids.map(|p| p as u64),
            baseline.limits.pids.map(|p| p as u64),
            |p| p.to_string(),
        ),
    ];
    for (key, from_flag, own, baseline, render) in limits {
        if let (false, Some(o), Some(b)) = (from_flag, own, baseline) {
            if o > b {
                found.push(format!("{key} = {}", render(o)));
            }
        }
    }
    if let (false, Some(o), Some(b)) = (flags.cpus, own.cpus, baseline.limits.cpus) {
        if o > b {
            found.push(format!("resources.cpus = {o}"));
        }
    }
    // Roots and addresses for the egress proxy decide where secrets go.
    if let Some(ca_file) = &own.proxy_ca_file {
        found.push(format!("proxy.ca_file = {}", ca_file.display()));
    }
    if !own.proxy_resolve.is_empty() {
        found.push("proxy.resolve".to_string());
    }
    if !flags.timeout {
        if let (Some(o), Some(b)) = (own.timeout, below.timeout) {
            if o > b {
                found.push(format!(
                    "sandbox.timeout = {}",
                    crate::parse::format_duration(o)
                ));
            }
        }
    }
    // Switches a lower file turned off; the project turning them back on
    // loosens. (Under a profile without network, `true` is refused outright.)
    let switched_back_on = [
        ("network.enabled", own.network, below.network),
        ("security.mount_cwd", own.mount_cwd, below.mount_cwd),
        ("security.mount_home", own.mount_home, below.mount_home),
    ];
    for (key, own, below) in switched_back_on {
        if key == "network.enabled" && flags.no_network {
            continue;
        }
        if own == Some(true) && below == Some(false) {
            found.push(format!("{key} = true"));
        }
    }
    // The guest kernel is half of a qemu sandbox's boundary: a repository
    // could pick one with known holes, or modules that do anything.
    if let Some(k) = own
        .qemu_kernel
        .as_ref()
        .filter(|k| below.qemu_kernel.as_ref() != Some(*k))
    {
        found.push(format!("qemu.kernel = {}", k.image.display()));
        if let Some(m) = &k.modules {
            found.push(format!("qemu.modules = {}", m.display()));
        }
    }
    let cap_below = below
        .pool_max_total
        .unwrap_or(crate::config::DEFAULT_POOL_MAX_TOTAL);
    if let Some(cap) = own.pool_max_total.filter(|c| *c > cap_below) {
        found.push(format!("pool.max_total = {cap}"));
    }
    for v in &own.volumes {
        // Inside the project, a read-only view shows nothing new; a writable
        // one loosens unless the user's profile writes through anyway.
        let harmless = v.host.starts_with(project_dir)
            && (v.read_only || baseline.workspace == WorkspaceMode::ReadWrite);
        if !harmless && !flags.volumes.contains(v) {
            found.push(format!(
                "sandbox.volumes {}:{}{}",
                v.host.display(),
                v.container,
                if v.read_only { ":ro" } else { "" }
            ));
        }
    }
    // A copied file is a read-only view of one host file: inside the
    // project (after symlinks) it shows nothing the workspace does not.
    let inside = |p: &Path| matches!((p.canonicalize(), project_dir.canonicalize()), (Ok(p), Ok(d)) if p.starts_with(&d));
    for f in &own.files {
        // A missing source is refused by the read itself (nothing is copied).
        if f.source.exists() && !inside(&f.source) {
            found.push(format!("files.source {}", f.source.display()));
        }
    }
    // The engine's build runs the Dockerfile's steps on the host's engine,
    // with its network and none of the profile's limits.
    if own.build.is_some() {
        found.push("[build] (the engine builds the file's Dockerfile)".to_string());
    }
    // A binding sends a secret of the user's to a host the file chose.
    for b in &own.secret_bindings {
        if !below.secret_bindings.contains(b) {
            found.push(format!("secrets.{} = {:?}", b.key, b.host));
        }
    }
    for p in &own.ports {
        if !flags.ports.contains(p) {
            found.push(format!(
                "network.ports {}:{}:{}/{}",
                p.host_ip,
                p.host_port,
                p.container_port,
                p.protocol.as_str()
            ));
        }
    }
    found
}

/// Refuses `config`'s project file when it loosens the sandbox and the user
/// has not trusted this exact content.
pub fn check(config: &Config, flags: &Flags) -> Result<()> {
    let Some(project) = &config.project else {
        return Ok(());
    };
    let dir = project.path.parent().unwrap_or(Path::new("/"));
    let found = loosening(project, dir, flags);
    if found.is_empty() || TrustStore::open_default().is_trusted(&project.path, &project.sha256)? {
        return Ok(());
    }
    Err(Error::UntrustedConfig {
        path: project.path.display().to_string(),
        settings: found.join(", "),
        dir: shell_word(&dir.to_string_lossy()),
    })
}

/// `path` quoted for a shell prompt, so the suggested command can be pasted.
fn shell_word(path: &str) -> String {
    shlex::try_quote(path).map_or_else(|_| format!("{path:?}"), |q| q.into_owned())
}

/// The trusted project files: `{ "<absolute path>": "<sha256>" }` in
/// [`crate::paths::trust_file`], mode 0600, changed under a lock.
pub struct TrustStore {
    path: PathBuf,
}

impl TrustStore {
    pub fn new(path: PathBuf) -> TrustStore {
        TrustStore { path }
    }

    pub fn open_default() -> TrustStore {
        TrustStore::new(crate::paths::trust_file())
    }

    pub fn entries(&self) -> Result<BTreeMap<String, String>> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                Error::state(
                    &self.path,
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{e}; remove the file and trust again"),
                    ),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(Error::state(&self.path, e)),
        }
    }

    pub fn is_trusted(&self, file: &Path, sha256: &str) -> Result<bool> {
        Ok(self.entries()?.get(&key(file)?).map(String::as_str) == Some(sha256))
    }

    pub fn trust(&self, file: &Path, sha256: &str) -> Result<()> {
        let key = key(file)?;
        self.update(|entries| {
            entries.insert(key, sha256.to_string());
        })
    }

    /// Returns whether `file` was trusted.
    pub fn revoke(&self, file: &Path) -> Result<bool> {
        let key = key(file)?;
        let mut removed = false;
        self.update(|entries| removed = entries.remove(&key).is_some())?;
        Ok(removed)
    }

    fn update(&self, change: impl FnOnce(&mut BTreeMap<String, String>)) -> Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(dir).map_err(|e| Error::state(dir, e))?;
        let lock_path = self.path.with_extension("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| Error::state(&lock_path, e))?;
        // SAFETY: flock on a descriptor we own; released when `lock` closes.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(Error::state(&lock_path, std::io::Error::last_os_error()));
        }
        let mut entries = self.entries()?;
        change(&mut entries);
        let tmp = self.path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(&entries)?)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        };
        write().map_err(|e| Error::state(&self.path, e))
    }
}

/// Trust is bound to the file's absolute path as well as its content.
fn key(file: &Path) -> Result<String> {
    file.to_str().map(str::to_string).ok_or_else(|| {
        Error::invalid(
            "config path",
            file.to_string_lossy(),
            "is not valid UTF-8 and cannot be trusted",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn project(below: &str, own: &str, dir: &Path) -> ProjectFile {
        let path = dir.join("agentkernel.toml");
        let mut b = Config::default();
        b.apply_text(&dir.join("user.toml"), below).unwrap();
        let mut o = Config::default();
        o.apply_text(&path, own).unwrap();
        ProjectFile {
            path,
            sha256: sha256_hex(own.as_bytes()),
            settings: Box::new(o),
            below: Box::new(b),
        }
    }

    #[test]
    fn tightening_is_not_loosening() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        let p = project(
            "",
            "[sandbox]\nprofile = \"restrictive\"\nvolumes = [\"./data:/data:ro\"]\n[network]\nenabled = false\n[resources]\nmemory = \"1g\"\ncpus = 1\n[pool]\nmax_total = 2\nsize = 30\n",
            dir.path(),
        );
        assert_eq!(
            loosening(&p, dir.path(), &Flags::default()),
            Vec::<String>::new()
        );
    }

    #[test]
    fn loosening_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let own = format!(
            "[sandbox]\nprofile = \"permissive\"\nvolumes = [\"{}:/h\", \".:/rw\"]\ntimeout = \"1h\"\n[resources]\nmemory = \"64g\"\n[network]\nports = [\"8080\"]\n[pool]\nmax_total = 50\n",
            outside.path().display()
        );
        let p = project("[sandbox]\ntimeout = \"1m\"\n", &own, dir.path());
        let dir_real = dir.path().canonicalize().unwrap();
        let found = loosening(&p, &dir_real, &Flags::default()).join(", ");
        for key in [
            "sandbox.profile",
            "resources.memory",
            "sandbox.timeout",
            "network.ports",
            "pool.max_total = 50",
            "/h",
            ":/rw",
        ] {
            assert!(found.contains(key), "{key} not in {found}");
        }
        // The same settings as flags are consent.
        let flags = Flags {
            profile: Some(Profile::Permissive),
            memory: true,
            timeout: true,
            volumes: &p.settings.volumes,
            ports: &p.settings.ports,
            ..Flags::default()
        };
        assert_eq!(
            loosening(&p, &dir_real, &flags),
            vec!["pool.max_total = 50".to_string()],
            "no flag sets the pool's cap"
        );
    }

    #[test]
    fn choosing_the_guest_kernel_needs_trust() {
        let dir = tempfile::tempdir().unwrap();
        let own = "[qemu]\nkernel = \"/srv/k/vmlinux\"\nmodules = \"/srv/k/modules\"\n";
        let found = loosening(&project("", own, dir.path()), dir.path(), &Flags::default());
        assert_eq!(
            found,
            vec![
                "qemu.kernel = /srv/k/vmlinux".to_string(),
                "qemu.modules = /srv/k/modules".to_string()
            ]
        );
        // The kernel the user's own file already chose is no loosening.
        let same = project(own, own, dir.path());
        assert!(loosening(&same, dir.path(), &Flags::default()).is_empty());
    }

    #[test]
    fn files_from_outside_the_project_and_builds_need_trust() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let key = outside.path().join("id_ed25519");
        std::fs::write(&key, "host secret").unwrap();
        std::fs::write(dir.path().join("app.env"), "A=1").unwrap();
        // A symlink in the project to the host file counts as the host file.
        std::os::unix::fs::symlink(&key, dir.path().join("innocent")).unwrap();
        let dir_real = dir.path().canonicalize().unwrap();
        let files = |source: &str| {
            let own = format!("[[files]]\nsource = {source:?}\ndest = \"/x\"\n");
            loosening(&project("", &own, dir.path()), &dir_real, &Flags::default())
        };
        assert!(files("app.env").is_empty());
        assert!(files("./missing").is_empty(), "refused when read, not here");
        for source in [
            key.to_str().unwrap(),
            "innocent",
            "../../../../../../etc/hostname",
        ] {
            let found = files(source).join(", ");
            assert!(found.contains("files.source"), "{source}: {found}");
        }
        let build = project("", "[build]\n", dir.path());
        let found = loosening(&build, &dir_real, &Flags::default()).join(", ");
        assert!(found.contains("[build]"), "{found}");
    }

    #[test]
    fn upstream_keys_go_through_the_same_check() {
        let dir = tempfile::tempdir().unwrap();
        let tightening = project(
            "",
            "[sandbox]\nname = \"x\"\n[security]\nprofile = \"restrictive\"\nnetwork = false\nmount_cwd = false\nmount_home = false\n[environment]\nA = \"1\"\n",
            dir.path(),
        );
        assert_eq!(
            loosening(&tightening, dir.path(), &Flags::default()),
            Vec::<String>::new()
        );

        let p = project(
            "[security]\nprofile = \"restrictive\"\nmount_cwd = false\nmount_home = false\n[network]\nenabled = false\n",
            "[security]\nprofile = \"permissive\"\nnetwork = true\nmount_cwd = true\nmount_home = true\n[ports]\n8080 = 80\n[secrets]\nGH_TOKEN = \"evil.example\"\n",
            dir.path(),
        );
        let found = loosening(&p, dir.path(), &Flags::default()).join(", ");
        for key in [
            "sandbox.profile = permissive",
            "network.enabled = true",
            "security.mount_cwd = true",
            "security.mount_home = true",
            "network.ports 127.0.0.1:8080:80/tcp",
            "secrets.GH_TOKEN = \"evil.example\"",
        ] {
            assert!(found.contains(key), "{key} not in {found}");
        }
        let flags = Flags {
            no_network: true,
            ..Flags::default()
        };
        let found = loosening(&p, dir.path(), &flags).join(", ");
        assert!(!found.contains("network.enabled"), "{found}");
    }

    #[test]
    fn a_permissive_user_may_let_the_project_write_through() {
        let dir = tempfile::tempdir().unwrap();
        let dir_real = dir.path().canonicalize().unwrap();
        let p = project(
            "[sandbox]\nprofile = \"permissive\"\n",
            "[sandbox]\nvolumes = [\".:/rw\"]\n",
            &dir_real,
        );
        assert!(loosening(&p, &dir_real, &Flags::default()).is_empty());
    }

    #[test]
    fn trust_is_bound_to_path_and_content() {
        let dir = tempfile::tempdir().unwrap();
        let store = TrustStore::new(dir.path().join("state/trusted-configs"));
        let file = Path::new("/p/agentkernel.toml");
        assert!(!store.is_trusted(file, "aa").unwrap());
        store.trust(file, "aa").unwrap();
        assert!(store.is_trusted(file, "aa").unwrap());
        assert!(!store.is_trusted(file, "bb").unwrap());
        assert!(!store
            .is_trusted(Path::new("/q/agentkernel.toml"), "aa")
            .unwrap());
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join("state/trusted-configs"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(store.revoke(file).unwrap());
        assert!(!store.is_trusted(file, "aa").unwrap());
        assert!(!store.revoke(file).unwrap());
    }
}
