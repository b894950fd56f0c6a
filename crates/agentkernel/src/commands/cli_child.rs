//! What `serve` and `mcp` share: each request runs this same binary's CLI
//! (`agentkernel run|exec|sandbox …`) as a child process with piped stdio.
//! The child validates, runs and cleans up exactly as the CLI does, so the
//! API and MCP server give the CLI's messages and leave what it leaves
//! (nothing) by construction; this module only carries bytes and codes.

use std::ffi::OsString;
use std::process::Stdio;

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

/// One thing the child did, in order: output chunks, then its exit code.
#[derive(Debug)]
pub enum Event {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The CLI's exit code (128+N when a signal ended it).
    Exit(i32),
}

/// Everything a child printed, once it has exited.
#[derive(Debug, Default)]
pub struct Collected {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub code: i32,
}

/// Starts `agentkernel ARGS…` and returns its events. Dropping the receiver
/// (a client that went away) or `shutdown` turning true sends the child
/// SIGTERM — never SIGKILL: the CLI then stops the command and removes its
/// sandbox itself — and the child is still waited for, so nothing is left.
pub fn spawn(
    args: Vec<OsString>,
    stdin: Option<Vec<u8>>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<mpsc::Receiver<Event>> {
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let (events, receiver) = mpsc::channel(64);
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // Its own task: a child that does not read its input must not stop
        // us from reading its output. A closed pipe is the child's choice.
        tokio::spawn(async move {
            let _ = pipe.write_all(&data).await;
        });
    }
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    tokio::spawn(async move {
        let stopping = stopped(&mut shutdown);
        tokio::pin!(stopping);
        let (mut out_open, mut err_open, mut signalled) = (true, true, false);
        let mut out_buf = vec![0u8; 16 * 1024];
        let mut err_buf = vec![0u8; 16 * 1024];
        while out_open || err_open {
            tokio::select! {
                n = stdout.read(&mut out_buf), if out_open => match n {
                    Ok(n) if n > 0 => { let _ = events.send(Event::Stdout(out_buf[..n].to_vec())).await; }
                    _ => out_open = false,
                },
                n = stderr.read(&mut err_buf), if err_open => match n {
                    Ok(n) if n > 0 => { let _ = events.send(Event::Stderr(err_buf[..n].to_vec())).await; }
                    _ => err_open = false,
                },
                _ = events.closed(), if !signalled => {
                    signalled = true;
                    terminate(&child);
                }
                _ = &mut stopping, if !signalled => {
                    signalled = true;
                    terminate(&child);
                }
            }
        }
        let code = match child.wait().await {
            Ok(status) => exit_code(status),
            Err(_) => crate::EXIT_AGENTKERNEL_ERROR,
        };
        let _ = events.send(Event::Exit(code)).await;
    });
    Ok(receiver)
}

/// Resolves once `shutdown` is true (never, if its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    loop {
        let stop = *shutdown.borrow_and_update();
        if stop {
            return;
        }
        if shutdown.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// SIGTERM to a child not yet waited for (`id()` is None once it has been,
/// so a recycled PID is never hit).
fn terminate(child: &tokio::process::Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill has no memory preconditions; pid is our unreaped child.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    }
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(crate::EXIT_AGENTKERNEL_ERROR)
}

/// Runs `agentkernel ARGS…` to the end and returns what it printed.
pub async fn collect(
    args: Vec<OsString>,
    stdin: Option<Vec<u8>>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<Collected> {
    let mut events = spawn(args, stdin, shutdown)?;
    let mut out = Collected::default();
    while let Some(event) = events.recv().await {
        match event {
            Event::Stdout(d) => out.stdout.extend_from_slice(&d),
            Event::Stderr(d) => out.stderr.extend_from_slice(&d),
            Event::Exit(code) => out.code = code,
        }
    }
    Ok(out)
}

/// agentkernel's own failure, as the CLI reported it: exit 125 and its
/// one-line `agentkernel: PROBLEM; FIX` message (the last such line).
#[derive(Debug, Clone, PartialEq)]
pub struct CliError {
    /// The whole line, without the `agentkernel: ` prefix.
    pub message: String,
    /// What is wrong (the message up to its first `; `).
    pub error: String,
    /// How to fix it (the rest), when the message names a fix.
    pub fix: Option<String>,
}

impl CliError {
    /// The error a run or exec that exited `code` with `stderr` reports, if
    /// agentkernel itself failed (not the command).
    pub fn from_exit(code: i32, stderr: &[u8]) -> Option<CliError> {
        if code != crate::EXIT_AGENTKERNEL_ERROR {
            return None;
        }
        let text = String::from_utf8_lossy(stderr);
        let line = text
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("agentkernel: "))
            .filter(|l| !l.starts_with("notice: ") && !l.starts_with("warning: "))?;
        Some(CliError::new(line))
    }

    pub fn new(message: &str) -> CliError {
        let (error, fix) = match message.split_once("; ") {
            Some((error, fix)) => (error.to_string(), Some(fix.to_string())),
            None => (message.to_string(), None),
        };
        CliError {
            message: message.to_string(),
            error,
            fix,
        }
    }

    /// The HTTP status that fits the CLI's error (docs/api.md lists them).
    pub fn status(&self) -> u16 {
        let m = &self.message;
        if m.starts_with("no sandbox named ") || m.starts_with("no such file ") {
            404
        } else if m.starts_with("sandbox ") && m.contains(" already exists;") {
            409
        } else if m.starts_with("backend ") && m.contains(" is unavailable: ") {
            503
        } else if m.starts_with("state ")
            || ["native: ", "docker: ", "podman: "]
                .iter()
                .any(|b| m.starts_with(b))
        {
            500
        } else {
            400
        }
    }
}

/// Options of a one-shot run (`POST /v1/run`, the MCP tool `run_command`):
/// the CLI's `run` flags of the same names. Host paths (`-v`) are not
/// offered; runs mount the server's current directory at /workspace, as the
/// CLI does from where it is started.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunOptions {
    /// The command and its arguments (at least one word), passed through untouched.
    pub command: Vec<String>,
    /// Image to use (default: auto-detected, as `run` does).
    pub image: Option<String>,
    /// Security profile: permissive, moderate (default), restrictive.
    pub profile: Option<String>,
    /// Backend: native, docker, podman (default: the server's AGENTKERNEL_BACKEND, config, else the first available).
    pub backend: Option<String>,
    /// A template (`agentkernel template list`), applied over the config files.
    pub template: Option<String>,
    /// Environment variables as KEY=VALUE (a bare KEY, which would copy the server's own value, is refused).
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory inside the sandbox (absolute).
    pub workdir: Option<String>,
    /// Kill the command and everything it started after this long (e.g. 30s, 5m); exit 124.
    pub timeout: Option<String>,
    /// Memory limit (e.g. 512m, 2g).
    pub memory: Option<String>,
    /// CPU limit (e.g. 0.5, 2).
    pub cpus: Option<String>,
    /// Cap of each writable layer (e.g. 1g).
    pub disk: Option<String>,
    /// Loopback only, under any profile.
    #[serde(default)]
    pub no_network: bool,
    /// When to pull the image: missing (default), always, never.
    pub pull: Option<String>,
    /// Keep the sandbox after the command exits.
    #[serde(default)]
    pub keep: bool,
    /// Name of the kept sandbox (implies keep).
    pub name: Option<String>,
    /// Expiry of a kept sandbox after its last use (e.g. 30m; implies keep).
    pub ttl: Option<String>,
    /// Text given to the command on its standard input (default: none, stdin is empty).
    pub stdin: Option<String>,
}

/// Options of a command in a kept sandbox (`POST /v1/sandboxes/{name}/exec`,
/// the MCP tool `exec`): the CLI's `exec` flags.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecOptions {
    /// The command and its arguments (at least one word).
    pub command: Vec<String>,
    /// Environment variables as KEY=VALUE (a bare KEY is refused).
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory inside the sandbox (absolute).
    pub workdir: Option<String>,
    /// Kill the command and everything it started after this long; exit 124.
    pub timeout: Option<String>,
    /// Text given to the command on its standard input.
    pub stdin: Option<String>,
}

/// Options of a new kept sandbox (`POST /v1/sandboxes`, the MCP tool
/// `create_sandbox`): `run --keep`'s options, without a command.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOptions {
    /// The sandbox's name (default: run-<8 hex>).
    pub name: Option<String>,
    /// Image to use (default: auto-detected, as `run` does).
    pub image: Option<String>,
    /// Security profile: permissive, moderate (default), restrictive.
    pub profile: Option<String>,
    /// Backend: native, docker, podman.
    pub backend: Option<String>,
    /// A template (`agentkernel template list`), applied over the config files.
    pub template: Option<String>,
    /// Environment variables as KEY=VALUE.
    #[serde(default)]
    pub env: Vec<String>,
    /// Memory limit (e.g. 512m, 2g).
    pub memory: Option<String>,
    /// CPU limit (e.g. 0.5, 2).
    pub cpus: Option<String>,
    /// Cap of each writable layer (e.g. 1g).
    pub disk: Option<String>,
    /// Loopback only, under any profile.
    #[serde(default)]
    pub no_network: bool,
    /// When to pull the image: missing (default), always, never.
    pub pull: Option<String>,
    /// Expiry after its last use (e.g. 30m; default 1h).
    pub ttl: Option<String>,
}

impl CreateOptions {
    /// `run --keep --name NAME … -- true`: the sandbox is created and kept.
    pub fn run_options(self) -> RunOptions {
        RunOptions {
            command: vec!["true".into()],
            image: self.image,
            profile: self.profile,
            backend: self.backend,
            template: self.template,
            env: self.env,
            memory: self.memory,
            cpus: self.cpus,
            disk: self.disk,
            no_network: self.no_network,
            pull: self.pull,
            keep: true,
            name: Some(self.name.unwrap_or_else(agentkernel_core::names::generated)),
            ttl: self.ttl,
            ..Default::default()
        }
    }
}

/// `--flag=value` keeps a value that starts with `-` a value.
fn flag(args: &mut Vec<OsString>, name: &str, value: &Option<String>) {
    if let Some(v) = value {
        args.push(format!("--{name}={v}").into());
    }
}

/// A bare `KEY` would hand the client the server's own environment.
fn env_flags(args: &mut Vec<OsString>, env: &[String]) -> Result<(), CliError> {
    for pair in env {
        if !pair.contains('=') {
            return Err(CliError::new(&format!(
                "invalid env `{pair}`: the API takes KEY=VALUE only (a bare KEY would copy the server's own value); give the value"
            )));
        }
        args.push(format!("--env={pair}").into());
    }
    Ok(())
}

impl RunOptions {
    /// The `agentkernel run …` words for these options.
    pub fn cli_args(&self) -> Result<Vec<OsString>, CliError> {
        let mut args: Vec<OsString> = vec!["run".into()];
        flag(&mut args, "image", &self.image);
        flag(&mut args, "profile", &self.profile);
        flag(&mut args, "backend", &self.backend);
        flag(&mut args, "template", &self.template);
        env_flags(&mut args, &self.env)?;
        flag(&mut args, "workdir", &self.workdir);
        flag(&mut args, "timeout", &self.timeout);
        flag(&mut args, "memory", &self.memory);
        flag(&mut args, "cpus", &self.cpus);
        flag(&mut args, "disk", &self.disk);
        flag(&mut args, "pull", &self.pull);
        flag(&mut args, "name", &self.name);
        flag(&mut args, "ttl", &self.ttl);
        if self.no_network {
            args.push("--no-network".into());
        }
        if self.keep {
            args.push("--keep".into());
        }
        args.push("--".into());
        args.extend(self.command.iter().map(OsString::from));
        Ok(args)
    }
}

impl ExecOptions {
    /// The `agentkernel exec …` words for a command in sandbox `name`.
    pub fn cli_args(&self, name: &str) -> Result<Vec<OsString>, CliError> {
        let mut args: Vec<OsString> = vec!["exec".into()];
        env_flags(&mut args, &self.env)?;
        flag(&mut args, "workdir", &self.workdir);
        flag(&mut args, "timeout", &self.timeout);
        args.push(name.into());
        args.push("--".into());
        args.extend(self.command.iter().map(OsString::from));
        Ok(args)
    }
}

/// A file's path in a kept sandbox: absolute, no NUL. It is only ever
/// opened by a command inside the sandbox, so `..` and symlinks resolve
/// against the sandbox's own root and cannot lead to the host.
pub fn sandbox_path(path: &str) -> Result<String, CliError> {
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    if path.contains('\0') || path.ends_with('/') {
        return Err(CliError::new(&format!(
            "invalid file path `{}`: it must name a file, not a directory, and hold no NUL byte; give the file's absolute path in the sandbox",
            path.escape_default()
        )));
    }
    Ok(path)
}

/// `exec NAME -- cat -- PATH`: a file's bytes, read inside the sandbox.
pub fn read_file_args(name: &str, path: &str) -> Vec<OsString> {
    ["exec", name, "--", "cat", "--", path]
        .into_iter()
        .map(OsString::from)
        .collect()
}

/// `exec NAME -- sh -c 'cat > "$1"' sh PATH`: stdin written to a file
/// inside the sandbox (created, or truncated, with the sandbox user's umask).
pub fn write_file_args(name: &str, path: &str) -> Vec<OsString> {
    ["exec", name, "--", "sh", "-c", "cat > \"$1\"", "sh", path]
        .into_iter()
        .map(OsString::from)
        .collect()
}

/// Why a file command inside the sandbox failed (its stderr), as an error
/// with the status that fits: 404 for a missing file.
pub fn file_error(path: &str, collected: &Collected) -> CliError {
    if let Some(e) = CliError::from_exit(collected.code, &collected.stderr) {
        return e;
    }
    let stderr = String::from_utf8_lossy(&collected.stderr);
    let why = stderr.lines().last().unwrap_or("failed").trim().to_string();
    if why.contains("No such file") || why.contains("Not a directory") {
        return CliError::new(&format!(
            "no such file {path} in the sandbox; check the path with an exec of `ls -l`"
        ));
    }
    CliError::new(&format!(
        "file {path} in the sandbox: {why}; check the path and its permissions with an exec of `ls -l`"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_error_splits_problem_and_fix() {
        let e = CliError::from_exit(
            125,
            b"agentkernel: notice: x\nagentkernel: no sandbox named a; `agentkernel sandbox list` shows the kept sandboxes\n",
        )
        .unwrap();
        assert_eq!(e.error, "no sandbox named a");
        assert_eq!(
            e.fix.as_deref(),
            Some("`agentkernel sandbox list` shows the kept sandboxes")
        );
        assert_eq!(e.status(), 404);
        assert_eq!(CliError::from_exit(1, b"agentkernel: x; y"), None);
        assert_eq!(CliError::from_exit(125, b"the command's own words"), None);
    }

    #[test]
    fn options_become_flags_with_attached_values() {
        let run = RunOptions {
            command: vec!["echo".into(), "--image=x".into()],
            image: Some("-weird".into()),
            env: vec!["A=1".into()],
            keep: true,
            ..Default::default()
        };
        let words: Vec<_> = run.cli_args().unwrap();
        assert_eq!(
            words,
            [
                "run",
                "--image=-weird",
                "--env=A=1",
                "--keep",
                "--",
                "echo",
                "--image=x"
            ]
            .map(OsString::from)
        );
        let bare = RunOptions {
            env: vec!["HOME".into()],
            ..Default::default()
        };
        assert!(bare.cli_args().unwrap_err().message.contains("KEY=VALUE"));
    }

    #[test]
    fn sandbox_paths_are_absolute_files() {
        assert_eq!(sandbox_path("etc/hostname").unwrap(), "/etc/hostname");
        assert!(sandbox_path("/tmp/").is_err());
        assert!(sandbox_path("/a\0b").is_err());
    }
}
