//! `agentkernel doctor`: which backends work here, and for each one that
//! doesn't, why and how to fix it.

use agentkernel_core::Result;
use agentkernel_docker::{podman, Engine};

use crate::backend::{self, BackendKind};

pub async fn doctor() -> Result<i32> {
    let mut ready = 0;
    for kind in BackendKind::ALL {
        let line = match kind.unbuilt_reason() {
            Some(why) => format!("unavailable  {why}; use -B docker or -B podman"),
            None if kind == BackendKind::Native => match agentkernel_native::host::check() {
                Ok(found) => {
                    ready += 1;
                    format!(
                        "ready        Linux {} ({}), no daemon",
                        found.kernel, found.detail
                    )
                }
                Err(why) => format!("unavailable  {why}"),
            },
            None => match engine_status(kind).await {
                Ok(status) => {
                    ready += 1;
                    format!("ready        {status}")
                }
                Err(e) => format!("unavailable  {e}"),
            },
        };
        println!("{:<12} {line}", kind.name());
    }
    let default = match backend::choose(None, None) {
        Ok(kind) => kind.name().to_string(),
        Err(e) => format!("none ({e})"),
    };
    println!("default      {default}");
    Ok(if ready > 0 { 0 } else { 1 })
}

async fn engine_status(kind: BackendKind) -> Result<String> {
    let engine: Engine = backend::connect(kind)?;
    let version = engine.ping().await?;
    let mut status = format!("{version} at {}", engine.address);
    if kind == BackendKind::Podman {
        if engine
            .address
            .ends_with(&format!("{}/podman.sock", podman::private_dir().display()))
        {
            status.push_str(&format!(
                " (agentkernel's private `podman system service`, exits after {}s idle)",
                podman::SERVICE_IDLE_SECS
            ));
        }
        if podman::needs_runc() {
            status.push_str("; hybrid cgroups: containers use runc");
        }
    }
    Ok(status)
}
