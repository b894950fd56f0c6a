//! The egress proxy from the command's side: `--allow-host`, `--egress-log`
//! and config into `SandboxSpec::egress`; and the proxy process,
//! `agentkernel __egress-proxy`, which the native backend starts
//! (`agentkernel_native::egress::start`) with its configuration (secret
//! values included) on an inherited pipe, never in argv or the environment.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use agentkernel_core::config::Config;
use agentkernel_core::egress::EgressSpec;
use agentkernel_core::parse::PortMapping;
use agentkernel_core::policy::Policy;
use agentkernel_core::{Error, Result};
use agentkernel_egress::{parse_host_pattern, Proxy, ProxyConfig};
use agentkernel_native::egress::{self, CONFIG_FD, HANDOFF_FD, LIFELINE_FD, REPORT_FD};

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

/// What the proxy process serves (`egress::Handed`).
enum Serving {
    Listener(tokio::net::TcpListener),
    Connections(tokio::sync::mpsc::Receiver<std::os::unix::net::UnixStream>),
}

impl Serving {
    async fn serve(self, proxy: &Proxy) {
        match self {
            Serving::Listener(listener) => {
                let _ = proxy.serve(listener).await;
            }
            Serving::Connections(connections) => proxy.serve_connections(connections).await,
        }
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
    // SAFETY: `start` passes fd 6 for the final report exactly when it asks for one.
    let final_report = config
        .final_report
        .then(|| unsafe { std::fs::File::from_raw_fd(REPORT_FD) });
    let reports = match config
        .report_socket
        .as_deref()
        .map(agentkernel_egress::summary::bind_reports)
        .transpose()
    {
        Ok(r) => r,
        Err(e) => return report(format!("cannot create the report socket: {e}")),
    };
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
        // Blocks until the sandbox's network namespace exists, or a VM's
        // run says connections will follow (or the sandbox's owner is
        // gone: then EOF, and we exit).
        let handoff = std::sync::Arc::new(handoff);
        let receiving = handoff.clone();
        let handed =
            tokio::task::spawn_blocking(move || egress::receive_listener(&receiving)).await;
        let (serving, sandbox_process) = match handed {
            Ok(Ok(egress::Handed::Listener(listener, sandbox_process))) => {
                let listener = match listener
                    .set_nonblocking(true)
                    .and_then(|()| tokio::net::TcpListener::from_std(listener))
                {
                    Ok(l) => l,
                    Err(_) => return crate::EXIT_AGENTKERNEL_ERROR,
                };
                (Serving::Listener(listener), sandbox_process)
            }
            // A VM's (qemu): connections come one by one over the handoff
            // socket, from the run, which only the run holds.
            Ok(Ok(egress::Handed::Connections)) => {
                let (sender, connections) = tokio::sync::mpsc::channel(16);
                std::thread::spawn(move || {
                    while let Some(stream) = egress::receive_connection(&handoff) {
                        if sender.blocking_send(stream).is_err() {
                            return;
                        }
                    }
                });
                (Serving::Connections(connections), None)
            }
            _ => return 0,
        };
        // The end of the sandbox: the lifeline's EOF, or, for an engine's
        // kept container (sent with the socket), its process's exit. Both
        // fds turn readable then.
        let end = sandbox_process.unwrap_or(lifeline);
        let ended = async {
            // An fd that cannot be watched could let the end go unnoticed:
            // then serve nothing (fail closed).
            // SAFETY: an OwnedFd, moved in: open and the same for the
            // AsyncFd's whole life.
            let registered = unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(end, tokio::io::Interest::READABLE)
            };
            if let Ok(fd) = registered {
                let _ = fd.readable().await;
            }
        };
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return crate::EXIT_AGENTKERNEL_ERROR,
            };
        let reports = async {
            match reports {
                Some(listener) => proxy.serve_reports(listener).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = reports => {}
            _ = serving.serve(&proxy) => {}
            () = ended => {}
            _ = term.recv() => {}
        }
        // Accepting has stopped; what is open drains into the report.
        if let Some(mut out) = final_report {
            let summary = proxy.report().await;
            if let Ok(json) = serde_json::to_vec(&summary) {
                let _ = out.write_all(&json);
            }
        }
        0
    })
}
