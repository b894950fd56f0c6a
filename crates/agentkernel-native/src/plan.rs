//! [`Plan`]: everything the sandbox helper needs, decided before it starts.
//!
//! The `agentkernel run` process resolves flags, config, the image and the
//! user's environment into a plan, then re-executes itself as the helper
//! (`agentkernel __native-sandbox`), handing the plan over as JSON on a file
//! descriptor. The helper never reads config or talks to a registry: it only
//! builds what the plan says, so its work is short, single-threaded and easy
//! to audit.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The sandbox's root filesystem.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RootSource {
    /// Image layer directories, bottom to top.
    Layers(Vec<PathBuf>),
    /// `--image host`: the host's `/`, read-only, under a private upper layer.
    Host,
}

/// How one host path appears in the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MountKind {
    Bind {
        read_only: bool,
    },
    /// An overlay whose lower layer is the host path: the sandbox may change
    /// what it sees, the host copy never changes.
    CopyOnWrite,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Mount {
    pub host: PathBuf,
    /// Absolute path inside the sandbox.
    pub target: String,
    pub kind: MountKind,
}

/// One `-P` mapping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Port {
    pub host_ip: std::net::Ipv4Addr,
    /// 0: any free port.
    pub host_port: u16,
    pub container_port: u16,
    pub udp: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SeccompMode {
    /// Docker's default denials.
    Default,
    /// The default denials plus ptrace, mount, bpf, keyctl, perf_event_open,
    /// userfaultfd, unshare and setns.
    Restrictive,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CgroupLimits {
    pub memory_bytes: Option<u64>,
    pub cpus: Option<f64>,
    pub pids: Option<i64>,
}

/// What the helper does with the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// A one-shot sandbox: build it, run `argv`, remove it.
    Run,
    /// A kept sandbox: build it under a detached holder, then run `argv` in it.
    CreateKept,
    /// Run `argv` in the existing kept sandbox.
    Exec,
}

/// A kept sandbox's identity and expiry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeepPlan {
    pub name: String,
    pub ttl: Duration,
    /// agentkernel's state directory (the sandbox's record and deadline live there).
    pub state_root: PathBuf,
    /// The record committed once the sandbox exists.
    pub record: agentkernel_core::state::SandboxRecord,
    /// `run --branch` found it already there (said so on stderr).
    #[serde(default)]
    pub reused: bool,
    /// A template's setup lines, run once right after creation.
    #[serde(default)]
    pub setup: Vec<String>,
    /// A warm sandbox of the native pool (pool.rs): built ahead for one
    /// run, which claims it; its holder then ends it when that run does.
    #[serde(default)]
    pub warm: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub action: Action,
    /// Set for kept sandboxes.
    pub keep: Option<KeepPlan>,
    /// Sandbox id: names its scratch directory, cgroup and hostname.
    pub id: String,
    /// Scratch directory (upper layers, work dirs); removed when the sandbox ends.
    pub scratch: PathBuf,
    pub root: RootSource,
    pub read_only_root: bool,
    /// tmpfs at `/tmp` (bytes) when the root is read-only.
    pub tmp_size_bytes: u64,
    pub mounts: Vec<Mount>,
    /// Directories covered by an empty read-only tmpfs (agentkernel's own
    /// state, when the root is the host's).
    pub hidden: Vec<String>,
    pub hostname: String,
    /// Loopback only when false; otherwise a veth to agentkernel's bridge
    /// (as root) or slirp4netns (rootless).
    pub network: bool,
    /// Published ports (`-P`), when there is a network.
    pub ports: Vec<Port>,
    /// `/etc/resolv.conf` contents when there is a network.
    pub resolv_conf: Option<String>,
    pub argv: Vec<String>,
    /// Final environment, `KEY=value`.
    pub env: Vec<String>,
    pub workdir: String,
    /// `user[:group]` from the image (names or ids); root when absent.
    pub user: Option<String>,
    /// Capability names without `CAP_` (e.g. `CHOWN`) the command keeps.
    pub capabilities: Vec<String>,
    pub no_new_privileges: bool,
    pub seccomp: SeccompMode,
    pub limits: CgroupLimits,
    /// Cap of the root's writable tmpfs layer (`--disk`), bytes.
    #[serde(default)]
    pub root_layer_bytes: Option<u64>,
    /// The sparse ext4 image holding the copy-on-write workspaces' writable
    /// layers, when their disk use is capped (see disk.rs).
    #[serde(default)]
    pub workspace_disk: Option<PathBuf>,
    /// Its size (the cap), bytes: a one-shot run's cleanup process prepares
    /// the next run's device of this size (disk_pool.rs).
    #[serde(default)]
    pub workspace_disk_bytes: Option<u64>,
    /// The loop device claimed with the image from the pool of devices
    /// attached ahead (disk_pool.rs); None: the supervisor attaches one.
    #[serde(default)]
    pub workspace_device: Option<String>,
    /// The disk is to come mounted from the keeper (disk_keeper.rs); the
    /// image is made only if the keeper has none ready.
    #[serde(default)]
    pub workspace_held: bool,
    pub tty: bool,
    pub timeout: Option<Duration>,
    /// An `Exec` in a warm sandbox this run claimed from the pool: the
    /// helper ends the sandbox (every process of it) before it returns the
    /// exit code, as a one-shot run does.
    #[serde(default)]
    pub claimed_warm: bool,
    /// Set when agentkernel runs without root: the helper first enters a
    /// user namespace mapping these ids to root (see rootless.rs).
    #[serde(default)]
    pub rootless: Option<crate::rootless::UserMap>,
    /// The egress proxy of this run (`None`: no secrets, no allow-list).
    #[serde(default)]
    pub egress: Option<crate::egress::EgressPlan>,
    /// `--secret-file`: written to a tmpfs at `/run/agentkernel/secrets`
    /// as the sandbox is built. Travels only in memory (the plan's memfd);
    /// a kept sandbox's stored `plan.json` never has it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_files: Vec<SecretFile>,
    /// `[[files]]`: written into the root as the sandbox is built, before
    /// its first command (and before a read-only root is made read-only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<agentkernel_core::files::InjectedFile>,
}

pub use agentkernel_core::secrets::SecretFile;

impl Plan {
    /// agentkernel's state directory: a kept sandbox's plan names it; a
    /// one-shot run's scratch dir is `<state>/runs/<id>`.
    pub fn state_root(&self) -> Option<PathBuf> {
        match &self.keep {
            Some(keep) => Some(keep.state_root.clone()),
            None => Some(self.scratch.parent()?.parent()?.to_path_buf()),
        }
    }
}
