//! Kept sandboxes (`--keep`, `--ttl`, `--branch`, `exec`, `sandbox …`).
//!
//! The container's main process is a keep-alive loop that reads the deadline
//! from the read-only control mount and exits when it passes; the container is
//! created with auto-remove, so the engine deletes it at expiry even when no
//! agentkernel process is running. Every use moves the deadline (the documented TTL rule:
//! counts from last use); a running command refreshes it so it is never cut
//! off mid-way. `stop` freezes the sandbox (docker pause) and `start` thaws it:
//! a stopped sandbox keeps its processes and files; since its frozen
//! keep-alive cannot end it, `stop` leaves a detached agentkernel that
//! collects it at its deadline (and exits early if it is started or removed).

use std::collections::HashMap;
use std::time::Duration;

use agentkernel_core::egress::SecretValues;
use agentkernel_core::files::InjectedFile;
use agentkernel_core::spec::{ExecRequest, Outcome, SandboxSpec};
use agentkernel_core::state::{now_unix, SandboxRecord, Store};
use agentkernel_core::Error;
use bollard::models::ContainerStateStatusEnum;

use crate::create::{container_body, Shape};
use crate::oneshot::{print_ports, remove_container, signal_container, start_failure};
use crate::{labels, Engine};

pub fn container_name(sandbox: &str) -> String {
    format!("{}{sandbox}", labels::CONTAINER_PREFIX)
}

/// Status of a kept sandbox's container, or `None` when it no longer exists.
pub async fn status(
    engine: &Engine,
    sandbox: &str,
) -> Result<Option<ContainerStateStatusEnum>, Error> {
    match crate::inspect::container(engine, &container_name(sandbox)).await {
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
/// `secret_files` (`--secret-file`) and `files` (`[[files]]`) are written
/// and the egress proxy (its values in `secrets`) started when the sandbox
/// is created.
pub async fn run(
    engine: &Engine,
    spec: &SandboxSpec,
    store: &Store,
    secret_files: &[(String, String)],
    files: &[InjectedFile],
    secrets: &SecretValues,
) -> Result<Outcome, Error> {
    let keep = spec.keep.as_ref().expect("kept run without keep settings");
    if keep.reuse && store.load(&keep.name)?.is_some() {
        agentkernel_native::egress::refuse_on_reuse(spec, &keep.name)?;
    }
    let reused = keep.reuse && reuse_existing(engine, store, &keep.name).await?;
    if !reused {
        create(engine, spec, store, secret_files, files, secrets).await?;
        setup(engine, spec, store).await?;
    }
    let command = exec(engine, store, &keep.name, &spec.exec);
    let outcome = agentkernel_native::egress::observing_kept(store, &keep.name, command).await;
    eprintln!(
        "{}",
        agentkernel_core::spec::kept_message(&keep.name, keep.ttl, reused)
    );
    outcome
}

/// A template's setup, once, in the sandbox just created; on failure the
/// sandbox is removed (a half-set-up sandbox must not be reused).
pub async fn setup(engine: &Engine, spec: &SandboxSpec, store: &Store) -> Result<(), Error> {
    let Some(keep) = spec.keep.as_ref().filter(|k| !k.setup.is_empty()) else {
        return Ok(());
    };
    let request = ExecRequest {
        argv: agentkernel_core::template::setup_argv(&keep.setup),
        tty: false,
        ..spec.exec.clone()
    };
    let code = match exec(engine, store, &keep.name, &request).await {
        Ok(outcome) => outcome.exit_code(),
        Err(e) => {
            let _ = remove(engine, store, &keep.name).await;
            return Err(e);
        }
    };
    if code != 0 {
        let _ = remove(engine, store, &keep.name).await;
        return Err(Error::Conflict(agentkernel_core::template::setup_failed(
            &keep.name, code,
        )));
    }
    Ok(())
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

/// Creates the kept sandbox (also `sandbox create`, which runs no first
/// command); `files` (`[[files]]`) are copied in before anything runs in it.
pub async fn create(
    engine: &Engine,
    spec: &SandboxSpec,
    store: &Store,
    secret_files: &[(String, String)],
    files: &[InjectedFile],
    secrets: &SecretValues,
) -> Result<(), Error> {
    let keep = spec.keep.as_ref().expect("kept run without keep settings");
    // Reserve first: a bad image must not leave a name behind, but two racers must not both get it.
    let dir = store.reserve(&keep.name)?;
    let result = async {
        let proxy = crate::egress::start(spec, secrets, store)?;
        let spec = &*crate::egress::container_spec(spec);
        // The TTL counts from when the sandbox is ready (touched again
        // below): the keep-alive must not exit while the engine is slow to
        // create and start it.
        store.touch_while_starting(&keep.name, keep.ttl)?;
        let cow = crate::create::needs_scratch(engine.flavor, spec);
        let scratch = dir.join("workspace");
        let labels_map = HashMap::from([
            (labels::MANAGED.to_string(), "true".to_string()),
            (labels::KIND.to_string(), labels::KIND_KEPT.to_string()),
            (labels::NAME.to_string(), keep.name.clone()),
            (labels::HOST.to_string(), labels::host_id()),
            (labels::PROFILE.to_string(), spec.policy.profile.to_string()),
            (labels::STATE.to_string(), store.root().display().to_string()),
        ]);
        let ctl = store.control_dir(&keep.name);
        crate::secret_files::make_mount_point(&ctl, spec)?;
        let body = container_body(
            engine.flavor,
            spec,
            Shape {
                command: crate::create::keep_alive_command(),
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
        // Running: the engine writes through the container's own mounts.
        crate::copy::put_files(engine, &name, files).await?;
        if let Some(started) = proxy {
            // After `[[files]]`, which could replace a bundle; lives as
            // long as the container from here on.
            crate::egress::attach(engine, &name, started, true).await?;
        }
        crate::secret_files::write(engine, &name, secret_files).await?;
        store.touch(&keep.name, keep.ttl)?;
        store.commit(&SandboxRecord::for_kept(spec, engine.kind(), container_id))
    }
    .await;
    if result.is_err() {
        remove_container(engine, &container_name(&keep.name)).await;
        let _ = store.forget(&keep.name);
    }
    result
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
        let store = store.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            let period = (ttl / 3).clamp(Duration::from_secs(1), Duration::from_secs(60));
            loop {
                tokio::time::sleep(period).await;
                let _ = store.touch(&name, ttl);
            }
        })
    };
    let container = container_name(name);
    let result =
        crate::exec::run_counting_oom(engine, &container, req, crate::exec::KillScope::ProcessTree)
            .await;
    refresher.abort();
    // Best effort: the sandbox may have been removed during the command,
    // and then the command's own result is the one to report.
    let _ = store.touch(name, ttl);
    result
}

pub async fn stop(engine: &Engine, store: &Store, name: &str) -> Result<(), Error> {
    require(engine, store, name).await?;
    match engine.docker.pause_container(&container_name(name)).await {
        Ok(()) => {}
        Err(e) if crate::engine::is_conflict(&e) => {} // already paused
        Err(e) => return Err(engine.error("stopping the sandbox", e)),
    }
    // A frozen keep-alive cannot end the sandbox at its deadline: a detached
    // agentkernel waits for it and collects it then (if it is still expired).
    agentkernel_core::detached::spawn(store.root(), &["sandbox", "gc", "--expire", name]);
    Ok(())
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

/// `sandbox gc --expire NAME` (started detached by `stop`): waits while the
/// sandbox is stopped and removes it once its deadline passes. Returns when
/// the sandbox is gone or running again (its keep-alive then does the job).
/// Nothing else will remove a stopped sandbox until a later agentkernel
/// command runs, so an engine error is retried, never taken as the end.
pub async fn expire_when_due(engine: &Engine, store: &Store, name: &str) {
    const RETRY: Duration = Duration::from_secs(1);
    let container = container_name(name);
    let mut errors = 0u32;
    loop {
        let Some(deadline) = store.deadline(name) else {
            return; // removed (its record with it)
        };
        let state = match status(engine, name).await {
            Ok(Some(state)) => state,
            Ok(None) => return,
            Err(e) => {
                errors += 1;
                // An engine that stays unreachable for an hour has gone for good.
                if errors > 3600 {
                    eprintln!("agentkernel: giving up expiring {name}: {e}");
                    return;
                }
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        if state != ContainerStateStatusEnum::PAUSED {
            return;
        }
        let now = now_unix();
        if now < deadline {
            // Re-check now and then: the sandbox may be started or removed meanwhile.
            tokio::time::sleep(Duration::from_secs((deadline - now).min(30))).await;
            continue;
        }
        // Record first (a container without one is garbage to any later gc);
        // then kill while frozen, so thawing cannot let the sandbox run on,
        // and remove until the engine confirms it is gone.
        let _ = store.forget(name);
        for _ in 0..600 {
            signal_container(engine, &container, "SIGKILL").await;
            let _ = engine.docker.unpause_container(&container).await;
            remove_container(engine, &container).await;
            if let Ok(None) = status(engine, name).await {
                break;
            }
            tokio::time::sleep(RETRY).await;
        }
        return;
    }
}
