//! Finding (or starting) a Podman API socket.
//!
//! Order: `$CONTAINER_HOST`, `/run/podman/podman.sock`,
//! `$XDG_RUNTIME_DIR/podman/podman.sock`; when none listens, agentkernel starts
//! `podman system service` on a private socket, shared by later agentkernel
//! commands, which exits by itself after five idle minutes.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agentkernel_core::Error;

use crate::podman_init::{self, InitKind};

/// Idle time after which the private service exits.
pub const SERVICE_IDLE_SECS: u32 = 300;

fn unavailable(why: impl Into<String>, fix: impl Into<String>) -> Error {
    Error::BackendUnavailable {
        backend: "podman".into(),
        why: why.into(),
        fix: fix.into(),
    }
}

pub fn listening(path: &Path) -> bool {
    UnixStream::connect(path).is_ok()
}

/// Sockets an existing Podman service may listen on, in order.
pub fn well_known_sockets() -> Vec<PathBuf> {
    let mut paths = vec![PathBuf::from("/run/podman/podman.sock")];
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        paths.push(PathBuf::from(dir).join("podman/podman.sock"));
    }
    paths
}

/// Our private service's directory: per user, in a runtime (tmpfs) location.
/// A service whose init is forced (`AGENTKERNEL_PODMAN_INIT`) gets a
/// directory of its own, so it never stands in for the usual one.
pub fn private_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    let base = if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/run/agentkernel")
    } else {
        match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
            Some(dir) => PathBuf::from(dir).join("agentkernel"),
            None => agentkernel_core::paths::state_dir(),
        }
    };
    match std::env::var(podman_init::FORCE_ENV)
        .ok()
        .filter(|v| !v.is_empty())
    {
        Some(forced) => base.join(format!("podman-init-{:016x}", fnv1a(forced.as_bytes()))),
        None => base.join("podman"),
    }
}

/// A stable short hash for directory names (FNV-1a, 64 bits).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

pub fn installed() -> bool {
    find_in_path("podman").is_some()
}

pub(crate) fn find_in_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

/// crun refuses hybrid cgroup hierarchies (v1 controllers plus an empty v2
/// mount), which Debian hosts and this project's CI have; runc handles them.
pub fn needs_runc() -> bool {
    let unified = Path::new("/sys/fs/cgroup/unified");
    let pure_v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    !pure_v2 && unified.join("cgroup.controllers").exists()
}

/// The API address to use, starting a private service if necessary, and the
/// kind of init its containers get.
pub fn service_address() -> Result<(String, InitKind), Error> {
    if let Some(host) = std::env::var("CONTAINER_HOST")
        .ok()
        .filter(|h| !h.is_empty())
    {
        return Ok((host, external_service_init()));
    }
    if let Some(sock) = well_known_sockets().into_iter().find(|p| listening(p)) {
        return Ok((
            format!("unix://{}", sock.display()),
            external_service_init(),
        ));
    }
    let sock = start_private_service()?;
    Ok((format!("unix://{}", sock.display()), private_service_init()))
}

/// A service we did not start uses its own containers.conf: read the
/// configured init the way Podman does (catatonit when unreadable).
fn external_service_init() -> InitKind {
    podman_init::choose().map_or(InitKind::Catatonit, |init| init.kind)
}

/// The init our private service was started with, recorded in its
/// directory as two lines, path and kind (read on every connection: no
/// process to spawn), else what it would be started with now.
fn private_service_init() -> InitKind {
    let recorded = std::fs::read_to_string(private_dir().join("init")).unwrap_or_default();
    recorded
        .lines()
        .nth(1)
        .and_then(InitKind::from_name)
        .unwrap_or_else(external_service_init)
}

/// The init our private service's containers get, as `doctor` shows it.
pub fn private_service_init_path() -> Option<PathBuf> {
    let recorded = std::fs::read_to_string(private_dir().join("init")).ok()?;
    recorded.lines().next().map(PathBuf::from)
}

/// Starts `podman system service` on the private socket unless it already
/// listens. A file lock keeps two agentkernel processes from starting two.
pub fn start_private_service() -> Result<PathBuf, Error> {
    let dir = private_dir();
    let sock = dir.join("podman.sock");
    if listening(&sock) {
        return Ok(sock);
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::state(&dir, e))?;
    let lock_path = dir.join("lock");
    let lock = std::fs::File::create(&lock_path).map_err(|e| Error::state(&lock_path, e))?;
    // SAFETY: flock on a descriptor we own; released when `lock` is dropped.
    unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
    if listening(&sock) {
        return Ok(sock);
    }
    let podman = find_in_path("podman").ok_or_else(|| {
        unavailable(
            "podman is not installed",
            "install it (`apt-get install podman`)",
        )
    })?;
    let init = podman_init::choose()?;
    let _ = std::fs::remove_file(&sock);
    let log_path = dir.join("service.log");
    let log = std::fs::File::create(&log_path).map_err(|e| Error::state(&log_path, e))?;
    let mut cmd = Command::new(podman);
    if needs_runc() {
        if find_in_path("runc").is_none() {
            return Err(unavailable(
                "this host has hybrid cgroups, which crun (podman's default runtime) refuses, and runc is not installed",
                "install runc (`apt-get install runc`)",
            ));
        }
        cmd.args(["--runtime", "runc"]);
    }
    if init.override_config {
        cmd.env(
            "CONTAINERS_CONF",
            podman_init::write_service_config(&dir, &init)?,
        );
    }
    let init_record = dir.join("init");
    let record = format!("{}\n{}\n", init.path.display(), init.kind.name());
    std::fs::write(&init_record, record).map_err(|e| Error::state(&init_record, e))?;
    cmd.args([
        "system",
        "service",
        "--time",
        &SERVICE_IDLE_SECS.to_string(),
    ])
    .arg(format!("unix://{}", sock.display()))
    // It outlives this command: never pin (and later lose) our working directory.
    .current_dir("/")
    .stdin(Stdio::null())
    .stdout(log.try_clone().map_err(|e| Error::state(&log_path, e))?)
    .stderr(log);
    // SAFETY: setsid is async-signal-safe; the service must not die with our
    // terminal session or receive the user's Ctrl-C.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| {
        unavailable(
            format!("cannot start `podman system service`: {e}"),
            "check the podman installation",
        )
    })?;
    let _ = std::fs::write(dir.join("service.pid"), child.id().to_string());
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        // Quietly: stderr belongs to the command; `agentkernel doctor` tells about the service.
        if listening(&sock) {
            return Ok(sock);
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut text = String::new();
            let _ = std::fs::File::open(&log_path).and_then(|mut f| f.read_to_string(&mut text));
            let last = text.lines().last().unwrap_or("").to_string();
            return Err(unavailable(
                format!("`podman system service` exited ({status}): {last}"),
                format!("see {}", log_path.display()),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(unavailable(
        "`podman system service` did not open its socket within 20s",
        format!("see {}", log_path.display()),
    ))
}
