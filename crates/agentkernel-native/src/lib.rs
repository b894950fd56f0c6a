//! agentkernel's native runtime: a sandbox made of Linux namespaces, an
//! overlay root, cgroups, capabilities and seccomp — no daemon, started in
//! milliseconds.
//!
//! The `agentkernel run` process turns a [`SandboxSpec`](agentkernel_core::spec::SandboxSpec)
//! and an image into a [`Plan`] ([`prepare`]), then re-executes itself as a
//! single-threaded helper that runs [`process::run`]. See `process/` for the
//! process structure and `rootfs.rs` for the filesystem.

pub mod backend;
pub mod caps;
pub mod cgroup;
pub mod copy;
pub mod disk;
pub mod disk_keeper;
pub mod disk_pool;
pub mod egress;
pub mod error;
pub mod gc;
pub mod helper;
pub mod host;
pub mod images;
pub mod join;
pub mod kept;
pub mod net;
pub mod observed;
pub mod plan;
pub mod pool;
pub mod prepare;
pub mod process;
pub mod rootfs;
pub mod rootless;
pub mod seccomp;
pub mod slirp;
pub mod stop;
mod sys;

pub use sys::pidfd_open;
pub mod trace;
mod user;

pub use backend::NativeBackend;
pub use error::Error;
pub use plan::Plan;

/// PATH for images that set none (Docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The hidden subcommand the helper runs as: `agentkernel __native-sandbox <plan-fd>`.
pub const HELPER_SUBCOMMAND: &str = "__native-sandbox";
