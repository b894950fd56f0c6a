//! The image store's errors. Each renders as one line that names the problem
//! and, where there is one, what to do about it.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong pulling, storing or reading images.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The reference does not parse.
    #[error("invalid image reference `{input}`: {reason}")]
    InvalidReference {
        /// What was given.
        input: String,
        /// Why it is invalid.
        reason: String,
    },

    /// A registry or mirror URL is malformed.
    #[error("invalid registry mirror `{url}`: {reason}")]
    InvalidMirror {
        /// What was given.
        url: String,
        /// Why it is invalid.
        reason: String,
    },

    /// Plain HTTP to a host that is not loopback.
    #[error(
        "refusing plain HTTP to registry host `{host}`: only loopback registries (127.0.0.0/8, ::1, localhost) \
         may use http://; use https://"
    )]
    InsecureRegistry {
        /// The offending host.
        host: String,
    },

    /// The registry could not be reached (DNS, connect, TLS, timeout).
    #[error("cannot reach registry {registry} ({detail})")]
    Connect {
        /// The registry (host or mirror URL).
        registry: String,
        /// The underlying cause (DNS, refused, TLS, timed out).
        detail: String,
    },

    /// The manifest (name or tag) does not exist.
    #[error("image {reference} not found in registry {registry} (404); check the name and tag")]
    NotFound {
        /// The image asked for.
        reference: String,
        /// The registry that answered.
        registry: String,
    },

    /// A blob listed by a manifest is missing from the registry.
    #[error("blob {digest} of image {reference} is missing from registry {registry} (404); the image is broken there, re-push it")]
    BlobNotFound {
        /// The image being pulled.
        reference: String,
        /// The missing blob.
        digest: String,
        /// The registry that answered.
        registry: String,
    },

    /// Access denied even after (anonymous) token authentication.
    #[error(
        "registry {registry} denied access to {reference} ({status}{detail}); the image may be private, or the name wrong"
    )]
    Unauthorized {
        /// The image asked for.
        reference: String,
        /// The registry that answered.
        registry: String,
        /// 401 or 403.
        status: u16,
        /// The registry's own message, prefixed with `: `, or empty.
        detail: String,
    },

    /// The registry wants a username and password (HTTP Basic).
    #[error(
        "registry {registry} requires a username and password (HTTP Basic auth, realm {realm:?}), which agentkernel does \
         not support; use a public image or a mirror that allows anonymous pulls"
    )]
    BasicAuthRequired {
        /// The registry that answered.
        registry: String,
        /// The realm it named.
        realm: String,
    },

    /// The bearer-token endpoint failed.
    #[error("could not get a pull token from {realm} for registry {registry}: {detail}")]
    Token {
        /// The registry that sent the challenge.
        registry: String,
        /// The token endpoint.
        realm: String,
        /// What went wrong.
        detail: String,
    },

    /// An HTTP status the protocol does not expect.
    #[error("registry {registry} answered {status} for {url}{detail}")]
    Http {
        /// The registry that answered.
        registry: String,
        /// The request URL.
        url: String,
        /// The status code.
        status: u16,
        /// The registry's own message, prefixed with `: `, or empty.
        detail: String,
    },

    /// Content did not hash to the digest it was asked for by.
    #[error(
        "{what} from {source_name} has digest {actual}, expected {expected}: the registry, a proxy or the network \
         corrupted it; it was discarded, try again"
    )]
    DigestMismatch {
        /// What was fetched (`blob sha256:…`, `layer sha256:… (uncompressed)`).
        what: String,
        /// Where it came from.
        source_name: String,
        /// The digest asked for.
        expected: String,
        /// The digest of what arrived.
        actual: String,
    },

    /// Content was not the size its descriptor promised.
    #[error("{what} from {source_name} is {actual} bytes, expected {expected}; it was discarded, try again")]
    SizeMismatch {
        /// What was fetched.
        what: String,
        /// Where it came from.
        source_name: String,
        /// The size the descriptor promised.
        expected: u64,
        /// The size that arrived (at least).
        actual: u64,
    },

    /// A manifest, index or config that cannot be used.
    #[error("image {reference}: {detail}")]
    InvalidImage {
        /// The image being pulled.
        reference: String,
        /// What is wrong with it.
        detail: String,
    },

    /// An image index without an entry for this platform.
    #[error("image {reference} has no variant for {platform} (it has: {available}); pick another image or tag")]
    NoMatchingPlatform {
        /// The image being pulled.
        reference: String,
        /// The platform wanted.
        platform: String,
        /// The platforms on offer.
        available: String,
    },

    /// A layer tries to write outside its directory or is otherwise unsafe.
    #[error("layer {layer}: entry `{entry}` {reason}; refusing to extract this image")]
    UnsafeLayer {
        /// The layer's digest.
        layer: String,
        /// The tar entry.
        entry: String,
        /// What it tried.
        reason: String,
    },

    /// A layer that is not a readable (optionally gzip- or zstd-compressed) tar.
    #[error("layer {layer} is not a valid tar stream: {detail}")]
    BadLayer {
        /// The layer's digest.
        layer: String,
        /// The decoder's error.
        detail: String,
    },

    /// A layer expands to more than the store accepts (a decompression or
    /// sparse-file bomb, or a layer bigger than the configured bound).
    #[error("layer {layer} expands to more than {limit} bytes ({bound}); refusing to extract this image; if it is trusted, raise `[images] max_layer_size` in the config or free disk space")]
    LayerTooLarge {
        /// The layer's digest.
        layer: String,
        /// The bound it crossed, in bytes.
        limit: u64,
        /// Where the bound comes from.
        bound: String,
    },

    /// `PullPolicy::Never` (or `resolve`) and the image is not stored.
    #[error("image {reference} is not in the local image store")]
    NotPresent {
        /// The image asked for.
        reference: String,
    },

    /// Every mirror failed and so did the registry itself.
    #[error("{last} (mirrors tried first: {})", mirror_list(.tried))]
    MirrorsFailed {
        /// The registry's own error.
        last: Box<Error>,
        /// Each mirror tried, with its error.
        tried: Vec<(String, Error)>,
    },

    /// A filesystem operation in the store failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path operated on.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

fn mirror_list(tried: &[(String, Error)]) -> String {
    tried
        .iter()
        .map(|(mirror, e)| format!("{mirror}: {e}"))
        .collect::<Vec<_>>()
        .join("; ")
}

impl Error {
    /// For a pull that failed everywhere: the first mirror that answered
    /// (a 404, a denial…) rather than being unreachable — its answer says
    /// more than a Docker Hub this machine cannot reach.
    pub fn mirror_answer(&self) -> Option<(&str, &Error)> {
        match self {
            Error::MirrorsFailed { tried, .. } => tried
                .iter()
                .find(|(_, e)| !matches!(e, Error::Connect { .. }))
                .map(|(mirror, e)| (mirror.as_str(), e)),
            _ => None,
        }
    }
}

/// The store's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Attaches a path to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
