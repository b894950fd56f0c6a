//! Backend-neutral core of agentkernel.
//!
//! Everything a backend needs to know about a sandbox is resolved here into a
//! [`spec::SandboxSpec`]; backends only translate it, they never decide policy.

pub mod backend;
pub mod cgroup;
pub mod config;
mod config_keys;
pub mod copy;
pub mod detached;
pub mod egress;
pub mod error;
pub mod exit;
pub mod files;
pub mod git;
pub mod image;
pub mod image_build;
pub mod names;
pub mod observe;
pub mod parse;
pub mod paths;
pub mod policy;
pub mod pool_keys;
pub mod procs;
pub mod seccomp;
pub mod secrets;
pub mod spec;
pub mod state;
pub mod template;
pub mod terminal;
pub mod trust;
pub mod vault;

pub use error::{Error, Result};
