//! agentkernel's Docker backend: translates a [`SandboxSpec`] into Engine API
//! calls (through bollard, over the unix socket or `DOCKER_HOST`), streams the
//! command's I/O, and cleans up everything it created.
//!
//! Modules, one concept each:
//! - [`engine`]: connecting (Docker or Podman), and turning engine errors into user-facing ones
//! - [`podman`]: finding or starting a Podman API socket
//! - [`podman_init`]: which init Podman's containers get (catatonit, tini…)
//! - [`labels`]: the `agentkernel.*` labels that mark what we own
//! - [`create`]: spec → container create body (policy enforcement lives here)
//! - [`network`]: agentkernel's own engine network (no traffic between sandboxes)
//! - [`seccomp`]: the restrictive profile's filter
//! - [`pull`]: making sure the image is present
//! - [`build`]: `[build]`, the image built from a Dockerfile
//! - [`copy`]: `sandbox cp` and `[[files]]`, by the archive API
//! - [`egress`]: the egress proxy, bound inside the container's network namespace
//! - [`stdio`]: streaming stdin/stdout/stderr, TTY, signals, resize
//! - [`oneshot`]: `run` without `--keep`
//! - [`exec`]: one command in an existing container (kept sandboxes, pool)
//! - [`handoff`]: Podman's pooled runs, run by the warm container's own keep-alive
//! - [`kept`]: kept sandboxes: create, exec, stop/start/remove, list
//! - [`pool`]: the warm pool behind `--fast`
//! - [`listing`]: listing containers, Podman's extra state names included
//! - [`gc`]: removing what dead agentkernel processes left behind
//! - [`detached`]: background agentkernel processes (refills, stopped-sandbox expiry)
//!
//! [`SandboxSpec`]: agentkernel_core::spec::SandboxSpec

pub mod backend;
pub mod build;
pub mod copy;
pub mod create;
pub mod dockerignore;
pub mod egress;
pub mod engine;
pub mod exec;
pub mod gc;
pub mod handoff;
pub mod inspect;
pub mod kept;
pub mod labels;
pub mod listing;
pub mod network;
pub mod oneshot;
pub mod podman;
pub mod podman_init;
pub mod pool;
pub mod pool_stats;
pub mod pull;
pub mod seccomp;
pub mod secret_files;
pub mod stdio;
pub mod stop;

pub use backend::EngineBackend;
pub use engine::Engine;
