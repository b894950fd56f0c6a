//! Running one command in an existing container through the exec API: used by
//! kept sandboxes and by claimed pool containers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use agentkernel_core::spec::{ExecRequest, Outcome};
use agentkernel_core::Error;
use bollard::exec::{CreateExecOptions, ResizeExecOptions, StartExecOptions, StartExecResults};
use tokio::sync::Notify;

use crate::engine::Flavor;
use crate::oneshot::start_failure;
use crate::stdio::{self, Process};
use crate::Engine;

/// Execs run under the engine's init, mounted in containers created with
/// `init`: as a child subreaper it keeps everything the command starts
/// (double forks included) in one tree that a timeout can kill, forwards
/// signals, and reports exec failures (tini as 126/127; catatonit by a
/// message, see [`stdio::init_exec_failure`]). Podman's init is catatonit or
/// tini, whichever the host has (see [`crate::podman_init`]).
pub(crate) fn exec_prefix(engine: &Engine) -> Vec<&'static str> {
    match engine.flavor {
        Flavor::Docker => vec!["/sbin/docker-init", "-s", "--"],
        Flavor::Podman => {
            let mut prefix = vec![PODMAN_INIT];
            prefix.extend(engine.podman_init.exec_args());
            prefix
        }
    }
}

/// Where Podman mounts its init in a container created with `init`.
pub(crate) const PODMAN_INIT: &str = "/run/podman-init";

/// What "kill everything the command started" means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillScope {
    /// The container lives on (kept sandbox): kill the exec'd process tree.
    ProcessTree,
    /// The container exists for this one command (pool): kill the container.
    Container,
}

struct ExecProcess<'a> {
    engine: &'a Engine,
    container: &'a str,
    exec_id: String,
    scope: KillScope,
}

impl ExecProcess<'_> {
    /// The exec's process on the engine's host. Docker reports 0 for a short
    /// while after the process started, so a signal that arrives early waits
    /// for the real pid instead of being dropped.
    async fn host_pid(&self) -> Option<i32> {
        for _ in 0..1000 {
            let info = self.engine.docker.inspect_exec(&self.exec_id).await.ok()?;
            if let Some(pid) = info.pid.filter(|p| *p > 0) {
                return Some(pid as i32);
            }
            if info.running == Some(false) {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        None
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
        match self.scope {
            KillScope::Container => {
                crate::oneshot::signal_container(self.engine, self.container, "SIGKILL").await
            }
            KillScope::ProcessTree => {
                if let Some(pid) = self.host_pid().await {
                    kill_tree(pid);
                }
            }
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
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(ppid) = agentkernel_core::state::proc_stat_field(pid, 4) {
                parents.insert(pid as i32, ppid as i32);
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

/// Runs `req` in `container` and returns how it ended.
pub async fn run(
    engine: &Engine,
    container: &str,
    req: &ExecRequest,
    scope: KillScope,
) -> Result<Outcome, Error> {
    let mut cmd: Vec<String> = exec_prefix(engine).iter().map(|s| s.to_string()).collect();
    cmd.extend(req.argv.iter().cloned());
    let env: Vec<String> = req.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let options = CreateExecOptions {
        tty: Some(req.tty),
        env: (!env.is_empty()).then_some(env),
        cmd: Some(cmd),
        working_dir: req.workdir.clone(),
        user: req.user.clone(),
        ..Default::default()
    };
    let (exec_id, started) = start_attached(engine, container, options).await?;
    let (output, input) = match started {
        Ok(StartExecResults::Attached { output, input }) => (output, input),
        Ok(StartExecResults::Detached) => unreachable!("started attached"),
        Err(e) => return start_failure(engine, e, &req.argv[0]),
    };
    let process = ExecProcess {
        engine,
        container,
        exec_id: exec_id.clone(),
        scope,
    };
    let done = Arc::new(Notify::new());
    let wait = {
        let done = done.clone();
        async move {
            done.notified().await;
            exit_code(engine, &exec_id).await
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
    let code = stdio::init_exec_failure(engine.flavor, &finished, &req.argv[0])
        .unwrap_or(finished.exit_code as i32);
    Ok(Outcome::Exited(code))
}

/// Creates an exec of `options` (stdio attached) in `container` and starts
/// it attached; the engine's refusal to start it is the second result.
pub(crate) async fn start_attached(
    engine: &Engine,
    container: &str,
    options: CreateExecOptions<String>,
) -> Result<(String, Result<StartExecResults, bollard::errors::Error>), Error> {
    let tty = options.tty.unwrap_or(false);
    let created = engine
        .docker
        .create_exec(
            container,
            CreateExecOptions {
                attach_stdin: Some(true),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                ..options
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
                tty,
                output_capacity: None,
            }),
        )
        .await;
    Ok((created.id, started))
}

/// An exec's exit code, once its output has ended.
pub(crate) async fn exit_code(engine: &Engine, exec_id: &str) -> Result<i64, Error> {
    // The stream closes as the process exits; the engine records the code a moment later.
    for _ in 0..500 {
        let info = match engine.docker.inspect_exec(exec_id).await {
            Ok(info) => info,
            // The container was killed and removed under it (timeout in
            // a pooled run): the command died with SIGKILL.
            Err(e) if crate::engine::is_not_found(&e) => return Ok(128 + i64::from(libc::SIGKILL)),
            Err(e) => return Err(engine.error("inspecting the command", e)),
        };
        if info.running != Some(true) {
            return Ok(info.exit_code.unwrap_or(0));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Err(engine.failure("the command's output ended but it did not exit"))
}

/// [`run`], with an exit by SIGKILL that the OOM killer caused (counted in
/// the container's memory cgroup) reported as such.
pub async fn run_counting_oom(
    engine: &Engine,
    container: &str,
    req: &ExecRequest,
    scope: KillScope,
) -> Result<Outcome, Error> {
    let ooms_before = oom_kills(engine, container).await;
    let result = run(engine, container, req, scope).await;
    // The engine's OOMKilled describes the main process only; count the cgroup's kills.
    if let (Ok(Outcome::Exited(137)), Some(before)) = (&result, ooms_before) {
        if oom_kills(engine, container).await.unwrap_or(0) > before {
            return Ok(Outcome::OutOfMemory);
        }
    }
    result
}

/// Seconds since the epoch, for the engine's event log.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Whether a container that ended with 137 and may already be gone was taken
/// by the OOM killer. `host_ooms_before` is [`cgroup::host_oom_kills`] read
/// before the container started.
///
/// The engine's record of the kill (`OOMKilled`, its `oom` event) can trail
/// the exit by a long way on a loaded machine, and waiting long for it would
/// slow every plain `kill -9`. When the engine runs on our kernel, the
/// kernel's own count settles it: unchanged means no OOM kill at all (answer
/// at once); changed means one happened, and if it was ours the engine's event
/// follows, so it is waited for patiently. Elsewhere only a short look is
/// affordable.
///
/// [`cgroup::host_oom_kills`]: agentkernel_core::cgroup::host_oom_kills
pub async fn gone_container_was_oom_killed(
    engine: &Engine,
    container: &str,
    since: i64,
    host_ooms_before: Option<u64>,
) -> bool {
    let patience = match (host_ooms_before, host_oom_kills_now(engine).await) {
        (Some(before), Some(now)) if now == before => return false,
        (Some(_), Some(_)) => Duration::from_secs(3),
        _ => Duration::from_millis(200),
    };
    oom_event_since(engine, container, since, patience).await
}

/// The kernel's OOM kill count, when the engine shares our kernel: it is
/// reached through a unix socket and reports our kernel release (Docker
/// Desktop's socket is local but its engine runs in a VM).
async fn host_oom_kills_now(engine: &Engine) -> Option<u64> {
    if !engine.address.starts_with("unix://") {
        return None;
    }
    let ours = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let theirs = engine.docker.version().await.ok()?.kernel_version?;
    if theirs != ours.trim() {
        return None;
    }
    agentkernel_core::cgroup::host_oom_kills()
}

/// Whether the engine recorded an `oom` event for `container` since `since`
/// (Unix seconds), asked every tenth of a second for up to `patience`: the
/// event can trail the exit.
async fn oom_event_since(engine: &Engine, container: &str, since: i64, patience: Duration) -> bool {
    use futures_util::StreamExt;
    let filters = HashMap::from([("container", vec![container]), ("event", vec!["oom"])]);
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        // `until` now, with nanoseconds: the engine answers from its log and
        // ends the stream instead of waiting for new events.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let options = bollard::query_parameters::EventsOptionsBuilder::new()
            .since(&since.to_string())
            .until(&format!("{}.{:09}", now.as_secs(), now.subsec_nanos()))
            .filters(&filters)
            .build();
        let mut events = engine.docker.events(Some(options));
        let first = tokio::time::timeout(Duration::from_millis(300), events.next()).await;
        if matches!(first, Ok(Some(Ok(_)))) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// OOM kills so far in `container`'s memory cgroup, read on the engine's host
/// (exec'd processes killed by the OOM killer do not set the engine's
/// `OOMKilled`, which describes the main process only).
pub async fn oom_kills(engine: &Engine, container: &str) -> Option<u64> {
    let info = crate::inspect::container(engine, container).await.ok()?;
    let state = info.state?;
    match state.pid.filter(|p| *p > 0) {
        Some(pid) => agentkernel_core::cgroup::oom_kills(pid),
        // The OOM killer may take the container's main process (its idle
        // keep-alive) too, which ends the container: the engine then says so.
        None => state.oom_killed.map(u64::from),
    }
}
