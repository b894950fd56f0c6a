//! The host side of agentkernel's VM backends. A sandbox is one VM: a
//! kernel ([`kernel`]), an initramfs holding the guest agent and the modules
//! it loads ([`initramfs`]), the image as a read-only disk ([`disk`]), a VMM
//! that boots them ([`vmm`]: QEMU today; Firecracker is meant to be one more
//! [`vmm::Vmm`]), and a conversation with the agent ([`session`]); a kept
//! sandbox's VM lives under a holder process ([`kept`]); a run's egress
//! proxy is reached through the agent's port ([`tunnel`]).

pub mod disk;
mod frames;
pub mod host_clock;
pub mod initramfs;
pub mod kept;
pub mod kernel;
pub mod net;
pub mod passt;
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

/// A file's identity (device, inode, size, modification time) into `hash`:
/// it changes whenever the file is rewritten or replaced, and costs one
/// `stat` where hashing the content would read megabytes on every run.
pub(crate) fn hash_identity(hash: &mut sha2::Sha256, meta: &std::fs::Metadata) {
    use sha2::Digest;
    use std::os::unix::fs::MetadataExt;
    for n in [
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime() as u64,
        meta.mtime_nsec() as u64,
    ] {
        hash.update(n.to_le_bytes());
    }
}

/// The first `bytes` of `hash`'s digest, in hex: a cache file's key.
pub(crate) fn short_key(hash: sha2::Sha256, bytes: usize) -> String {
    use sha2::Digest;
    hash.finalize()[..bytes]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
