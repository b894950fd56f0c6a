//! `agentkernel run` without `--keep`: create, attach, start, wait, remove.
//! The command is the container's main process (under Docker's init, which
//! reaps zombies and forwards signals), so no extra exec round-trip is paid.

use std::collections::HashMap;

use agentkernel_core::egress::SecretValues;
use agentkernel_core::names;
use agentkernel_core::spec::{Outcome, SandboxSpec};
use agentkernel_core::state::{self, Owner, Store};
use agentkernel_core::Error;
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, KillContainerOptionsBuilder, RemoveContainerOptionsBuilder,
    ResizeContainerTTYOptionsBuilder, WaitContainerOptionsBuilder,
};
use futures_util::StreamExt;

use crate::create::{container_body, Shape};
use crate::stdio::{self, Process};
use crate::{labels, Engine};

pub async fn run(engine: &Engine, spec: &SandboxSpec, store: &Store) -> Result<Outcome, Error> {
    run_with_secrets(engine, spec, store, &[], &[], &SecretValues::default()).await
}

/// [`run`]; with `secret_files` (`--secret-file`) or an egress proxy (its
/// values in `secrets`), the command is exec'd once the files are written
/// and the proxy listens (see [`crate::secret_files`], [`crate::egress`]);
/// `files` (`[[files]]`) are copied into the created container before it
/// starts.
pub async fn run_with_secrets(
    engine: &Engine,
    spec: &SandboxSpec,
    store: &Store,
    secret_files: &[(String, String)],
    files: &[agentkernel_core::files::InjectedFile],
    secrets: &SecretValues,
) -> Result<Outcome, Error> {
    // First: a proxy that cannot start leaves nothing behind.
    let mut proxy = crate::egress::start(spec, secrets, store)?;
    let final_report = proxy.as_mut().and_then(|p| p.final_report.take());
    let spec = &*crate::egress::container_spec(spec);
    // Orphans of earlier, killed runs are collected while this one starts.
    let gc = tokio::spawn(crate::gc::collect_orphans(engine.clone(), store.clone()));

    let id = names::generated();
    let container_name = format!("{}{id}", labels::CONTAINER_PREFIX);
    let scratch = if crate::create::needs_scratch(engine.flavor, spec) {
        Some(store.run_scratch(&id, &[])?)
    } else {
        None
    };

    let mut label_map = HashMap::from([
        (labels::MANAGED.to_string(), "true".to_string()),
        (labels::KIND.to_string(), labels::KIND_RUN.to_string()),
        (labels::OWNER.to_string(), Owner::current().0),
        (labels::HOST.to_string(), labels::host_id()),
        (labels::PROFILE.to_string(), spec.policy.profile.to_string()),
    ]);
    if let Some(s) = &scratch {
        label_map.insert(labels::SCRATCH.to_string(), s.display().to_string());
    }

    // Podman writes into a created container's root only, not through the
    // mounts it will have (the workspace): there `[[files]]` wait until it
    // runs, like secret files, and the command is exec'd after them.
    let files_after_start = engine.flavor == crate::engine::Flavor::Podman && !files.is_empty();
    let exec_after_files = !secret_files.is_empty() || files_after_start || proxy.is_some();
    let result = async {
        let body = container_body(
            engine.flavor,
            spec,
            Shape {
                command: if exec_after_files {
                    crate::secret_files::idle_command()
                } else {
                    spec.exec.argv.clone()
                },
                labels: label_map,
                stdin: !exec_after_files,
                tty: spec.exec.tty && !exec_after_files,
                scratch: scratch.as_deref(),
                control_dir: None,
                auto_remove: false,
            },
        )?;
        crate::pull::create_container(engine, &spec.image, spec.pull, &container_name, body, |e| {
            engine.error("creating the sandbox", e)
        })
        .await?;
        if exec_after_files {
            // Docker writes them into the created container, as below.
            if !files_after_start {
                crate::copy::put_files(engine, &container_name, files).await?;
            }
            let files = if files_after_start { files } else { &[] };
            return crate::secret_files::drive(
                engine,
                &container_name,
                spec,
                secret_files,
                files,
                proxy,
            )
            .await;
        }
        crate::copy::put_files(engine, &container_name, files).await?;
        drive(engine, &container_name, spec).await
    }
    .await;

    remove_container(engine, &container_name).await;
    if let Some(s) = &scratch {
        let _ = state::remove_tree(s);
    }
    if let Some(pipe) = final_report {
        crate::egress::record_final_report(pipe).await;
    }
    let _ = gc.await;
    result
}

/// Force-removes a container and its anonymous volumes; absent is fine.
/// Sends `signal` (a number or name) to the container's main process;
/// best effort: a container already gone needs no signal.
pub async fn signal_container(engine: &Engine, name: &str, signal: &str) {
    let options = KillContainerOptionsBuilder::default()
        .signal(signal)
        .build();
    let _ = engine.docker.kill_container(name, Some(options)).await;
}

pub async fn remove_container(engine: &Engine, name: &str) {
    let options = RemoveContainerOptionsBuilder::default()
        .force(true)
        .v(true)
        .build();
    let _ = engine.docker.remove_container(name, Some(options)).await;
}

struct Container<'a> {
    engine: &'a Engine,
    name: &'a str,
}

impl Process for Container<'_> {
    async fn signal(&self, signo: i32) {
        signal_container(self.engine, self.name, &signo.to_string()).await
    }
    async fn kill_all(&self) {
        self.signal(libc::SIGKILL).await
    }
    async fn resize(&self, rows: u16, cols: u16) {
        let options = ResizeContainerTTYOptionsBuilder::default()
            .h(rows as i32)
            .w(cols as i32)
            .build();
        let _ = self
            .engine
            .docker
            .resize_container_tty(self.name, options)
            .await;
    }
}

async fn drive(engine: &Engine, name: &str, spec: &SandboxSpec) -> Result<Outcome, Error> {
    let options = AttachContainerOptionsBuilder::default()
        .stdin(true)
        .stdout(true)
        .stderr(true)
        .stream(true)
        .build();
    let attached = engine
        .docker
        .attach_container(name, Some(options))
        .await
        .map_err(|e| engine.error("attaching to the sandbox", e))?;

    let started = crate::exec::unix_now() - 1;
    let host_ooms_before = agentkernel_core::cgroup::host_oom_kills();
    if let Err(e) = engine.docker.start_container(name, None).await {
        return start_failure(engine, e, &spec.exec.argv[0]);
    }
    print_ports(engine, name, spec).await;

    let wait = async {
        let options = WaitContainerOptionsBuilder::default()
            .condition("not-running")
            .build();
        let mut stream = engine.docker.wait_container(name, Some(options));
        match stream.next().await {
            Some(Ok(r)) => Ok(r.status_code),
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => Ok(code),
            Some(Err(e)) => Err(engine.error("waiting for the command", e)),
            None => Err(engine.failure("the engine ended the wait without an exit code")),
        }
    };
    let process = Container { engine, name };
    let finished = stdio::supervise(
        &process,
        attached.output,
        Some(attached.input),
        spec.exec.tty,
        spec.exec.timeout,
        Default::default(),
        wait,
    )
    .await?;

    if finished.timed_out {
        return Ok(Outcome::TimedOut);
    }
    let code = stdio::init_exec_failure(engine.flavor, &finished, &spec.exec.argv[0])
        .unwrap_or(finished.exit_code as i32);
    if code == 137 && spec.policy.limits.memory_bytes.is_some() {
        let flagged = match crate::inspect::container(engine, name).await {
            Ok(info) => info.state.and_then(|s| s.oom_killed) == Some(true),
            Err(_) => false,
        };
        if flagged
            || crate::exec::gone_container_was_oom_killed(engine, name, started, host_ooms_before)
                .await
        {
            return Ok(Outcome::OutOfMemory);
        }
    }
    Ok(Outcome::Exited(code))
}

/// The engine refuses to start a command it cannot execute; report it the
/// way a shell would (127 not found, 126 not executable).
pub fn start_failure(
    engine: &Engine,
    e: bollard::errors::Error,
    program: &str,
) -> Result<Outcome, Error> {
    let message = crate::engine::message_of(&e);
    let lower = message.to_ascii_lowercase();
    if lower.contains("executable file not found") || lower.contains("no such file or directory") {
        eprintln!("agentkernel: {program}: command not found in the sandbox");
        return Ok(Outcome::Exited(127));
    }
    if lower.contains("permission denied") || lower.contains("is a directory") {
        eprintln!("agentkernel: {program}: cannot execute (permission denied)");
        return Ok(Outcome::Exited(126));
    }
    Err(engine.error("starting the sandbox", e))
}

/// Tells the user where published ports landed (on stderr).
pub async fn print_ports(engine: &Engine, name: &str, spec: &SandboxSpec) {
    if spec.ports.is_empty() {
        return;
    }
    let Ok(info) = crate::inspect::container(engine, name).await else {
        return;
    };
    let Some(ports) = info.network_settings.and_then(|n| n.ports) else {
        return;
    };
    for p in &spec.ports {
        let key = format!("{}/{}", p.container_port, p.protocol.as_str());
        for b in ports.get(&key).cloned().flatten().unwrap_or_default() {
            eprintln!(
                "agentkernel: port {}:{} -> {key}",
                b.host_ip.unwrap_or_default(),
                b.host_port.unwrap_or_default()
            );
        }
    }
}
