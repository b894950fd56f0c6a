//! Connection to a Docker-API engine (Docker itself, or Podman's compatible
//! API), and the mapping of its errors to user-facing ones.

use agentkernel_core::backend::BackendKind;
use agentkernel_core::Error;
use bollard::errors::Error as BollardError;
use bollard::{ClientVersion, Docker};

/// API 1.41 is spoken by every Docker since 20.10 and by Podman's compat API;
/// pinning it avoids a version round-trip on every run.
const API_VERSION: ClientVersion = ClientVersion {
    major_version: 1,
    minor_version: 41,
};
const TIMEOUT_SECS: u64 = 600;

/// Which engine is behind the API. The client code is the same; a few
/// container settings differ (see `create.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Docker,
    Podman,
}

impl Flavor {
    pub fn name(self) -> &'static str {
        match self {
            Flavor::Docker => "docker",
            Flavor::Podman => "podman",
        }
    }
}

#[derive(Clone)]
pub struct Engine {
    pub docker: Docker,
    /// Where we connected, for messages.
    pub address: String,
    pub flavor: Flavor,
    /// Podman's container init (its exec arguments differ); unused on Docker.
    pub podman_init: crate::podman_init::InitKind,
}

impl Engine {
    /// Connects (lazily: no request is made) to `$DOCKER_HOST` or the default socket.
    pub fn connect() -> Result<Engine, Error> {
        let address = std::env::var("DOCKER_HOST")
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "unix:///var/run/docker.sock".to_string());
        Engine::connect_to(Flavor::Docker, address, crate::podman_init::InitKind::Tini)
    }

    /// Connects to Podman's Docker-compatible API, starting a private
    /// `podman system service` when no socket is listening.
    pub fn connect_podman() -> Result<Engine, Error> {
        let (address, init) = crate::podman::service_address()?;
        Engine::connect_to(Flavor::Podman, address, init)
    }

    fn connect_to(
        flavor: Flavor,
        address: String,
        podman_init: crate::podman_init::InitKind,
    ) -> Result<Engine, Error> {
        let docker = if let Some(path) = address.strip_prefix("unix://") {
            Docker::connect_with_unix(path, TIMEOUT_SECS, &API_VERSION)
        } else if address.starts_with("tcp://") || address.starts_with("http://") {
            Docker::connect_with_http(&address, TIMEOUT_SECS, &API_VERSION)
        } else {
            return Err(Error::BackendUnavailable {
                backend: flavor.name().into(),
                why: format!("{address} is not a unix:// or tcp:// address"),
                fix: "use unix:///path/to/socket or tcp://HOST:PORT".into(),
            });
        };
        let docker = docker.map_err(|e| unreachable_error(flavor, &address, &e))?;
        Ok(Engine {
            docker,
            address,
            flavor,
            podman_init,
        })
    }

    pub fn name(&self) -> &'static str {
        self.flavor.name()
    }

    /// Which backend this engine is.
    pub fn kind(&self) -> BackendKind {
        match self.flavor {
            Flavor::Docker => BackendKind::Docker,
            Flavor::Podman => BackendKind::Podman,
        }
    }

    /// Checks the engine answers.
    pub async fn ping(&self) -> Result<String, Error> {
        let v = self
            .docker
            .version()
            .await
            .map_err(|e| self.error("ping", e))?;
        let product = match self.flavor {
            Flavor::Docker => "Docker",
            Flavor::Podman => "Podman",
        };
        Ok(format!(
            "{product} {} (API {})",
            v.version.unwrap_or_default(),
            v.api_version.unwrap_or_default()
        ))
    }

    /// Turns an engine error into a user-facing one: unreachable engines get
    /// the "start it" fix; everything else says what we were doing.
    pub fn error(&self, action: &str, e: BollardError) -> Error {
        if is_connection_error(&e) {
            return unreachable_error(self.flavor, &self.address, &e);
        }
        if let Some(missing_init) = crate::podman_init::missing_init_error(&message_of(&e)) {
            return missing_init;
        }
        self.failure(format!("{action}: {}", message_of(&e)))
    }

    /// An engine-side failure in our own words.
    pub fn failure(&self, message: impl Into<String>) -> Error {
        Error::Backend {
            backend: self.flavor.name(),
            message: message.into(),
        }
    }
}

pub fn is_not_found(e: &BollardError) -> bool {
    matches!(
        e,
        BollardError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

pub fn is_conflict(e: &BollardError) -> bool {
    matches!(
        e,
        BollardError::DockerResponseServerError {
            status_code: 409,
            ..
        }
    )
}

/// The engine's own message, without bollard's wrapping.
pub fn message_of(e: &BollardError) -> String {
    match e {
        BollardError::DockerResponseServerError { message, .. } => message.trim().to_string(),
        other => other.to_string().replace('\n', " "),
    }
}

fn is_connection_error(e: &BollardError) -> bool {
    matches!(
        e,
        BollardError::SocketNotFoundError(_)
            | BollardError::IOError { .. }
            | BollardError::HyperResponseError { .. }
            | BollardError::HyperLegacyError { .. }
            | BollardError::RequestTimeoutError
    )
}

fn unreachable_error(flavor: Flavor, address: &str, e: &BollardError) -> Error {
    if let Some(denied) = socket_permission_error(flavor, address) {
        return denied;
    }
    let fix = match flavor {
        Flavor::Docker => "start it (`sudo systemctl start docker`, or run `dockerd`) or point DOCKER_HOST at a running engine; `agentkernel doctor` checks every backend",
        Flavor::Podman => "check `podman system service` (or point CONTAINER_HOST at a running one); `agentkernel doctor` checks every backend",
    };
    Error::BackendUnavailable {
        backend: flavor.name().into(),
        why: format!(
            "cannot reach the {} engine at {address} ({})",
            flavor.name(),
            message_of(e)
        ),
        fix: fix.into(),
    }
}

/// A socket that exists but that this user may not open: the engine runs,
/// the user lacks the group (or root), so "start it" would be wrong.
fn socket_permission_error(flavor: Flavor, address: &str) -> Option<Error> {
    let path = address.strip_prefix("unix://")?;
    let denied = std::os::unix::net::UnixStream::connect(path)
        .err()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied);
    if !denied {
        return None;
    }
    let fix = match flavor {
        Flavor::Docker => format!(
            "add your user to the group that owns it (`sudo usermod -aG {} $USER`, then log in again) or run as root",
            socket_group(path).unwrap_or_else(|| "docker".into())
        ),
        Flavor::Podman => "use your own Podman service (unset CONTAINER_HOST: agentkernel starts one for your user) or run as root".into(),
    };
    Some(Error::BackendUnavailable {
        backend: flavor.name().into(),
        why: format!(
            "the {} engine is running, but you may not use its socket {path} (permission denied)",
            flavor.name()
        ),
        fix,
    })
}

/// The name of the group owning `path`, from /etc/group.
fn socket_group(path: &str) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let gid = std::fs::metadata(path).ok()?.gid();
    std::fs::read_to_string("/etc/group")
        .ok()?
        .lines()
        .find_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            (fields.nth(1)?.parse::<u32>().ok()? == gid).then(|| name.to_string())
        })
}
