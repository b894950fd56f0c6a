//! `agentkernel run`: flags + config files + cwd/git → one `SandboxSpec`, then
//! the backend runs it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use agentkernel_core::backend::{Backend, BackendKind, Capabilities, RunOptions};
use agentkernel_core::config::Config;
use agentkernel_core::egress::SecretValues;
use agentkernel_core::image::{self, ImageSource};
use agentkernel_core::policy::{Limits, Policy, Seccomp};
use agentkernel_core::spec::{
    ExecRequest, Keep, PullPolicy, SandboxSpec, Workspace, WORKSPACE_PATH,
};
use agentkernel_core::state::Store;
use agentkernel_core::{git, names, parse, paths, Error, Result};

use crate::backend;
use crate::cli::RunArgs;

const DEFAULT_TTL: Duration = Duration::from_secs(3600);

pub async fn run(args: RunArgs) -> Result<i32> {
    agentkernel_docker::stdio::install_signal_handlers();
    let cwd = std::env::current_dir()
        .and_then(|d| d.canonicalize())
        .map_err(|e| Error::invalid("current directory", ".", e.to_string()))?;
    let mut config = Config::load(&cwd, args.config.as_deref())?;
    agentkernel_native::trace::phase("cli: config loaded");
    // config files < template < flags
    let template = match args.template.as_deref() {
        Some(t) => Some(super::template::apply(t, &mut config).await?),
        None => None,
    };
    for notice in &config.notices {
        eprintln!("agentkernel: notice: {notice}");
    }
    let kind = backend::choose(args.backend.as_deref(), config.backend.as_deref())?;
    let store = Store::open_default();
    let backend = backend::open(kind, &store)?;
    let capabilities = backend.capabilities();
    agentkernel_native::trace::phase("cli: backend opened");
    // The pool serves one-shot runs without published ports; those take the
    // normal path (explicit combinations are refused in `reject_unsupported`).
    // On by default, except native's pool, which is opt-in (`--fast` or
    // `fast = true`): a cold native start is already milliseconds, and
    // every warm sandbox holds a network namespace, a cgroup and an overlay
    // while it waits.
    let fast = args
        .fast
        .or(config.fast)
        .unwrap_or(kind != BackendKind::Native);
    let dry_run = args.dry_run;
    let receipt = args.receipt.clone().map(|path| crate::receipt::Request {
        path,
        dsse: args.receipt_format.as_deref() == Some("dsse"),
    });
    let ssh = args.ssh.then(|| crate::ssh::SshOptions {
        port: args.ssh_port,
        authorized_keys: args.ssh_authorized_keys.clone(),
        accept_env: args.ssh_accept_env.clone(),
    });
    let image_from_template = template.as_ref().is_some_and(|t| t.sets_image);
    let build =
        super::image_build::plan(&mut config, args.image.is_some(), template.as_ref(), kind)?;
    let (mut spec, image_source, notice, secret_values) =
        resolve(args, &config, &cwd, &capabilities, template)?;
    super::image_build::pin(&build, &mut spec);
    agentkernel_native::trace::phase("cli: spec resolved");
    // A warm container has neither a fresh build nor the `[[files]]`.
    let warm_pool = fast
        && build.is_none()
        && config.files.is_empty()
        && spec.keep.is_none()
        && spec.egress.is_none()
        && spec.ports.is_empty()
        && capabilities.warm_pool;
    if dry_run {
        let mut resolved = dry_run_json(&spec, image_source, kind, warm_pool);
        super::image_build::describe(&build, &config, &mut resolved);
        if image_from_template && image_source == ImageSource::Config {
            resolved["image_source"] = "template".into();
        }
        super::print_stdout(format!("{resolved:#}\n").as_bytes())?;
        return Ok(0);
    }
    agentkernel_core::backend::admit_egress(&capabilities, &spec)?;
    let files = super::image_build::prepare(&build, &config, backend.as_ref()).await?;
    let options = RunOptions {
        config: &config,
        warm_pool,
        notice,
        secrets: &secret_values,
        secret_files: Vec::new(),
        files,
    };
    let Some(request) = receipt else {
        return execute(&spec, backend.as_ref(), options, &store, ssh.as_ref()).await;
    };
    // From here on the sandbox is requested: whatever happens, a receipt.
    let mut invocation = crate::receipt::Invocation::for_run(&spec, kind.name(), warm_pool)?;
    if !options.files.is_empty() {
        invocation.sandbox["files"] = crate::receipt::files_facts(&options.files);
    }
    let recording = crate::receipt::Recording::start(request, invocation);
    let result = execute(&spec, backend.as_ref(), options, &store, ssh.as_ref()).await;
    recording.finish(result)
}

async fn execute(
    spec: &SandboxSpec,
    backend: &dyn Backend,
    mut options: RunOptions<'_>,
    store: &Store,
    ssh: Option<&crate::ssh::SshOptions>,
) -> Result<i32> {
    if let Some(keep) = spec.keep.as_ref().filter(|k| k.reuse) {
        // `--branch` reusing a stopped sandbox starts it again.
        super::sandbox_lifecycle::clear_stopped(store, &keep.name)?;
    }
    if let (Some(ssh), Some(keep)) = (ssh, &spec.keep) {
        crate::ssh::launch(store, &keep.name, ssh)?;
    }
    options.secret_files =
        agentkernel_core::secrets::file_contents(spec.egress.as_ref(), options.secrets);
    let outcome = backend.run(spec, &options).await?;
    Ok(super::finish(
        outcome,
        spec.policy.limits.memory_bytes,
        spec.exec.timeout,
    ))
}

/// Turns flags and config into a spec, rejecting every invalid or
/// not-yet-supported combination before anything is created.
/// The template (`--template`, already laid over `config`) is attached
/// next; last, the backend's `capabilities` decide what it cannot honour here
/// (`backend::admit`: refused when asked for; a profile default, or a
/// template's limit, is dropped, with the notice returned for the backend to
/// print once the run goes ahead).
pub fn resolve(
    args: RunArgs,
    config: &Config,
    cwd: &Path,
    capabilities: &Capabilities,
    template: Option<super::template::Applied>,
) -> Result<(SandboxSpec, ImageSource, Option<String>, SecretValues)> {
    reject_unsupported(&args)?;
    let limit_flags = (args.memory.is_some(), args.cpus.is_some());

    let argv = super::utf8_command(args.command)?;
    let profile = match args.profile.as_deref() {
        Some(p) => p.parse()?,
        None => config.profile.unwrap_or_default(),
    };
    let memory = args
        .memory
        .as_deref()
        .map(|m| parse::byte_size("--memory", m))
        .transpose()?;
    let cpus = args.cpus.as_deref().map(parse::cpus).transpose()?;
    let disk = args
        .disk
        .as_deref()
        .map(|d| parse::byte_size("--disk", d))
        .transpose()?;
    let limits = Limits {
        memory_bytes: memory.or(config.memory_bytes),
        cpus: cpus.or(config.cpus),
        pids: config.pids,
        disk_bytes: disk.or(config.disk_bytes),
    };
    let no_network = args.no_network || config.network == Some(false);
    let mut policy = Policy::for_profile(profile).with_overrides(no_network, limits);
    // A profile's CPU limit means "at most N": on a smaller host, all of it.
    if limits.cpus.is_none() {
        let available = std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64);
        policy.limits.cpus = policy.limits.cpus.map(|c| c.min(available));
    }
    // `--no-network` wins over a file's `true`, as every flag wins over config.
    if config.network == Some(true) && !policy.network && !args.no_network {
        // `[network] enabled = true` cannot undo a profile without network; say so rather than ignore it.
        return Err(Error::Conflict(format!(
            "config sets network.enabled (or security.network) = true but the {profile} profile has no network; choose --profile moderate or drop the key"
        )));
    }

    check_upstream_security(config, &policy)?;

    if let Some(image) = &args.image {
        image::validate_reference(image)?;
    }
    let (image, source) = image::detect(args.image.as_deref(), config.image.as_deref(), &argv, cwd);
    if source == ImageSource::Config {
        image::validate_reference(&image)?;
    }

    let flag_ports = args
        .publish
        .iter()
        .map(|p| parse::port(p))
        .collect::<Result<Vec<_>>>()?;
    let flag_volumes = args
        .volume
        .iter()
        .map(|v| parse::volume(v, cwd))
        .collect::<Result<Vec<_>>>()?;
    agentkernel_core::trust::check(
        config,
        &agentkernel_core::trust::Flags {
            profile: args.profile.as_deref().map(str::parse).transpose()?,
            memory: args.memory.is_some(),
            cpus: args.cpus.is_some(),
            disk: args.disk.is_some(),
            timeout: args.timeout.is_some(),
            no_network: args.no_network,
            volumes: &flag_volumes,
            ports: &flag_ports,
        },
    )?;
    check_limits_fit_host(args.memory.is_some(), args.cpus.is_some(), &limits)?;

    // A flag repeating the config's port or volume confirms it (see trust::Flags).
    let mut ports = config.ports.clone();
    ports.retain(|p| !flag_ports.contains(p));
    ports.extend(flag_ports);
    parse::reject_duplicate_ports(&ports)?;
    if let (Some(file), false) = (&config.require_encrypted_ports, ports.is_empty()) {
        return Err(Error::not_supported_hint(
            format!(
                "{}: security.transport.require_encrypted = true with published ports",
                file.display()
            ),
            "published ports are plain TCP/UDP; drop the ports or the key",
        ));
    }
    if !ports.is_empty() && !policy.network {
        return Err(Error::Conflict(format!(
            "--publish needs a network, but the sandbox has none ({}); drop --no-network or use --profile moderate",
            if args.no_network { "--no-network" } else { profile.as_str() }
        )));
    }

    let mut env: Vec<(String, String)> = config
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for e in &args.env {
        let (k, v) = parse::env_pair(e)?;
        env.retain(|(old, _)| *old != k);
        env.push((k, v));
    }
    let secret_request = agentkernel_core::secrets::Request {
        flags: &args.secret,
        config: &config.secret_bindings,
        files: &args.secret_file,
        placeholders: args.placeholder_secrets,
        network: policy.network,
    };
    let (egress, secret_values) = super::secret::for_run(&secret_request, &mut env)?;
    let mut volumes = config.volumes.clone();
    volumes.retain(|v| !flag_volumes.contains(v));
    volumes.extend(flag_volumes);

    let home = paths::home_dir().and_then(|h| h.canonicalize().ok());
    // `[security] mount_cwd = false`: no view of the project at all.
    let workspace = match config.mount_cwd {
        Some(false) => None,
        _ => workspace_for(cwd, home.as_deref()),
    };
    let workdir = match args.workdir.or_else(|| config.workdir.clone()) {
        Some(w) if !w.starts_with('/') => {
            return Err(Error::invalid("--workdir", w, "must be an absolute path"))
        }
        Some(w) => Some(w),
        None => workspace.as_ref().map(|w| w.path_in_sandbox.clone()),
    };
    let home = if policy.mount_home_read_only && config.mount_home != Some(false) {
        home
    } else {
        None
    };

    let timeout = match args.timeout.as_deref() {
        Some(t) => Some(parse::duration("--timeout", t)?),
        None => config.timeout,
    };
    let pull = match args.pull.as_deref() {
        Some(p) => p.parse()?,
        None => config.pull.unwrap_or(PullPolicy::Missing),
    };
    let keep = resolve_keep(
        args.keep || args.ssh,
        args.ttl.as_deref(),
        args.branch,
        args.name,
        config,
        cwd,
    )?;

    let egress = super::egress::resolve(
        egress,
        &args.allow_host,
        args.egress_log.as_deref(),
        config,
        &policy,
        &ports,
        cwd,
    )?;
    let mut spec = SandboxSpec {
        image,
        pull,
        policy,
        workspace,
        home,
        volumes,
        ports,
        keep,
        egress,
        template: None,
        exec: ExecRequest {
            argv,
            env,
            workdir,
            tty: super::wants_tty(),
            timeout,
            user: None,
        },
    };
    if let Some(applied) = template {
        super::template::attach(&mut spec, applied, limit_flags);
    }
    let notice = agentkernel_core::backend::admit(capabilities, &mut spec)?;
    Ok((spec, source, notice, secret_values))
}

/// `run --dry-run`: what would run, as JSON. Environment values are left out
/// (they are often secrets); their names are enough to check a config.
fn dry_run_json(
    spec: &SandboxSpec,
    image_source: ImageSource,
    backend: BackendKind,
    use_pool: bool,
) -> serde_json::Value {
    use serde_json::json;
    let source = match image_source {
        ImageSource::Flag => "flag",
        ImageSource::Config => "config",
        ImageSource::Command => "command",
        ImageSource::ProjectFile => "project-file",
        ImageSource::Default => "default",
    };
    let pull = match spec.pull {
        PullPolicy::Missing => "missing",
        PullPolicy::Always => "always",
        PullPolicy::Never => "never",
    };
    let mounts: Vec<serde_json::Value> = spec
        .workspace
        .iter()
        .map(|w| {
            json!({"host": w.host, "path": w.path_in_sandbox, "kind": "workspace",
                   "mode": spec.policy.workspace})
        })
        .chain(
            spec.home
                .iter()
                .map(|h| json!({"host": h, "path": h, "kind": "home", "mode": "read-only"})),
        )
        .chain(spec.volumes.iter().map(|v| {
            json!({"host": v.host, "path": v.container, "kind": "volume",
                   "mode": if v.read_only { "read-only" } else { "read-write" }})
        }))
        .collect();
    let ports: Vec<serde_json::Value> = spec
        .ports
        .iter()
        .map(|p| {
            json!({"host_ip": p.host_ip, "host_port": p.host_port,
                   "container_port": p.container_port, "protocol": p.protocol.as_str()})
        })
        .collect();
    json!({
        "backend": backend.name(),
        "image": spec.image,
        "image_source": source,
        "pull": pull,
        "profile": spec.policy.profile.as_str(),
        "policy": spec.policy,
        "mounts": mounts,
        "env": spec.exec.env.iter().map(|(k, _)| k).collect::<Vec<_>>(),
        "ports": ports,
        "argv": spec.exec.argv,
        "workdir": spec.exec.workdir,
        "timeout_secs": spec.exec.timeout.map(|t| t.as_secs_f64()),
        "keep": spec.keep.as_ref().map(|k| json!({
            "name": k.name, "ttl_secs": k.ttl.as_secs(), "reuse": k.reuse, "setup": k.setup,
        })),
        "template": spec.template,
        "pool": use_pool,
        "egress": spec.egress,
    })
}

/// Explicit limits above what this machine has would be no limit at all (or a
/// container that cannot start): refuse them, naming the figure.
fn check_limits_fit_host(memory_flag: bool, cpus_flag: bool, limits: &Limits) -> Result<()> {
    if let Some(memory) = limits.memory_bytes {
        let what = if memory_flag {
            "--memory"
        } else {
            "resources.memory"
        };
        let physical = host_memory_bytes();
        if memory > physical {
            return Err(Error::Conflict(format!(
                "{what} {}: this machine has {} of memory; give at most that",
                parse::format_bytes(memory),
                parse::format_bytes(physical)
            )));
        }
    }
    if let Some(cpus) = limits.cpus {
        let what = if cpus_flag {
            "--cpus"
        } else {
            "resources.cpus"
        };
        let online = online_cpus();
        if cpus > online as f64 {
            return Err(Error::Conflict(format!(
                "{what} {cpus}: this machine has {online} CPU{}; give at most {online}",
                if online == 1 { "" } else { "s" }
            )));
        }
    }
    Ok(())
}

fn host_memory_bytes() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let (pages, page_size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (pages.max(0) as u64).saturating_mul(page_size.max(0) as u64)
}

fn online_cpus() -> u64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as u64
}

/// The current directory at /workspace, except `/` and `$HOME` itself, which
/// would expose far more than a project.
fn workspace_for(cwd: &Path, home: Option<&Path>) -> Option<Workspace> {
    if cwd == Path::new("/") || Some(cwd) == home {
        eprintln!(
            "agentkernel: warning: not mounting {} at {WORKSPACE_PATH} (it is / or your home directory); run from a project directory",
            cwd.display()
        );
        return None;
    }
    Some(Workspace {
        host: PathBuf::from(cwd),
        path_in_sandbox: WORKSPACE_PATH.to_string(),
    })
}

fn resolve_keep(
    keep: bool,
    ttl: Option<&str>,
    branch: bool,
    name: Option<String>,
    config: &Config,
    cwd: &Path,
) -> Result<Option<Keep>> {
    let explicit_ttl = ttl.map(|t| parse::ttl("--ttl", t)).transpose()?;
    if !(keep || branch || name.is_some() || explicit_ttl.is_some()) {
        return Ok(None);
    }
    if branch && name.is_some() {
        return Err(Error::Conflict(
            "--branch and --name both name the sandbox; use one".into(),
        ));
    }
    let name = match (branch, name) {
        (true, _) => {
            let (project, branch) = git::project_and_branch(cwd)?;
            names::for_branch(&project, &branch)?
        }
        (false, Some(n)) => {
            names::validate(&n)?;
            n
        }
        (false, None) => match &config.name {
            // `[sandbox] name` (upstream's required key) names it when no flag does.
            Some(n) => {
                names::validate(n).map_err(|_| {
                    Error::invalid(
                        "[sandbox] name",
                        n.clone(),
                        format!("{}; change it or pass --name", names::RULE),
                    )
                })?;
                n.clone()
            }
            None => names::generated(),
        },
    };
    Ok(Some(Keep {
        name,
        ttl: explicit_ttl.or(config.ttl).unwrap_or(DEFAULT_TTL),
        reuse: branch,
        setup: Vec::new(),
    }))
}

/// Upstream's `[security]` keys that depend on the resolved policy: accepted
/// where our sandbox is at least as strict as they ask, refused where
/// ignoring them would leave it weaker.
fn check_upstream_security(config: &Config, policy: &Policy) -> Result<()> {
    let profile = policy.profile;
    match config.read_only_root {
        Some(true) if !policy.read_only_root => {
            return Err(Error::not_supported_hint(
                format!("security.read_only = true under the {profile} profile"),
                "use profile = \"restrictive\" (read-only root) or drop the key",
            ))
        }
        Some(false) if policy.read_only_root => eprintln!(
            "agentkernel: notice: security.read_only = false is ignored: the {profile} profile keeps the root read-only"
        ),
        _ => {}
    }
    if config.mount_home == Some(true) && !policy.mount_home_read_only {
        eprintln!(
            "agentkernel: notice: security.mount_home = true is ignored: the {profile} profile does not show your home directory"
        );
    }
    // Upstream's filters, weakest first: "default" blocks what ours blocks
    // everywhere; "moderate" adds ptrace, which only our restrictive filter
    // denies; "restrictive", "ai-agent" and custom files are allow-lists we
    // do not have.
    match config.seccomp.as_deref() {
        None | Some("default") => {}
        Some("moderate") if policy.seccomp == Seccomp::Restrictive => {}
        Some(other) => {
            return Err(Error::not_supported_hint(
                format!("security.seccomp = {other:?} under the {profile} profile"),
                "our filters are \"default\" (every profile) and \"moderate\" (restrictive profile); use one of those or drop the key",
            ))
        }
    }
    if let Some(rule) = config.unenforced_egress_rules.first() {
        if policy.network {
            return Err(Error::not_supported_hint(
                format!("{rule} (domain filtering)"),
                "egress is not filtered by domain yet: use --no-network (or profile = \"restrictive\") or drop the rule",
            ));
        }
        for rule in &config.unenforced_egress_rules {
            eprintln!("agentkernel: notice: {rule} has no effect: the sandbox has no network");
        }
    }
    Ok(())
}

/// Options that are specified but not built yet: validated, then refused.
fn reject_unsupported(args: &RunArgs) -> Result<()> {
    // The seed: ports and the pool do not mix; say so when both were asked for.
    let fast_requested = args.fast == Some(true);
    if fast_requested && !args.publish.is_empty() {
        return Err(Error::Conflict(
            "--publish cannot be used with --fast (the warm pool); use --fast=false or leave --fast out".into(),
        ));
    }
    if fast_requested
        && (args.keep || args.ssh || args.branch || args.name.is_some() || args.ttl.is_some())
    {
        return Err(Error::Conflict(
            "--fast (the warm pool) serves one-shot runs; a kept sandbox is always created afresh, so drop --fast".into(),
        ));
    }
    if let Some(receipt) = &args.receipt {
        let parent = receipt
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !parent.is_dir() {
            return Err(Error::invalid(
                "--receipt",
                receipt.to_string_lossy(),
                "its directory does not exist",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentkernel_core::policy::Profile;

    #[test]
    fn home_and_root_are_not_mounted() {
        assert!(workspace_for(Path::new("/"), None).is_none());
        assert!(workspace_for(Path::new("/home/u"), Some(Path::new("/home/u"))).is_none());
        assert!(workspace_for(Path::new("/home/u/p"), Some(Path::new("/home/u"))).is_some());
    }

    #[test]
    fn profile_default_is_moderate() {
        assert_eq!(Profile::default(), Profile::Moderate);
    }
}
