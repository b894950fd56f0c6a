//! A native run that a receipt observes. Unobserved, the CLI execs the
//! sandbox helper and the command's stdio is ours, passed straight through.
//! Observed, the helper is our child: its stdout and stderr come through
//! pipes that we copy to ours while hashing them (the tee), and it reports
//! how the command ended over a pipe of its own (an exit code alone cannot
//! tell a timeout from a command that exits 124).

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use agentkernel_core::observe::{self, Stream};
use agentkernel_core::spec::Outcome;
use agentkernel_core::{Error, Result};
use serde::{Deserialize, Serialize};
use tokio::signal::unix::{signal, SignalKind};

/// What the helper tells an observing parent.
#[derive(Debug, Serialize, Deserialize)]
pub enum HelperReport {
    Ended(Outcome),
    /// agentkernel's own failure, as printed.
    Failed(String),
}

/// How long the output may go on after the helper exited (a process that
/// left the sandbox's pid namespace cannot exist, but a kept sandbox's
/// background process may hold the pipe): then we stop waiting for it.
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// The tee's pipe size (the default maximum for unprivileged users).
const PIPE_SIZE: i32 = 1024 * 1024;

/// Helper side: writes the report to the fd the parent gave, if any.
pub fn send_report(fd: Option<&str>, report: HelperReport) {
    let Some(fd) = fd.and_then(|f| f.parse::<i32>().ok()).filter(|fd| *fd > 2) else {
        return;
    };
    // SAFETY: the fd was inherited from the observing parent for exactly this.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    if let Ok(json) = serde_json::to_vec(&report) {
        let _ = file.write_all(&json);
    }
}

fn backend_error(message: String) -> Error {
    Error::Backend {
        backend: "native",
        message,
    }
}

/// Runs the helper as a child, tees its output into the observation and
/// returns its exit code; how the command ended goes to `observe`.
pub async fn run(mut helper: Command, tty: bool) -> Result<i32> {
    let (report_read, report_write) = crate::sys::pipe()
        .map_err(|e| backend_error(format!("cannot create the report pipe: {e}")))?;
    let inherited = report_write.as_raw_fd();
    helper.arg(inherited.to_string());
    helper.stdout(Stdio::piped()).stderr(Stdio::piped());
    if !tty {
        // Its own process group: signals reach it only through us, once.
        // (With a terminal it must stay in the foreground group, which the
        // terminal's own Ctrl-C then reaches directly.)
        helper.process_group(0);
    }
    // SAFETY: only fcntl, async-signal-safe, between fork and exec.
    unsafe {
        helper.pre_exec(move || {
            if libc::fcntl(inherited, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = helper
        .spawn()
        .map_err(|e| backend_error(format!("cannot start the sandbox helper: {e}")))?;
    drop(report_write);
    let pid = child.id() as libc::pid_t;
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    for (pipe, stream) in [
        (child.stdout.take().map(OwnedFd::from), Stream::Stdout),
        (child.stderr.take().map(OwnedFd::from), Stream::Stderr),
    ] {
        let Some(pipe) = pipe else { continue };
        let done = done_tx.clone();
        std::thread::spawn(move || {
            tee(pipe, stream);
            let _ = done.send(());
        });
    }
    drop(done_tx);

    let waiter = tokio::task::spawn_blocking(move || child.wait());
    let status = forward_signals_until(waiter, pid, tty).await;
    let status =
        status.map_err(|e| backend_error(format!("waiting for the sandbox helper: {e}")))?;
    let deadline = std::time::Instant::now() + OUTPUT_GRACE;
    for _ in 0..2 {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if done_rx.recv_timeout(left).is_err() {
            break;
        }
    }
    let code = status.code().unwrap_or_else(|| {
        128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)
    });
    match read_report(report_read) {
        Some(HelperReport::Ended(outcome)) => {
            observe::outcome(outcome);
            Ok(code)
        }
        Some(HelperReport::Failed(message)) => Err(backend_error(
            message
                .strip_prefix("native: ")
                .unwrap_or(&message)
                .to_string(),
        )),
        None => Err(backend_error(format!(
            "the sandbox helper ended ({status}) without saying how the command ended"
        ))),
    }
}

/// The report the helper wrote before it exited. Read without waiting for
/// EOF: a kept sandbox's holder, forked by the helper, may hold the pipe's
/// write end for its whole life.
fn read_report(pipe: OwnedFd) -> Option<HelperReport> {
    // SAFETY: fcntl on an fd we own.
    unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    let mut file = std::fs::File::from(pipe);
    let mut json = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => json.extend_from_slice(&buffer[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    serde_json::from_slice(&json).ok()
}

/// Forwards the signals agentkernel is asked to pass on until the helper exits.
async fn forward_signals_until(
    mut waiter: tokio::task::JoinHandle<std::io::Result<std::process::ExitStatus>>,
    pid: libc::pid_t,
    tty: bool,
) -> std::io::Result<std::process::ExitStatus> {
    let mut kinds = vec![
        (SignalKind::terminate(), libc::SIGTERM),
        (SignalKind::hangup(), libc::SIGHUP),
    ];
    if !tty {
        kinds.push((SignalKind::interrupt(), libc::SIGINT));
        kinds.push((SignalKind::quit(), libc::SIGQUIT));
    }
    let mut streams: Vec<_> = kinds
        .into_iter()
        .filter_map(|(kind, no)| signal(kind).ok().map(|s| (s, no)))
        .collect();
    loop {
        let next = futures_util::future::select_all(
            streams
                .iter_mut()
                .map(|(s, no)| Box::pin(async move { s.recv().await.map(|_| *no) })),
        );
        tokio::select! {
            status = &mut waiter => {
                return status.map_err(std::io::Error::other)?;
            }
            (Some(no), _, _) = next => {
                // SAFETY: signals our own child.
                unsafe { libc::kill(pid, no) };
            }
        }
    }
}

/// Copies a pipe to our stdout or stderr, hashing what passes. A reader of
/// our stdout that went away stops the copying, not the hashing.
fn tee(pipe: OwnedFd, stream: Stream) {
    // A larger pipe: fewer wake-ups of this thread and of the writer
    // (best effort; the default 64 KiB works, only slower).
    // SAFETY: fcntl on an fd we own.
    unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
    let mut input = std::fs::File::from(pipe);
    // Our fd 1 or 2 unbuffered (std's stdout is line-buffered: a syscall per
    // line); ManuallyDrop: it is not ours to close.
    let fd = match stream {
        Stream::Stdout => 1,
        Stream::Stderr => 2,
    };
    // SAFETY: fd 1/2 stay open for the process's life; never closed here.
    let mut output = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
    let mut buffer = vec![0u8; PIPE_SIZE as usize];
    let mut open = true;
    loop {
        let n = match input.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let data = &buffer[..n];
        observe::output(stream, data);
        if open {
            open = output.write_all(data).is_ok();
        }
    }
}
