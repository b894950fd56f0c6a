//! One VM, one command: start the VMM, wait for the agent, send the command,
//! stream stdin to it and its output back, and return how it ended. The VM
//! is killed as soon as the command's end is seen (nothing in it outlives
//! the run), and with us if we are killed (PR_SET_PDEATHSIG).

use agentkernel_core::observe;
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::protocol::{read_frame, write_frame, GuestMessage, HostMessage, RunRequest, WindowSize};
use crate::vmm::{Nic, VmConfig, Vmm};
use crate::{fail, Result};

/// How long past the command's timeout a silent guest is given.
const AGENT_GRACE: Duration = Duration::from_secs(30);

/// How long a guest may say nothing, not even its heartbeat, before the
/// host takes it for hung and ends its VM: thirty heartbeats. Emulation on
/// a loaded host delays a guest by seconds, never by this much; a guest
/// that spins or deadlocks would otherwise hold its run (or a kept
/// sandbox's holder) forever. `AGENTKERNEL_VM_SILENCE_SECS` sets another.
pub const SILENCE_LIMIT: Duration = Duration::from_secs(60);

/// [`SILENCE_LIMIT`], or `AGENTKERNEL_VM_SILENCE_SECS` when it is a whole
/// number of seconds (a slower host, or a test that must not wait a minute).
pub fn silence_limit() -> Duration {
    std::env::var("AGENTKERNEL_VM_SILENCE_SECS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map_or(SILENCE_LIMIT, Duration::from_secs)
}

/// What a run or a holder says when it ends a silent guest.
pub(crate) fn silent_guest(silence: Duration) -> String {
    format!(
        "the VM stopped answering (its guest agent said nothing for {} s: a hung guest) and was ended; run it again, and if it recurs set AGENTKERNEL_VM_SILENCE_SECS higher on a very slow host",
        silence.as_secs()
    )
}

/// In the VMM process's environment: the owner label (`<boot>:<pid>:<start>`)
/// of the process that started it — the run for a one-shot VM, the holder
/// for a kept or warm one — as containers carry `agentkernel.owner`, so a
/// VM can be traced to what started it (`/proc/PID/environ`, root only).
pub const OWNER_ENV: &str = "AGENTKERNEL_OWNER";

/// How long a VM may take from start to its agent's hello.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Exited(i32),
    Signaled(i32),
    TimedOut,
    OutOfMemory,
}

/// Runs `request` in a VM booted by `vmm` from `vm`. The command's output
/// goes to our stdout/stderr as it arrives; our stdin goes to it. With
/// `egress` (the handoff socket of a started egress proxy, and
/// `request.egress_port` set), the guest's connections to the proxy's port
/// are carried to the proxy.
pub fn run(
    vmm: &dyn Vmm,
    vm: &VmConfig,
    request: RunRequest,
    egress: Option<std::os::fd::OwnedFd>,
) -> Result<Ended> {
    // Caught from before the boot, forwarded once the command runs.
    let signals = catch_signals();
    let (stream, mut vm_process) = boot(vmm, vm, None)?;
    for line in vm_process.port_lines() {
        eprintln!("{line}");
    }
    let request = RunRequest {
        network: vm_process.guest_network(),
        ..request
    };
    converse(stream, request, &mut vm_process, signals, egress)
}

/// Starts the VMM and returns our end of the agent's port. `control`, if
/// given, is a socket QEMU inherits for its control protocol (QMP).
pub(crate) fn boot(
    vmm: &dyn Vmm,
    vm: &VmConfig,
    control: Option<RawFd>,
) -> Result<(UnixStream, VmProcess)> {
    // The agent's port is one end of a socket pair that QEMU inherits: no
    // path anyone else could connect to, nothing on disk to clean up.
    let (ours, theirs) =
        UnixStream::pair().or_else(|e| fail(format!("cannot make a socket pair: {e}")))?;
    let agent_fd = theirs.as_raw_fd();
    // The network first: a VM that cannot get the one it asked for does
    // not start (never offline instead).
    let (net, tap) = match &vm.network {
        Some(network) => {
            let (attached, tap) = crate::net::attach(network)?;
            trace("network attached");
            (Some(attached), Some(tap))
        }
        None => (None, None),
    };
    let tap_fd = tap.as_ref().map(|t| t.as_raw_fd());
    let nic = net.as_ref().zip(tap_fd).map(|(n, fd)| Nic {
        fd,
        backend: n.backend(),
        mac: n.mac(),
    });
    let mut command = vmm.command(vm, agent_fd, nic.as_ref());
    if let Some(fd) = control {
        vmm.control(&mut command, fd);
    }
    command
        .env(OWNER_ENV, agentkernel_core::state::Owner::current().0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: prctl, setpgid and fcntl are async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            // The VM dies with us, even on kill -9.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Out of the terminal's process group: a Ctrl-C is ours to
            // forward to the command, not QEMU's to die of.
            if libc::setpgid(0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // QEMU keeps its ends of the pairs across exec.
            for fd in [Some(agent_fd), control, tap_fd].into_iter().flatten() {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    trace("vmm start");
    let child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            drop(tap);
            if let Some(net) = net {
                net.release();
            }
            return fail(format!("cannot start {}: {e}", vmm.name()));
        }
    };
    // Only QEMU holds its end now: if it dies, our reads see the end. The
    // same for the tap: it goes when QEMU does.
    drop(theirs);
    drop(tap);
    Ok((ours, VmProcess::new(child, net)))
}

/// Waits for the agent's hello.
pub(crate) fn await_ready(reader: &mut UnixStream, vm: &mut VmProcess) -> Result<()> {
    let _ = reader.set_read_timeout(Some(BOOT_TIMEOUT));
    match read_frame::<_, GuestMessage>(reader) {
        Ok(Some(GuestMessage::Ready {
            started_ms,
            modules_ms,
            uptime_ms,
        })) => {
            trace(&format!(
                "agent ready (guest uptime: agent started at {started_ms} ms, modules loaded at {modules_ms} ms, ready at {uptime_ms} ms)"
            ));
            Ok(())
        }
        other => vm.failure(format!(
            "the guest agent did not start ({})",
            describe(other)
        )),
    }
}

fn converse(
    stream: UnixStream,
    request: RunRequest,
    vm: &mut VmProcess,
    signals: Option<std::fs::File>,
    egress: Option<std::os::fd::OwnedFd>,
) -> Result<Ended> {
    let mut reader = stream
        .try_clone()
        .or_else(|e| fail(format!("socket: {e}")))?;
    let writer = Arc::new(Mutex::new(stream));
    let tunnels = egress.map(|handoff| crate::tunnel::to_proxy(handoff, writer.clone()));
    await_ready(&mut reader, vm)?;
    // The agent enforces the timeout; this is the backstop for a guest
    // that stops answering: no frame for that long ends the run.
    let backstop = request
        .timeout_ms
        .map(|ms| Duration::from_millis(ms) + AGENT_GRACE);
    let tty = request.tty.is_some();
    if let Err(e) = send(&writer, &HostMessage::Run(request)) {
        return vm.failure(format!("cannot send the command to the guest: {e}"));
    }
    match stream_command(
        reader,
        writer,
        backstop,
        Some(silence_limit()),
        signals,
        tty,
        tunnels.as_ref(),
    ) {
        Streamed::Ended(ended) => {
            vm.kill();
            Ok(ended)
        }
        Streamed::Failed(why) => {
            vm.kill();
            fail(why)
        }
        // The kernel's last word (a stall report, a panic) says why.
        Streamed::Silent(silence) => vm.failure(silent_guest(silence)),
        Streamed::Broken(how) => vm.failure(format!(
            "the VM stopped before the command finished ({how})"
        )),
    }
}

/// How a command's stream ended.
pub(crate) enum Streamed {
    Ended(Ended),
    /// The agent could not run it (its one-line reason).
    Failed(String),
    /// The stream broke before the command's end (how).
    Broken(String),
    /// The agent said nothing, not even `Alive`, for this long: the guest
    /// hung (a spinning or stalled kernel).
    Silent(Duration),
}

/// Once the command is sent: our stdin and signals to it, its output to our
/// stdout/stderr, until its end. `backstop`: the command's end is not seen
/// that long after it was sent (its timeout plus a grace: the agent enforces
/// the timeout, this is for a guest that does not) ends it as a timeout.
/// `silence`: on a stream straight from the agent, which says `Alive` every
/// couple of seconds, nothing for that long means the guest hung. `tty`:
/// the command has a terminal in the guest, so ours is raw until it ends
/// (keys, ^C included, are the guest terminal's to interpret) and follows
/// our window's size. `tunnels`: where the guest's egress connections go
/// (frames for them are ignored without).
pub(crate) fn stream_command(
    mut reader: UnixStream,
    writer: Arc<Mutex<UnixStream>>,
    backstop: Option<Duration>,
    silence: Option<Duration>,
    signals: Option<std::fs::File>,
    tty: bool,
    tunnels: Option<&crate::tunnel::Tunnels>,
) -> Streamed {
    let sent = Instant::now();
    // Restored when this returns, however the command or the VM ended.
    let _raw = tty
        .then(|| agentkernel_core::terminal::RawMode::enable(0))
        .flatten();
    if let Some(pipe) = signals {
        forward_signals(pipe, writer.clone(), tty);
    }
    // Our stdin, forwarded until it ends (never joined: a terminal's read
    // may block past the command's end; the process exits anyway).
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if send(&writer, &HostMessage::Stdin(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = send(&writer, &HostMessage::StdinClosed);
    });
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    loop {
        let elapsed = sent.elapsed();
        if backstop.is_some_and(|b| elapsed >= b) {
            return Streamed::Ended(Ended::TimedOut);
        }
        // Read no longer than the sooner of the two limits; a zero timeout
        // would mean none at all.
        let wait = [backstop.map(|b| b - elapsed), silence]
            .into_iter()
            .flatten()
            .min()
            .map(|w| w.max(Duration::from_millis(1)));
        let _ = reader.set_read_timeout(wait);
        match read_frame::<_, GuestMessage>(&mut reader) {
            Ok(Some(GuestMessage::Alive)) => {}
            Ok(Some(GuestMessage::Started)) => trace("command started"),
            Ok(Some(GuestMessage::Tunnel(frame))) => {
                if let Some(tunnels) = tunnels {
                    tunnels.handle(frame);
                }
            }
            Ok(Some(GuestMessage::Stdout(data))) => {
                // What a receipt digests (nothing is kept without --receipt).
                observe::output(observe::Stream::Stdout, &data);
                // A reader that went away (`| head -1`) only stops wanting output.
                let _ = stdout.write_all(&data).and_then(|()| stdout.flush());
            }
            Ok(Some(GuestMessage::Stderr(data))) => {
                observe::output(observe::Stream::Stderr, &data);
                let _ = stderr.write_all(&data);
            }
            Ok(Some(GuestMessage::Exited {
                code,
                signal,
                timed_out,
                out_of_memory,
            })) => {
                trace("exit seen");
                return Streamed::Ended(if timed_out {
                    Ended::TimedOut
                } else if out_of_memory {
                    Ended::OutOfMemory
                } else {
                    match (code, signal) {
                        (Some(c), _) => Ended::Exited(c),
                        (None, Some(s)) => Ended::Signaled(s),
                        (None, None) => Ended::Exited(255),
                    }
                });
            }
            Ok(Some(GuestMessage::Failed(why))) => return Streamed::Failed(why),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                // The command had its time and more: a timeout.
                if backstop.is_some_and(|b| sent.elapsed() >= b) {
                    return Streamed::Ended(Ended::TimedOut);
                }
                if let Some(silence) = silence {
                    return Streamed::Silent(silence);
                }
                // Woken a moment early for the backstop: read on.
            }
            other => return Streamed::Broken(describe(other)),
        }
    }
}

pub(crate) fn send(writer: &Mutex<UnixStream>, message: &HostMessage) -> std::io::Result<()> {
    let mut stream = writer.lock().unwrap_or_else(|p| p.into_inner());
    write_frame(&mut *stream, message)
}

/// The signals a user sends agentkernel to stop or poke its command, and
/// SIGWINCH (a terminal's new size, sent on as a resize, never as a signal).
const CAUGHT: [libc::c_int; 7] = [
    libc::SIGWINCH,
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// The write end of the self-pipe the signal handler reports to.
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(signo: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        let byte = signo as u8;
        // SAFETY: write(2) is async-signal-safe; one byte from our stack.
        unsafe { libc::write(fd, (&byte as *const u8).cast(), 1) };
    }
}

/// From now on the signals in [`CAUGHT`] are written to a pipe, whose
/// read end is returned, replacing the async runtime's handlers, which this
/// blocking session would never poll. `None` if no pipe can be made.
pub(crate) fn catch_signals() -> Option<std::fs::File> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into our array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return None;
    }
    SIGNAL_PIPE.store(fds[1], Ordering::Relaxed);
    for signo in CAUGHT {
        // SAFETY: a zeroed sigaction with our handler, which only writes
        // to the pipe.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signo, &action, std::ptr::null_mut());
        }
    }
    // SAFETY: the read end is ours alone from here.
    Some(unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[0]) })
}

/// Sends each caught signal to the command in the VM (its exit then says
/// how it took them); with a terminal, a SIGWINCH as our window's new size.
fn forward_signals(mut pipe: std::fs::File, writer: Arc<Mutex<UnixStream>>, tty: bool) {
    std::thread::spawn(move || {
        let mut byte = [0u8; 1];
        while pipe.read_exact(&mut byte).is_ok() {
            let message = match i32::from(byte[0]) {
                libc::SIGWINCH => match window_size().filter(|_| tty) {
                    Some(size) => HostMessage::Resize(size),
                    None => continue,
                },
                signo => HostMessage::Signal(signo),
            };
            if send(&writer, &message).is_err() {
                return;
            }
        }
    });
}

/// Our terminal's size (the one our stdin is), for the command's.
pub fn window_size() -> Option<WindowSize> {
    agentkernel_core::terminal::size(0).map(|(rows, cols)| WindowSize { rows, cols })
}

pub(crate) fn describe(frame: std::io::Result<Option<GuestMessage>>) -> String {
    match frame {
        Ok(None) => "the connection closed".into(),
        Ok(Some(m)) => format!("unexpected {m:?}"),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => "timed out".into(),
        Err(e) => e.to_string(),
    }
}

/// The VMM process, killed and reaped when dropped; its console and error
/// output kept (the last few KiB) to explain a failure.
pub(crate) struct VmProcess {
    child: Child,
    /// The VM's network lease, released once QEMU is reaped.
    net: Option<crate::net::Attached>,
    console: Arc<Mutex<VecDeque<u8>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

const CONSOLE_KEPT: usize = 16 << 10;

impl VmProcess {
    fn new(mut child: Child, net: Option<crate::net::Attached>) -> VmProcess {
        let console = Arc::new(Mutex::new(VecDeque::new()));
        let mut readers = Vec::new();
        let outputs: [Option<Box<dyn Read + Send>>; 2] = [
            child
                .stdout
                .take()
                .map(|o| Box::new(o) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|o| Box::new(o) as Box<dyn Read + Send>),
        ];
        for mut output in outputs.into_iter().flatten() {
            let console = console.clone();
            readers.push(std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = output.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let mut kept = console.lock().unwrap_or_else(|p| p.into_inner());
                    kept.extend(&buf[..n]);
                    let excess = kept.len().saturating_sub(CONSOLE_KEPT);
                    kept.drain(..excess);
                }
            }));
        }
        VmProcess {
            child,
            net,
            console,
            readers,
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the guest agent is told about its NIC (`None`: it has none).
    pub(crate) fn guest_network(&self) -> Option<crate::protocol::GuestNetwork> {
        self.net.as_ref().map(crate::net::Attached::guest)
    }

    /// Where its published ports landed, one line each.
    pub(crate) fn port_lines(&self) -> Vec<String> {
        self.net
            .as_ref()
            .map(crate::net::Attached::port_lines)
            .unwrap_or_default()
    }

    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        // QEMU is gone, and its tap with it: free the lease.
        if let Some(net) = self.net.take() {
            net.release();
        }
    }

    /// A failure, with the last line of the VM's console (the kernel's or
    /// QEMU's last word) when it said anything.
    pub(crate) fn failure<T>(&mut self, why: String) -> Result<T> {
        self.kill();
        let console = self.console.lock().unwrap_or_else(|p| p.into_inner());
        let text =
            String::from_utf8_lossy(&console.iter().copied().collect::<Vec<u8>>()).into_owned();
        // AGENTKERNEL_QEMU_CONSOLE=1: all of it, for debugging a guest.
        if std::env::var_os("AGENTKERNEL_QEMU_CONSOLE").is_some_and(|v| v == "1") {
            eprintln!("{text}");
        }
        let last = last_word(&text);
        if last.is_empty() {
            fail(why)
        } else {
            fail(format!("{why}; its console said: {last}"))
        }
    }
}

/// The console line that explains a failure: the agent's own reason when
/// it gave one (the kernel's "reboot: Restarting system" comes after it,
/// as the agent ends the VM), else the console's last line.
fn last_word(console: &str) -> String {
    let lines = || console.lines().map(str::trim).filter(|l| !l.is_empty());
    lines()
        .rfind(|l| l.starts_with("agentkernel-guest: "))
        .or_else(|| lines().next_back())
        .unwrap_or("")
        .to_string()
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `AGENTKERNEL_TRACE_STARTUP=1`: the native backend's phase lines.
fn trace(phase: &str) {
    agentkernel_native::trace::phase(phase);
}
