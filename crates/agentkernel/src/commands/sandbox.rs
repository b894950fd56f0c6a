//! `agentkernel sandbox list|info|stop|start|remove|gc`, across every engine
//! that holds kept sandboxes.

use agentkernel_core::state::{now_unix, SandboxRecord, Store};
use agentkernel_core::{names, parse, Error, Result};
use agentkernel_docker::{gc, kept, Engine};
use serde_json::json;

use crate::backend;
use crate::cli::SandboxCommand;

pub async fn sandbox(cmd: SandboxCommand) -> Result<i32> {
    let store = Store::open_default();
    match cmd {
        SandboxCommand::List { json } => list(&store, json).await,
        SandboxCommand::Info { name, json } => info(&store, &name, json).await,
        SandboxCommand::Stop { name } => {
            if !native_set_stopped(&store, &name, true)? {
                let engine = engine_of(&store, &name)?;
                kept::stop(&engine, &store, &name).await?;
            }
            eprintln!(
                "agentkernel: stopped {name}: its processes are frozen, its files kept; \
                 `agentkernel sandbox start {name}` resumes it (it still expires at its TTL)"
            );
            Ok(0)
        }
        SandboxCommand::Start { name } => {
            if !native_set_stopped(&store, &name, false)? {
                let engine = engine_of(&store, &name)?;
                kept::start(&engine, &store, &name).await?;
            }
            eprintln!("agentkernel: started {name}: its processes run again");
            Ok(0)
        }
        SandboxCommand::Remove { names: list } => {
            for name in &list {
                names::validate(name)?;
            }
            for name in &list {
                if is_native(&store, name)? {
                    agentkernel_native::kept::remove(&store, name).map_err(|e| Error::Backend {
                        backend: "native",
                        message: e.to_string(),
                    })?;
                    crate::ssh::stop(&store, name);
                    eprintln!("agentkernel: removed {name}");
                    continue;
                }
                let engine = engine_of(&store, name)?;
                kept::remove(&engine, &store, name).await?;
                crate::ssh::stop(&store, name);
                eprintln!("agentkernel: removed {name}");
            }
            Ok(0)
        }
        SandboxCommand::Gc { expire: Some(name) } => {
            let engine = engine_of(&store, &name)?;
            kept::expire_when_due(&engine, &store, &name).await;
            Ok(0)
        }
        SandboxCommand::Gc { expire: None } => {
            let (mut containers, mut dirs) = (0, 0);
            dirs += agentkernel_native::gc::orphaned_runs(&store);
            dirs += agentkernel_native::kept::collect(&store);
            for engine in backend::engines_in_use(&store) {
                engine.ping().await?;
                let c = gc::collect_orphans(engine, store.clone()).await;
                containers += c.containers.len();
                dirs += c.directories;
            }
            dirs += crate::ssh::collect(&store);
            eprintln!(
                "agentkernel: removed {} and {}",
                super::counted(containers, "container", "containers"),
                super::counted(dirs, "leftover directory", "leftover directories")
            );
            Ok(0)
        }
    }
}

fn is_native(store: &Store, name: &str) -> Result<bool> {
    Ok(store
        .load(name)?
        .ok_or_else(|| Error::NoSuchSandbox(name.to_string()))?
        .backend
        == "native")
}

/// `stop`/`start` of a native sandbox (freeze/thaw); false for other backends.
fn native_set_stopped(store: &Store, name: &str, stopped: bool) -> Result<bool> {
    names::validate(name)?;
    if !is_native(store, name)? {
        return Ok(false);
    }
    agentkernel_native::kept::set_stopped(store, name, stopped).map_err(|e| Error::Backend {
        backend: "native",
        message: e.to_string(),
    })?;
    Ok(true)
}

/// The engine holding `name`, from its record.
fn engine_of(store: &Store, name: &str) -> Result<Engine> {
    names::validate(name)?;
    let record = store
        .load(name)?
        .ok_or_else(|| Error::NoSuchSandbox(name.to_string()))?;
    backend::connect_named(&record.backend)
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

/// Live kept sandboxes of every engine in use, after collecting expired ones.
async fn rows(store: &Store) -> Result<Vec<Row>> {
    let mut out = Vec::new();
    agentkernel_native::kept::collect(store);
    for record in store.list().into_iter().filter(|r| r.backend == "native") {
        let Some(status) = agentkernel_native::kept::status(store, &record.name) else {
            continue;
        };
        let expires_in = store
            .deadline(&record.name)
            .map(|d| d.saturating_sub(now_unix()));
        out.push(Row {
            record,
            status: status.to_string(),
            expires_in,
        });
    }
    for engine in backend::engines_in_use(store) {
        engine.ping().await?;
        gc::collect_orphans(engine.clone(), store.clone()).await;
        for record in store
            .list()
            .into_iter()
            .filter(|r| r.backend == engine.name())
        {
            let status = match kept::status(&engine, &record.name).await? {
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
