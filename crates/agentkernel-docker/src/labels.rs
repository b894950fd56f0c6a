//! Labels on every container agentkernel creates. They are how a later
//! agentkernel process proves a container is its own before removing it.

pub const MANAGED: &str = "agentkernel.managed";
/// `run` (lives for one command) or `kept`.
pub const KIND: &str = "agentkernel.kind";
/// The sandbox name (kept sandboxes).
pub const NAME: &str = "agentkernel.name";
/// [`agentkernel_core::state::Owner`] of a `run` container.
pub const OWNER: &str = "agentkernel.owner";
/// The machine that created it, so a shared remote engine's containers of
/// other machines are never judged by our process table.
pub const HOST: &str = "agentkernel.host";
pub const PROFILE: &str = "agentkernel.profile";
/// The state directory that holds a kept sandbox's (or pool container's)
/// record: only agentkernel processes using that same directory manage it.
pub const STATE: &str = "agentkernel.state";
/// Host scratch directory to delete with the container.
pub const SCRATCH: &str = "agentkernel.scratch";

/// Pool containers: which key they warm, and for `pool status`, what they hold.
pub const POOL_KEY: &str = "agentkernel.pool.key";
pub const IMAGE: &str = "agentkernel.image";
pub const WORKSPACE: &str = "agentkernel.workspace";

pub const KIND_RUN: &str = "run";
pub const KIND_POOL: &str = "pool";
pub const KIND_KEPT: &str = "kept";

/// Name prefix of every container, so `docker ps` shows whose they are.
pub const CONTAINER_PREFIX: &str = "agentkernel-";

/// This machine's identity: /etc/machine-id, else the hostname.
pub fn host_id() -> String {
    std::fs::read_to_string("/etc/machine-id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default()
}
