//! Where agentkernel keeps its state (docs/security.md, "State and images").

use std::path::PathBuf;

/// `$AGENTKERNEL_HOME`, else `/var/lib/agentkernel` for root, else
/// `$XDG_DATA_HOME/agentkernel` (default `~/.local/share/agentkernel`).
pub fn state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("AGENTKERNEL_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/agentkernel");
    }
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("agentkernel");
    }
    home_dir()
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join(".local/share/agentkernel")
}

/// Where `program` is on `$PATH` (`/usr/bin:/bin` when it is unset), if
/// anywhere: how the helpers agentkernel starts (QEMU, slirp4netns, passt)
/// are found.
pub fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

pub fn home_dir() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
}

/// The system's and the user's config files, in increasing precedence.
pub fn user_config_files() -> Vec<PathBuf> {
    let mut files = vec![PathBuf::from("/etc/agentkernel/config.toml")];
    let user = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| home_dir().map(|h| h.join(".config")));
    if let Some(dir) = user {
        files.push(dir.join("agentkernel/config.toml"));
    }
    files
}

/// The project's config file, applied over [`user_config_files`]: it comes
/// with the directory (a cloned repository), so it may loosen the sandbox
/// only once trusted (`crate::trust`).
pub fn project_config_file(dir: &std::path::Path) -> PathBuf {
    dir.join(PROJECT_CONFIG_NAME)
}

pub const PROJECT_CONFIG_NAME: &str = "agentkernel.toml";

/// Where `agentkernel trust` records the project files the user trusts.
pub fn trust_file() -> PathBuf {
    state_dir().join("trusted-configs")
}
