//! `agentkernel sandbox list|info|stop|start|remove|gc`, across every engine
//! that holds kept sandboxes.

use agentkernel_core::state::{now_unix, SandboxRecord, Store};
use agentkernel_core::{names, parse, Error, Result};
use serde_json::json;

use crate::backend;
use crate::cli::SandboxCommand;

pub async fn sandbox(cmd: SandboxCommand) -> Result<i32> {
    let store = Store::open_default();
    match cmd {
        SandboxCommand::List { json } => list(&store, json).await,
        SandboxCommand::Info { name, json } => info(&store, &name, json).await,
        SandboxCommand::Stop { name } => {
            let (backend, _) = backend::holding(&store, &name)?;
            backend.stop(&name).await?;
            eprintln!(
                "agentkernel: stopped {name}: its processes are frozen, its files kept; \
                 `agentkernel sandbox start {name}` resumes it (it still expires at its TTL)"
            );
            Ok(0)
        }
        SandboxCommand::Start { name } => {
            let (backend, _) = backend::holding(&store, &name)?;
            backend.start(&name).await?;
            eprintln!("agentkernel: started {name}: its processes run again");
            Ok(0)
        }
        SandboxCommand::Remove { names: list } => {
            for name in &list {
                names::validate(name)?;
            }
            for name in &list {
                let (backend, _) = backend::holding(&store, name)?;
                backend.remove(name).await?;
                eprintln!("agentkernel: removed {name}");
            }
            Ok(0)
        }
        SandboxCommand::Gc { expire: Some(name) } => {
            let (backend, _) = backend::holding(&store, &name)?;
            backend.expire_when_due(&name).await?;
            Ok(0)
        }
        SandboxCommand::Gc { expire: None } => {
            let (mut containers, mut dirs) = (0, 0);
            for backend in backend::in_use(&store) {
                let c = backend.gc().await?;
                containers += c.containers;
                dirs += c.directories;
            }
            eprintln!(
                "agentkernel: removed {} and {}",
                super::counted(containers, "container", "containers"),
                super::counted(dirs, "leftover directory", "leftover directories")
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
            "container_id": self.record.handle,
        })
    }
}

/// Live kept sandboxes of every backend in use, after collecting expired ones.
async fn rows(store: &Store) -> Result<Vec<Row>> {
    let mut out = Vec::new();
    for backend in backend::in_use(store) {
        backend.gc().await?;
        let kind = backend.kind();
        for record in store.list().into_iter().filter(|r| r.backend == kind) {
            let Some(status) = backend.status(&record).await? else {
                continue;
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
    }
    out.sort_by(|a, b| a.record.name.cmp(&b.record.name));
    Ok(out)
}

async fn list(store: &Store, as_json: bool) -> Result<i32> {
    let rows = rows(store).await?;
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

async fn info(store: &Store, name: &str, as_json: bool) -> Result<i32> {
    names::validate(name)?;
    let row = rows(store)
        .await?
        .into_iter()
        .find(|r| r.record.name == name)
        .ok_or_else(|| Error::NoSuchSandbox(name.to_string()))?;
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
    println!("container:  {}", r.handle);
    Ok(0)
}

fn expires(secs: Option<u64>) -> String {
    match secs {
        Some(0) => "now".into(),
        Some(s) => parse::format_duration(std::time::Duration::from_secs(s)),
        None => "-".into(),
    }
}
