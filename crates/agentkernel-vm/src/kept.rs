//! Kept VMs without a daemon: a detached **holder** process per sandbox
//! (`agentkernel __vm-holder STATE NAME`) owns the VM — QEMU is its child
//! and dies with it (PDEATHSIG), even on `kill -9` — and serves the
//! sandbox's commands on a socket in the sandbox's private state directory.
//! Each connection is one request: a command (its stdio, signals and end
//! streamed back), `stop` (end every process in the guest), pause/resume
//! (QMP `stop`/`cont`) or remove. The holder enforces the TTL (moved by every
//! use and kept ahead while a command runs), and ends the sandbox when it
//! expires, is removed or its VM dies; a holder that was killed leaves a
//! state directory `collect` removes.
//!
//! A kept sandbox with an egress proxy: its creator starts the proxy and
//! hands the holder the proxy's handoff socket and lifeline (inherited
//! descriptors, `__vm-holder --egress H L STATE NAME`): the holder carries the guest's proxy
//! connections to it (`crate::tunnel`) for every command, and the proxy
//! ends when the holder does.
//!
//! Files in `<sandbox dir>`: `vm.json` (what to boot and the sandbox's base
//! request, written by the creator), `vm-held.json` (who holds it),
//! `vm.sock`, and `vm-paused` while paused.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use agentkernel_core::secrets::SecretFile;
use agentkernel_core::state::{now_unix, write_atomic, Owner, SandboxRecord, Store};
use serde::{Deserialize, Serialize};

use crate::protocol::{read_frame, write_frame, GuestMessage, HostMessage, RunRequest};
use crate::session::{self, Ended, Streamed, VmProcess, BOOT_TIMEOUT};
use crate::vmm::{Qemu, VmConfig};
use crate::{fail, Result};

/// The hidden subcommand the holder runs as (handled before the CLI parses).
pub const HOLDER_SUBCOMMAND: &str = "__vm-holder";

pub(crate) const SPEC_FILE: &str = "vm.json";
pub(crate) const HELD_FILE: &str = "vm-held.json";
const SOCKET: &str = "vm.sock";
const PAUSED: &str = "vm-paused";

/// What the holder boots, and the sandbox it makes of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeptVm {
    pub qemu: PathBuf,
    pub vm: VmConfig,
    /// The sandbox's root, workspace and confinement (its argv is unused);
    /// every command's request is based on it.
    pub sandbox: RunRequest,
    /// A kept sandbox's record, committed by the holder once the VM serves
    /// commands; `None` for a warm pool VM.
    pub record: Option<SandboxRecord>,
}

impl KeptVm {
    /// The kept VM `name` of `store`, as its creator described it.
    pub fn load(store: &Store, name: &str) -> Result<KeptVm> {
        KeptVm::load_from(&store.sandbox_dir(name))
    }

    fn load_from(dir: &std::path::Path) -> Result<KeptVm> {
        let path = dir.join(SPEC_FILE);
        let data = std::fs::read(&path)
            .or_else(|e| fail(format!("cannot read {}: {e}", path.display())))?;
        serde_json::from_slice(&data)
            .or_else(|e| fail(format!("cannot read {}: {e}", path.display())))
    }
}

/// Who holds a kept VM.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Held {
    /// The holder (`<boot>:<pid>:<start>`).
    holder: String,
    qemu_pid: u32,
}

impl Held {
    fn load(store: &Store, name: &str) -> Option<Held> {
        Held::load_from(&store.sandbox_dir(name))
    }

    pub(crate) fn load_from(dir: &std::path::Path) -> Option<Held> {
        let data = std::fs::read(dir.join(HELD_FILE)).ok()?;
        serde_json::from_slice(&data).ok()
    }

    pub(crate) fn alive(&self) -> bool {
        !Owner(self.holder.clone()).is_dead()
    }
}

/// A request on the holder's socket; the first frame of a connection.
#[derive(Debug, Serialize, Deserialize)]
enum Request {
    /// A command; then stdin and signals (`HostMessage`s) one way, its
    /// output and end (`GuestMessage`s) the other.
    Exec(Box<RunRequest>),
    /// End every process in the guest; answered with how many there were.
    EndAll,
    Pause,
    Resume,
    Remove,
}

type Reply = std::result::Result<u64, String>;

/// A started egress proxy's handoff socket and lifeline, for the holder
/// (`agentkernel_native::egress::StartedProxy`).
pub struct Egress {
    pub handoff: OwnedFd,
    pub lifeline: OwnedFd,
}

/// Builds the kept VM `name` (already reserved in `store`) under a new
/// holder, and returns once it serves commands — or with why it could not
/// be built, its name released. With `egress`, the holder carries the
/// guest's proxy connections (`kept.sandbox.egress_port` set); our copies
/// of its descriptors close when this returns. `secret_files` go to the
/// holder through its stdin, never into the stored description.
pub fn create(
    store: &Store,
    name: &str,
    kept: &KeptVm,
    egress: Option<Egress>,
    secret_files: &[SecretFile],
) -> Result<()> {
    let built = (|| {
        let spec = serde_json::to_vec(kept).or_else(|e| fail(e.to_string()))?;
        write_atomic(&store.sandbox_dir(name).join(SPEC_FILE), &spec)
            .or_else(|e| fail(e.to_string()))?;
        let mut args: Vec<std::ffi::OsString> = Vec::new();
        let mut inherit = Vec::new();
        if let Some(egress) = &egress {
            inherit = vec![egress.handoff.as_raw_fd(), egress.lifeline.as_raw_fd()];
            args.push(EGRESS_FLAG.into());
            args.extend(inherit.iter().map(|fd| fd.to_string().into()));
        }
        // The name last: what finds a sandbox's holder by its arguments.
        args.extend([store.root().as_os_str().to_owned(), name.into()]);
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        let mut holder = spawn_holder(&args, Stdio::piped(), Stdio::piped(), &inherit)?;
        // Read by the holder before it boots; the pipe's end is the list's.
        if let Some(mut input) = holder.stdin.take() {
            if !secret_files.is_empty() {
                let text = serde_json::to_vec(secret_files).or_else(|e| fail(e.to_string()))?;
                // A holder that died early is told below by its empty answer.
                let _ = input.write_all(&text);
            }
        }
        // "ok" once the VM serves commands, else why not; then EOF.
        let mut answer = String::new();
        if let Some(mut report) = holder.stdout.take() {
            let _ = report.read_to_string(&mut answer);
        }
        let mut lines = answer.trim().lines();
        match lines.next().unwrap_or("") {
            "ok" => {
                for line in lines {
                    eprintln!("{line}");
                }
                Ok(())
            }
            "" => fail("the VM's holder died while starting it"),
            _ => fail(answer.trim().to_string()),
        }
    })();
    if built.is_err() {
        let _ = store.forget(name);
    }
    built
}

/// The holder's argument before the egress proxy's two descriptors.
const EGRESS_FLAG: &str = "--egress";

/// Starts `agentkernel __vm-holder ARGS` away from our terminal (the user's
/// Ctrl-C or a closed terminal does not end the VM), its stdin `input` and
/// stdout `report`, keeping the descriptors `inherit` open across the exec.
/// Without descriptors to keep, the standard library starts it with
/// `posix_spawn` (no copy of our page tables: a warm VM's refill is on the
/// path of the run that starts it), in a process group of its own from the
/// spawn itself: a terminal sends Ctrl-C and its hang-up to its foreground
/// group, and the holder must never be in it, not even for the milliseconds
/// before its `main` runs. (A run in a terminal that closed as the run
/// ended, `script -c` or an agent's pty, lost two warm VMs of three that
/// way: their holders died of SIGHUP before they reached `setsid`.) The
/// holder then moves to a session of its own ([`holder_main`]). Keeping
/// descriptors needs code between fork and exec, which calls setsid there.
pub(crate) fn spawn_holder(
    args: &[&std::ffi::OsStr],
    input: Stdio,
    report: Stdio,
    inherit: &[RawFd],
) -> Result<std::process::Child> {
    let inherit = inherit.to_vec();
    let exe = std::env::current_exe()
        .or_else(|e| fail(format!("cannot find agentkernel itself: {e}")))?;
    let mut holder = Command::new(exe);
    holder
        .arg(HOLDER_SUBCOMMAND)
        .args(args)
        .stdin(input)
        .stdout(report)
        .stderr(Stdio::null());
    if inherit.is_empty() {
        holder.process_group(0);
    } else {
        // SAFETY: setsid and fcntl are async-signal-safe.
        unsafe {
            holder.pre_exec(move || {
                libc::setsid();
                for fd in &inherit {
                    // SAFETY (fcntl): clears FD_CLOEXEC in the child only.
                    if libc::fcntl(*fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }
    holder
        .spawn()
        .or_else(|e| fail(format!("cannot start the VM's holder: {e}")))
}

/// The holder: `agentkernel __vm-holder [--egress H L] STATE NAME` (a kept
/// sandbox, its creator waiting on our stdout, its secret files on our
/// stdin) or `agentkernel __vm-holder --warm DIR` (a warm pool VM,
/// `crate::pool`). Returns its exit code.
pub fn holder_main(args: &[String]) -> i32 {
    // Our own session, away from the starter's working directory. A starter
    // that kept descriptors for us made it already (then setsid fails
    // harmlessly). One that spawned us as the leader of a process group of
    // our own (`spawn_holder`, so that no terminal signal could reach us
    // before this point) left us unable to start one, as a group leader
    // cannot: a child of ours can, and carries on as the holder.
    // SAFETY: plain syscalls on our own process, which has no other thread
    // yet (main calls us first), so fork is safe.
    unsafe {
        let me = libc::getpid();
        if libc::setsid() < 0 && libc::getpgrp() == me && libc::getsid(0) != me {
            match libc::fork() {
                0 => {
                    libc::setsid();
                }
                // No child: we stay as we are, outside the terminal's
                // foreground group all the same.
                -1 => {}
                _ => libc::_exit(0),
            }
        }
    }
    let _ = std::env::set_current_dir("/");
    let place = match args {
        [flag, dir] if flag == "--warm" => {
            let dir = PathBuf::from(dir);
            // Who is booting it, for gc, until `vm-held.json` says who holds it.
            let _ = write_atomic(
                &dir.join(crate::pool::BOOTING),
                Owner::current().0.as_bytes(),
            );
            Place::Warm { dir }
        }
        [state, name] | [_, _, _, state, name] => Place::Kept {
            store: Store::new(PathBuf::from(state)),
            name: name.clone(),
        },
        _ => return 125,
    };
    let egress = match args {
        [flag, handoff, lifeline, _, _] if flag == EGRESS_FLAG => {
            match (handoff.parse::<RawFd>(), lifeline.parse::<RawFd>()) {
                // SAFETY: the creator passed these two for us alone
                // (`create`), open across the exec.
                (Ok(h), Ok(l)) if h > 2 && l > 2 && h != l => unsafe {
                    Some(Egress {
                        handoff: OwnedFd::from_raw_fd(h),
                        lifeline: OwnedFd::from_raw_fd(l),
                    })
                },
                _ => return 125,
            }
        }
        [_, _, _, _, _] => return 125,
        _ => None,
    };
    let secret_files = match read_secret_files(&place) {
        Ok(files) => files,
        Err(e) => {
            let _ = write!(std::io::stdout(), "{e}");
            place.forget();
            return 1;
        }
    };
    let mut report = std::io::stdout();
    let holder = match start(place, egress, secret_files) {
        Ok(holder) => holder,
        Err((place, e)) => {
            let _ = write!(report, "{e}");
            place.forget();
            return 1;
        }
    };
    // "ok", then where its published ports landed, for the creator to say.
    let ports = lock(&holder.vm).port_lines();
    let mut answer = String::from("ok");
    for line in ports {
        answer.push('\n');
        answer.push_str(&line);
    }
    let _ = write!(report, "{answer}").and_then(|()| report.flush());
    agentkernel_native::process::holder::detach_stdio();
    let held = Arc::new(holder);
    held.serve();
    0
}

/// A kept sandbox's `--secret-file`s, as its creator wrote them to our
/// stdin (nothing: none). A warm VM's stdin is /dev/null: its run has none.
fn read_secret_files(place: &Place) -> Result<Vec<SecretFile>> {
    if !matches!(place, Place::Kept { .. }) {
        return Ok(Vec::new());
    }
    let mut text = Vec::new();
    std::io::stdin()
        .read_to_end(&mut text)
        .or_else(|e| fail(format!("cannot read the secret files: {e}")))?;
    if text.is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_slice(&text).or_else(|e| fail(format!("cannot read the secret files: {e}")))
}

/// Where a holder's VM belongs.
pub(crate) enum Place {
    /// The kept sandbox `name`: TTL, record, `sandbox …` commands.
    Kept { store: Store, name: String },
    /// A warm pool VM in `dir`: serves one command, then ends.
    Warm { dir: PathBuf },
}

impl Place {
    fn dir(&self) -> PathBuf {
        match self {
            Place::Kept { store, name } => store.sandbox_dir(name),
            Place::Warm { dir } => dir.clone(),
        }
    }

    /// A use: a kept sandbox's deadline moves.
    fn used(&self, ttl: Duration) {
        if let Place::Kept { store, name } = self {
            let _ = store.touch(name, ttl);
        }
    }

    /// True once the VM should end with no command running: a kept
    /// sandbox's deadline passed (or it was removed), a warm VM's directory
    /// went (pruned, or its state dir removed) or it idled past its TTL.
    fn over(&self) -> bool {
        match self {
            Place::Kept { store, name } => store
                .deadline(name)
                .is_none_or(|deadline| now_unix() >= deadline),
            Place::Warm { dir } => crate::pool::is_over(dir),
        }
    }

    fn single_use(&self) -> bool {
        matches!(self, Place::Warm { .. })
    }

    fn forget(&self) {
        match self {
            Place::Kept { store, name } => {
                let _ = store.forget(name);
            }
            Place::Warm { dir } => {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

/// A running kept VM, as its holder sees it.
struct Holder {
    place: Place,
    ttl: Duration,
    vm: Mutex<VmProcess>,
    port: Arc<Mutex<UnixStream>>,
    port_reader: Mutex<Option<UnixStream>>,
    listener: UnixListener,
    qmp: Mutex<Qmp>,
    /// Connections of running commands, by id.
    clients: Mutex<HashMap<u64, UnixStream>>,
    next_id: AtomicU64,
    /// Where the guest's `EndedAll` goes (the `stop` waiting for it).
    ended_all: Mutex<Option<mpsc::Sender<u64>>>,
    /// When the guest last said anything (its heartbeat included), or was
    /// resumed: a running guest that stays silent past the limit hung.
    heard: Mutex<Instant>,
    /// The guest's egress proxy connections, carried to the proxy.
    tunnels: Option<crate::tunnel::Tunnels>,
    /// Held as long as we live: the proxy ends with us.
    _lifeline: Option<OwnedFd>,
}

/// Why the holder ends the sandbox.
enum End {
    VmGone,
    Removed,
}

fn start(
    place: Place,
    egress: Option<Egress>,
    secret_files: Vec<SecretFile>,
) -> std::result::Result<Holder, (Place, crate::Error)> {
    match boot_and_hold(&place, egress, secret_files) {
        Ok(parts) => Ok(parts.into_holder(place)),
        Err(e) => Err((place, e)),
    }
}

/// What `start` made, before it is a `Holder`.
struct Parts {
    ttl: Duration,
    vm: VmProcess,
    port: Arc<Mutex<UnixStream>>,
    reader: UnixStream,
    listener: UnixListener,
    qmp: Qmp,
    tunnels: Option<crate::tunnel::Tunnels>,
    lifeline: Option<OwnedFd>,
}

impl Parts {
    fn into_holder(self, place: Place) -> Holder {
        Holder {
            place,
            ttl: self.ttl,
            vm: Mutex::new(self.vm),
            port: self.port,
            port_reader: Mutex::new(Some(self.reader)),
            listener: self.listener,
            qmp: Mutex::new(self.qmp),
            clients: Mutex::default(),
            next_id: AtomicU64::new(1),
            ended_all: Mutex::default(),
            heard: Mutex::new(Instant::now()),
            tunnels: self.tunnels,
            _lifeline: self.lifeline,
        }
    }
}

fn boot_and_hold(
    place: &Place,
    egress: Option<Egress>,
    secret_files: Vec<SecretFile>,
) -> Result<Parts> {
    let dir = place.dir();
    let kept = KeptVm::load_from(&dir)?;
    let qemu = Qemu {
        binary: kept.qemu.clone(),
    };
    let (control, qemu_end) =
        UnixStream::pair().or_else(|e| fail(format!("cannot make a socket pair: {e}")))?;
    let (port, mut vm) = session::boot(&qemu, &kept.vm, Some(qemu_end.as_raw_fd()))?;
    drop(qemu_end);
    let mut reader = port.try_clone().or_else(|e| fail(format!("socket: {e}")))?;
    session::await_ready(&mut reader, &mut vm)?;
    let port = Arc::new(Mutex::new(port));
    let (tunnels, lifeline) = match egress {
        Some(Egress { handoff, lifeline }) => (
            Some(crate::tunnel::to_proxy(handoff, port.clone())),
            Some(lifeline),
        ),
        None => (None, None),
    };
    let sandbox = RunRequest {
        network: vm.guest_network(),
        secret_files,
        ..kept.sandbox.clone()
    };
    if let Err(e) = session::send(&port, &HostMessage::Keep(sandbox)) {
        return vm.failure(format!("cannot send the sandbox to the guest: {e}"));
    }
    // The heartbeat may come first while the agent builds the root.
    let built = loop {
        match read_frame::<_, GuestMessage>(&mut reader) {
            Ok(Some(GuestMessage::Alive)) => {}
            other => break other,
        }
    };
    match built {
        Ok(Some(GuestMessage::Kept)) => {}
        Ok(Some(GuestMessage::Failed(why))) => {
            vm.kill();
            return fail(why);
        }
        other => {
            return vm.failure(format!(
                "the guest agent did not build the sandbox ({})",
                session::describe(other)
            ))
        }
    }
    if matches!(place, Place::Warm { .. }) {
        if let Err(why) = run_first_command(&port, &mut reader, &kept.sandbox) {
            return vm.failure(why);
        }
    }
    let _ = reader.set_read_timeout(None);
    let qmp = match Qmp::connect(control) {
        Ok(q) => q,
        Err(e) => return vm.failure(format!("QEMU's control channel: {e}")),
    };
    let socket = dir.join(SOCKET);
    let _ = std::fs::remove_file(&socket);
    // The sandbox directory is 0700: only its owner can connect.
    let listener = UnixListener::bind(&socket)
        .or_else(|e| fail(format!("cannot listen on {}: {e}", socket.display())))?;
    let held = Held {
        holder: Owner::current().0,
        qemu_pid: vm.pid(),
    };
    let ttl = Duration::from_secs(kept.record.as_ref().map_or(0, |r| r.ttl_secs));
    let held_json = serde_json::to_vec(&held).unwrap_or_default();
    let recorded = match place {
        Place::Kept { store, name } => {
            let Some(mut record) = kept.record.clone() else {
                vm.kill();
                return fail("a kept VM without its record");
            };
            record.handle = format!("qemu pid {}", held.qemu_pid);
            write_atomic(&dir.join(HELD_FILE), &held_json)
                .and_then(|()| store.touch(name, ttl).map(|_| ()))
                .and_then(|()| store.commit(&record))
        }
        Place::Warm { .. } => write_atomic(&dir.join(HELD_FILE), &held_json)
            .and_then(|()| crate::pool::mark_ready(&dir)),
    };
    if let Err(e) = recorded {
        vm.kill();
        return fail(e.to_string());
    }
    Ok(Parts {
        ttl,
        vm,
        port,
        reader,
        listener,
        qmp,
        tunnels,
        lifeline,
    })
}

/// The command id of a warm VM's [`run_first_command`]; a client's
/// commands are numbered from 1.
const FIRST_COMMAND_ID: u64 = 0;

/// A warm VM runs a first command of its own before it is marked ready:
/// the agent's binary, which exits at once (`protocol::FIRST_COMMAND`), as
/// the sandbox's user in `/`, through the path every command takes — the
/// agent's launch, the command's cgroup, seccomp filter, capabilities and
/// user, its output and exit. Under TCG the first command a guest runs
/// pays for translating all of that code: in a kept VM the first `exec …
/// true` took 64–136 ms and the next ones 21–50 ms, whatever the program.
/// A pooled run is the first command its VM serves, so the pool pays that
/// here, ahead of the run. No program of the image runs (the image's shell
/// has run already, confined, in the agent's warm-up); once the command
/// has answered (`Exited`, or `Failed` if it could not start), every
/// process but the agent is killed (`EndAll`), so nothing of it is left
/// when the run's command starts. Any other answer means the guest is not
/// well, and the warm VM is not offered.
fn run_first_command(
    port: &Arc<Mutex<UnixStream>>,
    reader: &mut UnixStream,
    sandbox: &RunRequest,
) -> std::result::Result<(), String> {
    let command = RunRequest {
        argv: crate::protocol::FIRST_COMMAND.map(String::from).to_vec(),
        env: Vec::new(),
        workdir: "/".into(),
        timeout_ms: Some(5_000),
        tty: None,
        ..sandbox.clone()
    };
    let for_first = |message| HostMessage::For {
        id: FIRST_COMMAND_ID,
        message: Box::new(message),
    };
    session::send(port, &for_first(HostMessage::Run(command)))
        .and_then(|()| session::send(port, &for_first(HostMessage::StdinClosed)))
        .map_err(|e| format!("cannot send the guest its first command: {e}"))?;
    let mut answered = false;
    loop {
        match read_frame::<_, GuestMessage>(reader) {
            Ok(Some(GuestMessage::From { id, message })) if id == FIRST_COMMAND_ID => {
                if matches!(
                    *message,
                    GuestMessage::Exited { .. } | GuestMessage::Failed(_)
                ) && !answered
                {
                    answered = true;
                    session::send(port, &HostMessage::EndAll)
                        .map_err(|e| format!("cannot end the first command's processes: {e}"))?;
                }
            }
            Ok(Some(GuestMessage::EndedAll(_))) if answered => return Ok(()),
            Ok(Some(GuestMessage::Alive)) => {}
            other => {
                return Err(format!(
                    "the guest agent did not run the warm VM's first command ({})",
                    session::describe(other)
                ))
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Holder {
    /// Serves until the TTL passes (no command running), the sandbox is
    /// removed or the VM dies; then ends the VM and removes the sandbox.
    fn serve(self: Arc<Self>) {
        let (end_tx, ends) = mpsc::channel::<End>();
        if let Some(reader) = lock(&self.port_reader).take() {
            let holder = self.clone();
            let end = end_tx.clone();
            std::thread::spawn(move || holder.route_guest(reader, end));
        }
        {
            let holder = self.clone();
            std::thread::spawn(move || {
                for client in holder.listener.incoming().flatten() {
                    let holder = holder.clone();
                    let end = end_tx.clone();
                    std::thread::spawn(move || holder.handle(client, end));
                }
            });
        }
        let silence = session::silence_limit();
        loop {
            match ends.recv_timeout(Duration::from_secs(1)) {
                Ok(End::VmGone | End::Removed) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            // A paused guest says nothing by design.
            if !self.is_paused() && lock(&self.heard).elapsed() > silence {
                // Ending the VM ends every command's connection with it.
                eprintln!("agentkernel: {}", session::silent_guest(silence));
                break;
            }
            if !lock(&self.clients).is_empty() {
                // A running command is a use: the sandbox lives past it.
                self.place.used(self.ttl);
                continue;
            }
            if self.place.over() {
                break;
            }
        }
        lock(&self.vm).kill();
        self.place.forget();
    }

    /// The guest's messages, each to the connection of its command.
    fn route_guest(&self, mut reader: UnixStream, end: mpsc::Sender<End>) {
        let single_use = self.place.single_use();
        while let Ok(Some(message)) = read_frame::<_, GuestMessage>(&mut reader) {
            *lock(&self.heard) = Instant::now();
            match message {
                GuestMessage::From { id, message } => {
                    let finished = matches!(
                        *message,
                        GuestMessage::Exited { .. } | GuestMessage::Failed(_)
                    );
                    let mut clients = lock(&self.clients);
                    if let Some(client) = clients.get_mut(&id) {
                        let _ = write_frame(client, &*message);
                    }
                    if finished {
                        if let Some(client) = clients.remove(&id) {
                            let _ = client.shutdown(std::net::Shutdown::Both);
                        }
                        self.place.used(self.ttl);
                        if single_use {
                            // A warm VM serves one command, then ends.
                            let _ = end.send(End::Removed);
                        }
                    }
                }
                GuestMessage::EndedAll(count) => {
                    if let Some(waiting) = lock(&self.ended_all).take() {
                        let _ = waiting.send(count);
                    }
                }
                GuestMessage::Tunnel(frame) => {
                    if let Some(tunnels) = &self.tunnels {
                        tunnels.handle(frame);
                    }
                }
                _ => {}
            }
        }
        // The VM is gone (QEMU died or the guest powered off): every
        // connection ends with it.
        for (_, client) in lock(&self.clients).drain() {
            let _ = client.shutdown(std::net::Shutdown::Both);
        }
        let _ = end.send(End::VmGone);
    }

    fn handle(&self, mut client: UnixStream, end: mpsc::Sender<End>) {
        let request = match read_frame::<_, Request>(&mut client) {
            Ok(Some(r)) => r,
            _ => return,
        };
        let reply: Reply = match request {
            Request::Exec(command) => return self.exec(client, *command),
            Request::EndAll => self.end_all(),
            Request::Pause => self.set_paused(true),
            Request::Resume => self.set_paused(false),
            Request::Remove => {
                let _ = end.send(End::Removed);
                Ok(0)
            }
        };
        let _ = write_frame(&mut client, &reply);
    }

    fn exec(&self, mut client: UnixStream, command: RunRequest) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let Ok(replies) = client.try_clone() else {
            return;
        };
        lock(&self.clients).insert(id, replies);
        self.place.used(self.ttl);
        let to_guest = |message: HostMessage| {
            session::send(
                &self.port,
                &HostMessage::For {
                    id,
                    message: Box::new(message),
                },
            )
        };
        if to_guest(HostMessage::Run(command)).is_err() {
            lock(&self.clients).remove(&id);
            return;
        }
        while let Ok(Some(message)) = read_frame::<_, HostMessage>(&mut client) {
            if matches!(
                message,
                HostMessage::Stdin(_)
                    | HostMessage::StdinClosed
                    | HostMessage::Signal(_)
                    | HostMessage::Resize(_)
            ) && to_guest(message).is_err()
            {
                break;
            }
        }
        // The caller went away (killed, or its command ended): a command
        // still running has no one to report to and is killed.
        if lock(&self.clients).remove(&id).is_some() {
            let _ = to_guest(HostMessage::Signal(libc::SIGKILL));
        }
    }

    fn end_all(&self) -> Reply {
        let (tx, rx) = mpsc::channel();
        *lock(&self.ended_all) = Some(tx);
        session::send(&self.port, &HostMessage::EndAll).map_err(|e| e.to_string())?;
        rx.recv_timeout(Duration::from_secs(30))
            .map_err(|_| "the guest did not answer".to_string())
    }

    fn is_paused(&self) -> bool {
        self.place.dir().join(PAUSED).exists()
    }

    fn set_paused(&self, paused: bool) -> Reply {
        let marker = self.place.dir().join(PAUSED);
        lock(&self.qmp)
            .execute(if paused { "stop" } else { "cont" })
            .map_err(|e| {
                format!(
                    "QEMU did not {}: {e}",
                    if paused { "pause" } else { "resume" }
                )
            })?;
        let marked = if paused {
            write_atomic(&marker, b"").map_err(|e| e.to_string())
        } else {
            // Its silence while paused is not the guest's: count afresh.
            *lock(&self.heard) = Instant::now();
            match std::fs::remove_file(&marker) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.to_string()),
                _ => Ok(()),
            }
        };
        marked.map(|()| 0)
    }
}

/// QEMU's control protocol: one JSON object a line.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Reads the greeting and leaves capabilities negotiation.
    fn connect(stream: UnixStream) -> std::io::Result<Qmp> {
        let _ = stream.set_read_timeout(Some(BOOT_TIMEOUT));
        let writer = stream.try_clone()?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let mut greeting = String::new();
        qmp.reader.read_line(&mut greeting)?;
        qmp.execute("qmp_capabilities")?;
        Ok(qmp)
    }

    /// Runs `command` and waits for its answer (events on the way are skipped).
    fn execute(&mut self, command: &str) -> std::io::Result<()> {
        writeln!(self.writer, "{}", serde_json::json!({ "execute": command }))?;
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(std::io::Error::other("QEMU closed its control channel"));
            }
            let answer: serde_json::Value =
                serde_json::from_str(&line).map_err(std::io::Error::other)?;
            if answer.get("return").is_some() {
                return Ok(());
            }
            if let Some(error) = answer.get("error") {
                return Err(std::io::Error::other(error.to_string()));
            }
        }
    }
}

/// Connects to the holder of `name`, or says the sandbox is gone.
fn connect(store: &Store, name: &str) -> Result<UnixStream> {
    UnixStream::connect(store.sandbox_dir(name).join(SOCKET)).or_else(|_| {
        fail(format!(
            "sandbox {name} is gone (its VM stopped); `agentkernel sandbox gc` removes what it left"
        ))
    })
}

/// Connects to the holder whose VM's files are in `dir`.
pub(crate) fn connect_at(dir: &std::path::Path) -> std::io::Result<UnixStream> {
    UnixStream::connect(dir.join(SOCKET))
}

/// One request that is answered with a [`Reply`].
fn ask(store: &Store, name: &str, request: &Request) -> Result<u64> {
    let mut stream = connect(store, name)?;
    write_frame(&mut stream, request).or_else(|e| fail(format!("sandbox {name}: {e}")))?;
    match read_frame::<_, Reply>(&mut stream) {
        Ok(Some(Ok(n))) => Ok(n),
        Ok(Some(Err(why))) => fail(why),
        _ => fail(format!("sandbox {name}: its holder did not answer")),
    }
}

/// Runs `command` in the kept VM `name`: our stdin and signals to it, its
/// output to our stdout/stderr.
pub fn exec(store: &Store, name: &str, command: RunRequest) -> Result<Ended> {
    if is_paused(store, name) {
        return fail(format!(
            "sandbox {name} is paused; resume it with `agentkernel sandbox resume {name}`"
        ));
    }
    let signals = session::catch_signals();
    let stream = connect(store, name)?;
    exec_on(stream, command, signals).map_err(|e| crate::Error(format!("sandbox {name}: {e}")))
}

/// Sends `command` to the holder on `stream` and streams it to its end.
pub(crate) fn exec_on(
    mut stream: UnixStream,
    command: RunRequest,
    signals: Option<std::fs::File>,
) -> Result<Ended> {
    let backstop = command
        .timeout_ms
        .map(|ms| Duration::from_millis(ms) + Duration::from_secs(30));
    let tty = command.tty.is_some();
    write_frame(&mut stream, &Request::Exec(Box::new(command))).or_else(|e| fail(e.to_string()))?;
    let reader = stream
        .try_clone()
        .or_else(|e| fail(format!("socket: {e}")))?;
    // The holder watches the guest's heartbeat (it ends a silent VM, which
    // ends this stream): nothing here to watch but the command's time.
    let stream = Arc::new(Mutex::new(stream));
    match session::stream_command(reader, stream, backstop, None, signals, tty, None) {
        Streamed::Ended(ended) => Ok(ended),
        Streamed::Failed(why) => fail(why),
        Streamed::Silent(silence) => fail(session::silent_guest(silence)),
        Streamed::Broken(how) => fail(format!(
            "its VM stopped before the command finished ({how})"
        )),
    }
}

/// `sandbox stop`: every process in the guest ends; its files stay.
pub fn stop(store: &Store, name: &str) -> Result<u64> {
    // A paused guest cannot answer: say so instead of waiting for it.
    if is_paused(store, name) {
        return fail(format!(
            "sandbox {name} is paused; resume it first with `agentkernel sandbox resume {name}`"
        ));
    }
    ask(store, name, &Request::EndAll)
}

/// `sandbox pause|resume`: QEMU stops or continues the guest's CPUs.
pub fn set_paused(store: &Store, name: &str, paused: bool) -> Result<()> {
    let request = if paused {
        Request::Pause
    } else {
        Request::Resume
    };
    ask(store, name, &request).map(|_| ())
}

fn is_paused(store: &Store, name: &str) -> bool {
    store.sandbox_dir(name).join(PAUSED).exists()
}

/// `running` or `paused` while the holder lives; `None` when it is gone.
pub fn status(store: &Store, name: &str) -> Option<&'static str> {
    Held::load(store, name).filter(Held::alive).map(|_| {
        if is_paused(store, name) {
            "paused"
        } else {
            "running"
        }
    })
}

/// `sandbox rm`: the holder ends the VM and removes the sandbox; if it is
/// gone, what it left is removed here.
pub fn remove(store: &Store, name: &str) -> Result<()> {
    if Held::load(store, name).is_some_and(|h| h.alive())
        && ask(store, name, &Request::Remove).is_ok()
    {
        for _ in 0..400 {
            if !store.sandbox_dir(name).exists() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
    teardown(store, name);
    match store.sandbox_dir(name).exists() {
        false => Ok(()),
        true => fail(format!(
            "sandbox {name}: cannot remove {}",
            store.sandbox_dir(name).display()
        )),
    }
}

/// Removes what a dead (or unresponsive) holder left. Its QEMU dies with
/// it (PDEATHSIG), so a holder still alive is killed, never its QEMU by a
/// pid that may have been reused.
fn teardown(store: &Store, name: &str) {
    if let Some(held) = Held::load(store, name).filter(Held::alive) {
        if let Some(pid) = held.holder.split(':').nth(1).and_then(|p| p.parse().ok()) {
            // SAFETY: kill has no memory preconditions; `alive` checked
            // that this pid is still the holder (its start time).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let _ = store.forget(name);
}

/// Kept VMs whose holder died: removed. Returns how many.
pub fn collect(store: &Store) -> usize {
    let mut n = 0;
    for record in store.list_of(agentkernel_core::backend::BackendKind::Qemu) {
        if Held::load(store, &record.name).is_some_and(|h| h.alive()) {
            continue;
        }
        teardown(store, &record.name);
        n += 1;
    }
    n
}

/// Where a kept VM's base request lives, for `exec` to build on.
pub fn sandbox_request(store: &Store, name: &str) -> Result<RunRequest> {
    KeptVm::load(store, name).map(|k| k.sandbox)
}
