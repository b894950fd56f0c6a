//! agentkernel's OCI image store: pulls images from any registry (API v2),
//! verifies every byte against its digest, and unpacks each layer once into
//! a directory the native runtime stacks with overlayfs.
//!
//! # Layout
//!
//! ```text
//! <root>/blobs/sha256/<hex>           manifests and configs, by digest
//! <root>/layers/sha256/<diffid>/      one unpacked layer: an overlayfs lower dir
//! <root>/layers/sha256/<diffid>.markers  whiteouts that could not be recorded natively (rare)
//! <root>/refs/<escaped reference>     "<manifest digest>\n<reference>\n"
//! <root>/tmp/                         downloads and unpacks in progress
//! <root>/lock                         flock: pulls shared, prune exclusive
//! ```
//!
//! Layers are keyed by DiffID (the digest of the uncompressed tar), so the
//! gzip and zstd encodings of one layer share a directory.
//!
//! # Trust and crashes
//!
//! Nothing is renamed out of `tmp/` until it is verified: a blob's sha256
//! and size against its descriptor, a layer's compressed digest and its
//! DiffID, both computed while streaming. Files are fsynced, layer trees
//! synced with `syncfs`, and then renamed into place; the ref is written
//! last. A pull killed at any point therefore leaves only `tmp/` leftovers
//! (removed by the next pull that finds the store idle) and complete,
//! verified objects that no ref trusts yet.
//!
//! # Concurrency
//!
//! Two processes pulling the same image both succeed and store it once: a
//! per-layer `flock` makes the second wait for the first's layer instead of
//! downloading it again, and if both do produce a copy the rename of the
//! second fails on the existing directory and its copy is discarded.
//!
//! # Registries
//!
//! Anonymous pulls with bearer tokens (the `WWW-Authenticate` challenge);
//! Docker v2 schema 2 and OCI manifests; manifest lists and OCI indexes
//! resolved to this platform; gzip, zstd and uncompressed layers. Docker Hub
//! images go to mirrors first. Plain HTTP only to loopback hosts.
//!
//! ```no_run
//! # async fn demo() -> agentkernel_image::Result<()> {
//! use agentkernel_image::{mirrors_from_env, PullOptions, Reference, Store};
//! let store = Store::open("/var/lib/agentkernel/images")?;
//! let reference = Reference::parse("alpine:3.20")?;
//! let opts = PullOptions { mirrors: mirrors_from_env(), ..Default::default() };
//! let image = store.pull(&reference, &opts).await?;
//! println!("{} layers, cmd {:?}", image.layers.len(), image.config.cmd);
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod error;
mod extract;
mod manifest;
mod platform;
mod pull;
mod reference;
mod registry;
mod store;

pub use error::{Error, Result};
pub use extract::LayerMarkers;
pub use platform::Platform;
pub use pull::{Progress, ProgressFn, PullOptions, PullPolicy};
pub use reference::{Digest, Reference, DOCKER_HUB, DOCKER_HUB_REGISTRY};
pub use registry::{
    api_base, is_loopback_host, mirrors_from_dockerd, mirrors_from_env, probe, Probe,
    DOCKERD_CONFIG, MIRRORS_ENV,
};
pub use store::{Image, ImageConfig, PruneReport, Store};

/// Checks a mirror URL the way a pull will (scheme, loopback rule), so a
/// bad config can be reported before anything runs.
pub fn validate_mirror(url: &str) -> Result<()> {
    registry::parse_mirror(url).map(|_| ())
}
