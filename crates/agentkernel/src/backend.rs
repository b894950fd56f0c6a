//! Backend selection. Native (namespaces, no daemon), Docker and Podman (one
//! client, two engines) exist today; the others are named so that choosing one
//! is a clear "not supported yet", never a silent fallback.

use agentkernel_core::{Error, Result};
use agentkernel_docker::{podman, Engine};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Native,
    Docker,
    Podman,
    Firecracker,
    Qemu,
    Apple,
}

impl BackendKind {
    pub const ALL: [BackendKind; 6] = [
        BackendKind::Native,
        BackendKind::Docker,
        BackendKind::Podman,
        BackendKind::Firecracker,
        BackendKind::Qemu,
        BackendKind::Apple,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Native => "native",
            BackendKind::Docker => "docker",
            BackendKind::Podman => "podman",
            BackendKind::Firecracker => "firecracker",
            BackendKind::Qemu => "qemu",
            BackendKind::Apple => "apple",
        }
    }

    /// A backend by name, in any case (`-B Docker` is docker).
    pub fn parse(name: &str) -> Result<BackendKind> {
        BackendKind::ALL
            .into_iter()
            .find(|b| b.name().eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                Error::invalid(
                    "backend",
                    name,
                    "choose one of native, docker, podman, firecracker, qemu, apple",
                )
            })
    }

    /// Why a backend cannot be used by this build, if it cannot.
    pub fn unbuilt_reason(self) -> Option<&'static str> {
        match self {
            BackendKind::Docker | BackendKind::Podman | BackendKind::Native | BackendKind::Qemu => {
                None
            }
            BackendKind::Firecracker => Some(
                "the firecracker backend is not built yet: it needs the firecracker binary and a working KVM (-B qemu runs VMs without them)",
            ),
            BackendKind::Apple => Some("the apple backend runs only on macOS and is not built yet"),
        }
    }
}

/// `-B`, else `$AGENTKERNEL_BACKEND`, else config, else the first available
/// in SPEC order: native, docker, podman. Native is available to root on a
/// kernel with overlayfs, namespaces and cgroup controllers. Engines are
/// "available" without a request: a listening Docker socket (or
/// DOCKER_HOST), else an installed podman.
pub fn choose(flag: Option<&str>, configured: Option<&str>) -> Result<BackendKind> {
    let from_env = std::env::var("AGENTKERNEL_BACKEND")
        .ok()
        .filter(|b| !b.is_empty());
    let Some(name) = flag.or(from_env.as_deref()).or(configured) else {
        return auto();
    };
    let kind = BackendKind::parse(name)?;
    if let Some(why) = kind.unbuilt_reason() {
        return Err(Error::not_supported_hint(
            format!("backend {name}"),
            format!("{why}; use -B native, -B docker, -B podman or -B qemu (`agentkernel doctor` lists what works here)"),
        ));
    }
    if kind == BackendKind::Native {
        if let Err(why) = agentkernel_native::host::check() {
            return Err(Error::BackendUnavailable {
                backend: "native".into(),
                why,
                fix: "`agentkernel doctor` explains each backend".into(),
            });
        }
    }
    Ok(kind)
}

fn auto() -> Result<BackendKind> {
    if agentkernel_native::host::check().is_ok() {
        return Ok(BackendKind::Native);
    }
    let docker_host = std::env::var_os("DOCKER_HOST").is_some_and(|h| !h.is_empty());
    if docker_host || podman::listening(std::path::Path::new("/var/run/docker.sock")) {
        return Ok(BackendKind::Docker);
    }
    if std::env::var_os("CONTAINER_HOST").is_some_and(|h| !h.is_empty()) || podman::installed() {
        return Ok(BackendKind::Podman);
    }
    let native_why = agentkernel_native::host::check().err().unwrap_or_default();
    Err(Error::BackendUnavailable {
        backend: "any".into(),
        why: format!(
            "native: {native_why}; no Docker engine is listening on /var/run/docker.sock and podman is not installed"
        ),
        fix: "start Docker (`sudo systemctl start docker`) or install podman; `agentkernel doctor` explains each backend".into(),
    })
}

/// Connects to the engine behind a container backend.
pub fn connect(kind: BackendKind) -> Result<Engine> {
    match kind {
        BackendKind::Docker => Engine::connect(),
        BackendKind::Podman => Engine::connect_podman(),
        other => Err(Error::not_supported(format!("backend {}", other.name()))),
    }
}

/// The engine that holds a kept sandbox, from its record.
pub fn connect_named(backend: &str) -> Result<Engine> {
    connect(BackendKind::parse(backend)?)
}

/// Engines that may hold our sandboxes: Docker when reachable without a
/// request, Podman when it has kept sandboxes or a service is listening.
/// (Never starts a Podman service just to look.)
pub fn engines_in_use(store: &agentkernel_core::state::Store) -> Vec<Engine> {
    let mut engines = Vec::new();
    let docker_host = std::env::var_os("DOCKER_HOST").is_some_and(|h| !h.is_empty());
    if docker_host || podman::listening(std::path::Path::new("/var/run/docker.sock")) {
        engines.extend(Engine::connect().ok());
    }
    let podman_records = store.list().iter().any(|r| r.backend == "podman");
    let podman_listening = std::env::var_os("CONTAINER_HOST").is_some_and(|h| !h.is_empty())
        || podman::well_known_sockets()
            .iter()
            .any(|p| podman::listening(p))
        || podman::listening(&podman::private_dir().join("podman.sock"));
    if podman_records || podman_listening {
        engines.extend(Engine::connect_podman().ok());
    }
    engines
}
