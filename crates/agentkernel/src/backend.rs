//! The backend registry: the one place that maps a [`BackendKind`] to its
//! implementation, chooses the backend of a run, and finds the backends that
//! hold sandboxes. Everything else holds a `Box<dyn Backend>` and never asks
//! which one it is (see ARCHITECTURE.md, "Where to add a backend").

use agentkernel_core::backend::{Backend, BackendKind};
use agentkernel_core::state::Store;
use agentkernel_core::{Error, Result};
use agentkernel_docker::{podman, Engine, EngineBackend};
use agentkernel_native::NativeBackend;

/// The implementation of `kind`, connected (or checked usable) here.
pub fn open(kind: BackendKind, store: &Store) -> Result<Box<dyn Backend>> {
    let store = store.clone();
    match kind {
        BackendKind::Native => Ok(Box::new(NativeBackend::new(store))),
        BackendKind::Docker => Ok(Box::new(EngineBackend::docker(store))),
        BackendKind::Podman => Ok(Box::new(EngineBackend::podman(store))),
        BackendKind::Qemu => Ok(Box::new(crate::commands::qemu::QemuBackend::new(store))),
        BackendKind::Firecracker | BackendKind::Apple => Err(not_built(kind)),
    }
}

/// Why a backend cannot be used by this build, if it cannot.
pub fn unbuilt_reason(kind: BackendKind) -> Option<&'static str> {
    match kind {
        BackendKind::Docker | BackendKind::Podman | BackendKind::Native | BackendKind::Qemu => {
            None
        }
        BackendKind::Firecracker => Some(
            "the firecracker backend is not built yet: it needs the firecracker binary and a working KVM (-B qemu runs VMs without them)",
        ),
        BackendKind::Apple => Some("the apple backend runs only on macOS and is not built yet"),
    }
}

fn not_built(kind: BackendKind) -> Error {
    let why = unbuilt_reason(kind).unwrap_or("it is not built");
    Error::not_supported_hint(
        format!("backend {}", kind.name()),
        format!("{why}; use -B native, -B docker, -B podman or -B qemu (`agentkernel doctor` lists what works here)"),
    )
}

/// `-B`, else `$AGENTKERNEL_BACKEND`, else config, else the first available
/// in the documented order: native, docker, podman. Native is available to root on a
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
    if unbuilt_reason(kind).is_some() {
        return Err(not_built(kind));
    }
    if kind == BackendKind::Native {
        agentkernel_native::host::check().map_err(agentkernel_native::Error::from)?;
    }
    Ok(kind)
}

fn auto() -> Result<BackendKind> {
    if agentkernel_native::host::check().is_ok() {
        return Ok(BackendKind::Native);
    }
    if docker_reachable() {
        return Ok(BackendKind::Docker);
    }
    if std::env::var_os("CONTAINER_HOST").is_some_and(|h| !h.is_empty()) || podman::installed() {
        return Ok(BackendKind::Podman);
    }
    let native_why = agentkernel_native::host::check()
        .err()
        .map(|why| why.to_string())
        .unwrap_or_default();
    Err(Error::BackendUnavailable {
        backend: "any".into(),
        why: format!(
            "native: {native_why}; no Docker engine is listening on /var/run/docker.sock and podman is not installed"
        ),
        fix: "start Docker (`sudo systemctl start docker`) or install podman; `agentkernel doctor` explains each backend".into(),
    })
}

/// Docker answers without a request: `$DOCKER_HOST` is set or its socket listens.
fn docker_reachable() -> bool {
    std::env::var_os("DOCKER_HOST").is_some_and(|h| !h.is_empty())
        || podman::listening(std::path::Path::new("/var/run/docker.sock"))
}

/// The backend that holds the kept sandbox `name`, from its record.
pub fn holding(
    store: &Store,
    name: &str,
) -> Result<(Box<dyn Backend>, agentkernel_core::state::SandboxRecord)> {
    agentkernel_core::names::validate(name)?;
    let record = store
        .load(name)?
        .ok_or_else(|| Error::NoSuchSandbox(name.to_string()))?;
    Ok((open(record.backend, store)?, record))
}

/// Backends that may hold our sandboxes: native (its state is ours alone),
/// Docker when reachable without a request, Podman when it has kept
/// sandboxes or a service is listening. (Never starts a Podman service just
/// to look.)
pub fn in_use(store: &Store) -> Vec<Box<dyn Backend>> {
    let mut found: Vec<Box<dyn Backend>> = vec![
        Box::new(NativeBackend::new(store.clone())),
        // Kept VMs are known from the state directory alone (cheap).
        Box::new(crate::commands::qemu::QemuBackend::new(store.clone())),
    ];
    found.extend(
        engines_in_use(store)
            .into_iter()
            .map(|e| Box::new(EngineBackend::from_engine(e, store.clone())) as Box<dyn Backend>),
    );
    found
}

/// The engines behind Docker and Podman that may hold our containers (the
/// warm pool's `status`/`prune` work on these).
pub fn engines_in_use(store: &Store) -> Vec<Engine> {
    let mut engines = Vec::new();
    if docker_reachable() {
        engines.extend(Engine::connect().ok());
    }
    let podman_records = store
        .list()
        .iter()
        .any(|r| r.backend == BackendKind::Podman);
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

/// The engine of a container backend (the warm pool's `refill`, an SSH
/// forward into a container).
pub fn engine(kind: BackendKind) -> Result<Engine> {
    match kind {
        BackendKind::Docker => Engine::connect(),
        BackendKind::Podman => Engine::connect_podman(),
        other => Err(Error::not_supported(format!(
            "a warm pool on the {other} backend"
        ))),
    }
}
