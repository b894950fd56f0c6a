//! The host side of agentkernel's VM backends. A sandbox is one VM: a
//! kernel ([`kernel`]), an initramfs holding the guest agent and the modules
//! it loads ([`initramfs`]), the image as a read-only disk ([`disk`]), a VMM
//! that boots them ([`vmm`]: QEMU today; Firecracker is meant to be one more
//! [`vmm::Vmm`]), and a conversation with the agent ([`session`]); a kept
//! sandbox's VM lives under a holder process ([`kept`]); a run's egress
//! proxy is reached through the agent's port ([`tunnel`]).

pub mod disk;
pub mod initramfs;
pub mod kept;
pub mod kernel;
pub mod net;
pub mod pool;
pub mod session;
pub mod tunnel;
pub mod vmm;

pub use agentkernel_guest::protocol;

/// A failure with a one-line reason (the caller adds the backend's name).
#[derive(Debug)]
pub struct Error(pub String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn fail<T>(why: impl Into<String>) -> Result<T> {
    Err(Error(why.into()))
}
