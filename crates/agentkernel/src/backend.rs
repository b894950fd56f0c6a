//! Backend selection. Only the Docker backend exists today; the others are
//! named so that choosing one is a clear "not supported yet", never a silent
//! fallback.

use agentkernel_core::{Error, Result};

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

    pub fn parse(name: &str) -> Result<BackendKind> {
        BackendKind::ALL
            .into_iter()
            .find(|b| b.name() == name)
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
            BackendKind::Docker => None,
            BackendKind::Native => {
                Some("the native (namespaces, no daemon) backend is not built yet")
            }
            BackendKind::Podman => Some("the podman backend is not built yet"),
            BackendKind::Firecracker => Some("the firecracker backend is not built yet"),
            BackendKind::Qemu => Some("the qemu backend is not built yet"),
            BackendKind::Apple => Some("the apple backend runs only on macOS and is not built yet"),
        }
    }
}

/// `-B`, else config, else the first available in SPEC order (native, docker,
/// podman): today that is docker.
pub fn choose(flag: Option<&str>, configured: Option<&str>) -> Result<BackendKind> {
    let Some(name) = flag.or(configured) else {
        return Ok(BackendKind::Docker);
    };
    let kind = BackendKind::parse(name)?;
    if kind.unbuilt_reason().is_some() {
        return Err(Error::not_supported_hint(
            format!("backend {name}"),
            "use -B docker (`agentkernel doctor` lists what works here)",
        ));
    }
    Ok(kind)
}
