//! Pooled runs without an engine exec. An exec costs a round of engine work
//! (Podman: a conmon and a `runc exec`, ~100 ms; Docker: containerd's shim
//! and a `runc exec`, ~75 ms) — most of a pooled run; instead, the claimed
//! warm container's own keep-alive shell
//! ([`serving_keep_alive_command`]) runs the command, handed over through the
//! container's control directory, which lives on this host:
//!
//! - `run/argv/N`, `run/env/N` (`NAME=value`), `run/workdir`: one value per
//!   file plus a newline, read back with the shell's `read` builtin — never
//!   quoted, evaluated or split;
//! - `run/in`, `run/out`, `run/err`: FIFOs for the command's stdio (a FIFO in
//!   a read-only bind mount can still be written);
//! - `run/status`: a FIFO on which the shell says `run` (or `fallback`: take
//!   the exec path, nothing has run) and then the exit status.
//!
//! We wake the shell with SIGUSR1 on its host PID, which the refill recorded
//! (with its start time, so a reused PID is never signalled). The command runs
//! as `init -- ARGV` under the shell (the engine's init: `/run/podman-init`,
//! Docker's `/sbin/docker-init -s`), the same process tree an exec builds;
//! signals go to that init, which forwards them; a timeout kills the container.
//!
//! [`serving_keep_alive_command`]: crate::create::serving_keep_alive_command

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use agentkernel_core::spec::{ExecRequest, Outcome};
use agentkernel_core::state::{is_zombie, proc_stat_field};
use agentkernel_core::Error;
use bollard::container::LogOutput;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, Notify};

use crate::stdio::{self, Process};
use crate::Engine;

/// The file, in a pool container's host directory, naming its keep-alive shell.
const SHELL_FILE: &str = "shell";

/// The keep-alive shell of a warm container, on this host.
#[derive(Debug, Clone, Copy)]
pub struct Shell {
    pid: i32,
    /// Start time (clock ticks since boot), which tells a reused PID apart.
    start: u64,
}

impl Shell {
    fn alive(&self) -> bool {
        let pid = self.pid as u32;
        proc_stat_field(pid, 22) == Some(self.start) && !is_zombie(pid)
    }
}

fn parent_of(pid: u32) -> Option<u64> {
    proc_stat_field(pid, 4)
}

fn children_of(parent: i32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| parent_of(*pid) == Some(parent as u64))
        .collect()
}

/// Whether `pid` has a handler for SIGUSR1 (the shell has set its trap).
fn catches_usr1(pid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (libc::SIGUSR1 - 1)) != 0)
}

/// For the refill: finds the keep-alive shell under the container's init
/// (host PID `init_pid`) once it is ready for SIGUSR1, and records it in
/// `dir`. Without a record, runs take the exec path.
pub async fn record(init_pid: i32, dir: &Path) {
    for _ in 0..400 {
        let ready = children_of(init_pid).into_iter().find(|p| catches_usr1(*p));
        if let Some(pid) = ready {
            if let Some(start) = proc_stat_field(pid, 22) {
                let _ = agentkernel_core::state::write_atomic(
                    &dir.join(SHELL_FILE),
                    format!("{pid} {start}").as_bytes(),
                );
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The recorded shell of the pool container whose host directory is `dir`, if alive.
pub fn recorded(dir: &Path) -> Option<Shell> {
    let text = std::fs::read_to_string(dir.join(SHELL_FILE)).ok()?;
    let (pid, start) = text.trim().split_once(' ')?;
    let shell = Shell {
        pid: pid.parse().ok()?,
        start: start.parse().ok()?,
    };
    shell.alive().then_some(shell)
}

/// Names the shell itself uses or sets, which it could not pass through exactly.
const SHELL_NAMES: [&str; 13] = [
    "PWD", "OLDPWD", "SHLVL", "PPID", "LINENO", "OPTIND", "OPTARG", "IFS", "PS1", "PS2", "PS4",
    "ENV", "CDPATH",
];

fn plain_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with("__ak_")
        && !SHELL_NAMES.contains(&name)
}

/// Whether the shell can run `req` exactly as an exec would; `image_env` is
/// the image's environment (the shell's own, which it must not have changed).
pub fn suits(req: &ExecRequest, image_env: &[String]) -> bool {
    !req.tty
        && req.user.is_none()
        && req.workdir.as_deref().is_none_or(|w| w.starts_with('/'))
        && req.env.iter().all(|(k, _)| plain_name(k))
        && image_env.iter().all(|e| {
            let name = e.split('=').next().unwrap_or_default();
            !["PWD", "OLDPWD", "SHLVL"].contains(&name)
        })
}

fn state_error(path: &Path, e: std::io::Error) -> Error {
    Error::state(path, e)
}

fn write_value(path: &Path, value: &str) -> Result<(), Error> {
    let mut bytes = Vec::with_capacity(value.len() + 1);
    bytes.extend_from_slice(value.as_bytes());
    bytes.push(b'\n');
    std::fs::write(path, bytes).map_err(|e| state_error(path, e))?;
    // The command's user may be anyone: readable by all (the state directory guards it).
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
        .map_err(|e| state_error(path, e))
}

fn make_dir(path: &Path) -> Result<(), Error> {
    std::fs::create_dir(path).map_err(|e| state_error(path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| state_error(path, e))
}

fn make_fifo(path: &Path) -> Result<(), Error> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| state_error(path, std::io::Error::other(e)))?;
    // SAFETY: mkfifo reads a NUL-terminated path we own.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o666) } != 0 {
        return Err(state_error(path, std::io::Error::last_os_error()));
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| state_error(path, e))
}

/// Writes the request into `run` (the host side of [`crate::create::RUN_DIR`]).
fn write_request(run: &Path, req: &ExecRequest) -> Result<(), Error> {
    make_dir(run)?;
    make_dir(&run.join("argv"))?;
    make_dir(&run.join("env"))?;
    for (i, arg) in req.argv.iter().enumerate() {
        write_value(&run.join("argv").join(i.to_string()), arg)?;
    }
    for (i, (k, v)) in req.env.iter().enumerate() {
        write_value(&run.join("env").join(i.to_string()), &format!("{k}={v}"))?;
    }
    if let Some(w) = &req.workdir {
        write_value(&run.join("workdir"), w)?;
    }
    for fifo in ["in", "out", "err", "status"] {
        make_fifo(&run.join(fifo))?;
    }
    Ok(())
}

/// Opens the read end of an output FIFO without waiting for a writer, so the
/// shell's open of the write end never blocks (busybox's sh gives up on an
/// open interrupted by a signal), then makes it blocking for [`pump`].
fn open_output(path: &Path) -> Result<std::fs::File, Error> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| state_error(path, e))?;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
    }
    Ok(file)
}

/// Copies an output FIFO to the channel on a thread of its own, from when the
/// shell holds its write end (before the command starts) until EOF, when the
/// command and everything it started have closed it.
fn pump(mut file: std::fs::File, tx: mpsc::UnboundedSender<LogOutput>, stderr: bool) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let message = buf[..n].to_vec().into();
                    let chunk = if stderr {
                        LogOutput::StdErr { message }
                    } else {
                        LogOutput::StdOut { message }
                    };
                    if tx.send(chunk).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    });
}

/// Resolves when the shell has exited.
async fn gone(shell: Shell) {
    while shell.alive() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Handed<'a> {
    engine: &'a Engine,
    container: &'a str,
    shell: Shell,
}

impl Handed<'_> {
    /// The init the shell started for the command (on this host); not the
    /// idle `sleep` it killed, nor the one it starts once the command is over.
    async fn init_pid(&self) -> Option<i32> {
        let init = crate::exec::exec_prefix(self.engine)[0];
        let is_init = |pid: &u32| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).next() == Some(init.as_bytes()))
                && !is_zombie(*pid)
        };
        for _ in 0..1000 {
            if let Some(pid) = children_of(self.shell.pid).into_iter().find(is_init) {
                return Some(pid as i32);
            }
            if !self.shell.alive() {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        None
    }
}

impl Process for Handed<'_> {
    async fn signal(&self, signo: i32) {
        if let Some(pid) = self.init_pid().await {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, signo) };
        }
    }
    async fn kill_all(&self) {
        // The container exists for this one command: end it.
        crate::oneshot::signal_container(self.engine, self.container, "SIGKILL").await
    }
    async fn resize(&self, _rows: u16, _cols: u16) {}
}

/// Reads the next status line, or None when the shell exited without one.
async fn next_status(
    status: &mut BufReader<pipe::Receiver>,
    shell: Shell,
) -> Result<Option<String>, std::io::Error> {
    let mut line = String::new();
    tokio::select! {
        read = status.read_line(&mut line) => { read?; }
        _ = gone(shell) => {
            // It may have written its last word just before exiting.
            match tokio::time::timeout(Duration::from_millis(50), status.read_line(&mut line)).await {
                Ok(read) => { read?; }
                Err(_) => return Ok(None),
            }
        }
    }
    Ok((!line.is_empty()).then(|| line.trim_end().to_string()))
}

/// How a handed-over run went.
pub enum Handoff {
    Ran(Outcome),
    /// The shell declined before running anything: exec in the container instead.
    Declined,
    /// The container ended before running anything: take the normal path.
    Lost,
}

/// Runs `req` through the keep-alive `shell` of the claimed `container`,
/// whose host control directory is `ctl`.
pub async fn run(
    engine: &Engine,
    container: &str,
    ctl: &Path,
    shell: Shell,
    req: &ExecRequest,
) -> Result<Handoff, Error> {
    let run = ctl.join("run");
    write_request(&run, req)?;
    let open_error = |name: &str, e| state_error(&run.join(name), e);
    // Read-write ends: opening never blocks, and the shell's opens of its
    // ends do not wait for us. Our stdin end is the only writer: dropping it
    // is the command's EOF.
    let input = pipe::OpenOptions::new()
        .read_write(true)
        .open_sender(run.join("in"))
        .map_err(|e| open_error("in", e))?;
    let status = pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(run.join("status"))
        .map_err(|e| open_error("status", e))?;
    let mut status = BufReader::new(status);
    let out = open_output(&run.join("out"))?;
    let err = open_output(&run.join("err"))?;

    if !shell.alive() {
        return Ok(Handoff::Lost);
    }
    // SAFETY: kill has no memory-safety preconditions; the PID was checked
    // against its start time just now.
    unsafe { libc::kill(shell.pid, libc::SIGUSR1) };
    let first = next_status(&mut status, shell).await;
    // The shell has read the environment (or will not): its values stay on
    // disk no longer than that.
    let _ = std::fs::remove_dir_all(run.join("env"));
    let first = first.map_err(|e| open_error("status", e))?;
    match first.as_deref() {
        Some("run") => {}
        Some("fallback") => return Ok(Handoff::Declined),
        None => return Ok(Handoff::Lost),
        Some(other) => {
            return Err(engine.failure(format!(
                "unexpected status from the warm container: {other}"
            )))
        }
    }
    // The shell holds the write ends now: reading cannot meet an early EOF.
    let (tx, mut rx) = mpsc::unbounded_channel();
    pump(out, tx.clone(), false);
    pump(err, tx, true);

    let output: stdio::Output = Box::pin(futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx).map(|c| c.map(Ok))
    }));
    let done = std::sync::Arc::new(Notify::new());
    let wait = async {
        match next_status(&mut status, shell).await {
            Ok(Some(code)) => code
                .parse::<i64>()
                .map_err(|_| engine.failure(format!("unexpected status from the sandbox: {code}"))),
            // Killed with its container (a timeout, or the engine removed it).
            Ok(None) => Ok(128 + i64::from(libc::SIGKILL)),
            Err(e) => Err(open_error("status", e)),
        }
    };
    let process = Handed {
        engine,
        container,
        shell,
    };
    let finished = stdio::supervise(
        &process,
        output,
        Some(Box::pin(input)),
        false,
        req.timeout,
        done,
        wait,
    )
    .await?;
    if finished.timed_out {
        return Ok(Handoff::Ran(Outcome::TimedOut));
    }
    let code = stdio::init_exec_failure(engine.flavor, &finished, &req.argv[0])
        .unwrap_or(finished.exit_code as i32);
    Ok(Handoff::Ran(Outcome::Exited(code)))
}
