//! Host ⇄ guest messages: each is one frame, a 4-byte big-endian length and
//! that many bytes of JSON. The host speaks first after [`GuestMessage::Ready`].
//!
//! A one-shot VM gets exactly one [`HostMessage::Run`]; then stdin flows one
//! way, output the other, and [`GuestMessage::Exited`] ends the conversation.
//!
//! A kept VM gets [`HostMessage::Keep`] instead: the agent builds the
//! sandbox's root once, answers [`GuestMessage::Kept`] and then serves any
//! number of commands, concurrently, each under an id the host chooses:
//! [`HostMessage::For`] carries a command's `Run`, stdin and signals, and
//! [`GuestMessage::From`] its output and end. [`HostMessage::EndAll`] ends
//! every process in the sandbox (`sandbox stop`): files stay.
//!
//! From its `Ready` on, the agent also sends [`GuestMessage::Alive`] every
//! [`HEARTBEAT_INTERVAL`], whatever else it is doing: a guest whose kernel
//! hangs or spins goes silent, and the host can tell that from a command
//! that merely prints nothing.
//!
//! A one-shot VM whose run has an egress proxy also carries the proxy's
//! connections: [`HostMessage::Tunnel`] and [`GuestMessage::Tunnel`] hold a
//! [`TunnelFrame`] (see `crate::tunnel`).

use std::io::{self, Read, Write};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The name of the virtio-serial port the agent looks for.
pub const PORT_NAME: &str = "agentkernel";
/// The 9p mount tag of the workspace share.
pub const WORKSPACE_TAG: &str = "workspace";
/// How often the agent says it is alive. Small against the host's limit
/// for silence, so that a guest slowed down by emulation on a busy host is
/// not mistaken for a hung one.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// A warm VM's first command, which the host runs before offering the VM:
/// the agent's own binary (the process's `/proc/self/exe` is the agent it
/// was forked from, whatever the image holds), which exits at once when
/// given the flag. No program of the image runs.
pub const FIRST_COMMAND: [&str; 2] = ["/proc/self/exe", "--first-command"];
/// A frame larger than this is a protocol error, not an allocation. Room
/// for a request carrying `[[files]]` (at most 16 MiB, hex in JSON).
const MAX_FRAME: u32 = 40 << 20;

/// How the image's root filesystem is shown to the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RootMode {
    /// Writable: a tmpfs overlay on the read-only image disk; writes die with the VM.
    Overlay,
    /// The image disk as it is, read-only (with a writable tmpfs at /tmp).
    ReadOnly,
}

/// How the workspace share is shown at its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkspaceMode {
    ReadWrite,
    /// A tmpfs overlay on the share mounted read-only: the host copy never changes.
    CopyOnWrite,
    ReadOnly,
}

/// A host directory shared with the VM (`-v`), shown at `path`. The share
/// of the `n`th volume has the mount tag [`volume_tag`]`(n)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub path: String,
    pub read_only: bool,
}

/// The 9p mount tag of the `n`th volume's share.
pub fn volume_tag(n: usize) -> String {
    format!("volume{n}")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Workspace {
    pub path: String,
    pub mode: WorkspaceMode,
}

/// The one command a VM runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRequest {
    pub argv: Vec<String>,
    /// `KEY=value`, image environment first, the run's after (later wins).
    pub env: Vec<String>,
    pub workdir: String,
    /// `user[:group]`, names (looked up in the image) or ids; root when absent.
    pub user: Option<String>,
    pub timeout_ms: Option<u64>,
    pub root: RootMode,
    /// Size of /tmp under a read-only root, in bytes.
    pub tmp_bytes: u64,
    pub workspace: Option<Workspace>,
    /// Mounted after the workspace, in this order (a volume inside the
    /// workspace shows over it, as on the other backends).
    #[serde(default)]
    pub volumes: Vec<Volume>,
    pub no_new_privileges: bool,
    /// The most processes the command may have at once (a cgroup in the guest).
    pub pids_max: Option<u64>,
    /// The most memory the command may use, in bytes (a cgroup in the
    /// guest): the VM has this plus room for its own kernel and agent.
    #[serde(default)]
    pub memory_max: Option<u64>,
    /// The CPU time the command may use, in CPUs (`cpu.max` of its cgroup
    /// in the guest): a fraction of the VM's whole vCPUs (`--cpus 0.5`
    /// boots one vCPU and gives the command half of it).
    #[serde(default)]
    pub cpu_max: Option<f64>,
    /// `[[files]]`, written into the sandbox's root (resolved inside it)
    /// before anything runs: before a one-shot VM's command, once when a
    /// kept VM's sandbox is built.
    #[serde(default)]
    pub files: Vec<agentkernel_core::files::InjectedFile>,
    /// `--secret-file`s, on a tmpfs at `/run/agentkernel/secrets` in the
    /// root (native's code), written when the root is built. Never stored
    /// with a kept VM's description nor part of a pool key: a run with
    /// secret files boots its own VM; a kept one's holder gets them through
    /// a pipe. Left out of the JSON when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_files: Vec<agentkernel_core::secrets::SecretFile>,
    /// The capabilities the command keeps, by name (without `CAP_`); the
    /// bounding set loses the rest.
    pub capabilities: Vec<String>,
    /// The native backend's seccomp filter: its restrictive variant, or
    /// the default one.
    pub seccomp_restrictive: bool,
    /// The VM's NIC and how to configure it; `None`: the VM has no NIC,
    /// only `lo`. Filled in by the process that booted the VM (which holds
    /// the lease), never part of a pool key.
    #[serde(default)]
    pub network: Option<GuestNetwork>,
    /// A terminal for the command, of this size (`None`: pipes). Per
    /// command, like `argv`: never part of a pool key.
    #[serde(default)]
    pub tty: Option<WindowSize>,
    /// The egress proxy's port on the guest's loopback: the agent listens
    /// on `127.0.0.1:PORT` and carries each connection to the host (which
    /// hands it to the proxy) as [`TunnelFrame`]s. With `egress_ca`, the
    /// proxy's CA, added to the root's trust bundles before anything runs.
    /// Left out of the JSON when unset: a pool key (a hash of it) stays
    /// what it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_ca: Option<String>,
}

/// One connection's traffic through the agent's port, either way. The
/// guest opens (a client connected to the proxy's port); then each side
/// sends `Data` no more than [`TUNNEL_WINDOW`] bytes ahead of the other's
/// `Ack`s (what it has written to its socket), so neither side ever holds
/// more than that per connection; `Eof` says its sender's socket read its
/// end (the other side shuts its socket's writing half once the data
/// before it is written); `Close` ends the connection at once, both ways.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TunnelFrame {
    Open { id: u64 },
    Data { id: u64, data: Vec<u8> },
    Ack { id: u64, bytes: u64 },
    Eof { id: u64 },
    Close { id: u64 },
}

/// How many bytes of one connection may be in flight each way (sent, not
/// yet acknowledged): the most either side buffers for it.
pub const TUNNEL_WINDOW: u64 = 256 << 10;
/// The largest `Data` frame.
pub const TUNNEL_CHUNK: usize = 32 << 10;

/// A terminal's size in character cells (0 × 0: unknown, as a new
/// terminal starts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSize {
    pub rows: u16,
    pub cols: u16,
}

/// The guest's `eth0`: the NIC with this MAC gets `ip/prefix` and a default
/// route via `gateway` (agentkernel's bridge); `/etc/resolv.conf` in the
/// command's root gets `resolv_conf`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNetwork {
    pub mac: String,
    pub ip: std::net::Ipv4Addr,
    pub prefix: u8,
    pub gateway: std::net::Ipv4Addr,
    pub resolv_conf: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum HostMessage {
    Run(RunRequest),
    Stdin(Vec<u8>),
    StdinClosed,
    /// A signal agentkernel received, for the command's process group.
    Signal(i32),
    /// The host's terminal changed size: the command's terminal follows
    /// (and the command gets its SIGWINCH from the guest's kernel).
    Resize(WindowSize),
    /// Kept VM: build the sandbox's root from this request (its argv,
    /// timeout and environment are unused) and serve commands.
    Keep(RunRequest),
    /// Kept VM: `Run`, `Stdin`, `StdinClosed`, `Signal` or `Resize` for command `id`.
    For {
        id: u64,
        message: Box<HostMessage>,
    },
    /// Kept VM: kill every process but the agent; answered by `EndedAll`.
    EndAll,
    /// A proxy connection's traffic (see [`TunnelFrame`]).
    Tunnel(TunnelFrame),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum GuestMessage {
    /// The agent is up: the guest kernel's uptime when the agent started
    /// (the kernel's boot), when its modules were loaded and when it was
    /// ready (port open).
    Ready {
        started_ms: u64,
        modules_ms: u64,
        uptime_ms: u64,
    },
    /// The command was started (its root and mounts are in place).
    Started,
    /// The command's output; with a terminal, all of it (a terminal
    /// merges stderr into it, as on every backend).
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The command ended: an exit code, or the signal that killed it.
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
        out_of_memory: bool,
    },
    /// The agent could not run the command; a one-line reason.
    Failed(String),
    /// Kept VM: the sandbox's root is built; commands may come.
    Kept,
    /// Kept VM: a `Started`, `Stdout`, `Stderr`, `Exited` or `Failed` of command `id`.
    From {
        id: u64,
        message: Box<GuestMessage>,
    },
    /// Kept VM: every process but the agent was killed; how many there were.
    EndedAll(u64),
    /// The heartbeat: the guest's kernel and agent still run.
    Alive,
    /// A proxy connection's traffic (see [`TunnelFrame`]).
    Tunnel(TunnelFrame),
}

pub fn write_frame<W: Write, T: Serialize>(writer: &mut W, message: &T) -> io::Result<()> {
    let body = serde_json::to_vec(message).map_err(io::Error::other)?;
    let len = u32::try_from(body.len())
        .ok()
        .filter(|l| *l <= MAX_FRAME)
        .ok_or_else(|| io::Error::other("frame too large"))?;
    let mut frame = Vec::with_capacity(body.len() + 4);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    writer.write_all(&frame)?;
    writer.flush()
}

/// The next message, or `None` at a clean end of stream.
pub fn read_frame<R: Read, T: DeserializeOwned>(reader: &mut R) -> io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match reader.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len);
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes"),
        ));
    }
    let mut body = vec![0u8; len as usize];
    reader.read_exact(&mut body)?;
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_end_cleanly() {
        let mut wire = Vec::new();
        write_frame(&mut wire, &GuestMessage::Stdout(b"hi\n".to_vec())).unwrap();
        write_frame(&mut wire, &HostMessage::StdinClosed).unwrap();
        let mut reader = wire.as_slice();
        match read_frame::<_, GuestMessage>(&mut reader).unwrap() {
            Some(GuestMessage::Stdout(b)) => assert_eq!(b, b"hi\n"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            read_frame::<_, HostMessage>(&mut reader).unwrap(),
            Some(HostMessage::StdinClosed)
        ));
        assert!(read_frame::<_, HostMessage>(&mut reader).unwrap().is_none());
    }

    #[test]
    fn a_request_without_a_terminal_field_parses_as_pipes() {
        let mut request = serde_json::to_value(RunRequest {
            argv: vec!["true".into()],
            env: Vec::new(),
            workdir: "/".into(),
            user: None,
            timeout_ms: None,
            root: RootMode::Overlay,
            tmp_bytes: 0,
            workspace: None,
            volumes: Vec::new(),
            no_new_privileges: true,
            pids_max: None,
            memory_max: None,
            cpu_max: None,
            files: Vec::new(),
            secret_files: Vec::new(),
            capabilities: Vec::new(),
            seccomp_restrictive: false,
            network: None,
            tty: Some(WindowSize { rows: 24, cols: 80 }),
            egress_port: None,
            egress_ca: None,
        })
        .unwrap();
        request.as_object_mut().unwrap().remove("tty");
        let parsed: RunRequest = serde_json::from_value(request).unwrap();
        assert_eq!(parsed.tty, None);
    }

    #[test]
    fn oversized_frames_are_refused() {
        let wire = (MAX_FRAME + 1).to_be_bytes();
        assert!(read_frame::<_, HostMessage>(&mut wire.as_slice()).is_err());
    }
}
