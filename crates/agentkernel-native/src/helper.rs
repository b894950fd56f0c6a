//! The hand-off from the `agentkernel run`/`exec` process to the sandbox
//! helper: the plan is written to a memfd and the binary re-executes itself
//! as `agentkernel __native-sandbox <fd>`, which `main()` routes to
//! [`main`] before clap or tokio exist, so the helper is single-threaded and
//! may fork safely.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::os::unix::process::CommandExt;

use crate::error::{Error, HandoffError};
use agentkernel_core::exit::{finish, AGENTKERNEL_ERROR};
use agentkernel_core::spec::ExecRequest;
use agentkernel_core::state::Store;
use agentkernel_core::template;

use crate::observed::HelperReport;
use crate::plan::Action;
use crate::{join, kept, prepare, process, rootless, Plan, HELPER_SUBCOMMAND};

/// One more command in the kept sandbox `name`: its plan with this command,
/// run by the helper. Never returns on success unless a receipt observes it
/// (see `exec_helper`).
pub async fn exec_in(
    store: &Store,
    name: &str,
    request: &ExecRequest,
    ttl: Option<std::time::Duration>,
    reused: bool,
) -> agentkernel_core::Result<i32> {
    let plan = command_plan(store, name, request, ttl, reused)?;
    exec_helper(&plan).await
}

/// The kept sandbox's plan with this command in it.
fn command_plan(
    store: &Store,
    name: &str,
    request: &ExecRequest,
    ttl: Option<std::time::Duration>,
    reused: bool,
) -> agentkernel_core::Result<Plan> {
    let path = kept::plan_file(store, name);
    let sandbox: Plan = std::fs::read(&path)
        .and_then(|data| serde_json::from_slice(&data).map_err(std::io::Error::other))
        .map_err(|e| agentkernel_core::Error::state(&path, e))?;
    let mut plan = prepare::for_command(&sandbox, request);
    if let Some(keep) = plan.keep.as_mut() {
        keep.ttl = ttl.unwrap_or(keep.ttl);
        keep.reused = reused;
    }
    Ok(plan)
}

/// The helper that runs one command in the kept sandbox `name` — exactly
/// what `agentkernel exec` becomes — as a command for a long-lived caller
/// (the SSH server) to start as its child, saving the `exec` process in
/// between. The plan's memfd is close-on-exec in the caller (no other child
/// of a busy server inherits it) and made inheritable in the child only; the
/// caller drops the returned fd once the command is spawned.
pub fn exec_command(
    store: &Store,
    name: &str,
    request: &ExecRequest,
) -> agentkernel_core::Result<(std::process::Command, std::os::fd::OwnedFd)> {
    let plan = command_plan(store, name, request, None, false)?;
    child_command(&plan)
}

/// The helper of `plan` as a command to start as a child: the plan's memfd
/// is close-on-exec here and made inheritable in the child only. Drop the
/// returned fd once the command is spawned.
fn child_command(
    plan: &Plan,
) -> agentkernel_core::Result<(std::process::Command, std::os::fd::OwnedFd)> {
    let (mut helper, fd) = memfd_command(plan, libc::MFD_CLOEXEC).map_err(Error::from)?;
    // SAFETY: just created by memfd_command, ours.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    // SAFETY: only fcntl between fork and exec.
    unsafe {
        helper.pre_exec(move || {
            if libc::fcntl(raw, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok((helper, fd))
}

/// Builds the kept sandbox of `plan` (which has no command) in a helper
/// child and waits for it: for a process that cannot be the helper itself
/// (the pool's refill has a runtime; the helper must be single-threaded).
pub fn create_in_child(plan: &Plan) -> agentkernel_core::Result<()> {
    let (mut helper, fd) = child_command(plan)?;
    let status = helper
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map_err(|e| Error::from(HandoffError::Exec(e)))?;
    drop(fd);
    if status.success() {
        Ok(())
    } else {
        Err(agentkernel_core::Error::Backend {
            backend: "native",
            message: format!("building a warm sandbox failed ({status})"),
        })
    }
}

/// Hands the plan to a fresh copy of ourselves on an inherited memfd: by
/// exec (never returns on success), or, when a receipt observes the run, as
/// a child whose output passes through us (`observed`), returning its exit
/// code.
pub async fn exec_helper(plan: &Plan) -> agentkernel_core::Result<i32> {
    if can_become_helper(plan) {
        become_helper(plan);
    }
    let (helper, _fd) = memfd_command(plan, 0).map_err(Error::from)?;
    exec_or_observe(helper, plan.tty).await
}

/// Whether this process can be the helper of `plan` itself, skipping the
/// exec (~1 ms: loading the binary again, the plan's round trip through
/// JSON): a plain one-shot run, built here or claimed from the pool (no
/// receipt observing it, no egress proxy whose descriptors the exec hands
/// over), from a process that is still
/// single-threaded, as the helper must be (the CLI's runtime runs on this
/// thread; a blocking task, e.g. a wait for the image store's lock, leaves
/// threads behind, and then the helper is exec'd as always).
fn can_become_helper(plan: &Plan) -> bool {
    (plan.action == Action::Run || plan.claimed_warm)
        && plan.egress.is_none()
        && !agentkernel_core::observe::enabled()
        && single_threaded()
}

fn single_threaded() -> bool {
    // Field 20 of /proc/self/stat, after the parenthesised command name.
    std::fs::read_to_string("/proc/self/stat").is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(17).map(|n| n == "1"))
            .unwrap_or(false)
    })
}

/// Becomes the helper without exec'ing it: leaves this process as an exec
/// would (caught signals back to their default action, close-on-exec
/// descriptors closed, the command line the helper's), runs the plan and
/// exits with its code. Returns only when the command line cannot be
/// replaced, having changed nothing: the caller then execs the helper.
fn become_helper(plan: &Plan) {
    // The sandbox sees its PID 1's command line: the helper's, never the
    // caller's (which may carry values the sandbox must not see).
    if !rewrite_command_line() {
        return;
    }
    crate::trace::phase("cli becomes the helper");
    let _ = std::io::stdout().flush();
    reset_caught_signals();
    close_on_exec_descriptors();
    let code = run_plan(plan.clone(), &mut |_| {});
    let _ = std::io::stdout().flush();
    std::process::exit(code);
}

/// Overwrites this process's argument area (what /proc/PID/cmdline shows)
/// with the helper's `agentkernel __native-sandbox`, NUL-filled to its end.
fn rewrite_command_line() -> bool {
    // arg_start and arg_end: fields 48 and 49 of /proc/self/stat (Linux 3.5).
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return false;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return false;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let (Some(start), Some(end)) = (
        fields.get(45).and_then(|f| f.parse::<usize>().ok()),
        fields.get(46).and_then(|f| f.parse::<usize>().ok()),
    ) else {
        return false;
    };
    let words = format!("agentkernel\0{}\0", crate::HELPER_SUBCOMMAND);
    if start == 0 || end <= start || end - start < words.len() {
        return false;
    }
    // SAFETY: [start, end) is this process's own argument area on its
    // stack, mapped and writable, which nothing reads any more: Rust copied
    // the arguments at start-up (std::env::args) and clap parsed the copy.
    unsafe {
        let area = std::slice::from_raw_parts_mut(start as *mut u8, end - start);
        area.fill(0);
        area[..words.len()].copy_from_slice(words.as_bytes());
    }
    true
}

/// As exec does: every signal with a handler (the runtime's) back to its
/// default action; ignored ones stay ignored.
fn reset_caught_signals() {
    for sig in 1..libc::SIGRTMIN() {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: sigaction queries and sets this process's own dispositions.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) == 0
                && old.sa_sigaction != libc::SIG_DFL
                && old.sa_sigaction != libc::SIG_IGN
            {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
    }
}

/// As exec does: closes every descriptor marked close-on-exec (the
/// runtime's, the image store's); the caller's inherited ones stay, as they
/// reach an exec'd helper. Their owners are never dropped: the process ends
/// in [`become_helper`].
fn close_on_exec_descriptors() {
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    for fd in fds.into_iter().filter(|fd| *fd > 2) {
        // SAFETY: fcntl and close on descriptors of this process nothing
        // will use again (see above); a stale number (the directory's own
        // fd, now closed) fails harmlessly.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 && flags & libc::FD_CLOEXEC != 0 {
                libc::close(fd);
            }
        }
    }
}

async fn exec_or_observe(
    mut helper: std::process::Command,
    tty: bool,
) -> agentkernel_core::Result<i32> {
    if agentkernel_core::observe::enabled() {
        return crate::observed::run(helper, tty).await;
    }
    crate::trace::phase("cli execs the helper");
    Err(Error::from(HandoffError::Exec(helper.exec())).into())
}

/// The helper's command line, with the plan on a memfd (and that fd, left
/// open for the helper to inherit: without MFD_CLOEXEC in FLAGS, across our
/// own exec).
fn memfd_command(
    plan: &Plan,
    flags: libc::c_uint,
) -> Result<(std::process::Command, i32), HandoffError> {
    let json = serde_json::to_vec(plan).map_err(HandoffError::Encode)?;
    let name = c"agentkernel-plan";
    // SAFETY: a valid C string; the new fd is owned by `file` below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(HandoffError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: just created, ours.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(&json).map_err(HandoffError::Write)?;
    let fd = file.into_raw_fd();
    let _ = std::io::stdout().flush();
    let mut helper = std::process::Command::new("/proc/self/exe");
    helper
        .arg0("agentkernel")
        .arg(HELPER_SUBCOMMAND)
        .arg(fd.to_string());
    Ok((helper, fd))
}

/// `agentkernel __native-sandbox <fd> [<report fd>]`: the helper's entry
/// point, reached before any runtime or thread exists. Returns the exit
/// code. An observing parent (`observed`) passes the fd to report how the
/// command ended on.
pub fn main(fd_arg: Option<String>, report_fd: Option<String>) -> i32 {
    run_helper(fd_arg, &mut |report| {
        crate::observed::send_report(report_fd.as_deref(), report)
    })
}

fn run_helper(fd_arg: Option<String>, report: &mut dyn FnMut(HelperReport)) -> i32 {
    match read_plan(fd_arg) {
        Ok(plan) => run_plan(plan, report),
        Err(e) => {
            eprintln!("agentkernel: {e}");
            report(HelperReport::Failed(e.to_string()));
            AGENTKERNEL_ERROR
        }
    }
}

fn run_plan(plan: Plan, report: &mut dyn FnMut(HelperReport)) -> i32 {
    // A rootless sandbox is built inside a user namespace of its own (an
    // `exec` joins the kept sandbox's one instead).
    if let (Some(map), Action::Run | Action::CreateKept) = (&plan.rootless, &plan.action) {
        if let Err(e) = rootless::enter_user_namespace(map) {
            eprintln!("agentkernel: native (rootless): {e}");
            report(HelperReport::Failed(format!("native (rootless): {e}")));
            let _ = std::fs::remove_dir_all(&plan.scratch);
            return AGENTKERNEL_ERROR;
        }
    }
    let outcome: Result<_, Error> = match plan.action {
        Action::Run => process::run(&plan).map_err(Error::from),
        Action::CreateKept => process::holder::create(&plan)
            .map_err(Error::from)
            .and_then(|()| {
                template_setup(&plan);
                if plan.argv.is_empty() {
                    // `sandbox create`: no first command.
                    return Ok(agentkernel_core::spec::Outcome::Exited(0));
                }
                let mut first = plan.clone();
                first.action = Action::Exec;
                join::exec(&first).map_err(Error::from)
            }),
        Action::Exec if plan.claimed_warm => exec_in_claimed(&plan),
        Action::Exec => join::exec(&plan).map_err(Error::from),
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
            report(HelperReport::Ended(outcome));
            finish(outcome, plan.limits.memory_bytes, plan.timeout)
        }
        Err(e) => {
            eprintln!("agentkernel: native: {e}");
            report(HelperReport::Failed(format!("native: {e}")));
            AGENTKERNEL_ERROR
        }
    }
}

/// A pooled run's command in the warm sandbox it claimed; then every
/// process of that sandbox is ended before the exit code is returned, as
/// when a one-shot run's sandbox ends (its holder removes the rest).
fn exec_in_claimed(plan: &Plan) -> Result<agentkernel_core::spec::Outcome, Error> {
    let init = crate::pool::ClaimedInit::open(plan).ok_or_else(|| {
        Error::from(crate::error::KeptError::HolderExited(
            plan.keep
                .as_ref()
                .map(|k| k.name.clone())
                .unwrap_or_default(),
        ))
    })?;
    let outcome = join::exec(plan).map_err(Error::from);
    crate::trace::phase("pooled command ended");
    init.end();
    crate::trace::phase("claimed sandbox ended");
    outcome
}

/// Right after the helper created a kept sandbox: runs its template's
/// setup there, in a child (entering the sandbox's namespaces is one-way,
/// and the first command still has to enter them). On failure the sandbox
/// is removed and the helper exits 125.
fn template_setup(plan: &Plan) {
    let Some(keep) = plan.keep.as_ref().filter(|k| !k.setup.is_empty()) else {
        return;
    };
    let mut setup = plan.clone();
    setup.action = Action::Exec;
    setup.argv = template::setup_argv(&keep.setup);
    setup.tty = false;
    // SAFETY: the helper is single-threaded; the child runs the setup and exits.
    let child = unsafe { libc::fork() };
    if child == 0 {
        let code = match join::exec(&setup) {
            Ok(outcome) => outcome.exit_code(),
            Err(e) => {
                eprintln!("agentkernel: native: {e}");
                AGENTKERNEL_ERROR
            }
        };
        // SAFETY: ends the forked child without running the parent's exit handlers.
        unsafe { libc::_exit(code) }
    }
    let code = if child < 0 {
        -1
    } else {
        let mut status = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(child, &mut status, 0) };
        if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            128 + libc::WTERMSIG(status)
        }
    };
    if code != 0 {
        let store = Store::new(keep.state_root.clone());
        let _ = kept::remove(&store, &keep.name);
        eprintln!("agentkernel: {}", template::setup_failed(&keep.name, code));
        std::process::exit(AGENTKERNEL_ERROR);
    }
}

fn read_plan(fd_arg: Option<String>) -> Result<Plan, HandoffError> {
    let fd: i32 = fd_arg
        .and_then(|f| f.parse().ok())
        .filter(|fd| *fd > 2)
        .ok_or(HandoffError::NotInherited)?;
    // SAFETY: the fd was inherited from the run process that exec'd us and is
    // used only here.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut json = Vec::new();
    std::io::Seek::rewind(&mut file)
        .and_then(|_| file.read_to_end(&mut json))
        .map_err(HandoffError::Read)?;
    serde_json::from_slice(&json).map_err(HandoffError::Decode)
}
