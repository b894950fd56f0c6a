//! `agentkernel sandbox create [NAME]`: upstream's create step of
//! create → exec → stop → remove. The sandbox is resolved exactly as
//! `run --keep` resolves one (same flags, config, trust and checks), then
//! built without a first command.

use std::path::PathBuf;

use agentkernel_core::backend::RunOptions;
use agentkernel_core::config::Config;
use agentkernel_core::egress::SecretValues;
use agentkernel_core::spec::kept_message;
use agentkernel_core::state::Store;
use agentkernel_core::{Error, Result};

use crate::backend;
use crate::cli::{CreateArgs, RunArgs};

pub async fn create(args: CreateArgs) -> Result<i32> {
    let unsupported = [
        (args.source.is_some(), "--source"),
        (args.git_ref.is_some(), "--git-ref"),
        (!args.label.is_empty(), "--label"),
    ];
    if let Some((_, flag)) = unsupported.iter().find(|(given, _)| *given) {
        return Err(Error::not_supported(*flag));
    }
    let cwd = match &args.dir {
        Some(dir) => dir.clone(),
        None => std::env::current_dir()
            .map_err(|e| Error::invalid("current directory", ".", e.to_string()))?,
    };
    let cwd = cwd
        .canonicalize()
        .map_err(|e| Error::invalid("--dir", cwd.to_string_lossy(), e.to_string()))?;
    let mut config = Config::load(&cwd, args.config.as_deref())?;
    // config files < template < flags, as for `run`
    let template = match args.template.as_deref() {
        Some(t) => Some(super::template::apply(t, &mut config).await?),
        None => None,
    };
    for notice in &config.notices {
        eprintln!("agentkernel: notice: {notice}");
    }
    if let Some(agent) = &args.agent {
        eprintln!(
            "agentkernel: notice: --agent {agent} has no effect: the image is what the sandbox runs (--image)"
        );
    }
    let kind = backend::choose(args.backend.as_deref(), config.backend.as_deref())?;
    if args.ssh {
        // The SSH server is started by the run path; create has none yet.
        return Err(agentkernel_core::Error::not_supported_hint(
            "--ssh on `sandbox create`",
            "create it with `agentkernel run --ssh --name NAME -- true` instead",
        ));
    }
    let store = Store::open_default();
    let backend = backend::open(kind, &store)?;
    let no_start = args.no_start;
    let build =
        super::image_build::plan(&mut config, args.image.is_some(), template.as_ref(), kind)?;
    let (mut spec, _, notice, _) = super::run::resolve(
        run_args(args),
        &config,
        &cwd,
        &backend.capabilities(),
        template,
    )?;
    if spec.egress.is_some() {
        // Secret files are written by the first command's start-up and the
        // proxy by the run path; a command-less create has neither yet.
        return Err(agentkernel_core::Error::not_supported_hint(
            "secrets and egress options on `sandbox create`",
            "create it with `agentkernel run --keep --name NAME …` instead",
        ));
    }
    super::image_build::pin(&build, &mut spec);
    let files = super::image_build::prepare(&build, &config, backend.as_ref()).await?;
    let keep = spec.keep.clone().expect("create always keeps");
    // `--no-start`: created stopped. A new sandbox runs no command, so only
    // what holds it runs: stopped is a matter of marking it.
    let mark = || {
        if no_start {
            super::sandbox_lifecycle::mark_stopped(&store, &keep.name)?;
        }
        Ok(())
    };
    let options = RunOptions {
        config: &config,
        warm_pool: false,
        notice,
        secrets: &SecretValues::default(),
        secret_files: Vec::new(),
        files,
    };
    // Native never returns on success: its helper creates the sandbox.
    backend.create(&spec, &options, &mark).await?;
    eprintln!("{}", kept_message(&keep.name, keep.ttl, false));
    Ok(0)
}

/// The `run --keep` arguments `create` stands for: no command.
fn run_args(args: CreateArgs) -> RunArgs {
    RunArgs {
        image: args.image,
        profile: args.profile,
        keep: true,
        fast: None,
        config: args.config,
        backend: args.backend,
        template: args.template,
        ttl: args.ttl,
        branch: args.branch,
        name: args.name,
        no_network: args.no_network,
        publish: args.publish,
        ssh: args.ssh,
        ssh_port: None,
        ssh_authorized_keys: None,
        ssh_accept_env: Vec::new(),
        secret: args.secret,
        secret_file: args.secret_file,
        placeholder_secrets: args.placeholder_secrets,
        allow_host: Vec::new(),
        egress_log: None,
        receipt: None::<PathBuf>,
        receipt_format: None,
        env: args.env,
        workdir: args.workdir,
        volume: args.volume,
        memory: args.memory,
        cpus: args.cpus,
        disk: args.disk,
        timeout: None,
        pull: args.pull,
        dry_run: false,
        command: Vec::new(),
    }
}
