//! `agentkernel doctor`: which backends work here, and for each one that
//! doesn't, why and how to fix it.

use agentkernel_core::Result;
use agentkernel_docker::Engine;

use crate::backend::BackendKind;

pub async fn doctor() -> Result<i32> {
    let mut ready = 0;
    for kind in BackendKind::ALL {
        let line = match kind.unbuilt_reason() {
            Some(why) => format!("unavailable  {why}; use -B docker"),
            None => match docker_status().await {
                Ok(version) => {
                    ready += 1;
                    format!("ready        {version}")
                }
                Err(e) => format!("unavailable  {e}"),
            },
        };
        println!("{:<12} {line}", kind.name());
    }
    let default = if ready > 0 { "docker" } else { "none" };
    println!("default      {default}");
    Ok(if ready > 0 { 0 } else { 1 })
}

async fn docker_status() -> Result<String> {
    let engine = Engine::connect()?;
    let version = engine.ping().await?;
    Ok(format!("{version} at {}", engine.address))
}
