//! `agentkernel pool status|prune` (and the hidden `refill` that `run` starts).

use agentkernel_core::state::Store;
use agentkernel_core::Result;
use agentkernel_docker::pool;

use crate::backend;
use crate::cli::PoolCommand;

pub async fn pool(cmd: PoolCommand) -> Result<i32> {
    let store = Store::open_default();
    match cmd {
        PoolCommand::Refill { key, used } => {
            let file = pool::load_key_file(&store, &key)?;
            let engine = backend::connect_named(&file.backend)?;
            pool::refill(&engine, &store, &key, used.as_deref()).await?;
            Ok(0)
        }
        PoolCommand::Status => {
            println!(
                "{:<8} {:<17} {:<28} {:<12} {:>4} {:>6}  WORKSPACE",
                "BACKEND", "KEY", "IMAGE", "PROFILE", "WARM", "IN USE"
            );
            for engine in backend::engines_in_use(&store) {
                engine.ping().await?;
                for s in pool::status(&engine, &store).await {
                    println!(
                        "{:<8} {:<17} {:<28} {:<12} {:>4} {:>6}  {}",
                        engine.name(),
                        s.key,
                        s.image,
                        s.profile,
                        s.warm,
                        s.in_use,
                        s.workspace
                    );
                }
            }
            Ok(0)
        }
        PoolCommand::Prune => {
            let mut removed = 0;
            for engine in backend::engines_in_use(&store) {
                engine.ping().await?;
                removed += pool::prune(&engine, &store).await;
            }
            eprintln!(
                "agentkernel: removed {}",
                super::counted(removed, "warm container", "warm containers")
            );
            Ok(0)
        }
    }
}
