//! `agentkernel sandbox list|info|pause|resume|start|remove|gc`, across
//! every backend that holds kept sandboxes (`stop`, `extend-ttl`, `clean`:
//! `sandbox_lifecycle.rs`; `create`, `cp`: their own modules).

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
        SandboxCommand::Create(args) => super::sandbox_create::create(*args).await,
        SandboxCommand::Stop { name } => {
            super::sandbox_lifecycle::stop_command(&store, &name).await
        }
        SandboxCommand::ExtendTtl { name, duration, by } => super::sandbox_lifecycle::extend_ttl(
            &store,
            &name,
            duration.or(by).as_deref().unwrap_or("1h"),
        ),
        SandboxCommand::Clean { force, all } => {
            super::sandbox_lifecycle::clean(&store, force, all).await
        }
        SandboxCommand::Cp { src, dest } => super::sandbox_cp::cp(&store, &src, &dest).await,
        SandboxCommand::Pause { name } => {
            let (backend, _) = backend::holding(&store, &name)?;
            backend.pause(&name).await?;
            eprintln!(
                "agentkernel: paused {name}: its processes are frozen, its files kept; \
                 `agentkernel sandbox resume {name}` resumes it (it still expires at its TTL)"
            );
            Ok(0)
        }
        SandboxCommand::Start { name, .. } => {
            names::validate(&name)?;
            super::sandbox_lifecycle::clear_stopped(&store, &name)?;
            thaw(&store, &name).await?;
            eprintln!("agentkernel: started {name}: commands run in it again");
            Ok(0)
        }
        SandboxCommand::Resume { name } => {
            thaw(&store, &name).await?;
            eprintln!("agentkernel: resumed {name}: its processes run again");
            Ok(0)
        }
        SandboxCommand::Remove { names: list } => {
            for name in &list {
                names::validate(name)?;
            }
            for name in &list {
                remove_one(&store, name).await?;
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
            collect_garbage(&store).await?;
            Ok(0)
        }
    }
}

/// `sandbox gc`: removes expired sandboxes and what killed agentkernel
/// processes left, and says how much.
pub(super) async fn collect_garbage(store: &Store) -> Result<()> {
    let (mut containers, mut dirs) = (0, 0);
    for backend in backend::in_use(store) {
        let c = backend.gc().await?;
        containers += c.containers;
        dirs += c.directories;
    }
    dirs += crate::ssh::collect(store);
    eprintln!(
        "agentkernel: removed {} and {}",
        super::counted(containers, "container", "containers"),
        super::counted(dirs, "leftover directory", "leftover directories")
    );
    Ok(())
}

/// Removes one kept sandbox, on whichever backend holds it.
pub(super) async fn remove_one(store: &Store, name: &str) -> Result<()> {
    let (backend, _) = backend::holding(store, name)?;
    backend.remove(name).await?;
    // Its SSH server (run --ssh), if any, goes with it.
    crate::ssh::stop(store, name);
    Ok(())
}

/// Thaws a paused sandbox (a running one is left as it is; a rootless
/// native one, with no freezer, is never paused).
async fn thaw(store: &Store, name: &str) -> Result<()> {
    let (backend, record) = backend::holding(store, name)?;
    match backend.status(&record).await?.as_deref() {
        // The backend's resume also says when the sandbox is gone.
        Some("paused") | None => backend.resume(name).await,
        Some(_) => Ok(()),
    }
}

pub(super) struct Row {
    pub(super) record: SandboxRecord,
    pub(super) status: String,
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
pub(super) async fn rows(store: &Store) -> Result<Vec<Row>> {
    let mut out = Vec::new();
    for backend in backend::in_use(store) {
        backend.gc().await?;
        let kind = backend.kind();
        for record in store.list_of(kind) {
            let Some(status) = backend.status(&record).await? else {
                continue;
            };
            let expires_in = store
                .deadline(&record.name)
                .map(|d| d.saturating_sub(now_unix()));
            out.push(Row {
                status: super::sandbox_lifecycle::shown_status(store, &record.name, &status),
                record,
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
        parse::format_ttl(std::time::Duration::from_secs(r.ttl_secs))
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
        Some(s) if s >= agentkernel_core::state::NO_EXPIRY - now_unix() => "never".into(),
        Some(0) => "now".into(),
        Some(s) => parse::format_duration(std::time::Duration::from_secs(s)),
        None => "-".into(),
    }
}
