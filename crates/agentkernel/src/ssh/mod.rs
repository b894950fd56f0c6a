//! `run --ssh`: an SSH server on the host side of a kept sandbox. Nothing is
//! installed in the image: each SSH session channel runs its command the way
//! `agentkernel exec` does (on native, the server starts the sandbox helper
//! `exec` would become, with the same plan: `exec.rs`), so a session gets
//! exactly what `agentkernel exec` gets (user, environment, working
//! directory, policy, cgroup, namespaces).
//!
//! Layout, under `<state>/ssh/<sandbox>/` (0700, every file 0600):
//! `host_key`, `client_key` (+ `.pub`), `authorized_keys` (the client key and,
//! with `--ssh-authorized-keys`, the caller's keys), `known_hosts` (the host
//! key pinned to `[127.0.0.1]:PORT`), `port`, `accept_env` and `server` (the
//! server's `<boot>:<pid>:<start>`). The server lives as long as the sandbox
//! (see [`server::watch`]) and removes the directory when it ends; `sandbox
//! gc` removes the directories of servers that were killed.

mod exec;
mod forward;
mod mux;
pub mod server;
mod sftp;

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use agentkernel_core::state::{create_private_dir_all, Owner, Store};
use agentkernel_core::{Error, Result};
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::LineEnding;
use russh::keys::PrivateKey;

/// The user name clients present; any name is accepted (the key decides) and
/// the session runs as the sandbox's own user, like `agentkernel exec`.
pub const SSH_USER: &str = "sandbox";

/// What `run --ssh` was asked for.
#[derive(Debug, Clone, Default)]
pub struct SshOptions {
    pub port: Option<u16>,
    pub authorized_keys: Option<PathBuf>,
    pub accept_env: Vec<String>,
}

/// Where a sandbox's SSH server keeps its keys and state.
pub fn state_dir(store: &Store, name: &str) -> PathBuf {
    store.root().join("ssh").join(name)
}

fn state_error(path: &Path, e: std::io::Error) -> Error {
    Error::state(path, e)
}

/// Writes a file 0600 (created so: never readable by others, even briefly).
fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(data))
        .map_err(|e| state_error(path, e))
}

fn random_ed25519() -> Result<PrivateKey> {
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(|e| state_error(Path::new("/dev/urandom"), e))?;
    Ok(PrivateKey::from(Ed25519Keypair::from_seed(&seed)))
}

fn openssh_private(key: &PrivateKey) -> Result<String> {
    key.to_openssh(LineEnding::LF)
        .map(|s| s.to_string())
        .map_err(|e| Error::Conflict(format!("cannot encode an SSH key: {e}")))
}

fn openssh_public(key: &PrivateKey) -> Result<String> {
    key.public_key()
        .to_openssh()
        .map_err(|e| Error::Conflict(format!("cannot encode an SSH key: {e}")))
}

/// A running server's port, if the sandbox has one.
pub fn running_port(store: &Store, name: &str) -> Option<u16> {
    let dir = state_dir(store, name);
    let owner = std::fs::read_to_string(dir.join("server")).ok()?;
    if Owner(owner.trim().to_string()).is_dead() {
        return None;
    }
    std::fs::read_to_string(dir.join("port"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `run --ssh`, before the sandbox is created: keys, the listening socket
/// (so the port is known and printed now), and the detached server, which
/// waits for the sandbox to exist and ends with it (or when this run fails
/// before creating it).
pub fn launch(store: &Store, name: &str, options: &SshOptions) -> Result<()> {
    if let Some(port) = running_port(store, name) {
        eprintln!("agentkernel: sandbox {name}: ssh on 127.0.0.1:{port} (already running); `agentkernel ssh {name}` connects");
        return Ok(());
    }
    let extra_keys = match &options.authorized_keys {
        Some(path) => Some(read_authorized_keys(path)?),
        None => None,
    };
    let listener =
        std::net::TcpListener::bind(("127.0.0.1", options.port.unwrap_or(0))).map_err(|e| {
            match options.port {
                Some(p) => Error::invalid(
                    "--ssh-port",
                    p.to_string(),
                    format!(
                    "cannot listen on 127.0.0.1:{p} ({e}); choose another port or omit --ssh-port"
                ),
                ),
                None => Error::Conflict(format!(
                    "cannot listen on 127.0.0.1 for SSH: {e}; check the loopback interface"
                )),
            }
        })?;
    let port = listener
        .local_addr()
        .map_err(|e| Error::Conflict(format!("cannot read the SSH port: {e}")))?
        .port();
    let dir = state_dir(store, name);
    let _ = std::fs::remove_dir_all(&dir);
    create_private_dir_all(&dir).map_err(|e| state_error(&dir, e))?;
    let prepared = (|| -> Result<()> {
        let host = random_ed25519()?;
        let client = random_ed25519()?;
        write_private(&dir.join("host_key"), openssh_private(&host)?.as_bytes())?;
        write_private(
            &dir.join("client_key"),
            openssh_private(&client)?.as_bytes(),
        )?;
        let client_pub = openssh_public(&client)?;
        write_private(
            &dir.join("client_key.pub"),
            format!("{client_pub}\n").as_bytes(),
        )?;
        let mut authorized = format!("{client_pub}\n");
        if let Some(extra) = &extra_keys {
            authorized.push_str(extra);
        }
        write_private(&dir.join("authorized_keys"), authorized.as_bytes())?;
        write_private(
            &dir.join("known_hosts"),
            format!("[127.0.0.1]:{port} {}\n", openssh_public(&host)?).as_bytes(),
        )?;
        write_private(&dir.join("port"), format!("{port}\n").as_bytes())?;
        write_private(
            &dir.join("accept_env"),
            options.accept_env.join("\n").as_bytes(),
        )?;
        spawn_server(name, &listener)
    })();
    if let Err(e) = prepared {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e);
    }
    eprintln!("agentkernel: sandbox {name}: ssh on 127.0.0.1:{port}; `agentkernel ssh {name}` connects (`agentkernel ssh-config {name}` for an OpenSSH Host block)");
    Ok(())
}

/// The keys of an `authorized_keys` file, checked to parse (options before a
/// key are not supported: each line must be a plain public key).
fn read_authorized_keys(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::invalid(
            "--ssh-authorized-keys",
            path.display().to_string(),
            format!("cannot be read ({e})"),
        )
    })?;
    let mut out = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        russh::keys::PublicKey::from_openssh(line).map_err(|e| {
            Error::invalid(
                "--ssh-authorized-keys",
                path.display().to_string(),
                format!("has a line that is not a plain public key ({e}); key options are not supported"),
            )
        })?;
        out.push_str(line);
        out.push('\n');
    }
    Ok(out)
}

/// The server is this binary (`agentkernel __ssh-server NAME CREATOR`), in a
/// session of its own, detached from our terminal, with the listening socket
/// as fd 3. It is double-forked, so neither this process nor the native
/// helper it becomes has it as a child.
fn spawn_server(name: &str, listener: &std::net::TcpListener) -> Result<()> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::Conflict(format!("cannot find agentkernel's own binary: {e}")))?;
    let fd = listener.as_raw_fd();
    let mut command = std::process::Command::new(exe);
    command
        .arg0("agentkernel")
        .arg(server::SUBCOMMAND)
        .arg(name)
        .arg(Owner::current().0)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::fork() != 0 {
                libc::_exit(0);
            }
            libc::setsid();
            // The socket is close-on-exec: dup2 makes an inheritable copy,
            // or, when it already is fd 3, the flag is cleared.
            let inherited = if fd == server::LISTEN_FD {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, server::LISTEN_FD)
            };
            if inherited < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut middle = command
        .spawn()
        .map_err(|e| Error::Conflict(format!("cannot start the SSH server: {e}")))?;
    let _ = middle.wait();
    Ok(())
}

/// Ends a sandbox's server (by its recorded pid, checked against its start
/// time) and removes its directory. For `sandbox remove`/`gc`: the server
/// also notices on its own within a fraction of a second.
pub fn stop(store: &Store, name: &str) {
    let dir = state_dir(store, name);
    if let Ok(owner) = std::fs::read_to_string(dir.join("server")) {
        let owner = Owner(owner.trim().to_string());
        if let (false, Some(pid)) = (
            owner.is_dead(),
            owner
                .0
                .split(':')
                .nth(1)
                .and_then(|p| p.parse::<i32>().ok()),
        ) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `sandbox gc`: servers whose sandbox is gone are ended, and the
/// directories of servers that died (`kill -9`) are removed. Returns how
/// many were collected.
pub fn collect(store: &Store) -> usize {
    let Ok(entries) = std::fs::read_dir(store.root().join("ssh")) else {
        return 0;
    };
    let mut n = 0;
    for entry in entries.flatten() {
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let sandbox_gone = !matches!(store.load(&name), Ok(Some(_)));
        if sandbox_gone || running_port(store, &name).is_none() {
            stop(store, &name);
            n += 1;
        }
    }
    n
}

/// The `ssh` options that reach a sandbox's server: its key, its port, its
/// pinned host key (no prompt, no write to the user's known_hosts).
fn client_options(store: &Store, name: &str) -> Result<(u16, Vec<String>)> {
    agentkernel_core::names::validate(name)?;
    let port = running_port(store, name).ok_or_else(|| match store.load(name) {
        Ok(Some(_)) => Error::Conflict(format!(
            "sandbox {name} has no SSH server; create it with `agentkernel run --ssh --name {name} -- CMD`"
        )),
        _ => Error::NoSuchSandbox(name.to_string()),
    })?;
    let dir = state_dir(store, name);
    let path = |f: &str| dir.join(f).display().to_string();
    Ok((
        port,
        vec![
            format!("IdentityFile={}", path("client_key")),
            "IdentitiesOnly=yes".into(),
            format!("UserKnownHostsFile={}", path("known_hosts")),
            "GlobalKnownHostsFile=/dev/null".into(),
            "StrictHostKeyChecking=yes".into(),
            "PasswordAuthentication=no".into(),
            "KbdInteractiveAuthentication=no".into(),
            "LogLevel=ERROR".into(),
        ],
    ))
}

/// `agentkernel ssh NAME [-- CMD]`: becomes the system's `ssh`.
pub fn connect(name: &str, command: &[std::ffi::OsString]) -> Result<i32> {
    let store = Store::open_default();
    let (port, options) = client_options(&store, name)?;
    let dir = state_dir(&store, name);
    // The mux socket of the shared connection (below).
    let mux = dir.join("mux");
    if let Some(code) = through_master(&dir, &mux, command) {
        return Ok(code);
    }
    let mut ssh = std::process::Command::new("ssh");
    for option in options {
        ssh.arg("-o").arg(option);
    }
    // One connection, reused: the first `agentkernel ssh` becomes the
    // master (in the background, for a minute after its last session, or
    // until the server ends), and later ones skip the SSH handshake, most of
    // a round trip's time. The socket is in the sandbox's 0700 directory.
    ssh.args(["-o", "ControlMaster=auto", "-o", "ControlPersist=60"])
        .arg("-o")
        .arg(format!("ControlPath={}", mux.display()));
    ssh.arg("-p")
        .arg(port.to_string())
        .arg(format!("{SSH_USER}@127.0.0.1"));
    if !command.is_empty() {
        ssh.arg("--").args(command);
    }
    let e = ssh.exec();
    Err(Error::Conflict(
        if e.kind() == std::io::ErrorKind::NotFound {
            "ssh (the OpenSSH client) is not installed; install it (`apt-get install openssh-client`)"
            .into()
        } else {
            format!("cannot run ssh: {e}")
        },
    ))
}

/// A command over the running master without starting `ssh` (`mux.rs`),
/// when `ssh` would do nothing more: a command (no terminal) and no
/// `--ssh-accept-env` (so no `SendEnv` of the user's ssh configuration could
/// matter). None: use `ssh`.
fn through_master(dir: &Path, mux: &Path, command: &[std::ffi::OsString]) -> Option<i32> {
    use std::os::unix::ffi::OsStrExt;
    // Joined with spaces, as `ssh` joins its command words.
    let words: Vec<&[u8]> = command.iter().map(|w| w.as_bytes()).collect();
    let joined = words.join(&b' ');
    let accepts_env = std::fs::read(dir.join("accept_env")).map_or(true, |a| !a.is_empty());
    if joined.is_empty() || accepts_env {
        return None;
    }
    mux::run(mux, &joined)
}

/// `agentkernel ssh-config NAME`: an OpenSSH `Host` block for editors.
pub fn config_block(name: &str) -> Result<String> {
    let store = Store::open_default();
    let (port, options) = client_options(&store, name)?;
    let mut block =
        format!("Host {name}\n    HostName 127.0.0.1\n    Port {port}\n    User {SSH_USER}\n");
    for option in options {
        let (key, value) = option.split_once('=').unwrap_or((&option, ""));
        block.push_str(&format!("    {key} {value}\n"));
    }
    Ok(block)
}
