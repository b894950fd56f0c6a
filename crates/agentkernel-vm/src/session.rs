//! One VM, one command: start the VMM, wait for the agent, send the command,
//! stream stdin to it and its output back, and return how it ended. The VM
//! is killed as soon as the command's end is seen (nothing in it outlives
//! the run), and with us if we are killed (PR_SET_PDEATHSIG).

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::protocol::{read_frame, write_frame, GuestMessage, HostMessage, RunRequest};
use crate::vmm::{VmConfig, Vmm};
use crate::{fail, Result};

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
/// goes to our stdout/stderr as it arrives; our stdin goes to it.
pub fn run(vmm: &dyn Vmm, vm: &VmConfig, request: RunRequest) -> Result<Ended> {
    let socket_dir = vm
        .agent_socket
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default();
    let listener = UnixListener::bind(&vm.agent_socket).or_else(|e| {
        fail(format!(
            "cannot listen on {}: {e}",
            vm.agent_socket.display()
        ))
    })?;
    let mut command = vmm.command(vm);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            // The VM dies with us, even on kill -9.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    trace("vmm start");
    let child = command
        .spawn()
        .or_else(|e| fail(format!("cannot start {}: {e}", vmm.name())))?;
    let mut vm_process = VmProcess::new(child);
    let stream = accept(&listener, &mut vm_process);
    // The socket has done its job; leave nothing on disk.
    let _ = std::fs::remove_file(&vm.agent_socket);
    let _ = std::fs::remove_dir(&socket_dir);
    let stream = stream?;
    trace("vmm connected");
    converse(stream, request, &mut vm_process)
}

fn converse(stream: UnixStream, request: RunRequest, vm: &mut VmProcess) -> Result<Ended> {
    let mut reader = stream
        .try_clone()
        .or_else(|e| fail(format!("socket: {e}")))?;
    let mut writer = stream;
    let _ = reader.set_read_timeout(Some(BOOT_TIMEOUT));
    match read_frame::<_, GuestMessage>(&mut reader) {
        Ok(Some(GuestMessage::Ready {
            started_ms,
            uptime_ms,
        })) => trace(&format!(
            "agent ready (guest uptime: agent started at {started_ms} ms, ready at {uptime_ms} ms)"
        )),
        other => {
            return vm.failure(format!(
                "the guest agent did not start ({})",
                describe(other)
            ))
        }
    }
    let _ = reader.set_read_timeout(None);
    if let Err(e) = write_frame(&mut writer, &HostMessage::Run(request)) {
        return vm.failure(format!("cannot send the command to the guest: {e}"));
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
                    if write_frame(&mut writer, &HostMessage::Stdin(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = write_frame(&mut writer, &HostMessage::StdinClosed);
    });
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    loop {
        match read_frame::<_, GuestMessage>(&mut reader) {
            Ok(Some(GuestMessage::Started)) => trace("command started"),
            Ok(Some(GuestMessage::Stdout(data))) => {
                // A reader that went away (`| head -1`) only stops wanting output.
                let _ = stdout.write_all(&data).and_then(|()| stdout.flush());
            }
            Ok(Some(GuestMessage::Stderr(data))) => {
                let _ = stderr.write_all(&data);
            }
            Ok(Some(GuestMessage::Exited {
                code,
                signal,
                timed_out,
                out_of_memory,
            })) => {
                trace("exit seen");
                vm.kill();
                return Ok(if timed_out {
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
            Ok(Some(GuestMessage::Failed(why))) => {
                vm.kill();
                return fail(why);
            }
            other => {
                return vm.failure(format!(
                    "the VM stopped before the command finished ({})",
                    describe(other)
                ))
            }
        }
    }
}

fn describe(frame: std::io::Result<Option<GuestMessage>>) -> String {
    match frame {
        Ok(None) => "the connection closed".into(),
        Ok(Some(m)) => format!("unexpected {m:?}"),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => "timed out".into(),
        Err(e) => e.to_string(),
    }
}

/// Waits for the VMM to connect to the agent's socket, or to die trying.
fn accept(listener: &UnixListener, vm: &mut VmProcess) -> Result<UnixStream> {
    listener
        .set_nonblocking(true)
        .or_else(|e| fail(format!("socket: {e}")))?;
    let started = Instant::now();
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                return Ok(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return vm.failure(format!("socket: {e}")),
        }
        if vm.exited() {
            return vm.failure("the VMM exited at start".into());
        }
        if started.elapsed() > BOOT_TIMEOUT {
            return vm.failure("the VMM did not connect to the agent's socket".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The VMM process, killed and reaped when dropped; its console and error
/// output kept (the last few KiB) to explain a failure.
struct VmProcess {
    child: Child,
    console: Arc<Mutex<VecDeque<u8>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

const CONSOLE_KEPT: usize = 16 << 10;

impl VmProcess {
    fn new(mut child: Child) -> VmProcess {
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
            console,
            readers,
        }
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }

    /// A failure, with the last line of the VM's console (the kernel's or
    /// QEMU's last word) when it said anything.
    fn failure<T>(&mut self, why: String) -> Result<T> {
        self.kill();
        let console = self.console.lock().unwrap_or_else(|p| p.into_inner());
        let text =
            String::from_utf8_lossy(&console.iter().copied().collect::<Vec<u8>>()).into_owned();
        // AGENTKERNEL_QEMU_CONSOLE=1: all of it, for debugging a guest.
        if std::env::var_os("AGENTKERNEL_QEMU_CONSOLE").is_some_and(|v| v == "1") {
            eprintln!("{text}");
        }
        let last = text
            .lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty())
            .unwrap_or("")
            .to_string();
        if last.is_empty() {
            fail(why)
        } else {
            fail(format!("{why}; its console said: {last}"))
        }
    }
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
