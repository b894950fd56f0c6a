//! `agentkernel doctor [--json]`: which backends work here — proven by
//! starting a real sandbox on each — whether images can be pulled, and for
//! everything that does not work, why and what to do.
//!
//! The JSON form's field names are stable (README.md lists them).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agentkernel_core::config::Config;
use agentkernel_core::Result;
use agentkernel_docker::{podman, Engine};
use agentkernel_image as images;
use serde_json::{json, Value};

use crate::backend::{self, BackendKind};

/// How long a registry gets to answer `GET /v2/`.
const REGISTRY_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the trial sandbox may take (a cold Podman service included).
const RUN_TIMEOUT: &str = "60s";

/// One backend's verdict.
struct BackendReport {
    name: &'static str,
    /// `ready` (a sandbox ran), `failed` (usable, but the sandbox did not
    /// run), `unavailable` (cannot be used here), `not built`.
    status: &'static str,
    detail: String,
    fix: Option<String>,
    run: Option<TrialRun>,
}

/// The trial sandbox: `true` in a small image.
struct TrialRun {
    image: String,
    millis: u64,
    exit_code: i32,
    error: Option<String>,
}

/// One registry endpoint Docker Hub images are pulled from.
struct RegistryReport {
    url: String,
    /// `docker hub` or `mirror`.
    role: &'static str,
    /// Where the mirror is configured (empty for Docker Hub).
    source: &'static str,
    probe: images::Probe,
}

pub async fn doctor(as_json: bool) -> Result<i32> {
    let mut reports = Vec::new();
    for kind in BackendKind::ALL {
        reports.push(check(kind).await);
    }
    let registries = registries().await;
    let default = backend::choose(None, None);
    let ready = reports.iter().filter(|r| r.status == "ready").count();
    if as_json {
        let doc = json!({
            "backends": reports.iter().map(backend_json).collect::<Vec<_>>(),
            "default_backend": default.as_ref().ok().map(|k| k.name()),
            "default_backend_error": default.as_ref().err().map(|e| e.to_string()),
            "registries": registries.iter().map(registry_json).collect::<Vec<_>>(),
            "can_pull": registries.iter().any(|r| r.probe.status.is_some()),
        });
        println!("{}", serde_json::to_string_pretty(&doc).expect("json"));
    } else {
        for r in &reports {
            let mut line = r.detail.clone();
            if let Some(run) = &r.run {
                line.push_str("; ");
                line.push_str(&run_summary(run));
            }
            if let Some(fix) = &r.fix {
                line.push_str("; ");
                line.push_str(fix);
            }
            println!("{:<12} {:<12} {line}", r.name, r.status);
        }
        for r in &registries {
            let (label, verdict) = registry_text(r);
            println!("{label:<12} {verdict}");
        }
        if registries.iter().all(|r| r.probe.status.is_none()) {
            println!("{:<12} {}", "pulls", no_registry_hint());
        }
        let default = match default {
            Ok(kind) => kind.name().to_string(),
            Err(e) => format!("none ({e})"),
        };
        println!("{:<12} {default}", "default");
    }
    Ok(if ready > 0 { 0 } else { 1 })
}

/// What to do when no registry answers.
pub(crate) fn no_registry_hint() -> &'static str {
    "no registry answers: set a Docker Hub mirror ([images] mirrors in the config, or AGENTKERNEL_REGISTRY_MIRRORS), use images already here, or --image host (native)"
}

async fn check(kind: BackendKind) -> BackendReport {
    let report = |status, detail: String, fix: Option<String>| BackendReport {
        name: kind.name(),
        status,
        detail,
        fix,
        run: None,
    };
    if let Some(why) = kind.unbuilt_reason() {
        return report(
            "not built",
            why.to_string(),
            Some("nothing to install: this version of agentkernel has no such backend".into()),
        );
    }
    if kind == BackendKind::Qemu {
        // A trial VM costs seconds under TCG: say what a run would use.
        return match super::qemu::doctor() {
            Ok(detail) => report(
                "untested",
                detail,
                Some("try it: agentkernel run -B qemu --no-network -i IMAGE true".into()),
            ),
            Err(e) => unavailable(kind, e),
        };
    }
    let (detail, image) = if kind == BackendKind::Native {
        match agentkernel_native::host::check() {
            Ok(found) => (
                format!("Linux {} ({}), no daemon", found.kernel, found.detail),
                agentkernel_native::prepare::HOST_IMAGE.to_string(),
            ),
            Err(why) => return report("unavailable", why, None),
        }
    } else {
        let engine = match backend::connect(kind) {
            Ok(engine) => engine,
            Err(e) => return unavailable(kind, e),
        };
        let detail = match engine_status(kind, &engine).await {
            Ok(detail) => detail,
            Err(e) => return unavailable(kind, e),
        };
        match agentkernel_docker::pull::small_local_image(&engine).await {
            Ok(Some(image)) => (detail, image),
            Ok(None) => {
                let fix = format!(
                    "it has no image to try a sandbox in: `{} pull alpine` (or `{} load`), then run doctor again",
                    kind.name(),
                    kind.name()
                );
                return report("untested", detail, Some(fix));
            }
            Err(e) => return report("failed", detail, Some(e.to_string())),
        }
    };
    let run = trial_run(kind, &image, true);
    if run.exit_code != 0 {
        // Sandboxes may still work without a network (a kernel without
        // bridge/veth, no iptables): say that apart from "nothing works".
        let offline = trial_run(kind, &image, false);
        if offline.exit_code == 0 {
            return BackendReport {
                name: kind.name(),
                status: "no network",
                detail,
                fix: Some(format!(
                    "sandboxes run only with --no-network here: {}",
                    run.error.as_deref().unwrap_or("no message")
                )),
                run: Some(offline),
            };
        }
    }
    BackendReport {
        name: kind.name(),
        status: if run.exit_code == 0 {
            "ready"
        } else {
            "failed"
        },
        detail,
        fix: None,
        run: Some(run),
    }
}

/// An unusable backend: its reason and, apart, the fix for it.
fn unavailable(kind: BackendKind, e: agentkernel_core::Error) -> BackendReport {
    let (detail, fix) = match e {
        agentkernel_core::Error::BackendUnavailable { why, fix, .. } => (why, Some(fix)),
        other => (other.to_string(), None),
    };
    BackendReport {
        name: kind.name(),
        status: "unavailable",
        detail,
        fix,
        run: None,
    }
}

/// Runs `agentkernel run -B KIND --image IMAGE -- true` (this binary, the
/// whole path a user's run takes, in an empty directory; with the default
/// profile's network unless `network` is false) and times it.
fn trial_run(kind: BackendKind, image: &str, network: bool) -> TrialRun {
    let started = Instant::now();
    let workspace = std::env::temp_dir().join(format!("agentkernel-doctor-{}", std::process::id()));
    let output = std::fs::create_dir_all(&workspace).and_then(|()| {
        Command::new("/proc/self/exe")
            .args(["run", "-B", kind.name(), "--fast=false", "--pull", "never"])
            .args(["--timeout", RUN_TIMEOUT, "--image", image])
            .args((!network).then_some("--no-network"))
            .args(["--", "true"])
            .env_remove("AGENTKERNEL_BACKEND")
            .current_dir(&workspace)
            .stdin(Stdio::null())
            .output()
    });
    let _ = std::fs::remove_dir(&workspace);
    let millis = started.elapsed().as_millis() as u64;
    let image = image.to_string();
    match output {
        Ok(out) => {
            let exit_code = out.status.code().unwrap_or(-1);
            let error = (exit_code != 0).then(|| {
                let err = String::from_utf8_lossy(&out.stderr);
                let last = err.lines().rev().find(|l| !l.trim().is_empty());
                last.unwrap_or("no message")
                    .trim_start_matches("agentkernel: ")
                    .to_string()
            });
            TrialRun {
                image,
                millis,
                exit_code,
                error,
            }
        }
        Err(e) => TrialRun {
            image,
            millis,
            exit_code: -1,
            error: Some(format!("cannot start agentkernel: {e}")),
        },
    }
}

fn run_summary(run: &TrialRun) -> String {
    let image = if run.image == agentkernel_native::prepare::HOST_IMAGE {
        "--image host".to_string()
    } else {
        run.image.clone()
    };
    match &run.error {
        None => format!("ran `true` in {image} in {} ms", run.millis),
        Some(e) => format!("`true` in {image} failed (exit {}): {e}", run.exit_code),
    }
}

async fn engine_status(kind: BackendKind, engine: &Engine) -> Result<String> {
    let version = engine.ping().await?;
    let mut status = format!("{version} at {}", engine.address);
    if kind == BackendKind::Podman {
        let private = format!("{}/podman.sock", podman::private_dir().display());
        if engine.address.ends_with(&private) {
            status.push_str(&format!(
                " (agentkernel's private `podman system service`, exits after {}s idle",
                podman::SERVICE_IDLE_SECS
            ));
            if let Some(init) = podman::private_service_init_path() {
                status.push_str(&format!("; container init {}", init.display()));
            }
            status.push(')');
        }
        if podman::needs_runc() {
            status.push_str("; hybrid cgroups: containers use runc");
        }
    }
    Ok(status)
}

/// Docker Hub and each configured mirror, asked `GET /v2/` concurrently.
async fn registries() -> Vec<RegistryReport> {
    let cwd = std::env::current_dir().unwrap_or_else(|_| "/".into());
    let config = Config::load(&cwd, None).unwrap_or_default();
    let mut endpoints: Vec<(String, &'static str, &'static str)> = Vec::new();
    if let Ok(mirrors) = super::image::mirrors(&config) {
        for m in mirrors {
            if let Ok(base) = images::api_base(Some(&m.url)) {
                endpoints.push((base, "mirror", m.source));
            }
        }
    }
    endpoints.push((
        images::api_base(None).expect("docker hub"),
        "docker hub",
        "",
    ));
    let probes = endpoints
        .iter()
        .map(|(base, _, _)| images::probe(base, REGISTRY_TIMEOUT));
    let probes = futures_util::future::join_all(probes).await;
    endpoints
        .into_iter()
        .zip(probes)
        .map(|((url, role, source), probe)| RegistryReport {
            url,
            role,
            source,
            probe,
        })
        .collect()
}

fn registry_text(r: &RegistryReport) -> (&'static str, String) {
    let label = if r.role == "mirror" {
        "mirror"
    } else {
        "registry"
    };
    let verdict = match (&r.probe.status, &r.probe.error) {
        (Some(status), _) => format!(
            "{:<12} {} (HTTP {status}, {} ms){}",
            "reachable",
            r.url,
            r.probe.millis,
            source_note(r)
        ),
        (None, error) => format!(
            "{:<12} {} ({}){}",
            "unreachable",
            r.url,
            error.as_deref().unwrap_or("no answer"),
            source_note(r)
        ),
    };
    (label, verdict)
}

fn source_note(r: &RegistryReport) -> String {
    if r.source.is_empty() {
        String::new()
    } else {
        format!("; from {}", r.source)
    }
}

fn backend_json(r: &BackendReport) -> Value {
    json!({
        "name": r.name,
        "status": r.status,
        "ready": r.status == "ready",
        "detail": r.detail,
        "fix": r.fix,
        "run": r.run.as_ref().map(|run| json!({
            "image": run.image,
            "command": ["true"],
            "millis": run.millis,
            "exit_code": run.exit_code,
            "error": run.error,
        })),
    })
}

fn registry_json(r: &RegistryReport) -> Value {
    json!({
        "url": r.url,
        "role": r.role,
        "source": (!r.source.is_empty()).then_some(r.source),
        "reachable": r.probe.status.is_some(),
        "http_status": r.probe.status,
        "millis": r.probe.millis,
        "error": r.probe.error,
    })
}
