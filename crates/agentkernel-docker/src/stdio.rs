//! Streams a running command's I/O like a local command's: stdout and stderr
//! separate and live, stdin forwarded (EOF included), a raw terminal with
//! window-size updates when interactive, signals forwarded, `--timeout`
//! enforced. Shared by one-shot runs and execs in kept sandboxes.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use agentkernel_core::{observe, terminal, Error};
use bollard::container::LogOutput;
use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::Notify;

pub type Output = Pin<Box<dyn Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>;
pub type Input = Pin<Box<dyn AsyncWrite + Send>>;

/// What supervising needs from the thing that runs the command.
pub trait Process {
    /// Delivers a signal the user sent agentkernel (SIGINT, SIGTERM, …).
    fn signal(&self, signo: i32) -> impl Future<Output = ()>;
    /// Kills the command and everything it started (timeout, third Ctrl-C).
    fn kill_all(&self) -> impl Future<Output = ()>;
    fn resize(&self, rows: u16, cols: u16) -> impl Future<Output = ()>;
}

pub struct Finished {
    pub exit_code: i64,
    pub timed_out: bool,
    /// The first bytes the command wrote to stderr (an init's exec error is read from here).
    pub stderr_head: Vec<u8>,
}

const STDERR_HEAD_LEN: usize = 256;

/// Signals we forward. SIGWINCH is handled separately (resize).
const FORWARDED: [(SignalKind, i32); 4] = [
    (SignalKind::interrupt(), libc::SIGINT),
    (SignalKind::terminate(), libc::SIGTERM),
    (SignalKind::hangup(), libc::SIGHUP),
    (SignalKind::quit(), libc::SIGQUIT),
];

/// How long a command may take to exit after agentkernel is told to stop
/// (SIGTERM, SIGHUP; SIGINT without a terminal) before the whole sandbox is
/// killed. The signal goes to the container's init, which the command may
/// have stopped (a ptrace attach to PID 1): without this, nothing would
/// deliver it and `agentkernel run` would wait forever.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Whether `signo` asks agentkernel to end the run (rather than being a key
/// the command may handle and carry on: Ctrl-C in an interactive terminal).
fn asks_to_stop(signo: i32, tty: bool) -> bool {
    signo == libc::SIGTERM || signo == libc::SIGHUP || (signo == libc::SIGINT && !tty)
}

pub struct Signals {
    streams: Vec<(Signal, i32)>,
}

/// Handlers installed at start-up (see [`install_signal_handlers`]).
static EARLY: std::sync::Mutex<Option<Signals>> = std::sync::Mutex::new(None);

/// Installs agentkernel's handlers for the forwarded signals as early as
/// possible: a Ctrl-C that arrives while the sandbox is being created is then
/// held and delivered to the command as soon as it runs (which ends it and
/// lets cleanup happen), instead of killing agentkernel mid-way and leaving
/// the sandbox to a later garbage collection. Needs a tokio runtime.
pub fn install_signal_handlers() {
    let mut early = EARLY.lock().unwrap_or_else(|p| p.into_inner());
    if early.is_none() {
        *early = Some(Signals::install());
    }
}

impl Signals {
    fn take_or_install() -> Signals {
        EARLY
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_else(Signals::install)
    }

    fn install() -> Signals {
        let streams = FORWARDED
            .iter()
            .filter_map(|(kind, no)| signal(*kind).ok().map(|s| (s, *no)))
            .collect();
        Signals { streams }
    }

    async fn recv(&mut self) -> i32 {
        let futures = self
            .streams
            .iter_mut()
            .map(|(s, no)| Box::pin(async move { s.recv().await.map(|_| *no) }));
        match futures_util::future::select_all(futures).await.0 {
            Some(no) => no,
            None => std::future::pending().await,
        }
    }
}

/// Supervises one command until `wait` resolves with its exit code.
/// `output_done` is notified when the command's output stream ends, which is
/// how an exec (that has no wait API) learns it is over.
pub async fn supervise<P: Process>(
    process: &P,
    output: Output,
    input: Option<Input>,
    tty: bool,
    timeout: Option<Duration>,
    output_done: Arc<Notify>,
    wait: impl Future<Output = Result<i64, Error>>,
) -> Result<Finished, Error> {
    let _raw = if tty {
        terminal::RawMode::enable(0)
    } else {
        None
    };
    if tty {
        if let Some((rows, cols)) = terminal::size(1) {
            process.resize(rows, cols).await;
        }
    }
    let stdin_task = input.map(|i| tokio::spawn(forward_stdin(i)));
    let output_task = tokio::spawn(async move {
        let head = pump_output(output).await;
        output_done.notify_one();
        head
    });

    let mut signals = Signals::take_or_install();
    let mut winch = signal(SignalKind::window_change()).ok();
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let sleep = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(sleep, wait);

    let mut timed_out = false;
    let mut signals_seen = 0;
    let mut kill_at: Option<tokio::time::Instant> = None;
    let mut killed = false;
    let exit_code = loop {
        tokio::select! {
            code = &mut wait => break code?,
            no = signals.recv() => {
                signals_seen += 1;
                // A command that ignores two signals is stuck: the third one wins.
                if signals_seen >= 3 { process.kill_all().await } else { process.signal(no).await }
                if asks_to_stop(no, tty) && kill_at.is_none() {
                    kill_at = Some(tokio::time::Instant::now() + STOP_GRACE);
                }
            }
            _ = async { match kill_at { Some(at) => tokio::time::sleep_until(at).await, None => std::future::pending().await } }, if !killed => {
                killed = true;
                process.kill_all().await;
            }
            _ = async { match winch.as_mut() { Some(w) => { w.recv().await; } None => std::future::pending().await } } => {
                if let Some((rows, cols)) = terminal::size(1) {
                    process.resize(rows, cols).await;
                }
            }
            _ = &mut sleep, if !timed_out => {
                timed_out = true;
                process.kill_all().await;
            }
        }
    };
    // The output stream ends when the command's last writer closes; don't let
    // a background process that inherited the pipes hold us forever.
    let stderr_head = match tokio::time::timeout(Duration::from_secs(2), output_task).await {
        Ok(Ok(head)) => head,
        _ => Vec::new(),
    };
    if let Some(t) = stdin_task {
        t.abort();
    }
    Ok(Finished {
        exit_code,
        timed_out,
        stderr_head,
    })
}

async fn forward_stdin(mut input: Input) {
    let mut stdin = tokio::io::stdin();
    let _ = tokio::io::copy(&mut stdin, &mut input).await;
    // Half-close: the command sees EOF on its stdin.
    let _ = input.shutdown().await;
}

/// Copies the command's output to ours; returns the first bytes of its stderr.
async fn pump_output(mut output: Output) -> Vec<u8> {
    let mut stderr_head = Vec::new();
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let mut stdout_open = true;
    while let Some(Ok(chunk)) = output.next().await {
        match chunk {
            LogOutput::StdOut { message } | LogOutput::Console { message } => {
                observe::output(observe::Stream::Stdout, &message);
                // A closed stdout (`| head -1`) stops our copying, not the command.
                if stdout_open {
                    stdout_open =
                        stdout.write_all(&message).await.is_ok() && stdout.flush().await.is_ok();
                }
            }
            LogOutput::StdErr { message } => {
                observe::output(observe::Stream::Stderr, &message);
                if stderr_head.len() < STDERR_HEAD_LEN {
                    let take = (STDERR_HEAD_LEN - stderr_head.len()).min(message.len());
                    stderr_head.extend_from_slice(&message[..take]);
                }
                let _ = stderr.write_all(&message).await;
                let _ = stderr.flush().await;
            }
            LogOutput::StdIn { .. } => {}
        }
    }
    stderr_head
}

/// Podman's init (catatonit), which runs our commands, exits 1 when it cannot
/// execute the command, after printing `ERROR (catatonit:N): failed to exec
/// pid1: <reason>`. Recover the shell's codes from that line (127 not found,
/// 126 not executable) and name the command, as Docker's init does.
pub fn init_exec_failure(
    flavor: crate::engine::Flavor,
    finished: &Finished,
    program: &str,
) -> Option<i32> {
    if flavor != crate::engine::Flavor::Podman || finished.exit_code != 1 {
        return None;
    }
    let head = String::from_utf8_lossy(&finished.stderr_head);
    let reason = head
        .strip_prefix("ERROR (catatonit:")?
        .split_once("): failed to exec pid1: ")?
        .1;
    if reason.starts_with("No such file or directory") {
        eprintln!("agentkernel: {program}: command not found in the sandbox");
        Some(127)
    } else if reason.starts_with("Permission denied") || reason.starts_with("Is a directory") {
        eprintln!("agentkernel: {program}: cannot execute (permission denied)");
        Some(126)
    } else {
        None
    }
}
