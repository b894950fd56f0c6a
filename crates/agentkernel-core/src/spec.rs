//! [`SandboxSpec`]: the one backend-neutral description of a sandbox.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use std::time::Duration;

use crate::parse::{PortMapping, Volume};
use crate::policy::Policy;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum PullPolicy {
    #[default]
    Missing,
    Always,
    Never,
}

/// Case-insensitive, like every other choice of a value.
impl std::str::FromStr for PullPolicy {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "missing" => Ok(PullPolicy::Missing),
            "always" => Ok(PullPolicy::Always),
            "never" => Ok(PullPolicy::Never),
            _ => Err(crate::Error::invalid(
                "pull policy",
                s,
                "expected missing, always or never",
            )),
        }
    }
}

/// A sandbox that outlives its first command.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Keep {
    pub name: String,
    pub ttl: Duration,
    /// `--branch`: reuse the sandbox if it exists.
    pub reuse: bool,
    /// A template's `setup`: shell command lines run once, in order, when the
    /// sandbox is created (never when `--branch` reuses it).
    #[serde(default)]
    pub setup: Vec<String>,
}

/// The host directory shown at `/workspace`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Workspace {
    pub host: PathBuf,
    pub path_in_sandbox: String,
}

pub const WORKSPACE_PATH: &str = "/workspace";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxSpec {
    pub image: String,
    pub pull: PullPolicy,
    pub policy: Policy,
    pub workspace: Option<Workspace>,
    /// Permissive profile: the host's home, read-only, at the same path.
    pub home: Option<PathBuf>,
    pub volumes: Vec<Volume>,
    pub ports: Vec<PortMapping>,
    pub keep: Option<Keep>,
    /// Secrets through the host-side proxy and the egress allow-list; `None`
    /// when neither was asked for (nothing is started).
    #[serde(default)]
    pub egress: Option<crate::egress::EgressSpec>,
    /// `--template`: which template shaped this sandbox, and its digest.
    #[serde(default)]
    pub template: Option<crate::template::TemplateRef>,
    /// Files that carry agentkernel's labels (`agentkernel.*`) are backend concerns;
    /// this is the first command to run.
    pub exec: ExecRequest,
}

/// One command to run in a sandbox.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub workdir: Option<String>,
    pub tty: bool,
    pub timeout: Option<Duration>,
    /// Run as this user (`exec --sudo`: `0:0`) instead of the image's.
    #[serde(default)]
    pub user: Option<String>,
}

/// How a command ended, before it becomes agentkernel's exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Exited(i32),
    /// Killed by the memory limit (exit 137, named on stderr).
    OutOfMemory,
    /// `--timeout` expired and the process tree was killed (exit 124).
    TimedOut,
}

impl Outcome {
    pub fn exit_code(self) -> i32 {
        match self {
            Outcome::Exited(c) => c,
            Outcome::OutOfMemory => 137,
            Outcome::TimedOut => 124,
        }
    }

    /// The signal that ended the command, as every backend's init reports
    /// one: exit status 128+N (tini, catatonit, native's init). A command
    /// that itself exits with 128+N reads the same; the status is the fact.
    pub fn signal(self) -> Option<i32> {
        match self {
            Outcome::Exited(c) if c > 128 && c <= 128 + 64 => Some(c - 128),
            Outcome::OutOfMemory => Some(9),
            _ => None,
        }
    }
}

/// Everything observed about one command's run, beyond how it ended: what a
/// receipt signs. Gathered only when asked for (`crate::observe`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    /// `None` when agentkernel failed before the command ended.
    pub outcome: Option<Outcome>,
    /// The image's resolved content address (`name@sha256:…` from a
    /// registry, else the engine's image ID); `None` for `--image host`.
    pub image_digest: Option<String>,
    pub started_at: std::time::SystemTime,
    pub ended_at: std::time::SystemTime,
    pub output: Option<OutputDigests>,
}

/// sha256 and length of a byte stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamDigest {
    pub sha256: String,
    pub bytes: u64,
}

/// The command's stdout and stderr, each and as written in turn (a terminal
/// run has only stdout: the terminal merges them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputDigests {
    pub stdout: StreamDigest,
    pub stderr: StreamDigest,
    pub combined: StreamDigest,
}

/// What `run` says on stderr after the first command of a kept sandbox.
pub fn kept_message(name: &str, ttl: Duration, reused: bool) -> String {
    format!(
        "agentkernel: sandbox {name} kept{} ({}); `agentkernel exec {name} -- CMD` runs in it",
        if reused { ", reused" } else { "" },
        if ttl.is_zero() {
            "never expires".to_string()
        } else {
            format!(
                "expires {} after last use",
                crate::parse::format_duration(ttl)
            )
        },
    )
}
