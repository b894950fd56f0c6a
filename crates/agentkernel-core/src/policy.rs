//! Security profiles and the backend-neutral [`Policy`] they resolve to.
//!
//! This is the one place that decides what `permissive`, `moderate` and
//! `restrictive` mean; backends translate a `Policy`, so the same profile means
//! the same thing everywhere.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    Permissive,
    #[default]
    Moderate,
    Restrictive,
}

impl Profile {
    pub const NAMES: [&'static str; 3] = ["permissive", "moderate", "restrictive"];

    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Permissive => "permissive",
            Profile::Moderate => "moderate",
            Profile::Restrictive => "restrictive",
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Case-insensitive, as upstream's files and users write it (`Moderate`).
impl FromStr for Profile {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "permissive" => Ok(Profile::Permissive),
            "moderate" => Ok(Profile::Moderate),
            "restrictive" => Ok(Profile::Restrictive),
            _ => Err(Error::invalid(
                "profile",
                s,
                "expected permissive, moderate or restrictive",
            )),
        }
    }
}

/// How the current directory appears at `/workspace`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkspaceMode {
    /// Writes go through to the host directory.
    ReadWrite,
    /// The sandbox sees the directory and may change it; the host copy never changes.
    CopyOnWrite,
    ReadOnly,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Capabilities {
    /// The container engine's default set.
    EngineDefault,
    /// The default set minus these.
    DefaultWithout(Vec<String>),
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Seccomp {
    /// Docker's default denials plus io_uring, AF_VSOCK and TIOCSTI, from
    /// the one table in `crate::seccomp` (the name predates that table).
    EngineDefault,
    /// The default filter's denials plus ptrace, mount, bpf, keyctl,
    /// perf_event_open, userfaultfd, unshare and setns.
    Restrictive,
}

#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    pub cpus: Option<f64>,
    pub pids: Option<i64>,
    /// Cap of each writable layer (the root's and the copy-on-write
    /// workspace's): writes past it fail with ENOSPC inside the sandbox, so a
    /// command can never fill the host's disk.
    #[serde(default)]
    pub disk_bytes: Option<u64>,
}

/// Default disk cap of the moderate profile.
pub const MODERATE_DISK_BYTES: u64 = 10 << 30;
/// Default disk cap of the restrictive profile.
pub const RESTRICTIVE_DISK_BYTES: u64 = 1 << 30;

/// What a profile (plus overriding flags) resolves to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    pub profile: Profile,
    pub network: bool,
    pub read_only_root: bool,
    /// Size of the tmpfs at `/tmp` when the root is read-only.
    pub tmp_size_bytes: u64,
    pub workspace: WorkspaceMode,
    pub mount_home_read_only: bool,
    pub capabilities: Capabilities,
    pub no_new_privileges: bool,
    pub seccomp: Seccomp,
    pub limits: Limits,
    /// The limits the user set (flags or config files), as opposed to the
    /// profile's defaults: a backend that cannot enforce one of these must
    /// refuse the run, while a default it cannot enforce is dropped with a
    /// notice. (Comparing values with the defaults cannot tell `--memory 2g`
    /// under moderate from no flag at all.)
    #[serde(default)]
    pub user_limits: Limits,
}

/// Capabilities the moderate profile removes from the engine's default set.
pub const MODERATE_DROPPED_CAPS: [&str; 4] = ["NET_RAW", "MKNOD", "AUDIT_WRITE", "SYS_CHROOT"];

impl Policy {
    pub fn for_profile(profile: Profile) -> Policy {
        match profile {
            Profile::Permissive => Policy {
                profile,
                network: true,
                read_only_root: false,
                tmp_size_bytes: 0,
                workspace: WorkspaceMode::ReadWrite,
                mount_home_read_only: true,
                capabilities: Capabilities::EngineDefault,
                no_new_privileges: false,
                seccomp: Seccomp::EngineDefault,
                limits: Limits::default(),
                user_limits: Limits::default(),
            },
            Profile::Moderate => Policy {
                profile,
                network: true,
                read_only_root: false,
                tmp_size_bytes: 0,
                workspace: WorkspaceMode::CopyOnWrite,
                mount_home_read_only: false,
                capabilities: Capabilities::DefaultWithout(
                    MODERATE_DROPPED_CAPS
                        .iter()
                        .map(|c| c.to_string())
                        .collect(),
                ),
                no_new_privileges: true,
                seccomp: Seccomp::EngineDefault,
                limits: Limits {
                    memory_bytes: Some(2 << 30),
                    cpus: Some(2.0),
                    pids: Some(4096),
                    disk_bytes: Some(MODERATE_DISK_BYTES),
                },
                user_limits: Limits::default(),
            },
            Profile::Restrictive => Policy {
                profile,
                network: false,
                read_only_root: true,
                tmp_size_bytes: 64 << 20,
                workspace: WorkspaceMode::ReadOnly,
                mount_home_read_only: false,
                capabilities: Capabilities::None,
                no_new_privileges: true,
                seccomp: Seccomp::Restrictive,
                limits: Limits {
                    memory_bytes: Some(512 << 20),
                    cpus: Some(1.0),
                    pids: Some(512),
                    disk_bytes: Some(RESTRICTIVE_DISK_BYTES),
                },
                user_limits: Limits::default(),
            },
        }
    }

    /// Applies user overrides. Limits may be set under any profile; the network
    /// can only be turned off, never on, by a flag (a profile's promise of no
    /// network must not be undone by a stray config line).
    pub fn with_overrides(mut self, no_network: bool, limits: Limits) -> Policy {
        if no_network {
            self.network = false;
        }
        if limits.memory_bytes.is_some() {
            self.limits.memory_bytes = limits.memory_bytes;
        }
        if limits.cpus.is_some() {
            self.limits.cpus = limits.cpus;
        }
        if limits.pids.is_some() {
            self.limits.pids = limits.pids;
        }
        if limits.disk_bytes.is_some() {
            self.limits.disk_bytes = limits.disk_bytes;
        }
        self.user_limits = limits;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_match_the_spec_table() {
        let p = Policy::for_profile(Profile::Permissive);
        assert!(p.network && !p.read_only_root && p.mount_home_read_only);
        assert_eq!(p.workspace, WorkspaceMode::ReadWrite);
        assert_eq!(p.limits, Limits::default());

        let m = Policy::for_profile(Profile::Moderate);
        assert!(m.network && m.no_new_privileges && !m.mount_home_read_only);
        assert_eq!(m.workspace, WorkspaceMode::CopyOnWrite);
        assert_eq!(m.limits.memory_bytes, Some(2 << 30));
        assert_eq!(m.limits.pids, Some(4096));

        let r = Policy::for_profile(Profile::Restrictive);
        assert!(!r.network && r.read_only_root && r.no_new_privileges);
        assert_eq!(r.capabilities, Capabilities::None);
        assert_eq!(r.seccomp, Seccomp::Restrictive);
        assert_eq!(r.workspace, WorkspaceMode::ReadOnly);
        assert_eq!(r.limits.memory_bytes, Some(512 << 20));
        assert_eq!(r.limits.disk_bytes, Some(1 << 30));
        assert_eq!(
            p.limits.disk_bytes, None,
            "permissive: capped only with --disk"
        );
        assert_eq!(m.limits.disk_bytes, Some(10 << 30));
    }

    #[test]
    fn overrides_only_narrow_the_network() {
        let p = Policy::for_profile(Profile::Permissive).with_overrides(true, Limits::default());
        assert!(!p.network);
        let r = Policy::for_profile(Profile::Restrictive).with_overrides(false, Limits::default());
        assert!(!r.network);
        let m = Policy::for_profile(Profile::Moderate).with_overrides(
            false,
            Limits {
                memory_bytes: Some(64 << 20),
                cpus: None,
                pids: Some(10),
                disk_bytes: None,
            },
        );
        assert_eq!(m.limits.memory_bytes, Some(64 << 20));
        assert_eq!(m.limits.cpus, Some(2.0));
        assert_eq!(m.limits.pids, Some(10));
        assert_eq!(m.limits.disk_bytes, Some(MODERATE_DISK_BYTES));
        assert_eq!(
            m.user_limits.disk_bytes, None,
            "the profile's own cap is not the user's"
        );
        assert_eq!(m.user_limits.memory_bytes, Some(64 << 20));
        let d = Policy::for_profile(Profile::Permissive).with_overrides(
            false,
            Limits {
                disk_bytes: Some(1 << 30),
                ..Limits::default()
            },
        );
        assert_eq!(d.limits.disk_bytes, Some(1 << 30));
        assert_eq!(d.user_limits.disk_bytes, Some(1 << 30));
    }

    #[test]
    fn profile_names_parse() {
        for name in Profile::NAMES {
            assert_eq!(name.parse::<Profile>().unwrap().as_str(), name);
        }
        assert!("strict".parse::<Profile>().is_err());
        assert_eq!("Moderate".parse::<Profile>().unwrap(), Profile::Moderate);
        assert_eq!(
            "RESTRICTIVE".parse::<Profile>().unwrap(),
            Profile::Restrictive
        );
    }
}
