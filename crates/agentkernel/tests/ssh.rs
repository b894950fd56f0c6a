//! `run --ssh`, `agentkernel ssh` and `ssh-config`, driven with the real
//! OpenSSH client (ssh, scp, sftp, ssh-keygen) on every backend.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A kept sandbox with an SSH server, removed (server and all) on drop.
struct SshSandbox<'a> {
    env: &'a TestEnv,
    name: String,
    port: u16,
    config: PathBuf,
}

impl<'a> SshSandbox<'a> {
    fn start(env: &'a TestEnv, prefix: &str, extra: &[&str], cmd: &[&str]) -> SshSandbox<'a> {
        let name = unique_name(prefix);
        let mut args = vec!["--ssh"];
        args.extend_from_slice(extra);
        let out = env.run_kept(&name, &args, cmd);
        let mut sandbox = SshSandbox {
            env,
            port: 0,
            config: env.home_dir().join(format!("{name}.ssh-config")),
            name,
        };
        assert_code(&out, 0);
        let err = stderr(&out);
        let port = err
            .split("ssh on 127.0.0.1:")
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port on stderr: {err}"));
        let out = env.run(&["ssh-config", &sandbox.name]);
        assert_code(&out, 0);
        std::fs::write(&sandbox.config, &out.stdout).unwrap();
        sandbox.port = port;
        sandbox
    }

    /// The system's ssh/scp/sftp with the printed Host block (`-F`).
    fn openssh(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        self.env.configure(&mut cmd);
        cmd.arg("-F").arg(&self.config);
        cmd
    }

    /// `agentkernel ssh NAME -- CMD`.
    fn ssh(&self, command: &str) -> Output {
        self.env.run(&["ssh", &self.name, "--", command])
    }

    fn exec(&self, cmd: &[&str]) -> Output {
        let mut args = vec!["exec", self.name.as_str(), "--"];
        args.extend_from_slice(cmd);
        self.env.run(&args)
    }

    /// `scp FROM TO` (a remote side is `NAME:PATH`).
    fn scp(&self, from: impl AsRef<std::ffi::OsStr>, to: impl AsRef<std::ffi::OsStr>) -> Output {
        self.openssh("scp").arg(from).arg(to).output().unwrap()
    }

    /// `ssh -N FLAG SPEC` (a forwarding, no command) in the background.
    fn forward(&self, flag: &str, spec: &str) -> std::process::Child {
        self.openssh("ssh")
            .args(["-N", "-o", "ExitOnForwardFailure=yes", flag, spec])
            .arg(&self.name)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// The system's ssh with the Host block but KEY instead of the
    /// sandbox's client key (-F's IdentityFile would still be offered after
    /// -i: the block is used without it).
    fn ssh_with_key(&self, key: &std::path::Path, command: &str) -> Output {
        let without_key = self.env.home_dir().join(format!("{}.no-key", self.name));
        let config = std::fs::read_to_string(&self.config).unwrap();
        let kept: Vec<&str> = config
            .lines()
            .filter(|l| !l.trim_start().starts_with("IdentityFile"))
            .collect();
        std::fs::write(&without_key, kept.join("\n")).unwrap();
        let mut cmd = Command::new("ssh");
        self.env.configure(&mut cmd);
        cmd.arg("-F")
            .arg(&without_key)
            .args(["-o", "BatchMode=yes", "-i"])
            .arg(key)
            .arg(&self.name)
            .arg(command)
            .output()
            .unwrap()
    }

    fn state(&self) -> PathBuf {
        self.env.state_dir().join("ssh").join(&self.name)
    }
}

impl Drop for SshSandbox<'_> {
    fn drop(&mut self) {
        let _ = self.env.run(&["sandbox", "remove", &self.name]);
    }
}

/// A new ed25519 key pair in the test's home (FILE and FILE.pub).
fn new_key(env: &TestEnv, file: &str) -> PathBuf {
    let key = env.home_dir().join(file);
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .output()
        .unwrap();
    assert_code(&out, 0);
    key
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    )
    .is_ok()
}

/// Runs `sh -c SCRIPT` under `script`, which gives it a terminal, typing
/// each of INPUT into that terminal a second apart; returns what the
/// terminal showed and the status.
fn on_terminal(env: &TestEnv, shell: &str, input: &[&str]) -> Output {
    let mut cmd = Command::new("script");
    env.configure(&mut cmd);
    cmd.args(["-qec", shell, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("script (bsdutils) is installed");
    let mut stdin = child.stdin.take().unwrap();
    // Give the remote shell time to start before it reads, then keep the
    // terminal open until it exits.
    std::thread::sleep(Duration::from_millis(1500));
    for typed in input {
        stdin.write_all(typed.as_bytes()).unwrap();
        stdin.flush().unwrap();
        std::thread::sleep(Duration::from_secs(1));
    }
    let status = wait_child(&mut child, Duration::from_secs(60));
    drop(stdin);
    let mut stdout = Vec::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut stdout)
        .unwrap();
    Output {
        status,
        stdout,
        stderr: Vec::new(),
    }
}

#[test]
fn exec_over_ssh_is_agentkernel_exec_with_exit_status_and_streams() {
    let env = TestEnv::new();
    let sandbox = SshSandbox::start(&env, "sshexec", &[], &["sh", "-c", "echo state > /tmp/s"]);

    let out = sandbox.ssh("cat /tmp/s; echo to-err >&2; exit 7");
    assert_code(&out, 7);
    assert_eq!(stdout(&out), "state\n");
    assert!(stderr(&out).contains("to-err"), "{}", stderr(&out));

    // Same user, working directory, environment, open files, cgroup and
    // namespaces as `agentkernel exec`: the session is in the sandbox, and
    // nothing of the server's (its listening socket, a plan) reaches it.
    let namespaces =
        "/proc/self/ns/mnt /proc/self/ns/pid /proc/self/ns/net /proc/self/ns/uts /proc/self/ns/ipc";
    let probe = format!(
        "id -u; id -g; pwd; echo $PATH; echo $HOME; env | grep -v '^_=' | sort; \
         ls /proc/self/fd; cat /proc/self/cgroup; for n in {namespaces}; do readlink $n; done"
    );
    let by_ssh = sandbox.ssh(&probe);
    let by_exec = sandbox.exec(&["/bin/sh", "-c", &probe]);
    assert_code(&by_ssh, 0);
    assert_code(&by_exec, 0);
    assert_eq!(stdout(&by_ssh), stdout(&by_exec));
    // Only stdio (and `ls`'s own directory, 3) is open in a session.
    let fds = sandbox.ssh("ls /proc/self/fd");
    assert_code(&fds, 0);
    assert_eq!(stdout(&fds), "0\n1\n2\n3\n");
    for ns in namespaces
        .split(' ')
        .map(|n| std::fs::read_link(n).unwrap())
    {
        let ns = ns.to_string_lossy().into_owned();
        assert!(
            !stdout(&by_ssh).contains(&ns),
            "the session shares the host's {ns}"
        );
    }

    // stdin reaches the command, EOF included.
    let mut child = env
        .std_cmd()
        .args(["ssh", &sandbox.name, "--", "wc -c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"12345").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_code(&out, 0);
    assert_eq!(stdout(&out).trim(), "5");

    // Over the shared connection (`agentkernel ssh` asks the background
    // master for the session itself): all output is written by the time it
    // exits, even to a file; and when that master is gone, the next call
    // starts a new one.
    let file = env.home_dir().join("big-output");
    let status = env
        .std_cmd()
        .args(["ssh", &sandbox.name, "--", "head -c 3000000 /dev/zero"])
        .stdout(std::fs::File::create(&file).unwrap())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 3_000_000);
    let mux = sandbox.state().join("mux");
    assert!(mux.exists(), "no shared connection");
    let out = Command::new("ssh")
        .arg("-o")
        .arg(format!("ControlPath={}", mux.display()))
        .args(["-O", "exit", "sandbox"])
        .output()
        .unwrap();
    assert_code(&out, 0);
    let out = sandbox.ssh("echo again; exit 3");
    assert_code(&out, 3);
    assert_eq!(stdout(&out), "again\n");

    // Keys and state are private.
    for file in ["host_key", "client_key", "authorized_keys", "known_hosts"] {
        let mode = std::fs::metadata(sandbox.state().join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{file} is {mode:o}");
    }
    let dir_mode = std::fs::metadata(sandbox.state())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o077, 0, "the ssh directory is {dir_mode:o}");
}

#[test]
fn interactive_shell_and_window_size_on_a_terminal() {
    let env = TestEnv::new();
    let sandbox = SshSandbox::start(&env, "sshpty", &[], &["true"]);
    let ssh = format!("ssh -F {} {}", sandbox.config.display(), sandbox.name);

    // A login shell on a terminal: it reads what is typed, and its exit
    // status is ssh's.
    // Ctrl-C reaches the command in the sandbox (not ssh, not the server).
    let started = Instant::now();
    let out = on_terminal(
        &env,
        &ssh,
        &[
            "sleep 30; echo not-$((1+1))-interrupted\n",
            "\x03",
            "tty; echo $((6*7))x; exit 3\n",
        ],
    );
    let shown = stdout(&out);
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "Ctrl-C did not interrupt: {shown}"
    );
    assert!(!shown.contains("not-2-interrupted"), "{shown}");
    assert!(shown.contains("42x"), "{shown}");
    assert!(
        shown.contains("/dev/pts/"),
        "no terminal in the sandbox: {shown}"
    );
    assert_eq!(out.status.code(), Some(3), "{shown}");

    // The client's window size reaches the sandbox's terminal, and a change
    // of it too (SIGWINCH through `exec`).
    let resize = format!(
        "stty cols 123 rows 45; {ssh_tt} 'sleep 0.5; stty size; sleep 3; stty size' < /dev/tty & sleep 2; stty cols 77 rows 21; kill -WINCH $!; wait $!",
        ssh_tt = ssh.replace("ssh -F", "ssh -tt -F"),
    );
    let out = on_terminal(&env, &resize, &[]);
    let shown = stdout(&out);
    assert!(shown.contains("45 123"), "{shown}");
    assert!(
        shown.contains("21 77"),
        "window change not passed on: {shown}"
    );
}

#[test]
fn scp_and_sftp_move_files_in_the_sandbox_view_only() {
    let env = TestEnv::new();
    // A host file the sandbox must never reach through a symlink.
    let host_secret = env.home_dir().join("host-secret.txt");
    std::fs::write(&host_secret, "HOST-ONLY").unwrap();
    let link_cmd = format!(
        "echo from-sandbox > /tmp/down.txt; ln -s {} /tmp/escape; mkdir /tmp/dir",
        host_secret.display()
    );
    let sandbox = SshSandbox::start(&env, "sshscp", &[], &["sh", "-c", &link_cmd]);
    let remote = |path: &str| format!("{}:{path}", sandbox.name);

    // Up: a file with binary content and every byte value.
    let local_up = env.home_dir().join("up.bin");
    let payload: Vec<u8> = (0..=255u8).cycle().take(200_000).collect();
    std::fs::write(&local_up, &payload).unwrap();
    let out = sandbox.scp(&local_up, remote("/tmp/dir/up.bin"));
    assert_code(&out, 0);
    let out = sandbox.exec(&[
        "sh",
        "-c",
        "wc -c < /tmp/dir/up.bin; md5sum /tmp/dir/up.bin",
    ]);
    assert_code(&out, 0);
    assert!(stdout(&out).starts_with("200000\n"), "{}", stdout(&out));

    // Down.
    let local_down = env.home_dir().join("down.txt");
    let out = sandbox.scp(remote("/tmp/down.txt"), &local_down);
    assert_code(&out, 0);
    assert_eq!(
        std::fs::read_to_string(&local_down).unwrap(),
        "from-sandbox\n"
    );

    // Round trip of the binary file is byte-exact.
    let back = env.home_dir().join("back.bin");
    let out = sandbox.scp(remote("/tmp/dir/up.bin"), &back);
    assert_code(&out, 0);
    assert!(
        std::fs::read(&back).unwrap() == payload,
        "binary round trip differs"
    );

    // The attack: a symlink in the sandbox to a host path resolves inside
    // the sandbox (where that path does not exist), never on the host.
    let stolen = env.home_dir().join("stolen.txt");
    let out = sandbox.scp(remote("/tmp/escape"), &stolen);
    assert_ne!(
        out.status.code(),
        Some(0),
        "scp followed a sandbox symlink to the host"
    );
    assert!(
        std::fs::read_to_string(&stolen).map_or(true, |s| !s.contains("HOST-ONLY")),
        "host file read through the sandbox"
    );

    // sftp in batch mode: mkdir, put, ls, get, rename, rm.
    let batch = env.home_dir().join("batch");
    let got = env.home_dir().join("got.txt");
    std::fs::write(
        &batch,
        format!(
            "mkdir /tmp/sftpdir\nput {} /tmp/sftpdir/a.txt\nls /tmp/sftpdir\nrename /tmp/sftpdir/a.txt /tmp/sftpdir/b.txt\nget /tmp/sftpdir/b.txt {}\nrm /tmp/down.txt\n",
            local_down.display(),
            got.display()
        ),
    )
    .unwrap();
    let out = sandbox
        .openssh("sftp")
        .arg("-b")
        .arg(&batch)
        .arg(&sandbox.name)
        .output()
        .unwrap();
    assert_code(&out, 0);
    assert!(stdout(&out).contains("a.txt"), "{}", stdout(&out));
    assert_eq!(std::fs::read_to_string(&got).unwrap(), "from-sandbox\n");
    let out = sandbox.exec(&[
        "sh",
        "-c",
        "cat /tmp/sftpdir/b.txt; test -e /tmp/down.txt || echo removed",
    ]);
    assert_eq!(stdout(&out), "from-sandbox\nremoved\n");
}

#[test]
fn local_forward_reaches_a_server_on_the_sandbox_loopback() {
    let env = TestEnv::new();
    let sandbox = SshSandbox::start(
        &env,
        "sshfwd",
        &[],
        &[
            "sh",
            "-c",
            "mkdir -p /tmp/www && echo hello-from-inside > /tmp/www/index.html && httpd -p 127.0.0.1:8080 -h /tmp/www",
        ],
    );
    let local = free_port();
    let mut forward = sandbox.forward("-L", &format!("{local}:127.0.0.1:8080"));
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        match http_get(local) {
            Ok(body) if !body.is_empty() => break body,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            other => panic!("no answer through ssh -L: {other:?}"),
        }
    };
    // SAFETY: kill has no memory-safety preconditions; our own child.
    unsafe { libc::kill(forward.id() as i32, libc::SIGTERM) };
    let _ = forward.wait();
    assert!(body.contains("hello-from-inside"), "{body}");

    // Dynamic forwarding (`ssh -D`, a SOCKS proxy: what VS Code Remote-SSH
    // uses by default to reach its server) goes the same way: the sandbox's
    // loopback is reachable, the host's is not.
    let host_only = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    host_only.set_nonblocking(true).unwrap();
    let host_port = host_only.local_addr().unwrap().port();
    let socks = free_port();
    let mut dynamic = sandbox.forward("-D", &format!("127.0.0.1:{socks}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        match socks_connect(socks, 8080) {
            Ok(stream) => break stream,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => panic!("no connection through ssh -D: {e}"),
        }
    };
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body);
    drop(stream);
    let to_host = socks_connect(socks, host_port);
    let accepted = host_only.accept();
    // SIGKILL: with a forwarded connection open, ssh waits on SIGTERM.
    let _ = dynamic.kill();
    let _ = dynamic.wait();
    assert!(body.contains("hello-from-inside"), "{body}");
    assert!(to_host.is_err(), "ssh -D reached the host's loopback");
    assert!(accepted.is_err(), "the host's listener got a connection");
}

/// Opens a connection through the SOCKS5 proxy on 127.0.0.1:PROXY to
/// 127.0.0.1:PORT as the proxy's far side sees it; Err if it refuses.
fn socks_connect(proxy: u16, port: u16) -> std::io::Result<std::net::TcpStream> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", proxy))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(&[5, 1, 0])?; // version 5, one method: no auth
    let mut choice = [0u8; 2];
    stream.read_exact(&mut choice)?;
    let mut request = vec![5, 1, 0, 1, 127, 0, 0, 1]; // CONNECT to IPv4 127.0.0.1
    request.extend_from_slice(&port.to_be_bytes());
    stream.write_all(&request)?;
    let mut reply = [0u8; 10];
    stream.read_exact(&mut reply)?;
    if reply[1] != 0 {
        return Err(std::io::Error::other(format!(
            "SOCKS refused: {}",
            reply[1]
        )));
    }
    Ok(stream)
}

#[test]
fn wrong_key_and_unlisted_environment_are_refused() {
    let env = TestEnv::new();
    let sandbox = SshSandbox::start(&env, "sshauth", &["--ssh-accept-env", "OK_*"], &["true"]);

    // A key the server never saw.
    let other = new_key(&env, "other_key");
    let out = sandbox.ssh_with_key(&other, "echo got-in");
    assert_code(&out, 255);
    assert!(!stdout(&out).contains("got-in"));
    assert!(
        stderr(&out).contains("Permission denied"),
        "{}",
        stderr(&out)
    );

    // Remote forwarding (a port on the host, fed from the sandbox) is refused.
    let out = sandbox
        .openssh("ssh")
        .args(["-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:9"])
        .arg(&sandbox.name)
        .arg("echo forwarded")
        .output()
        .unwrap();
    assert_code(&out, 255);
    assert!(!stdout(&out).contains("forwarded"));

    // SendEnv/SetEnv: only the listed names reach the command.
    let out = sandbox
        .openssh("ssh")
        .args(["-o", "SetEnv=OK_ONE=yes NOT_LISTED=leak"])
        .arg(&sandbox.name)
        .arg("echo ${OK_ONE-unset} ${NOT_LISTED-unset}")
        .output()
        .unwrap();
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "yes unset\n");
}

#[test]
fn removing_the_sandbox_ends_sessions_and_closes_the_port() {
    let env = TestEnv::new();
    let sandbox = SshSandbox::start(&env, "sshrm", &[], &["true"]);
    assert!(port_open(sandbox.port));
    let session = env.spawn(&["ssh", &sandbox.name, "--", "sleep 120"]);
    std::thread::sleep(Duration::from_secs(1));

    let out = env.run(&["sandbox", "remove", &sandbox.name]);
    assert_code(&out, 0);
    let ended = session.wait_output_within(Duration::from_secs(15));
    assert!(ended.is_some(), "the SSH session outlived its sandbox");
    let deadline = Instant::now() + Duration::from_secs(5);
    while port_open(sandbox.port) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!port_open(sandbox.port), "the SSH port is still open");
    assert!(!sandbox.state().exists(), "keys left behind");

    let out = env.run(&["ssh", &sandbox.name, "--", "true"]);
    let line = assert_one_line_error(&out);
    assert!(line.contains(&sandbox.name), "{line}");
}

#[test]
fn a_killed_server_is_collected_and_a_taken_port_is_refused() {
    let env = TestEnv::new();
    let sandbox = SshSandbox::start(&env, "sshgc", &[], &["true"]);
    let owner = std::fs::read_to_string(sandbox.state().join("server")).unwrap();
    let pid: i32 = owner.split(':').nth(1).unwrap().parse().unwrap();
    // SAFETY: kill has no memory-safety preconditions; the server we started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(300));
    let out = env.run(&["sandbox", "gc"]);
    assert_code(&out, 0);
    assert!(!sandbox.state().exists(), "gc left the dead server's keys");
    let out = env.run(&["ssh", &sandbox.name]);
    let line = assert_one_line_error(&out);
    assert!(line.contains("no SSH server"), "{line}");

    // --ssh-port on a port in use: one line, exit 125, no sandbox made.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let name = unique_name("sshport");
    let out = env.run_kept(&name, &["--ssh", "--ssh-port", &port], &["true"]);
    let line = assert_one_line_error(&out);
    assert!(line.contains("--ssh-port"), "{line}");
    let out = env.run(&["sandbox", "info", &name]);
    assert_ne!(out.status.code(), Some(0), "a sandbox was made");
    assert!(!env.state_dir().join("ssh").join(&name).exists());
}

#[test]
fn chosen_port_callers_keys_config_flag_and_a_stopped_sandbox() {
    let env = TestEnv::new();
    // The caller's own key, as in ~/.ssh/authorized_keys.
    let own = new_key(&env, "own_key");
    let authorized = env.home_dir().join("authorized_keys");
    let public = std::fs::read_to_string(own.with_extension("pub")).unwrap();
    std::fs::write(&authorized, format!("# mine\n\n{public}")).unwrap();

    // A line with key options is refused: one line, 125, nothing made.
    let with_options = env.home_dir().join("authorized_keys.options");
    std::fs::write(&with_options, format!("no-pty {public}")).unwrap();
    let name = unique_name("sshopts");
    let out = env.run_kept(
        &name,
        &[
            "--ssh",
            "--ssh-authorized-keys",
            with_options.to_str().unwrap(),
        ],
        &["true"],
    );
    let line = assert_one_line_error(&out);
    assert!(line.contains("--ssh-authorized-keys"), "{line}");
    assert_ne!(env.run(&["sandbox", "info", &name]).status.code(), Some(0));
    assert!(!env.state_dir().join("ssh").join(&name).exists());

    let port = free_port();
    let sandbox = SshSandbox::start(
        &env,
        "sshkeys",
        &[
            "--ssh-port",
            &port.to_string(),
            "--ssh-authorized-keys",
            authorized.to_str().unwrap(),
        ],
        &["true"],
    );
    assert_eq!(sandbox.port, port);

    // `ssh NAME --config` is `ssh-config NAME`.
    let out = env.run(&["ssh", &sandbox.name, "--config"]);
    assert_code(&out, 0);
    assert_eq!(out.stdout, std::fs::read(&sandbox.config).unwrap());

    // The caller's key gets in (with the pinned host key of the Host block).
    let out = sandbox.ssh_with_key(&own, "echo own-key");
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "own-key\n");

    // A stopped sandbox runs nothing over SSH either, as `exec` refuses;
    // started again, it does.
    assert_code(&env.run(&["sandbox", "stop", &sandbox.name]), 0);
    let out = sandbox.ssh("echo ran");
    assert_code(&out, 125);
    assert!(!stdout(&out).contains("ran"));
    assert!(stderr(&out).contains("is stopped"), "{}", stderr(&out));
    assert_code(&env.run(&["sandbox", "start", &sandbox.name]), 0);
    let out = sandbox.ssh("echo ran");
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "ran\n");
}
