//! `--secret-file` on Docker and Podman: a tmpfs at
//! `/run/agentkernel/secrets` in the container, filled through an exec's
//! stdin before the command runs. The bytes travel only over the engine's
//! API socket into a process in the container: never a host file, and never
//! the container's config, env or labels (`docker inspect` shows the tmpfs,
//! not what is in it).
//!
//! A one-shot run with secret files therefore cannot make the command the
//! container's main process (it would start before its files exist): the
//! main process idles, the files are written, and the command is exec'd
//! like a kept sandbox's, with the container as its kill scope.

use agentkernel_core::secrets::SECRETS_DIR;
use agentkernel_core::spec::{ExecRequest, Outcome, SandboxSpec};
use agentkernel_core::Error;
use bollard::exec::{CreateExecOptions, StartExecResults};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::oneshot::start_failure;
use crate::Engine;

/// The tmpfs's entry in `HostConfig.Tmpfs`, when the spec has secret files.
/// Sticky and world-writable like `/tmp`: the files are written by the
/// command's own user (whom the engine knows only by the image's `USER`),
/// so they are theirs without CAP_CHOWN, which restrictive drops; the sticky
/// bit keeps any other user from replacing them.
pub fn tmpfs(spec: &SandboxSpec) -> Option<(String, String)> {
    let files = &spec.egress.as_ref()?.secret_files;
    (!files.is_empty()).then(|| {
        (
            SECRETS_DIR.to_string(),
            "rw,nosuid,nodev,noexec,size=1m,mode=1777".to_string(),
        )
    })
}

/// A kept sandbox's control directory is bind-mounted read-only at
/// `/run/agentkernel`, where the engine could not create the tmpfs's mount
/// point: it is made on the host beforehand (an empty directory; the tmpfs
/// covers it in the container).
pub fn make_mount_point(control_dir: &std::path::Path, spec: &SandboxSpec) -> Result<(), Error> {
    if tmpfs(spec).is_none() {
        return Ok(());
    }
    let dir = control_dir.join("secrets");
    match std::fs::create_dir(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(Error::state(&dir, e)),
        _ => Ok(()),
    }
}

/// Main process of a one-shot container whose command is exec'd.
pub fn idle_command() -> Vec<String> {
    vec![
        "/bin/sh".into(),
        "-c".into(),
        "trap 'exit 0' TERM INT HUP; while :; do sleep 3600 & wait $!; done".into(),
    ]
}

/// Writes each `(name, content)` to `SECRETS_DIR/name`, mode 0400, as the
/// container's user, one exec per file with the content on its stdin.
pub async fn write(
    engine: &Engine,
    container: &str,
    files: &[(String, String)],
) -> Result<(), Error> {
    for (name, content) in files {
        let path = format!("{SECRETS_DIR}/{name}");
        let fail = |why: String| {
            Error::Conflict(format!(
                "--secret-file {name}: cannot write {path} in the sandbox ({why}); the image needs /bin/sh and cat"
            ))
        };
        let options = CreateExecOptions {
            cmd: Some(vec![
                "/bin/sh".to_string(),
                "-c".to_string(),
                "umask 077 && cat >\"$1\" && chmod 0400 \"$1\"".to_string(),
                "sh".to_string(),
                path.clone(),
            ]),
            ..Default::default()
        };
        let (exec_id, started) = crate::exec::start_attached(engine, container, options).await?;
        let started = started.map_err(|e| fail(crate::engine::message_of(&e)))?;
        let StartExecResults::Attached {
            mut output,
            mut input,
        } = started
        else {
            return Err(fail("the engine detached the writer".into()));
        };
        input
            .write_all(content.as_bytes())
            .await
            .map_err(|e| fail(e.to_string()))?;
        // Half-close: `cat` sees the end of the value.
        input.shutdown().await.map_err(|e| fail(e.to_string()))?;
        let mut said = String::new();
        while let Some(chunk) = output.next().await {
            if let Ok(chunk) = chunk {
                said.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
            }
        }
        let code = crate::exec::exit_code(engine, &exec_id).await?;
        if code != 0 {
            let said = said.trim().replace('\n', " ");
            return Err(fail(format!("exit {code}: {said}")));
        }
    }
    Ok(())
}

/// A one-shot container created with [`idle_command`]: start it, copy the
/// `[[files]]` in, write the secret files and attach the egress proxy
/// (`proxy`, see [`crate::egress`]), then run the command by exec; the
/// container is its kill scope.
pub async fn drive(
    engine: &Engine,
    container: &str,
    spec: &SandboxSpec,
    secret_files: &[(String, String)],
    files: &[agentkernel_core::files::InjectedFile],
    proxy: Option<agentkernel_native::egress::StartedProxy>,
) -> Result<Outcome, Error> {
    if let Err(e) = engine.docker.start_container(container, None).await {
        if start_failure(engine, e, "/bin/sh").is_ok() {
            let needs = if secret_files.is_empty() && files.is_empty() {
                "the egress proxy needs to start the command once it listens"
            } else {
                "--secret-file (and [[files]] on Podman) need before the command starts"
            };
            return Err(Error::Conflict(format!(
                "image {} has no /bin/sh, which {needs}; use an image with a shell",
                spec.image
            )));
        }
        return Err(engine.failure("starting the sandbox failed"));
    }
    crate::oneshot::print_ports(engine, container, spec).await;
    crate::copy::put_files(engine, container, files).await?;
    // After `[[files]]`, which could replace a bundle. Held until the
    // command ends: the proxy ends with this run.
    let _lifeline = match proxy {
        Some(started) => Some(crate::egress::attach(engine, container, started, false).await?),
        None => None,
    };
    write(engine, container, secret_files).await?;
    let ooms_before = crate::exec::oom_kills(engine, container).await;
    let request: &ExecRequest = &spec.exec;
    let result = crate::exec::run(
        engine,
        container,
        request,
        crate::exec::KillScope::Container,
    )
    .await;
    if let (Ok(Outcome::Exited(137)), Some(before)) = (&result, ooms_before) {
        if crate::exec::oom_kills(engine, container).await.unwrap_or(0) > before {
            return Ok(Outcome::OutOfMemory);
        }
    }
    result
}
