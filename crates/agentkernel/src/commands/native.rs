//! `agentkernel run -B native`: find the image in agentkernel's own store
//! (pulling it if the policy allows), turn the spec into a plan, and re-exec
//! as the single-threaded sandbox helper, which runs it and exits with the
//! command's code.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::os::unix::process::CommandExt;

use agentkernel_core::config::Config;
use agentkernel_core::egress::SecretValues;
use agentkernel_core::spec::{ExecRequest, SandboxSpec};
use agentkernel_core::state::Store;
use agentkernel_core::{Error, Result};
use agentkernel_native::plan::Action;
use agentkernel_native::prepare::{self, ImageRoot, HOST_IMAGE};
use agentkernel_native::{join, kept, rootless, sandbox, Plan, HELPER_SUBCOMMAND};

/// Runs a one-shot sandbox. On success this never returns: the process
/// becomes the helper.
pub async fn run(
    spec: &SandboxSpec,
    config: &Config,
    store: &Store,
    secrets: &SecretValues,
    secret_files: Vec<agentkernel_native::plan::SecretFile>,
) -> Result<i32> {
    if let Some(keep) = spec.keep.as_ref().filter(|k| k.reuse) {
        if let Some(record) = existing(store, &keep.name).await? {
            if record.backend != "native" {
                return Err(Error::Conflict(format!(
                    "sandbox {} exists on the {} backend; use -B {} to reuse it, or remove it first",
                    keep.name, record.backend, record.backend
                )));
            }
            super::egress::refuse_on_reuse(spec, &keep.name)?;
            return exec_in(store, &keep.name, &spec.exec, Some(keep.ttl), true).await;
        }
    }
    if rootless::UserMap::for_caller().is_some() {
        // Before the image: a run that cannot happen costs no download.
        prepare::check_rootless_spec(spec)?;
    }
    let image = image_root(spec, config).await?;
    let mut plan = prepare::plan(spec, &image, store)?;
    plan.secret_files = secret_files;
    if let Some(egress) = spec.egress.as_ref().filter(|e| e.needs_proxy()) {
        // Last, just before the helper: nothing after it can fail but the
        // exec, and the proxy ends with this process if that fails.
        let started = super::egress::start(egress, secrets).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&plan.scratch);
        })?;
        plan.egress = Some(started.into_plan().map_err(|e| Error::Backend {
            backend: "egress proxy",
            message: e.to_string(),
        })?);
    }
    hand_over(plan, store).await
}

/// `sandbox create` on native: the kept sandbox without a first command
/// (the helper sees an empty argv). `mark` runs once the name is reserved
/// (`--no-start` marks it stopped: with no command, only its init runs,
/// which is what a stopped sandbox is). Never returns on success.
pub async fn create(
    spec: &SandboxSpec,
    config: &Config,
    store: &Store,
    mark: impl FnOnce() -> Result<()>,
) -> Result<i32> {
    if rootless::UserMap::for_caller().is_some() {
        prepare::check_rootless_spec(spec)?;
    }
    let image = image_root(spec, config).await?;
    let mut plan = prepare::plan(spec, &image, store)?;
    plan.argv.clear();
    if let Err(e) = mark() {
        let _ = std::fs::remove_dir_all(&plan.scratch);
        let _ = store.forget(&spec.keep.as_ref().expect("kept").name);
        return Err(e);
    }
    hand_over(plan, store).await
}

/// Hands `plan` to the helper (see `exec_helper`); on failure removes what
/// the plan reserved.
async fn hand_over(plan: Plan, store: &Store) -> Result<i32> {
    let result = exec_helper(&plan).await;
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&plan.scratch);
        if let Some(keep) = &plan.keep {
            let _ = store.forget(&keep.name);
        }
    }
    result
}

/// For `--branch`: the sandbox's record, waiting for a concurrent creator
/// that holds the name but has not committed yet.
async fn existing(
    store: &Store,
    name: &str,
) -> Result<Option<agentkernel_core::state::SandboxRecord>> {
    for _ in 0..100 {
        if let Some(record) = store.load(name)? {
            return Ok(Some(record));
        }
        if !store.sandbox_dir(name).exists() {
            return Ok(None);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Ok(None)
}

/// `agentkernel exec NAME` (and `run --branch` reusing NAME): the kept
/// sandbox's plan with this command, run by the helper. Never returns on
/// success.
pub async fn exec_in(
    store: &Store,
    name: &str,
    request: &ExecRequest,
    ttl: Option<std::time::Duration>,
    reused: bool,
) -> Result<i32> {
    let path = kept::plan_file(store, name);
    let data = std::fs::read(&path).map_err(|e| Error::state(&path, e))?;
    let sandbox: Plan =
        serde_json::from_slice(&data).map_err(|e| Error::state(&path, std::io::Error::other(e)))?;
    let mut plan = prepare::for_command(&sandbox, request);
    if let Some(keep) = plan.keep.as_mut() {
        keep.ttl = ttl.unwrap_or(keep.ttl);
        keep.reused = reused;
    }
    exec_helper(&plan).await
}

async fn image_root(spec: &SandboxSpec, config: &Config) -> Result<ImageRoot> {
    if spec.image == HOST_IMAGE {
        return Ok(ImageRoot::default());
    }
    let image = super::image::fetch_for_run(spec, config).await?;
    agentkernel_core::observe::image_digest(agentkernel_core::image::pinned(
        &spec.image,
        image.manifest_digest.as_str(),
    ));
    // Rootless overlayfs reads opaque directories from the `user.*` xattrs
    // an unprivileged unpack leaves; whiteouts it cannot do without.
    let rootless = rootless::UserMap::for_caller().is_some();
    if image
        .markers
        .iter()
        .any(|m| !m.whiteouts.is_empty() || (!rootless && !m.opaque_dirs.is_empty()))
    {
        return Err(Error::Image {
            image: spec.image.clone(),
            why: "its layers were unpacked without root, so overlayfs cannot show their deletions"
                .into(),
            fix: "remove it with `agentkernel image rm` and pull it again as root".into(),
        });
    }
    Ok(ImageRoot {
        layers: image.layers,
        env: image.config.env,
        entrypoint: image.config.entrypoint,
        cmd: image.config.cmd,
        working_dir: image.config.working_dir,
        user: image.config.user,
    })
}

/// Hands the plan to a fresh copy of ourselves on an inherited memfd: by
/// exec (never returns on success), or, when a receipt observes the run, as
/// a child whose output passes through us (`native_observed`).
async fn exec_helper(plan: &Plan) -> Result<i32> {
    let fail = |why: String| {
        Err(Error::Backend {
            backend: "native",
            message: why,
        })
    };
    let json = match serde_json::to_vec(plan) {
        Ok(j) => j,
        Err(e) => return fail(format!("cannot encode the sandbox plan: {e}")),
    };
    let name = c"agentkernel-plan";
    // SAFETY: a valid C string; the new fd is owned by `file` below. No
    // MFD_CLOEXEC: the helper inherits it across exec.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
    if fd < 0 {
        return fail(format!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: just created, ours.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    if let Err(e) = file.write_all(&json) {
        return fail(format!("cannot write the sandbox plan: {e}"));
    }
    let fd = file.into_raw_fd();
    let _ = std::io::stdout().flush();
    let mut helper = std::process::Command::new("/proc/self/exe");
    helper
        .arg0("agentkernel")
        .arg(HELPER_SUBCOMMAND)
        .arg(fd.to_string());
    if agentkernel_core::observe::enabled() {
        return super::native_observed::run(helper, plan.tty).await;
    }
    agentkernel_native::trace::phase("cli execs the helper");
    let e = helper.exec();
    fail(format!("cannot start the sandbox helper: {e}"))
}

/// `agentkernel __native-sandbox <fd>`: the helper's entry point, reached
/// before any runtime or thread exists. Returns the exit code.
pub fn helper(fd_arg: Option<String>, report_fd: Option<String>) -> i32 {
    run_helper(fd_arg, &mut |report| {
        super::native_observed::send_report(report_fd.as_deref(), report)
    })
}

fn run_helper(
    fd_arg: Option<String>,
    report: &mut dyn FnMut(super::native_observed::HelperReport),
) -> i32 {
    let plan = match read_plan(fd_arg) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("agentkernel: {e}");
            report(super::native_observed::HelperReport::Failed(e));
            return crate::EXIT_AGENTKERNEL_ERROR;
        }
    };
    // A rootless sandbox is built inside a user namespace of its own (an
    // `exec` joins the kept sandbox's one instead).
    if let (Some(map), Action::Run | Action::CreateKept) = (&plan.rootless, &plan.action) {
        if let Err(e) = rootless::enter_user_namespace(map) {
            eprintln!("agentkernel: native (rootless): {e}");
            report(super::native_observed::HelperReport::Failed(format!(
                "native (rootless): {e}"
            )));
            let _ = std::fs::remove_dir_all(&plan.scratch);
            return crate::EXIT_AGENTKERNEL_ERROR;
        }
    }
    let outcome = match plan.action {
        Action::Run => sandbox::run(&plan),
        Action::CreateKept => kept::create(&plan).and_then(|()| {
            super::template::native_setup(&plan);
            if plan.argv.is_empty() {
                // `sandbox create`: no first command.
                return Ok(agentkernel_core::spec::Outcome::Exited(0));
            }
            let mut first = plan.clone();
            first.action = Action::Exec;
            join::exec(&first)
        }),
        Action::Exec => join::exec(&plan),
    };
    if let (Some(keep), Action::CreateKept | Action::Exec) = (&plan.keep, &plan.action) {
        let reused = keep.reused;
        if plan.action == Action::CreateKept || reused {
            eprintln!(
                "{}",
                agentkernel_core::spec::kept_message(&keep.name, keep.ttl, reused)
            );
        }
    }
    match outcome {
        Ok(outcome) => {
            report(super::native_observed::HelperReport::Ended(outcome));
            super::finish(outcome, plan.limits.memory_bytes, plan.timeout)
        }
        Err(e) => {
            eprintln!("agentkernel: native: {e}");
            report(super::native_observed::HelperReport::Failed(format!(
                "native: {e}"
            )));
            crate::EXIT_AGENTKERNEL_ERROR
        }
    }
}

fn read_plan(fd_arg: Option<String>) -> std::result::Result<Plan, String> {
    let fd: i32 = fd_arg
        .and_then(|f| f.parse().ok())
        .filter(|fd| *fd > 2)
        .ok_or("the sandbox helper is internal; use `agentkernel run -B native`")?;
    // SAFETY: the fd was inherited from the run process that exec'd us and is
    // used only here.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut json = Vec::new();
    std::io::Seek::rewind(&mut file)
        .and_then(|_| file.read_to_end(&mut json))
        .map_err(|e| format!("cannot read the sandbox plan: {e}"))?;
    serde_json::from_slice(&json).map_err(|e| format!("bad sandbox plan: {e}"))
}
