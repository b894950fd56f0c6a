//! Kept sandboxes (`--keep`, `--ttl`, `--branch`, `exec`, `sandbox …`).
//!
//! The container's main process is a keep-alive loop that reads the deadline
//! from the read-only control mount and exits when it passes; the container is
//! created with auto-remove, so the engine deletes it at expiry even when no
//! agentkernel process is running. Every use moves the deadline (SPEC: TTL
//! counts from last use); a running command refreshes it so it is never cut
//! off mid-way. `stop` freezes the sandbox (docker pause) and `start` thaws it:
//! a stopped sandbox keeps its processes and files, and a later agentkernel
//! command removes it once its deadline has passed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use agentkernel_core::spec::{ExecRequest, Outcome, SandboxSpec};
use agentkernel_core::state::{now_unix, SandboxRecord, Store};
use agentkernel_core::Error;
use bollard::exec::{CreateExecOptions, ResizeExecOptions, StartExecOptions, StartExecResults};
use bollard::models::ContainerStateStatusEnum;
use tokio::sync::Notify;

use crate::create::{container_body, Shape, CONTROL_MOUNT};
use crate::engine::Flavor;
use crate::oneshot::{print_ports, remove_container, start_failure};
use crate::stdio::{self, Process};
use crate::{labels, Engine};

/// Docker mounts its init (tini) at this path in containers created with
/// `init`; execs run under it too, for shell-like 126/127 codes. Podman's
/// catatonit has no such codes, and Podman's exec reports them itself.
fn exec_prefix(flavor: Flavor) -> &'static [&'static str] {
    match flavor {
        Flavor::Docker => &["/sbin/docker-init", "-s", "--"],
        Flavor::Podman => &[],
    }
}

fn keep_alive_script() -> String {
    format!(
        "trap 'exit 0' TERM INT HUP; \
         while :; do \
           now=$(date +%s); d=$(cat {CONTROL_MOUNT}/deadline 2>/dev/null || echo 0); \
           [ \"$now\" -ge \"$d\" ] && exit 0; \
           s=$((d - now)); [ \"$s\" -gt 2 ] && s=2; \
           sleep \"$s\" & wait $!; \
         done"
    )
}

pub fn container_name(sandbox: &str) -> String {
    format!("{}{sandbox}", labels::CONTAINER_PREFIX)
}

/// Status of a kept sandbox's container, or `None` when it no longer exists.
pub async fn status(
    engine: &Engine,
    sandbox: &str,
) -> Result<Option<ContainerStateStatusEnum>, Error> {
    match engine
        .docker
        .inspect_container(&container_name(sandbox), None)
        .await
    {
        Ok(info) => Ok(Some(
            info.state
                .and_then(|s| s.status)
                .unwrap_or(ContainerStateStatusEnum::EMPTY),
        )),
        Err(e) if crate::engine::is_not_found(&e) => Ok(None),
        Err(e) => Err(engine.error("inspecting the sandbox", e)),
    }
}

/// `run --keep/--ttl/--branch`: create (or, for `--branch`, reuse) and run the first command.
pub async fn run(engine: &Engine, spec: &SandboxSpec, store: &Store) -> Result<Outcome, Error> {
    let keep = spec.keep.as_ref().expect("kept run without keep settings");
    let reused = keep.reuse && reuse_existing(engine, store, &keep.name).await?;
    if !reused {
        create(engine, spec, store).await?;
    }
    let outcome = exec(engine, store, &keep.name, &spec.exec).await;
    eprintln!(
        "agentkernel: sandbox {} kept{} (expires {} after last use); `agentkernel exec {} -- CMD` runs in it",
        keep.name,
        if reused { ", reused" } else { "" },
        agentkernel_core::parse::format_duration(keep.ttl),
        keep.name
    );
    outcome
}

/// For `--branch`: true when a live sandbox of this name exists (thawed if stopped).
async fn reuse_existing(engine: &Engine, store: &Store, name: &str) -> Result<bool, Error> {
    // A concurrent creator holds the reservation until it commits: give it time.
    for _ in 0..100 {
        if store.load(name)?.is_some() || !store.sandbox_dir(name).exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if store.load(name)?.is_none() {
        return Ok(false);
    }
    match status(engine, name).await? {
        Some(ContainerStateStatusEnum::PAUSED) => {
            start(engine, store, name).await?;
            Ok(true)
        }
        Some(ContainerStateStatusEnum::RUNNING) => Ok(true),
        // Expired or removed behind our back: start afresh under the same name.
        _ => {
            remove_container(engine, &container_name(name)).await;
            store.forget(name)?;
            Ok(false)
        }
    }
}

async fn create(engine: &Engine, spec: &SandboxSpec, store: &Store) -> Result<(), Error> {
    let keep = spec.keep.as_ref().expect("kept run without keep settings");
    // Reserve first: a bad image must not leave a name behind, but two racers must not both get it.
    let dir = store.reserve(&keep.name)?;
    let result = async {
        store.touch(&keep.name, keep.ttl)?;
        let cow = crate::create::needs_scratch(engine.flavor, spec);
        let scratch = dir.join("workspace");
        let labels_map = HashMap::from([
            (labels::MANAGED.to_string(), "true".to_string()),
            (labels::KIND.to_string(), labels::KIND_KEPT.to_string()),
            (labels::NAME.to_string(), keep.name.clone()),
            (labels::HOST.to_string(), labels::host_id()),
            (labels::PROFILE.to_string(), spec.policy.profile.to_string()),
        ]);
        let ctl = store.control_dir(&keep.name);
        let body = container_body(
            engine.flavor,
            spec,
            Shape {
                command: vec!["/bin/sh".into(), "-c".into(), keep_alive_script()],
                labels: labels_map,
                stdin: false,
                tty: false,
                scratch: cow.then_some(scratch.as_path()),
                control_dir: Some(&ctl),
                auto_remove: true,
            },
        )?;
        let name = container_name(&keep.name);
        let container_id = crate::pull::create_container(engine, &spec.image, spec.pull, &name, body, |e| {
            if crate::engine::is_conflict(&e) {
                Error::NameClash(keep.name.clone())
            } else {
                engine.error("creating the sandbox", e)
            }
        })
        .await?;
        if let Err(e) = engine.docker.start_container(&name, None).await {
            if start_failure(engine, e, "/bin/sh").is_ok() {
                return Err(Error::Conflict(format!(
                    "image {} has no /bin/sh, which kept sandboxes need for their keep-alive process; use an image with a shell",
                    spec.image
                )));
            }
            return Err(engine.failure("starting the kept sandbox failed"));
        }
        print_ports(engine, &name, spec).await;
        store.commit(&SandboxRecord {
            name: keep.name.clone(),
            backend: engine.name().into(),
            container_id,
            image: spec.image.clone(),
            profile: spec.policy.profile.to_string(),
            created_unix: now_unix(),
            ttl_secs: keep.ttl.as_secs(),
            workspace: spec.workspace.as_ref().map(|w| w.host.clone()),
        })
    }
    .await;
    if result.is_err() {
        remove_container(engine, &container_name(&keep.name)).await;
        let _ = store.forget(&keep.name);
    }
    result
}

struct ExecProcess<'a> {
    engine: &'a Engine,
    exec_id: String,
}

impl ExecProcess<'_> {
    async fn host_pid(&self) -> Option<i32> {
        let info = self.engine.docker.inspect_exec(&self.exec_id).await.ok()?;
        info.pid.filter(|p| *p > 0).map(|p| p as i32)
    }
}

impl Process for ExecProcess<'_> {
    // The Engine API cannot signal an exec; on the engine's own host we can.
    async fn signal(&self, signo: i32) {
        if let Some(pid) = self.host_pid().await {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, signo) };
        }
    }
    async fn kill_all(&self) {
        if let Some(pid) = self.host_pid().await {
            kill_tree(pid);
        }
    }
    async fn resize(&self, rows: u16, cols: u16) {
        let _ = self
            .engine
            .docker
            .resize_exec(
                &self.exec_id,
                ResizeExecOptions {
                    height: rows,
                    width: cols,
                },
            )
            .await;
    }
}

/// SIGKILLs `root` and every descendant (found through /proc parent links).
fn kill_tree(root: i32) {
    let mut parents: HashMap<i32, i32> = HashMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let Some(after) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
                continue;
            };
            if let Some(ppid) = after.split(' ').nth(1).and_then(|s| s.parse().ok()) {
                parents.insert(pid, ppid);
            }
        }
    }
    let mut doomed = vec![root];
    let mut i = 0;
    while i < doomed.len() {
        let p = doomed[i];
        doomed.extend(parents.iter().filter(|(_, pp)| **pp == p).map(|(c, _)| *c));
        i += 1;
    }
    for pid in doomed {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Runs one command in a kept sandbox.
pub async fn exec(
    engine: &Engine,
    store: &Store,
    name: &str,
    req: &ExecRequest,
) -> Result<Outcome, Error> {
    let record = store
        .load(name)?
        .ok_or_else(|| Error::NoSuchSandbox(name.to_string()))?;
    match status(engine, name).await? {
        Some(ContainerStateStatusEnum::RUNNING) => {}
        Some(ContainerStateStatusEnum::PAUSED) => {
            return Err(Error::Conflict(format!(
                "sandbox {name} is stopped; start it with `agentkernel sandbox start {name}`"
            )))
        }
        _ => {
            store.forget(name)?;
            return Err(Error::NoSuchSandbox(format!(
                "{name} (it expired or was removed)"
            )));
        }
    }
    let ttl = Duration::from_secs(record.ttl_secs);
    store.touch(name, ttl)?;
    // Keep the deadline ahead of a long command so the keep-alive loop never cuts it off.
    let refresher = {
        let store = Store::new(store.root().to_path_buf());
        let name = name.to_string();
        tokio::spawn(async move {
            let period = (ttl / 3).clamp(Duration::from_secs(1), Duration::from_secs(60));
            loop {
                tokio::time::sleep(period).await;
                let _ = store.touch(&name, ttl);
            }
        })
    };
    let result = exec_in(engine, name, req).await;
    refresher.abort();
    store.touch(name, ttl)?;
    result
}

async fn exec_in(engine: &Engine, name: &str, req: &ExecRequest) -> Result<Outcome, Error> {
    let mut cmd: Vec<String> = exec_prefix(engine.flavor)
        .iter()
        .map(|s| s.to_string())
        .collect();
    cmd.extend(req.argv.iter().cloned());
    let env: Vec<String> = req.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let created = engine
        .docker
        .create_exec(
            &container_name(name),
            CreateExecOptions {
                attach_stdin: Some(true),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                tty: Some(req.tty),
                env: (!env.is_empty()).then_some(env),
                cmd: Some(cmd),
                working_dir: req.workdir.clone(),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| engine.error("creating the command", e))?;
    let started = engine
        .docker
        .start_exec(
            &created.id,
            Some(StartExecOptions {
                detach: false,
                tty: req.tty,
                output_capacity: None,
            }),
        )
        .await;
    let (output, input) = match started {
        Ok(StartExecResults::Attached { output, input }) => (output, input),
        Ok(StartExecResults::Detached) => unreachable!("started attached"),
        Err(e) => return start_failure(engine, e, &req.argv[0]),
    };
    let process = ExecProcess {
        engine,
        exec_id: created.id.clone(),
    };
    let done = Arc::new(Notify::new());
    let wait = {
        let done = done.clone();
        let id = created.id.clone();
        async move {
            done.notified().await;
            // The stream closes as the process exits; the engine records the code a moment later.
            for _ in 0..500 {
                let info = engine
                    .docker
                    .inspect_exec(&id)
                    .await
                    .map_err(|e| engine.error("inspecting the command", e))?;
                if info.running != Some(true) {
                    return Ok(info.exit_code.unwrap_or(0));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(engine.failure("the command's output ended but it did not exit"))
        }
    };
    let finished = stdio::supervise(
        &process,
        output,
        Some(input),
        req.tty,
        req.timeout,
        done,
        wait,
    )
    .await?;
    if finished.timed_out {
        return Ok(Outcome::TimedOut);
    }
    Ok(Outcome::Exited(finished.exit_code as i32))
}

pub async fn stop(engine: &Engine, store: &Store, name: &str) -> Result<(), Error> {
    require(engine, store, name).await?;
    match engine.docker.pause_container(&container_name(name)).await {
        Ok(()) => Ok(()),
        Err(e) if crate::engine::is_conflict(&e) => Ok(()), // already paused
        Err(e) => Err(engine.error("stopping the sandbox", e)),
    }
}

pub async fn start(engine: &Engine, store: &Store, name: &str) -> Result<(), Error> {
    let record = require(engine, store, name).await?;
    store.touch(name, Duration::from_secs(record.ttl_secs))?;
    match engine.docker.unpause_container(&container_name(name)).await {
        Ok(()) => Ok(()),
        Err(e) if crate::engine::is_conflict(&e) => Ok(()), // not paused
        Err(e) => Err(engine.error("starting the sandbox", e)),
    }
}

pub async fn remove(engine: &Engine, store: &Store, name: &str) -> Result<(), Error> {
    if store.load(name)?.is_none() && status(engine, name).await?.is_none() {
        return Err(Error::NoSuchSandbox(name.to_string()));
    }
    remove_container(engine, &container_name(name)).await;
    store.forget(name)
}

/// The record of a sandbox that still exists.
async fn require(engine: &Engine, store: &Store, name: &str) -> Result<SandboxRecord, Error> {
    let record = store
        .load(name)?
        .ok_or_else(|| Error::NoSuchSandbox(name.to_string()))?;
    if status(engine, name).await?.is_none() {
        store.forget(name)?;
        return Err(Error::NoSuchSandbox(format!(
            "{name} (it expired or was removed)"
        )));
    }
    Ok(record)
}
