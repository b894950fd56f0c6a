//! The egress proxy of a Docker or Podman sandbox (`-S`, `--allow-host`,
//! `--egress-log`): the same host-side proxy process as native's
//! (`agentkernel_native::egress`: configuration and values on an inherited
//! pipe, CA back on its stdout), reachable from this one container only.
//!
//! - **Where it listens.** Its socket is bound *inside the container's
//!   network namespace*, on the container's loopback (`127.0.0.1:3128`): a
//!   thread joins that namespace through a pidfd of the container's init,
//!   binds, and hands the socket to the proxy (`SCM_RIGHTS`). So the
//!   container is started first with an idle main process, and its command is
//!   exec'd only once the socket exists and the CA is installed (the path
//!   `--secret-file` takes, [`crate::secret_files::drive`]).
//! - **What the container may reach.** With an allow-list its network is
//!   `none` — loopback only, no DNS — so the proxy is its one way out;
//!   without one (secrets only) it keeps agentkernel's network.
//! - **The CA** is appended to the image's bundles (Debian/Alpine and RHEL
//!   paths, symlinks followed inside the container) and written to
//!   `/etc/agentkernel/`, through the engine's archive API: in the
//!   container's own layer, never the host's files.
//! - **How long it lives.** One-shot: the run holds the lifeline pipe, so the
//!   proxy ends with the run, `kill -9` included (the container is then
//!   garbage for gc). Kept: no agentkernel process outlives `run --keep`, so
//!   the proxy is sent a pidfd of the container's init with its socket and
//!   ends when the container does — `sandbox rm`, expiry, gc.
//!
//! Needs the engine's processes on this machine, and root (joining another
//! namespace): a remote engine or a non-root caller is refused, one line.

use std::borrow::Cow;
use std::os::fd::{AsRawFd, OwnedFd};

use agentkernel_core::egress::{EgressSpec, SecretValues};
use agentkernel_core::spec::SandboxSpec;
use agentkernel_core::state::Store;
use agentkernel_core::Error;
use agentkernel_native::egress::{self as proxy, StartedProxy};
use bollard::query_parameters::{
    ContainerArchiveInfoOptions, DownloadFromContainerOptions, UploadToContainerOptions,
};
use futures_util::TryStreamExt;

use crate::Engine;

fn egress_of(spec: &SandboxSpec) -> Option<&EgressSpec> {
    spec.egress.as_ref().filter(|e| e.needs_proxy())
}

/// Whether this spec runs with a proxy.
pub fn needed(spec: &SandboxSpec) -> bool {
    egress_of(spec).is_some()
}

/// The spec the container is made from: with a proxy, its variables in the
/// environment (the container's, so later execs in a kept sandbox get them
/// too), and under an allow-list no network but loopback.
pub fn container_spec(spec: &SandboxSpec) -> Cow<'_, SandboxSpec> {
    let Some(egress) = egress_of(spec) else {
        return Cow::Borrowed(spec);
    };
    let mut spec = spec.clone();
    for (key, value) in proxy::environment() {
        spec.exec.env.retain(|(k, _)| k != key);
        spec.exec.env.push((key.to_string(), value));
    }
    if !egress.allow_hosts.is_empty() {
        spec.policy.network = false;
    }
    Cow::Owned(spec)
}

/// Starts the proxy process when the spec needs one (before the container
/// exists: a configuration it refuses leaves nothing behind). As on native,
/// a kept sandbox's proxy answers report requests on a socket in its state
/// directory, and a receipt's one-shot run gets a final report.
pub fn start(
    spec: &SandboxSpec,
    secrets: &SecretValues,
    store: &Store,
) -> Result<Option<StartedProxy>, Error> {
    let Some(egress) = egress_of(spec) else {
        return Ok(None);
    };
    let reports = proxy::Reports {
        socket: spec
            .keep
            .as_ref()
            .map(|k| proxy::report_socket(store, &k.name)),
        final_report: spec.keep.is_none() && agentkernel_core::observe::enabled(),
    };
    proxy::start(egress, secrets, reports).map(Some)
}

/// A receipt's one-shot run: records the proxy's final report, read from
/// `pipe` once the proxy has ended with the run.
pub async fn record_final_report(pipe: OwnedFd) {
    let report = tokio::task::spawn_blocking(move || proxy::read_final_report(pipe)).await;
    agentkernel_core::observe::egress(proxy::report_json(report.ok().flatten()));
}

/// Held by a one-shot run until its command ends: the proxy exits when it
/// is dropped (or the run is killed).
pub struct Lifeline {
    _write_end: Option<OwnedFd>,
}

/// In a started container: installs the CA, binds the proxy's socket in
/// its network namespace and hands it over. `kept`: the proxy then lives as
/// long as the container, not this process.
pub async fn attach(
    engine: &Engine,
    container: &str,
    started: StartedProxy,
    kept: bool,
) -> Result<Lifeline, Error> {
    let info = crate::inspect::container(engine, container)
        .await
        .map_err(|e| engine.error("inspecting the sandbox", e))?;
    let id = info.id.clone().unwrap_or_default();
    let pid = info.state.as_ref().and_then(|s| s.pid).filter(|p| *p > 0);
    let Some(pid) = pid else {
        return Err(engine.failure("the sandbox exited before its egress proxy could start"));
    };
    let init = container_init(engine, pid as i32, &id)?;
    install_ca(engine, container, &mount_points(&info), &started.ca_pem).await?;
    let listener = bind_in_network_of(&init).map_err(|e| {
        if e.raw_os_error() == Some(libc::EPERM) {
            Error::not_supported_hint(
                format!(
                    "the egress proxy on the {} backend without root",
                    engine.flavor.name()
                ),
                "run agentkernel as root: the proxy's socket is bound inside the container's network namespace",
            )
        } else {
            engine.failure(format!(
                "cannot bind the egress proxy's port in the sandbox: {e}"
            ))
        }
    })?;
    proxy::send_listener(&started.handoff, &listener, kept.then_some(&init)).map_err(|e| {
        engine.failure(format!(
            "cannot hand the listening socket to the egress proxy: {e}"
        ))
    })?;
    Ok(Lifeline {
        _write_end: (!kept).then_some(started.lifeline),
    })
}

/// A pidfd of the container's init, checked to be that container's: with a
/// remote engine the PID the engine reports is some other process here, or
/// none.
fn container_init(engine: &Engine, pid: i32, id: &str) -> Result<OwnedFd, Error> {
    process_of_container(pid, id).ok_or_else(|| {
        Error::not_supported_hint(
            format!(
                "the egress proxy with a {} engine whose containers are not on this machine ({})",
                engine.flavor.name(),
                engine.address
            ),
            "use the local engine, or -B native: the proxy must bind inside the container's network namespace",
        )
    })
}

/// A pidfd of process `pid` when its cgroup names container `id` (every
/// engine's cgroup path for a container holds its full ID).
fn process_of_container(pid: i32, id: &str) -> Option<OwnedFd> {
    let pidfd = agentkernel_native::pidfd_open(pid).ok()?;
    // The pidfd pins the process: what its cgroup says now is about it.
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    (id.len() == 64 && cgroup.contains(id)).then_some(pidfd)
}

/// Binds the proxy's port on the loopback of `init`'s network namespace, in
/// a thread of its own (joining a namespace is per thread; it ends after).
fn bind_in_network_of(init: &OwnedFd) -> std::io::Result<std::net::TcpListener> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns with a valid pidfd affects this thread only.
                if unsafe { libc::setns(init.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                std::net::TcpListener::bind(("127.0.0.1", proxy::PROXY_PORT))
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the binding thread panicked")))
    })
}

/// Largest bundle read back from the container: real ones are ~250 KB.
const BUNDLE_LIMIT: usize = 16 << 20;

/// Symlinks followed while resolving one path before giving up.
const MAX_LINKS: usize = 16;

/// Go's `os.ModeSymlink` and `os.ModeDir`, as the engine reports a path's mode.
const GO_MODE_SYMLINK: u32 = 1 << 27;
const GO_MODE_DIR: u32 = 1 << 31;

/// Where the container has something mounted (binds, volumes, tmpfs): the
/// CA is never written there — a bind's files are the host's.
fn mount_points(info: &bollard::models::ContainerInspectResponse) -> Vec<String> {
    let mut points: Vec<String> = info
        .mounts
        .iter()
        .flatten()
        .filter_map(|m| m.destination.clone())
        .collect();
    let host = info.host_config.as_ref();
    points.extend(
        host.and_then(|h| h.tmpfs.as_ref())
            .into_iter()
            .flatten()
            .map(|(k, _)| k.clone()),
    );
    points
}

/// Refuses a resolved path at or beneath a mount point.
fn refuse_on_a_mount(path: &str, mounts: &[String]) -> Result<(), String> {
    match mounts.iter().find(|m| {
        let m = m.trim_end_matches('/');
        m.is_empty() || path == m || path.starts_with(&format!("{m}/"))
    }) {
        Some(mount) => Err(format!(
            "{path} is on the mount at {mount}, whose files are not the image's; mount it elsewhere"
        )),
        None => Ok(()),
    }
}

/// `path` with every symlink in it resolved inside the container, one
/// component at a time (the engine resolves a link it is asked about, but
/// not the directories on the way to it): the path a write really lands
/// on, so that it can be checked against the mounts. `None`: it does not
/// exist; `Some((path, is_dir))` otherwise.
async fn resolve(
    engine: &Engine,
    container: &str,
    path: &str,
) -> Result<Option<(String, bool)>, String> {
    let mut done: Vec<String> = Vec::new();
    let mut rest: std::collections::VecDeque<String> =
        path.split('/').map(str::to_string).collect();
    let mut links = 0;
    let mut is_dir = true;
    while let Some(part) = rest.pop_front() {
        match part.as_str() {
            "" | "." => continue,
            ".." => {
                done.pop();
                continue;
            }
            _ => {}
        }
        let candidate = format!(
            "/{}",
            [&done[..], std::slice::from_ref(&part)].concat().join("/")
        );
        let stat = match engine
            .docker
            .get_container_archive_info(
                container,
                Some(ContainerArchiveInfoOptions {
                    path: candidate.clone(),
                }),
            )
            .await
        {
            Ok(stat) => stat,
            Err(e) if crate::engine::is_not_found(&e) => return Ok(None),
            Err(e) => return Err(format!("{candidate}: {}", crate::engine::message_of(&e))),
        };
        if stat.file_mode & GO_MODE_SYMLINK != 0 {
            links += 1;
            if links > MAX_LINKS {
                return Err(format!("{path}: more than {MAX_LINKS} symlinks"));
            }
            // The engines report the link's target resolved (absolute);
            // a relative one is taken from the link's directory.
            let target = stat.link_target;
            if target.starts_with('/') {
                done.clear();
            }
            for (i, p) in target.split('/').enumerate() {
                rest.insert(i, p.to_string());
            }
            continue;
        }
        is_dir = stat.file_mode & GO_MODE_DIR != 0;
        done.push(part);
    }
    Ok(Some((format!("/{}", done.join("/")), is_dir)))
}

/// Splits a resolved absolute path into its directory and name.
fn split(path: &str) -> (&str, &str) {
    let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
    (if dir.is_empty() { "/" } else { dir }, name)
}

/// Adds the CA to the container's trust store before any command runs:
/// each system bundle the image has gets it appended (where its symlinks
/// lead, inside the container), and `/etc/agentkernel/` gets the CA and a
/// bundle of the system's plus it, which the `*_CA_*` variables name.
/// Nothing is written on a mount (a bind's files are the host's).
async fn install_ca(
    engine: &Engine,
    container: &str,
    mounts: &[String],
    ca_pem: &str,
) -> Result<(), Error> {
    let fail = |what: String| {
        Error::Conflict(format!(
            "cannot install the egress proxy's CA in the sandbox: {what}"
        ))
    };
    let mut system = Vec::new();
    for bundle in proxy::SYSTEM_BUNDLES {
        let Some((real, false)) = resolve(engine, container, &format!("/{bundle}"))
            .await
            .map_err(fail)?
        else {
            continue;
        };
        refuse_on_a_mount(&real, mounts).map_err(fail)?;
        let Some((mode, mut content)) = read_file(engine, container, &real).await.map_err(fail)?
        else {
            continue;
        };
        if system.is_empty() {
            system = content.clone();
        }
        content.extend_from_slice(format!("\n{ca_pem}").as_bytes());
        let (dir, name) = split(&real);
        let mut tar = tar::Builder::new(Vec::new());
        append(&mut tar, name, mode, &content).map_err(|e| fail(e.to_string()))?;
        upload(engine, container, dir, tar)
            .await
            .map_err(|e| fail(format!("{real}: {e}")))?;
    }
    // Where /etc/agentkernel really is (or would be made).
    let (ca, bundle) = (proxy::CA_FILE, proxy::BUNDLE_FILE);
    let (etc, ours) = split(split(ca).0);
    let target = match resolve(engine, container, split(ca).0)
        .await
        .map_err(fail)?
    {
        Some((real, true)) => real,
        Some((real, false)) => return Err(fail(format!("{real} is not a directory"))),
        None => match resolve(engine, container, etc).await.map_err(fail)? {
            Some((real, true)) => format!("{}/{ours}", real.trim_end_matches('/')),
            _ => return Err(fail(format!("the image has no directory {etc}"))),
        },
    };
    refuse_on_a_mount(&target, mounts).map_err(fail)?;
    let (parent, dir_name) = split(&target);
    let mut combined = system;
    combined.extend_from_slice(format!("\n{ca_pem}").as_bytes());
    let mut tar = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    let inside = |path: &str| format!("{dir_name}/{}", split(path).1);
    tar.append_data(&mut dir, format!("{dir_name}/"), std::io::empty())
        .and_then(|()| append(&mut tar, &inside(ca), 0o644, ca_pem.as_bytes()))
        .and_then(|()| append(&mut tar, &inside(bundle), 0o644, &combined))
        .map_err(|e| fail(e.to_string()))?;
    upload(engine, container, parent, tar)
        .await
        .map_err(|e| fail(format!("{bundle}: {e}")))
}

fn append(
    tar: &mut tar::Builder<Vec<u8>>,
    name: &str,
    mode: u32,
    content: &[u8],
) -> std::io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_mode(mode);
    header.set_size(content.len() as u64);
    tar.append_data(&mut header, name, content)
}

async fn upload(
    engine: &Engine,
    container: &str,
    dir: &str,
    tar: tar::Builder<Vec<u8>>,
) -> Result<(), String> {
    let archive = tar.into_inner().map_err(|e| e.to_string())?;
    engine
        .docker
        .upload_to_container(
            container,
            Some(UploadToContainerOptions {
                path: dir.to_string(),
                ..Default::default()
            }),
            bollard::body_full(archive.into()),
        )
        .await
        .map_err(|e| crate::engine::message_of(&e))
}

/// The mode and contents of the regular file at the resolved `path`; `None`
/// when it is something else.
async fn read_file(
    engine: &Engine,
    container: &str,
    path: &str,
) -> Result<Option<(u32, Vec<u8>)>, String> {
    let mut stream = engine.docker.download_from_container(
        container,
        Some(DownloadFromContainerOptions {
            path: path.to_string(),
        }),
    );
    let mut archive = Vec::new();
    while let Some(chunk) = stream
        .try_next()
        .await
        .map_err(|e| format!("{path}: {}", crate::engine::message_of(&e)))?
    {
        archive.extend_from_slice(&chunk);
        if archive.len() > BUNDLE_LIMIT {
            return Err(format!("{path} is larger than {BUNDLE_LIMIT} bytes"));
        }
    }
    let bad = |e: std::io::Error| format!("{path}: {e}");
    let mut tar = tar::Archive::new(archive.as_slice());
    let mut entries = tar.entries().map_err(bad)?;
    let Some(entry) = entries.next() else {
        return Ok(None);
    };
    let mut entry = entry.map_err(bad)?;
    if !entry.header().entry_type().is_file() {
        return Ok(None);
    }
    let mode = entry.header().mode().map_err(bad)? & 0o7777;
    let mut content = Vec::new();
    std::io::Read::read_to_end(&mut entry, &mut content).map_err(bad)?;
    Ok(Some((mode, content)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a remote engine's PID means here: some process that is not the
    /// container's, or none at all. Neither is joined.
    #[test]
    fn a_process_outside_the_container_is_not_taken_for_its_init() {
        let id = "ab".repeat(32);
        assert!(process_of_container(std::process::id() as i32, &id).is_none());
        assert!(process_of_container(1, &id).is_none());
        assert!(process_of_container(i32::MAX, &id).is_none());
        // The positive case — the engine's PID for a local container — is
        // what every engine test in tests/egress.rs goes through.
    }
}
