//! Errors a user can cause or meet. Each renders as one line that names the
//! problem and, where there is one, the fix; the binary turns them into exit 125.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A value given on the command line or in a config file is malformed.
    #[error("invalid {what} `{value}`: {why}")]
    InvalidValue {
        what: &'static str,
        value: String,
        why: String,
    },

    /// A config file could not be read or parsed.
    #[error("config {path}: {message}")]
    Config { path: PathBuf, message: String },

    /// A `--template` that cannot be found, fetched or applied.
    #[error("template {template}: {message}")]
    Template { template: String, message: String },

    /// Two options (or an option and a profile) cannot be used together.
    #[error("{0}")]
    Conflict(String),

    /// A feature that is specified but not built yet.
    #[error("{feature} is not supported yet{hint}")]
    NotSupported { feature: String, hint: String },

    /// The project's `./agentkernel.toml` loosens the sandbox and the user has not trusted it.
    #[error("{path} loosens the sandbox ({settings}) and is not trusted; read it, then run `agentkernel trust {dir}` (or pass it with --config, or give those settings as flags)")]
    UntrustedConfig {
        path: String,
        settings: String,
        dir: String,
    },

    /// The backend cannot be used here.
    #[error("backend {backend} is unavailable: {why}; {fix}")]
    BackendUnavailable {
        backend: String,
        why: String,
        fix: String,
    },

    /// The image does not exist locally and could not be pulled.
    #[error("image {image} not available: {why}; {fix}")]
    Image {
        image: String,
        why: String,
        fix: String,
    },

    /// A kept sandbox with this name already exists.
    #[error("sandbox {0} already exists; pick another name, reuse it with `agentkernel exec {0} -- CMD`, or remove it with `agentkernel sandbox remove {0}`")]
    NameClash(String),

    /// No kept sandbox has this name.
    #[error("no sandbox named {0}; `agentkernel sandbox list` shows the kept sandboxes")]
    NoSuchSandbox(String),

    /// `--branch` outside a git work tree, or a HEAD we cannot read.
    #[error("--branch needs a git repository: {0}")]
    Git(String),

    /// The backend failed while doing something it should be able to do.
    #[error("{backend}: {message}")]
    Backend {
        backend: &'static str,
        message: String,
    },

    /// Local state (the kept-sandbox store) could not be read or written.
    #[error("{}", state_message(path, source))]
    State {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// "permission denied" on state is someone else's state (it is private to
/// its owner): say whose move it is.
fn state_message(path: &std::path::Path, source: &std::io::Error) -> String {
    if source.kind() == std::io::ErrorKind::PermissionDenied {
        return format!(
            "state {}: permission denied: it belongs to another user; run agentkernel as its owner (or root)",
            path.display()
        );
    }
    format!("state {}: {source}", path.display())
}

impl Error {
    pub fn invalid(what: &'static str, value: impl Into<String>, why: impl Into<String>) -> Self {
        Error::InvalidValue {
            what,
            value: value.into(),
            why: why.into(),
        }
    }

    pub fn not_supported(feature: impl Into<String>) -> Self {
        Error::NotSupported {
            feature: feature.into(),
            hint: String::new(),
        }
    }

    pub fn not_supported_hint(feature: impl Into<String>, hint: impl Into<String>) -> Self {
        Error::NotSupported {
            feature: feature.into(),
            hint: format!("; {}", hint.into()),
        }
    }

    pub fn state(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::State {
            path: path.into(),
            source,
        }
    }
}
