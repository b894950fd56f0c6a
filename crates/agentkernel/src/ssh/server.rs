//! The SSH server of one kept sandbox (russh). Each session channel becomes
//! a child that runs its command as `agentkernel exec NAME -- …` does
//! (`exec.rs`: on native, the sandbox helper itself), piped, or on a host
//! pseudo-terminal for `pty-req`, which the helper then bridges to a terminal
//! of the sandbox's own; `sftp` is served here over commands run the same
//! way (`sftp.rs`);
//! `direct-tcpip` (`ssh -L`) connects from inside the sandbox's network
//! namespace.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use agentkernel_core::state::{Owner, Store};
use russh::keys::PublicKey;
use russh::server::{Auth, Msg, Server as _, Session};
use russh::{Channel, ChannelId, ChannelMsg, MethodKind, MethodSet, Sig};
use tokio::io::AsyncWriteExt;

/// The hidden subcommand that runs a server (started by [`super::launch`]).
pub const SUBCOMMAND: &str = "__ssh-server";
/// The listening socket, inherited from `run --ssh`.
pub const LISTEN_FD: i32 = 3;

/// What every connection of one sandbox's server shares.
struct Shared {
    sandbox: Arc<super::exec::Sandbox>,
    authorized: Vec<PublicKey>,
    accept_env: Vec<String>,
}

impl Shared {
    /// `SendEnv`/`SetEnv` names that are passed to the command: only those
    /// `--ssh-accept-env` listed (`LANG` and `LC_*` style prefixes with `*`).
    fn accepts_env(&self, name: &str) -> bool {
        self.accept_env
            .iter()
            .any(|pattern| match pattern.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => name == pattern,
            })
    }

    fn authorized(&self, key: &PublicKey) -> bool {
        self.authorized
            .iter()
            .any(|k| k.key_data() == key.key_data())
    }
}

/// `agentkernel __ssh-server NAME CREATOR`: serves until the sandbox is gone
/// (or never appears: CREATOR, the `run` that launched us, died first).
pub async fn serve(name: String, creator: String) -> i32 {
    let store = Store::open_default();
    let dir = super::state_dir(&store, &name);
    let started = start(&name, &dir);
    let (listener, config, shared) = match started {
        Ok(s) => s,
        Err(_) => {
            let _ = std::fs::remove_dir_all(&dir);
            return crate::EXIT_AGENTKERNEL_ERROR;
        }
    };
    // Connections wait in the listen backlog until the sandbox exists.
    let creator = Owner(creator);
    if created(&store, &name, &creator).await {
        let mut server = Server { shared };
        let running = server.run_on_socket(config, &listener);
        tokio::select! {
            _ = running => {}
            () = gone(&store, &name) => {}
        }
    }
    // Sessions end with us: their `exec` children get SIGHUP (PDEATHSIG).
    let _ = std::fs::remove_dir_all(&dir);
    0
}

type Started = (
    tokio::net::TcpListener,
    Arc<russh::server::Config>,
    Arc<Shared>,
);

fn start(name: &str, dir: &std::path::Path) -> std::io::Result<Started> {
    agentkernel_core::state::write_atomic(&dir.join("server"), Owner::current().0.as_bytes())
        .map_err(std::io::Error::other)?;
    // SAFETY: fd 3 was handed to us by `launch` and is used only here.
    let std_listener = unsafe { std::net::TcpListener::from_raw_fd(LISTEN_FD) };
    // Inherited, so not close-on-exec: made so, or every session's helper
    // (or `exec`) would hold the listening socket while it runs.
    // SAFETY: fcntl on the fd we now own.
    if unsafe { libc::fcntl(LISTEN_FD, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    std_listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(std_listener)?;
    let read = |f: &str| std::fs::read_to_string(dir.join(f));
    let host_key =
        russh::keys::PrivateKey::from_openssh(read("host_key")?).map_err(std::io::Error::other)?;
    let authorized = read("authorized_keys")?
        .lines()
        .filter_map(|l| PublicKey::from_openssh(l.trim()).ok())
        .collect();
    let accept_env = read("accept_env")?
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    let config = russh::server::Config {
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        keys: vec![host_key],
        auth_rejection_time: Duration::from_millis(200),
        auth_rejection_time_initial: Some(Duration::ZERO),
        nodelay: true,
        ..Default::default()
    };
    let shared = Arc::new(Shared {
        sandbox: Arc::new(super::exec::Sandbox::new(
            name.to_string(),
            std::env::current_exe()?,
        )),
        authorized,
        accept_env,
    });
    Ok((listener, Arc::new(config), shared))
}

fn exists(store: &Store, name: &str) -> bool {
    matches!(store.load(name), Ok(Some(_)))
}

/// Whether the sandbox came to exist (false: the `run` creating it is gone
/// and it never did).
async fn created(store: &Store, name: &str, creator: &Owner) -> bool {
    loop {
        if exists(store, name) {
            return true;
        }
        if creator.is_dead() {
            return exists(store, name);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Returns when the sandbox is gone: its record removed (`sandbox remove`,
/// expiry, gc) or, native, its holder dead.
async fn gone(store: &Store, name: &str) {
    loop {
        if !exists(store, name) {
            return;
        }
        if let Some(held) = agentkernel_native::kept::Held::load(store, name) {
            if !held.holder_alive() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[derive(Clone)]
struct Server {
    shared: Arc<Shared>,
}

impl russh::server::Server for Server {
    type Handler = Connection;

    fn new_client(&mut self, _: Option<std::net::SocketAddr>) -> Connection {
        Connection {
            shared: self.shared.clone(),
        }
    }
}

/// One client connection. Requests are answered here (accept or refuse);
/// the work happens in a task per channel that owns the [`Channel`].
struct Connection {
    shared: Arc<Shared>,
}

impl russh::server::Handler for Connection {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        key: &PublicKey,
    ) -> Result<Auth, Self::Error> {
        Ok(if self.shared.authorized(key) {
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn auth_publickey(&mut self, _user: &str, key: &PublicKey) -> Result<Auth, Self::Error> {
        Ok(if self.shared.authorized(key) {
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        tokio::spawn(session_channel(self.shared.clone(), channel));
        Ok(true)
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host: &str,
        port: u32,
        _originator_address: &str,
        _originator_port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Ok(port) = u16::try_from(port) else {
            return Ok(false);
        };
        let store = Store::open_default();
        let sandbox = &self.shared.sandbox;
        let backend = sandbox.backend(&store);
        let connected =
            super::forward::connect_inside(&store, &sandbox.name, backend, host, port).await;
        match connected {
            Ok(stream) => {
                tokio::spawn(async move {
                    let mut stream = stream;
                    let mut channel_stream = channel.into_stream();
                    let _ = tokio::io::copy_bidirectional(&mut channel_stream, &mut stream).await;
                });
                Ok(true)
            }
            Err(_) => Ok(false),
        }
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        _value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.shared.accepts_env(name) {
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        }
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if name == "sftp" {
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        }
    }
}

/// What a session channel was asked to run.
enum Request {
    Shell,
    Exec(Vec<u8>),
    Sftp,
}

/// A session channel: collects `pty-req` and `env`, then runs the shell,
/// the command or SFTP, forwarding data, EOF, window changes and signals.
async fn session_channel(shared: Arc<Shared>, mut channel: Channel<Msg>) {
    let mut pty: Option<(String, u16, u16)> = None;
    let mut env: Vec<(String, String)> = Vec::new();
    let request = loop {
        match channel.wait().await {
            Some(ChannelMsg::RequestPty {
                term,
                col_width,
                row_height,
                ..
            }) => pty = Some((term, clamp(col_width), clamp(row_height))),
            Some(ChannelMsg::SetEnv {
                variable_name,
                variable_value,
                ..
            }) => {
                if shared.accepts_env(&variable_name) {
                    env.push((variable_name, variable_value));
                }
            }
            Some(ChannelMsg::RequestShell { .. }) => break Request::Shell,
            Some(ChannelMsg::Exec { command, .. }) => break Request::Exec(command),
            Some(ChannelMsg::RequestSubsystem { name, .. }) if name == "sftp" => {
                break Request::Sftp
            }
            Some(_) => {}
            None => return,
        }
    };
    let code = match request {
        Request::Sftp => serve_sftp(&shared, &mut channel).await,
        Request::Shell => run_command(&shared, &mut channel, pty, env, &["/bin/sh", "-l"]).await,
        Request::Exec(command) => {
            let command = String::from_utf8_lossy(&command).into_owned();
            run_command(
                &shared,
                &mut channel,
                pty,
                env,
                &["/bin/sh", "-c", &command],
            )
            .await
        }
    };
    let _ = channel.exit_status(code as u32).await;
    let _ = channel.eof().await;
    let _ = channel.close().await;
}

/// Runs ARGV in the sandbox; its exit code (125 with a line on
/// stderr when it cannot be started).
async fn run_command(
    shared: &Shared,
    channel: &mut Channel<Msg>,
    pty: Option<(String, u16, u16)>,
    mut env: Vec<(String, String)>,
    argv: &[&str],
) -> i32 {
    let argv: Vec<String> = argv.iter().map(|a| a.to_string()).collect();
    let code = match pty {
        Some((term, cols, rows)) => {
            env.push(("TERM".into(), term));
            run_on_pty(shared, channel, &env, &argv, cols, rows).await
        }
        None => run_piped(shared, channel, &env, &argv).await,
    };
    match code {
        Ok(code) => code,
        Err(e) => {
            let message = format!("agentkernel: ssh: cannot run the command: {e}\r\n");
            let _ = channel.extended_data(1, message.as_bytes()).await;
            crate::EXIT_AGENTKERNEL_ERROR
        }
    }
}

/// The SFTP subsystem: russh-sftp speaks the protocol over an in-memory
/// pipe that we relay to the channel, so that when the client is done (EOF)
/// we still own the channel to send exit-status 0, as OpenSSH's scp expects.
async fn serve_sftp(shared: &Shared, channel: &mut Channel<Msg>) -> i32 {
    let (ours, theirs) = tokio::io::duplex(256 * 1024);
    let handler = super::sftp::Sftp::new(shared.sandbox.clone());
    russh_sftp::server::run(theirs, handler).await;
    let (from_sftp, mut to_sftp) = tokio::io::split(ours);
    let pump_out = tokio::spawn(pump(from_sftp, channel.make_writer()));
    loop {
        match channel.wait().await {
            Some(ChannelMsg::Data { data }) => {
                if to_sftp.write_all(&data).await.is_err() {
                    break;
                }
            }
            Some(ChannelMsg::Eof) | None => break,
            Some(_) => {}
        }
    }
    // The SFTP loop sees EOF, ends and closes its end: the pump ends too.
    let _ = to_sftp.shutdown().await;
    let _ = pump_out.await;
    0
}

fn clamp(n: u32) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

/// Runs ARGV in the sandbox with pipes: stdout as channel data, stderr as
/// extended data, channel data to stdin (EOF closes it).
async fn run_piped(
    shared: &Shared,
    channel: &mut Channel<Msg>,
    env: &[(String, String)],
    argv: &[String],
) -> std::io::Result<i32> {
    use std::process::Stdio;
    let mut command = shared.sandbox.command(env, argv, false)?;
    command
        .command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn()?;
    let pid = child.id();
    let mut stdin = child.stdin.take();
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let out_writer = channel.make_writer();
    let err_writer = channel.make_writer_ext(Some(1));
    let pump_out = tokio::spawn(pump(stdout, out_writer));
    let pump_err = tokio::spawn(pump(stderr, err_writer));
    let mut open = true;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status?,
            msg = channel.wait(), if open => match msg {
                Some(ChannelMsg::Data { data }) => {
                    if let Some(s) = stdin.as_mut() {
                        if s.write_all(&data).await.is_err() {
                            stdin = None;
                        }
                    }
                }
                Some(ChannelMsg::Eof) => stdin = None,
                Some(ChannelMsg::Signal { signal }) => send_signal(pid, &signal),
                Some(_) => {}
                None => {
                    // The client is gone: hang up, as sshd does.
                    send_signal(pid, &Sig::HUP);
                    stdin = None;
                    open = false;
                }
            },
        }
    };
    let _ = pump_out.await;
    let _ = pump_err.await;
    Ok(exit_code(status))
}

async fn pump(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
) {
    let _ = tokio::io::copy(&mut from, &mut to).await;
    let _ = to.flush().await;
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

fn send_signal(pid: Option<u32>, signal: &Sig) {
    let number = match signal {
        Sig::ABRT => libc::SIGABRT,
        Sig::ALRM => libc::SIGALRM,
        Sig::FPE => libc::SIGFPE,
        Sig::HUP => libc::SIGHUP,
        Sig::ILL => libc::SIGILL,
        Sig::INT => libc::SIGINT,
        Sig::KILL => libc::SIGKILL,
        Sig::PIPE => libc::SIGPIPE,
        Sig::QUIT => libc::SIGQUIT,
        Sig::SEGV => libc::SIGSEGV,
        Sig::TERM => libc::SIGTERM,
        Sig::USR1 => libc::SIGUSR1,
        Sig::Custom(_) => return,
    };
    if let Some(pid) = pid {
        // SAFETY: kill has no memory-safety preconditions; the helper (or
        // `exec`) forwards the signal to the command in the sandbox.
        unsafe { libc::kill(pid as i32, number) };
    }
}

/// Runs ARGV on a host pseudo-terminal: the helper (or `agentkernel exec`)
/// sees a terminal, gives the command one of the sandbox's own and relays
/// between them
/// (window size included: a window change here is a SIGWINCH for it).
async fn run_on_pty(
    shared: &Shared,
    channel: &mut Channel<Msg>,
    env: &[(String, String)],
    argv: &[String],
    cols: u16,
    rows: u16,
) -> std::io::Result<i32> {
    let (master, slave) = open_pty(cols, rows)?;
    let mut command = shared.sandbox.command(env, argv, true)?;
    command
        .command
        .stdin(slave.try_clone()?)
        .stdout(slave.try_clone()?)
        .stderr(slave.try_clone()?);
    // SAFETY: setsid/ioctl only, between fork and exec: the terminal
    // becomes exec's controlling terminal (window changes reach it).
    unsafe {
        command.command.pre_exec(move || {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn()?;
    drop(slave);
    let pid = child.id();
    let master_fd = master.as_raw_fd();
    let reader = tokio::fs::File::from_std(std::fs::File::from(master.try_clone()?));
    let mut writer = tokio::fs::File::from_std(std::fs::File::from(master));
    let out_writer = channel.make_writer();
    // Reading the master fails with EIO once the child side is closed.
    let pump_out = tokio::spawn(pump(reader, out_writer));
    let mut open = true;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status?,
            msg = channel.wait(), if open => match msg {
                Some(ChannelMsg::Data { data }) => {
                    let _ = writer.write_all(&data).await;
                    let _ = writer.flush().await;
                }
                Some(ChannelMsg::WindowChange { col_width, row_height, .. }) => {
                    set_window(master_fd, clamp(col_width), clamp(row_height));
                }
                Some(ChannelMsg::Signal { signal }) => send_signal(pid, &signal),
                Some(_) => {}
                None => {
                    send_signal(pid, &Sig::HUP);
                    open = false;
                }
            },
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), pump_out).await;
    drop(writer);
    Ok(exit_code(status))
}

fn open_pty(cols: u16, rows: u16) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut master = -1;
    let mut slave = -1;
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two fds; the name and termios are not asked for.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are ours.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    for fd in [&master, &slave] {
        // SAFETY: fcntl on an fd we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok((master, slave))
}

fn set_window(master: i32, cols: u16, rows: u16) {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from a struct we own.
    unsafe { libc::ioctl(master, libc::TIOCSWINSZ, &size) };
}
