//! `agentkernel sandbox list|info|stop|start|remove|gc`.

use agentkernel_core::state::{now_unix, SandboxRecord, Store};
use agentkernel_core::{names, parse, Result};
use agentkernel_docker::{gc, kept, Engine};
use serde_json::json;

use crate::cli::SandboxCommand;

pub async fn sandbox(cmd: SandboxCommand) -> Result<i32> {
    let store = Store::open_default();
    let engine = Engine::connect()?;
    match cmd {
        SandboxCommand::List { json } => list(&engine, &store, json).await,
        SandboxCommand::Info { name, json } => info(&engine, &store, &name, json).await,
        SandboxCommand::Stop { name } => {
            names::validate(&name)?;
            kept::stop(&engine, &store, &name).await.map(|_| 0)
        }
        SandboxCommand::Start { name } => {
            names::validate(&name)?;
            kept::start(&engine, &store, &name).await.map(|_| 0)
        }
        SandboxCommand::Remove { names: list } => {
            for name in &list {
                names::validate(name)?;
            }
            for name in &list {
                kept::remove(&engine, &store, name).await?;
                eprintln!("agentkernel: removed {name}");
            }
            Ok(0)
        }
        SandboxCommand::Gc => {
            engine.ping().await?;
            let collected = gc::collect_orphans(engine, store).await;
            eprintln!(
                "agentkernel: removed {} container(s) and {} leftover director(ies)",
                collected.containers.len(),
                collected.directories
            );
            Ok(0)
        }
    }
}

struct Row {
    record: SandboxRecord,
    status: String,
    expires_in: Option<u64>,
}

impl Row {
    fn json(&self) -> serde_json::Value {
        json!({
            "name": self.record.name,
            "backend": self.record.backend,
            "status": self.status,
            "image": self.record.image,
            "profile": self.record.profile,
            "created_unix": self.record.created_unix,
            "ttl_secs": self.record.ttl_secs,
            "expires_in_secs": self.expires_in,
            "workspace": self.record.workspace,
            "container_id": self.record.container_id,
        })
    }
}

async fn rows(engine: &Engine, store: &Store) -> Result<Vec<Row>> {
    engine.ping().await?;
    gc::collect_orphans(engine.clone(), Store::new(store.root().to_path_buf())).await;
    let mut out = Vec::new();
    for record in store.list() {
        let status = match kept::status(engine, &record.name).await? {
            None => continue,
            Some(s) => match s.to_string().as_str() {
                "paused" => "stopped".to_string(),
                other => other.to_string(),
            },
        };
        let expires_in = store
            .deadline(&record.name)
            .map(|d| d.saturating_sub(now_unix()));
        out.push(Row {
            record,
            status,
            expires_in,
        });
    }
    Ok(out)
}

async fn list(engine: &Engine, store: &Store, as_json: bool) -> Result<i32> {
    let rows = rows(engine, store).await?;
    if as_json {
        let list: Vec<_> = rows.iter().map(Row::json).collect();
        println!("{}", serde_json::to_string_pretty(&list).expect("json"));
        return Ok(0);
    }
    println!(
        "{:<28} {:<8} {:<8} {:<12} {:<10} IMAGE",
        "NAME", "BACKEND", "STATUS", "PROFILE", "EXPIRES"
    );
    for r in &rows {
        println!(
            "{:<28} {:<8} {:<8} {:<12} {:<10} {}",
            r.record.name,
            r.record.backend,
            r.status,
            r.record.profile,
            expires(r.expires_in),
            r.record.image
        );
    }
    Ok(0)
}

async fn info(engine: &Engine, store: &Store, name: &str, as_json: bool) -> Result<i32> {
    names::validate(name)?;
    let rows = rows(engine, store).await?;
    let row = rows
        .into_iter()
        .find(|r| r.record.name == name)
        .ok_or_else(|| agentkernel_core::Error::NoSuchSandbox(name.to_string()))?;
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&row.json()).expect("json")
        );
        return Ok(0);
    }
    let r = &row.record;
    println!("name:       {}", r.name);
    println!("backend:    {}", r.backend);
    println!("status:     {}", row.status);
    println!("image:      {}", r.image);
    println!("profile:    {}", r.profile);
    println!(
        "ttl:        {}",
        parse::format_duration(std::time::Duration::from_secs(r.ttl_secs))
    );
    println!("expires in: {}", expires(row.expires_in));
    if let Some(w) = &r.workspace {
        println!("workspace:  {}", w.display());
    }
    println!("container:  {}", r.container_id);
    Ok(0)
}

fn expires(secs: Option<u64>) -> String {
    match secs {
        Some(0) => "now".into(),
        Some(s) => parse::format_duration(std::time::Duration::from_secs(s)),
        None => "-".into(),
    }
}
