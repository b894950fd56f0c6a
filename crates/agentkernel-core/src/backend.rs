//! The backend interface: what a sandbox backend is (`BackendKind`), what it
//! can enforce on this machine (`Capabilities`), and what it does (`Backend`).
//!
//! The split follows Cloud Hypervisor's `Hypervisor`/`Vm` and youki's
//! `CgroupManager`: the CLI decides *what* runs (a [`SandboxSpec`], resolved
//! once), a backend decides *how*. The CLI holds a `Box<dyn Backend>` from the
//! registry (the binary's `backend.rs`) and never asks which backend it is.
//! Policy is decided here, once, from the backend's answer: [`admit`] refuses
//! before anything is pulled or created whatever the backend cannot honour.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::egress::{EgressSpec, SecretValues};
use crate::policy::WorkspaceMode;
use crate::spec::{ExecRequest, Outcome, SandboxSpec};
use crate::state::SandboxRecord;
use crate::{Error, Result};

/// Every backend agentkernel names. Stored in records as the same lowercase
/// strings it always was (`"native"`, `"docker"`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Native,
    Docker,
    Podman,
    Firecracker,
    Qemu,
    Apple,
}

impl BackendKind {
    pub const ALL: [BackendKind; 6] = [
        BackendKind::Native,
        BackendKind::Docker,
        BackendKind::Podman,
        BackendKind::Firecracker,
        BackendKind::Qemu,
        BackendKind::Apple,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Native => "native",
            BackendKind::Docker => "docker",
            BackendKind::Podman => "podman",
            BackendKind::Firecracker => "firecracker",
            BackendKind::Qemu => "qemu",
            BackendKind::Apple => "apple",
        }
    }

    /// A backend by name, in any case (`-B Docker` is docker).
    pub fn parse(name: &str) -> Result<BackendKind> {
        BackendKind::ALL
            .into_iter()
            .find(|b| b.name().eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                Error::invalid(
                    "backend",
                    name,
                    "choose one of native, docker, podman, firecracker, qemu, apple",
                )
            })
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

impl FromStr for BackendKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<BackendKind> {
        BackendKind::parse(s)
    }
}

/// Whether a backend can do one thing here; when it cannot, why (naming the
/// backend, e.g. "on a rootless native sandbox") and what to do instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Support {
    Yes,
    No { why: String, fix: String },
}

impl Support {
    pub fn no(why: impl Into<String>, fix: impl Into<String>) -> Support {
        Support::No {
            why: why.into(),
            fix: fix.into(),
        }
    }

    /// `Err` naming `feature`, why not, and the fix, when unsupported.
    fn require(&self, feature: &str) -> Result<()> {
        match self {
            Support::Yes => Ok(()),
            Support::No { why, fix } => Err(Error::not_supported_hint(
                format!("{feature} {why}"),
                fix.clone(),
            )),
        }
    }
}

/// The egress proxy, where the spec needs one: refused (one line) on a
/// backend without it. Apart from `admit` because `run --dry-run` shows the
/// bindings and allow-list it would use on any backend.
pub fn admit_egress(caps: &Capabilities, spec: &SandboxSpec) -> Result<()> {
    if spec.egress.as_ref().is_some_and(EgressSpec::needs_proxy) {
        caps.egress_proxy
            .require("the egress proxy (--allow-host, -S, --egress-log)")?;
    }
    Ok(())
}

/// What a backend can enforce on this machine, as data. `admit` turns it
/// into refusals (what the user asked for and cannot have) and notices
/// (a profile default that is not enforced here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    pub memory_limit: Support,
    pub cpu_limit: Support,
    /// A `--disk` cap on the sandbox's writable root (not only on tmpfs).
    pub disk_cap_root: Support,
    /// A `--disk` cap on the copy-on-write workspace's upper layer.
    pub disk_cap_workspace: Support,
    pub published_ports: Support,
    /// Publishing on an IPv6 host address.
    pub ipv6_ports: Support,
    /// Any network at all (e.g. rootless native needs slirp4netns).
    pub network: Support,
    /// The host-side egress proxy (`SandboxSpec::egress`).
    pub egress_proxy: Support,
    /// The sandbox runs without root on the host.
    pub rootless: bool,
    /// One-shot runs may be served by warm, pre-created sandboxes.
    pub warm_pool: bool,
}

impl Capabilities {
    /// Everything: the base a backend states its exceptions against.
    pub fn all() -> Capabilities {
        Capabilities {
            memory_limit: Support::Yes,
            cpu_limit: Support::Yes,
            disk_cap_root: Support::Yes,
            disk_cap_workspace: Support::Yes,
            published_ports: Support::Yes,
            ipv6_ports: Support::Yes,
            network: Support::Yes,
            egress_proxy: Support::Yes,
            rootless: false,
            warm_pool: false,
        }
    }
}

/// The policy decision, made once before anything is pulled or created:
/// refuses what the user asked for and the backend cannot enforce (one line,
/// exit 125), and drops the profile's default memory and CPU limits it
/// cannot, returning the notice that says so. `spec.policy.limits` is left
/// holding only what will be enforced.
pub fn admit(caps: &Capabilities, spec: &mut SandboxSpec) -> Result<Option<String>> {
    let policy = &spec.policy;
    if !spec.ports.is_empty() {
        caps.published_ports.require("publishing ports (-P)")?;
    }
    if let Some(p) = spec.ports.iter().find(|p| p.host_ip.contains(':')) {
        caps.ipv6_ports
            .require(&format!("publishing on {} (IPv6)", p.host_ip))?;
    }
    if policy.network {
        if let Support::No { why, fix } = &caps.network {
            return Err(Error::Conflict(format!("no network {why}; {fix}")));
        }
    }
    if policy.user_limits.disk_bytes.is_some() {
        let cow_workspace =
            spec.workspace.is_some() && policy.workspace == WorkspaceMode::CopyOnWrite;
        if !policy.read_only_root {
            caps.disk_cap_root.require("--disk")?;
        }
        if cow_workspace {
            caps.disk_cap_workspace
                .require("--disk for the copy-on-write workspace")?;
        }
    }
    if policy.user_limits.memory_bytes.is_some() {
        caps.memory_limit.require("a memory limit")?;
    }
    if policy.user_limits.cpus.is_some() {
        caps.cpu_limit.require("a CPU limit")?;
    }
    // The profile's own defaults: dropped, and said.
    let mut dropped = Vec::new();
    let mut reason = None;
    let limits = &mut spec.policy.limits;
    if let (Some(m), Support::No { why, fix }) = (limits.memory_bytes, &caps.memory_limit) {
        dropped.push(format!("memory ({} MiB)", m >> 20));
        reason.get_or_insert((why, fix));
        limits.memory_bytes = None;
    }
    if let (Some(c), Support::No { why, fix }) = (limits.cpus, &caps.cpu_limit) {
        dropped.push(format!("CPU ({c})"));
        reason.get_or_insert((why, fix));
        limits.cpus = None;
    }
    Ok(reason.map(|(why, fix)| {
        let (noun, are) = match dropped.len() {
            1 => ("limit", "is"),
            _ => ("limits", "are"),
        };
        format!(
            "agentkernel: notice: the {} profile's {} {noun} {are} not enforced {why}; {fix}",
            spec.policy.profile.as_str(),
            dropped.join(" and "),
        )
    }))
}

/// Per-run settings that come from config rather than the spec.
pub struct RunOptions<'a> {
    pub config: &'a Config,
    /// Serve this one-shot run from a warm pool (the caller checked
    /// `Capabilities::warm_pool` and that the spec is poolable).
    pub warm_pool: bool,
    /// What `admit` dropped, printed once nothing more can refuse the run.
    pub notice: Option<String>,
    /// The values `-S`/`[secrets]` bind, for the egress proxy.
    pub secrets: &'a SecretValues,
    /// `--secret-file`s: (name, content), written where the sandbox reads them.
    pub secret_files: Vec<(String, String)>,
    /// `[[files]]`, read from the host: written into a new sandbox before
    /// its first command (a reused kept sandbox already has them).
    pub files: Vec<crate::files::InjectedFile>,
}

/// What a garbage collection removed.
#[derive(Debug, Default, Clone, Copy)]
pub struct Collected {
    pub containers: usize,
    pub directories: usize,
}

/// What `agentkernel doctor` learns of a usable backend before it tries a
/// sandbox on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// How it is set up here, and a small image to try a sandbox in.
    Ready { detail: String, trial_image: String },
    /// It answers but has no image to try a sandbox in; `fix` says how to get one.
    Untested { detail: String, fix: String },
    /// It answers but looking for a trial image failed.
    Failed { detail: String, why: String },
}

/// One sandbox backend. Methods that start a command return its
/// [`Outcome`]; a backend may instead replace the process (native re-execs
/// itself as the sandbox helper, which exits with the command's code).
#[async_trait::async_trait(?Send)]
pub trait Backend {
    fn kind(&self) -> BackendKind;

    /// What this backend can enforce here (cheap: asked on every run).
    fn capabilities(&self) -> Capabilities;

    /// Runs `spec`: one-shot, or (with `spec.keep`) creates the kept sandbox
    /// and runs its first command in it — or, for `--branch` (`keep.reuse`),
    /// runs in the existing one.
    async fn run(&self, spec: &SandboxSpec, options: &RunOptions<'_>) -> Result<Outcome>;

    /// One more command in the kept sandbox `record` describes.
    async fn exec(&self, record: &SandboxRecord, request: &ExecRequest) -> Result<Outcome>;

    /// `sandbox create`: the kept sandbox `spec` describes, with no first
    /// command (its argv is empty). `reserved` runs once the name is
    /// reserved; when it fails, nothing is left. A backend may replace the
    /// process (native), which exits once the sandbox is created.
    async fn create(
        &self,
        spec: &SandboxSpec,
        options: &RunOptions<'_>,
        reserved: &dyn Fn() -> Result<()>,
    ) -> Result<()>;

    /// Ends every process in a kept sandbox but what holds it (its files,
    /// network and TTL stay); returns how many ended.
    async fn stop(&self, name: &str) -> Result<usize>;

    /// Freezes a kept sandbox: processes and files kept.
    async fn pause(&self, name: &str) -> Result<()>;

    /// Thaws a paused kept sandbox.
    async fn resume(&self, name: &str) -> Result<()>;

    /// Copies the host path `host` into the sandbox as `path` (into it,
    /// when `path` is a directory there), resolving `path` inside the sandbox.
    async fn copy_in(&self, name: &str, host: &Path, path: &str) -> Result<()>;

    /// Copies `path` out of the sandbox to the host path `host` (into it,
    /// when it is a directory): files and directories only.
    async fn copy_out(&self, name: &str, path: &str, host: &Path) -> Result<()>;

    /// The kept sandbox's TTL is now `ttl` (`sandbox extend-ttl`; the record
    /// and deadline are the caller's), for backends that keep their own copy.
    fn set_ttl(&self, _name: &str, _ttl: std::time::Duration) -> Result<()> {
        Ok(())
    }

    /// Removes a kept sandbox and everything it holds.
    async fn remove(&self, name: &str) -> Result<()>;

    /// `running` / `paused` (frozen) / …, or `None` when the sandbox is gone (and
    /// was collected).
    async fn status(&self, record: &SandboxRecord) -> Result<Option<String>>;

    /// Removes what dead runs and expired kept sandboxes of this backend left.
    async fn gc(&self) -> Result<Collected>;

    /// For `doctor`: how this backend is set up here (an error when it
    /// cannot be used), and what to try a sandbox in.
    async fn probe(&self) -> Result<Probe>;

    /// Removes the kept sandbox `name` once its deadline passes (the
    /// detached `sandbox gc --expire NAME` a stop leaves behind).
    async fn expire_when_due(&self, _name: &str) -> Result<()> {
        Ok(())
    }

    /// `[build]`: builds `build` into the image `tag`. Only an engine
    /// (Docker, Podman) builds images; the others refuse.
    async fn build_image(&self, build: &crate::image_build::BuildSpec, _tag: &str) -> Result<()> {
        Err(Error::not_supported(format!(
            "[build] ({}) on the {} backend",
            build.config.display(),
            self.kind()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Limits, Policy, Profile};
    use crate::spec::{ExecRequest, PullPolicy};

    fn spec(limits: Limits) -> SandboxSpec {
        SandboxSpec {
            image: "busybox".into(),
            pull: PullPolicy::Missing,
            policy: Policy::for_profile(Profile::Moderate).with_overrides(true, limits),
            workspace: None,
            home: None,
            volumes: vec![],
            ports: vec![],
            keep: None,
            egress: None,
            exec: ExecRequest {
                argv: vec!["true".into()],
                env: vec![],
                workdir: None,
                tty: false,
                timeout: None,
                user: None,
            },
            template: None,
        }
    }

    fn no_cgroups() -> Capabilities {
        let no = Support::no("on a rootless sandbox", "run as root");
        Capabilities {
            memory_limit: no.clone(),
            cpu_limit: no,
            ..Capabilities::all()
        }
    }

    #[test]
    fn kinds_read_and_write_as_the_old_strings() {
        for kind in BackendKind::ALL {
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.name()));
            assert_eq!(serde_json::from_str::<BackendKind>(&json).unwrap(), kind);
        }
        assert_eq!(BackendKind::parse("Docker").unwrap(), BackendKind::Docker);
        assert!(BackendKind::parse("lxc").is_err());
    }

    #[test]
    fn a_limit_the_user_asked_for_is_refused_even_when_it_equals_the_default() {
        let default = Policy::for_profile(Profile::Moderate).limits.memory_bytes;
        let mut s = spec(Limits {
            memory_bytes: default,
            ..Limits::default()
        });
        let err = admit(&no_cgroups(), &mut s).unwrap_err().to_string();
        assert!(
            err.contains("memory") && err.contains("run as root"),
            "{err}"
        );
    }

    #[test]
    fn defaults_that_cannot_be_enforced_are_dropped_and_said() {
        let mut s = spec(Limits::default());
        let notice = admit(&no_cgroups(), &mut s).unwrap().unwrap();
        assert!(notice.contains("not enforced") && notice.contains("memory"));
        assert_eq!(s.policy.limits.memory_bytes, None);
        assert_eq!(s.policy.limits.cpus, None);
        assert!(s.policy.limits.pids.is_some());
        let mut s = spec(Limits::default());
        assert_eq!(admit(&Capabilities::all(), &mut s).unwrap(), None);
        assert!(s.policy.limits.memory_bytes.is_some());
    }
}
