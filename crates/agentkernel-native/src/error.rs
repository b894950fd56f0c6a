//! The native backend's errors, typed until they are printed. Each leaf
//! names the problem and its fix; [`Error`] composes them with `#[from]`,
//! and its conversion to `agentkernel_core::Error` is the one place they
//! become agentkernel's one-line error.

use std::io;

pub use crate::cgroup::CgroupError;
pub use crate::process::SandboxError;

/// What to do about an error, kept apart from what went wrong: leaf errors
/// say the problem in their message and the fix here, and [`with_fix`]
/// joins the two in the one place they are rendered.
pub trait Fix: std::error::Error {
    fn fix(&self) -> Option<&'static str>;
}

/// "problem; fix" (or the problem alone when there is nothing to do).
pub fn with_fix(e: &dyn Fix) -> String {
    match e.fix() {
        Some(fix) => format!("{e}; {fix}"),
        None => e.to_string(),
    }
}

/// Why native sandboxes cannot run on this host (`host::check`).
#[derive(Debug, thiserror::Error)]
pub enum HostUnsupported {
    #[error("the kernel has no overlayfs (try `modprobe overlay`), which the sandbox root needs")]
    NoOverlayfs,
    #[error("the kernel has no {0} namespaces")]
    NoNamespace(&'static str),
    #[error("rootless native sandboxes need Linux 5.14 or later (this is {kernel}); run as root or use -B podman")]
    RootlessKernelTooOld { kernel: String },
    #[error("rootless native sandboxes need unprivileged user namespaces, which this kernel disables (sysctl kernel.unprivileged_userns_clone=0; set it to 1), or {ROOTLESS_FIX}")]
    UnprivilegedUsernsDisabled,
    #[error("rootless native sandboxes need user namespaces, and sysctl user.max_user_namespaces is 0 (raise it), or {ROOTLESS_FIX}")]
    NoUserNamespacesAllowed,
    #[error("AppArmor restricts unprivileged user namespaces here (sysctl kernel.apparmor_restrict_unprivileged_userns=1; set it to 0 or give agentkernel an AppArmor profile that allows userns), or {ROOTLESS_FIX}")]
    AppArmorRestrictsUserns,
    #[error("cgroup v1 without the memory, cpu and pids controllers mounted; mount them or boot with cgroup v2")]
    CgroupV1ControllersMissing,
    #[error("cgroup v2 without the {0} controller")]
    CgroupV2ControllerMissing(&'static str),
}

const ROOTLESS_FIX: &str = "run agentkernel as root, or use -B podman / -B docker";

/// Why a rootless sandbox cannot have a network here (`slirp::usable`).
#[derive(Debug, thiserror::Error)]
pub enum SlirpUnusable {
    #[error("slirp4netns is not installed (apt-get install slirp4netns), which a rootless sandbox's network needs")]
    NotInstalled,
    #[error("{TUN} is not accessible to you ({source}), which slirp4netns needs; `chmod 0666 {TUN}` as root (udev's default mode)")]
    TunInaccessible { source: io::Error },
}

/// The tap device slirp4netns opens.
pub(crate) const TUN: &str = "/dev/net/tun";

/// The plan's hand-off from the CLI process to the sandbox helper.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("the sandbox helper is internal; use `agentkernel run -B native`")]
    NotInherited,
    #[error("cannot encode the sandbox plan: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("bad sandbox plan: {0}")]
    Decode(#[source] serde_json::Error),
    #[error("memfd_create: {0}")]
    Memfd(#[source] io::Error),
    #[error("cannot write the sandbox plan: {0}")]
    Write(#[source] io::Error),
    #[error("cannot read the sandbox plan: {0}")]
    Read(#[source] io::Error),
    #[error("cannot start the sandbox helper: {0}")]
    Exec(#[source] io::Error),
}

/// A kept native sandbox cannot be used, stopped or removed.
#[derive(Debug, thiserror::Error)]
pub enum KeptError {
    #[error("sandbox {0} is gone; `agentkernel sandbox gc` removes what it left")]
    Gone(String),
    #[error(
        "sandbox {0} is gone (its holder exited); `agentkernel sandbox gc` removes what it left"
    )]
    HolderExited(String),
    #[error("sandbox {0} is stopped; `agentkernel sandbox start {0}` resumes it")]
    Stopped(String),
    #[error("sandbox {0} is rootless: stopping it needs a freezer cgroup, which only root can create here; `agentkernel sandbox remove {0}` ends it")]
    NoFreezer(String),
    #[error(
        "cannot remove sandbox {0}: permission denied; run agentkernel as its owner (or root)"
    )]
    RemoveDenied(String),
    #[error("sandbox {name} could not be removed: {} is still there; run agentkernel as its owner (or root), then `agentkernel sandbox gc`", dir.display())]
    StillThere {
        name: String,
        dir: std::path::PathBuf,
    },
    #[error("the sandbox's holder exited during setup")]
    HolderDiedInSetup,
    /// The holder's own one-line report of why setup failed.
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    State(#[from] agentkernel_core::Error),
    #[error("{}", with_fix(.0))]
    Sandbox(#[from] SandboxError),
    #[error("{}", with_fix(.0))]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Any native backend failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Host(#[from] HostUnsupported),
    #[error(transparent)]
    Slirp(#[from] SlirpUnusable),
    #[error(transparent)]
    Handoff(#[from] HandoffError),
    #[error(transparent)]
    Kept(#[from] KeptError),
    #[error("{}", with_fix(.0))]
    Sandbox(#[from] SandboxError),
    #[error("{}", with_fix(.0))]
    Cgroup(#[from] CgroupError),
    /// The runtime (namespaces, cgroups, mounts) failed; the message says where.
    #[error(transparent)]
    Runtime(#[from] io::Error),
}

impl From<Error> for agentkernel_core::Error {
    fn from(e: Error) -> agentkernel_core::Error {
        match e {
            Error::Host(why) => agentkernel_core::Error::BackendUnavailable {
                backend: "native".into(),
                why: why.to_string(),
                fix: "`agentkernel doctor` explains each backend".into(),
            },
            Error::Kept(KeptError::State(e)) => e,
            other => agentkernel_core::Error::Backend {
                backend: "native",
                message: other.to_string(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one rendering: the leaf's problem, then its fix.
    #[test]
    fn runtime_errors_render_problem_then_fix() {
        let e = Error::from(SandboxError::from(CgroupError::V1ControllerNotMounted(
            "pids",
        )));
        assert_eq!(
            e.to_string(),
            "the cgroup v1 pids controller is not mounted; mount the memory, cpu, pids and \
             freezer controllers, or boot with cgroup v2"
        );
        let core = agentkernel_core::Error::from(e);
        assert!(
            core.to_string().ends_with("or boot with cgroup v2"),
            "{core}"
        );
        // Nothing to do: the problem alone.
        assert_eq!(
            Error::from(CgroupError::NoFreezer).to_string(),
            "this sandbox has no freezer cgroup"
        );
    }
}
