//! The egress proxy from the command's side: `--allow-host`, `--egress-log`
//! and config into `SandboxSpec::egress`; which backends can carry it; and
//! the proxy process, `agentkernel __egress-proxy` — started with its
//! configuration (secret values included) on an inherited pipe, never in
//! argv or the environment.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;

use agentkernel_core::config::Config;
use agentkernel_core::egress::{EgressSpec, SecretValues};
use agentkernel_core::parse::PortMapping;
use agentkernel_core::policy::Policy;
use agentkernel_core::spec::SandboxSpec;
use agentkernel_core::{Error, Result};
use agentkernel_egress::{parse_host_pattern, Proxy, ProxyConfig};

use crate::backend::BackendKind;

/// Caught in `main()` before clap, like the native helper.
pub const PROXY_SUBCOMMAND: &str = "__egress-proxy";

/// The proxy process's descriptors: its configuration (a pipe), the socket
/// its listening socket arrives on, and the lifeline (EOF: the sandbox's
/// owner is gone).
const CONFIG_FD: RawFd = 3;
const HANDOFF_FD: RawFd = 4;
const LIFELINE_FD: RawFd = 5;

/// The allow-list half of `SandboxSpec::egress` (flags, `[network] allow`,
/// upstream's `[security.domains] allow`) with the proxy's own settings,
/// added to what secret resolution made (`secrets`). `None` when nothing
/// asks for either.
pub fn resolve(
    secrets: Option<EgressSpec>,
    allow: &[String],
    log: Option<&Path>,
    config: &Config,
    policy: &Policy,
    ports: &[PortMapping],
    cwd: &Path,
) -> Result<Option<EgressSpec>> {
    let secrets = secrets.map(|egress| with_proxy_settings(egress, config));
    let mut allow_hosts = Vec::new();
    for text in config.egress_allow.iter().chain(allow) {
        let pattern =
            parse_host_pattern(text).map_err(|why| Error::invalid("--allow-host", text, why))?;
        if !allow_hosts.contains(&pattern) {
            allow_hosts.push(pattern);
        }
    }
    if allow_hosts.is_empty() && log.is_none() {
        return Ok(secrets);
    }
    let from_flags = !allow.is_empty() || log.is_some();
    if !policy.network && !from_flags {
        // A file's allow-list under a profile without network: already stricter.
        eprintln!("agentkernel: notice: the egress allow-list (network.allow, security.domains.allow) has no effect: the sandbox has no network");
        return Ok(secrets);
    }
    if !policy.network {
        return Err(Error::Conflict(
            "--allow-host and --egress-log need a network, but this sandbox has none (--no-network, or the profile's); drop one or the other".into(),
        ));
    }
    if !allow_hosts.is_empty() && !ports.is_empty() {
        return Err(Error::not_supported_hint(
            "--publish with an egress allow-list",
            "the sandbox's only network is then the proxy; drop --publish or the allow-list",
        ));
    }
    Ok(Some(EgressSpec {
        allow_hosts,
        log: log.map(|l| cwd.join(l)),
        ..with_proxy_settings(secrets.unwrap_or_default(), config)
    }))
}

/// `[proxy] ca_file` and `resolve` matter only once a proxy runs.
fn with_proxy_settings(mut egress: EgressSpec, config: &Config) -> EgressSpec {
    egress.upstream_ca_file = config.proxy_ca_file.clone();
    egress.resolve = config.proxy_resolve.clone();
    egress
}

/// Fail closed: where the proxy cannot be made reachable from this sandbox
/// alone (or cannot yet outlive a run), egress options are refused.
pub fn check_backend(spec: &SandboxSpec, backend: BackendKind) -> Result<()> {
    if !spec.egress.as_ref().is_some_and(EgressSpec::needs_proxy) {
        return Ok(());
    }
    let refuse = |what: String, hint: &str| Err(Error::not_supported_hint(what, hint));
    match backend {
        BackendKind::Native if agentkernel_native::rootless::UserMap::for_caller().is_some() => {
            refuse(
                "the egress proxy (--allow-host, -S, --egress-log) on rootless native".into(),
                "run agentkernel as root (-B native)",
            )
        }
        BackendKind::Native => Ok(()),
        other => refuse(
            format!(
                "the egress proxy (--allow-host, -S, --egress-log) on the {} backend",
                other.name()
            ),
            "use -B native as root, whose proxy only its own sandbox can reach",
        ),
    }
}

/// `--branch` reusing a sandbox: its proxy (or none) was set when it was
/// created; egress options given now would silently not apply.
pub fn refuse_on_reuse(spec: &SandboxSpec, name: &str) -> Result<()> {
    if spec.egress.as_ref().is_some_and(EgressSpec::needs_proxy) {
        return Err(Error::Conflict(format!(
            "sandbox {name} exists: -S, --allow-host and --egress-log apply when a sandbox is created; drop them, or remove {name} first"
        )));
    }
    Ok(())
}

/// A started proxy process, waiting for its listening socket.
pub struct StartedProxy {
    pub ca_pem: String,
    /// Where the listening socket goes (see `agentkernel_native::egress`).
    pub handoff: OwnedFd,
    /// Held while the sandbox lives; its closing ends the proxy.
    pub lifeline: OwnedFd,
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both were just created and are ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Starts `agentkernel __egress-proxy` on the host: configuration and values
/// through a pipe, the CA certificate back on its stdout. Fails closed: any
/// error is the run's error, and the process is gone.
pub fn start(egress: &EgressSpec, secrets: &SecretValues) -> Result<StartedProxy> {
    let fail = |why: String| Error::Backend {
        backend: "egress proxy",
        message: why,
    };
    let config = ProxyConfig::new(egress, secrets);
    // Before a process exists: a bad configuration is the caller's one line.
    config.validate().map_err(|e| fail(e.to_string()))?;
    let io = |what: &'static str| move |e: std::io::Error| fail(format!("{what}: {e}"));
    let (config_read, config_write) = pipe().map_err(io("pipe"))?;
    let (lifeline_read, lifeline) = pipe().map_err(io("pipe"))?;
    let (handoff, proxy_handoff) =
        agentkernel_native::egress::handoff_pair().map_err(io("socketpair"))?;
    let inherited = [
        config_read.as_raw_fd(),
        proxy_handoff.as_raw_fd(),
        lifeline_read.as_raw_fd(),
    ];
    let mut command = std::process::Command::new("/proc/self/exe");
    command
        .arg0("agentkernel")
        .arg(PROXY_SUBCOMMAND)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        // It may outlive this command (a kept sandbox's): holding the
        // caller's stderr would keep a `$(agentkernel run …)` waiting.
        .stderr(Stdio::null());
    // SAFETY: only async-signal-safe calls (fcntl, dup2, setsid) between
    // fork and exec.
    unsafe {
        command.pre_exec(move || {
            // Out of the way first (a source may be 3..5 itself), then into place.
            let mut high = [0; 3];
            for (i, fd) in inherited.iter().enumerate() {
                high[i] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 10);
                if high[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, fd) in high.iter().enumerate() {
                if libc::dup2(*fd, CONFIG_FD + i as RawFd) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // Its own session: the terminal's Ctrl-C is the sandbox's, and
            // the proxy must serve until the sandbox is gone.
            libc::setsid();
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(io("cannot start it"))?;
    drop((config_read, proxy_handoff, lifeline_read));
    let result = (|| {
        let json = serde_json::to_vec(&config).map_err(|e| fail(e.to_string()))?;
        std::fs::File::from(config_write)
            .write_all(&json)
            .map_err(io("cannot send its configuration"))?;
        let mut out = String::new();
        child
            .stdout
            .take()
            .expect("piped")
            .read_to_string(&mut out)
            .map_err(io("cannot read its CA"))?;
        match out.strip_prefix("error: ") {
            None if out.starts_with("-----BEGIN CERTIFICATE-----") => Ok(out),
            Some(why) => Err(fail(why.trim().to_string())),
            None => Err(fail("it exited during start-up".into())),
        }
    })();
    match result {
        Ok(ca_pem) => Ok(StartedProxy {
            ca_pem,
            handoff,
            lifeline,
        }),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

impl StartedProxy {
    /// Makes the two descriptors survive the exec into the native helper
    /// and hands their numbers to the plan.
    pub fn into_plan(self) -> std::io::Result<agentkernel_native::egress::EgressPlan> {
        for fd in [&self.handoff, &self.lifeline] {
            // SAFETY: clears FD_CLOEXEC on an fd we own.
            if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(agentkernel_native::egress::EgressPlan {
            ca_pem: self.ca_pem,
            handoff_fd: self.handoff.into_raw_fd(),
            lifeline_fd: self.lifeline.into_raw_fd(),
        })
    }
}

/// `agentkernel __egress-proxy`: the proxy process. Returns its exit code.
pub fn proxy_main() -> i32 {
    // Secret values live here: no core dumps, no ptrace by same-uid processes.
    // SAFETY: integer-only prctl.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0) };
    let report = |why: String| {
        let mut out = std::io::stdout();
        let _ = writeln!(out, "error: {why}");
        let _ = out.flush();
        crate::EXIT_AGENTKERNEL_ERROR
    };
    let mut json = Vec::new();
    // SAFETY: fds 3-5 were set up by `start` for this process alone.
    let (config, handoff, lifeline) = unsafe {
        (
            std::fs::File::from_raw_fd(CONFIG_FD),
            OwnedFd::from_raw_fd(HANDOFF_FD),
            OwnedFd::from_raw_fd(LIFELINE_FD),
        )
    };
    if let Err(e) = { config }.read_to_end(&mut json) {
        return report(format!("cannot read the configuration: {e}"));
    }
    let config: ProxyConfig = match serde_json::from_slice(&json) {
        Ok(c) => c,
        Err(e) => return report(format!("bad configuration: {e}")),
    };
    json.fill(0);
    let proxy = match Proxy::new(config) {
        Ok(p) => p,
        Err(e) => return report(e.to_string()),
    };
    {
        let mut out = std::io::stdout();
        let _ = out.write_all(proxy.ca_cert_pem().as_bytes());
        let _ = out.flush();
    }
    // The caller reads the certificate to EOF.
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: replaces our stdout with /dev/null.
        unsafe { libc::dup2(null.as_raw_fd(), 1) };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(_) => return crate::EXIT_AGENTKERNEL_ERROR,
    };
    runtime.block_on(async move {
        // Blocks until the sandbox's network namespace exists (or its
        // supervisor is gone: then EOF, and we exit).
        let listener = tokio::task::spawn_blocking(move || {
            agentkernel_native::egress::receive_listener(&handoff)
        })
        .await;
        let Ok(Ok(listener)) = listener else {
            return 0;
        };
        let listener = match listener
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(listener))
        {
            Ok(l) => l,
            Err(_) => return crate::EXIT_AGENTKERNEL_ERROR,
        };
        let lifeline = async {
            match tokio::net::unix::pipe::Receiver::from_owned_fd(lifeline) {
                Ok(mut pipe) => {
                    let mut byte = [0u8; 1];
                    let _ = tokio::io::AsyncReadExt::read(&mut pipe, &mut byte).await;
                }
                // Not a pipe we can watch: serve only as long as nothing
                // else ends us.
                Err(_) => std::future::pending().await,
            }
        };
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return crate::EXIT_AGENTKERNEL_ERROR,
            };
        tokio::select! {
            _ = proxy.serve(listener) => {}
            () = lifeline => {}
            _ = term.recv() => {}
        }
        0
    })
}
