//! The last steps before the user's command: identity, limits, privileges,
//! seccomp, then execve. Runs in the sandbox (after `pivot_root`) in the
//! process that becomes the command.

use std::ffi::CString;
use std::io;

use std::os::fd::{AsRawFd, OwnedFd};

use super::signal_set;
use crate::plan::{Plan, SeccompMode};
use crate::{caps, sys, user};

/// Open files a command may have: Docker's default, or our own hard limit if
/// lower (raising it needs CAP_SYS_RESOURCE, which many hosts' root lacks).
const NOFILE: u64 = 1 << 20;

/// Never returns: execs the command or exits 125/126/127 with one line on stderr.
pub fn exec(plan: &Plan) -> ! {
    crate::trace::phase("command: forked");
    let program = plan.argv.first().cloned().unwrap_or_default();
    match prepare_and_exec(plan) {
        Err(Failure::Setup(e)) => {
            eprintln!("agentkernel: cannot start the command in the sandbox: {e}");
            exit(125)
        }
        Err(Failure::NotFound) => {
            eprintln!("agentkernel: {program}: command not found in the sandbox");
            exit(127)
        }
        Err(Failure::CannotExecute(e)) => {
            eprintln!("agentkernel: {program}: cannot execute ({e})");
            exit(126)
        }
    }
}

enum Failure {
    Setup(io::Error),
    NotFound,
    CannotExecute(io::Error),
}

fn exit(code: i32) -> ! {
    // SAFETY: _exit ends this (forked) process without running the parent's atexit handlers.
    unsafe { libc::_exit(code) }
}

fn prepare_and_exec(plan: &Plan) -> Result<std::convert::Infallible, Failure> {
    let identity = user::resolve(plan.user.as_deref()).map_err(Failure::Setup)?;
    let mut env = plan.env.clone();
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={}", identity.home));
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(crate::DEFAULT_PATH)
        .to_string();

    set_nofile_limit();
    if let (Some(_), Some(max)) = (plan.rootless, plan.limits.pids) {
        crate::rootless::limit_processes(max).map_err(Failure::Setup)?;
    }
    if plan.no_new_privileges {
        // SAFETY: PR_SET_NO_NEW_PRIVS takes integers only.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(Failure::Setup(io::Error::last_os_error()));
        }
    }
    // Installed while we still hold CAP_SYS_ADMIN, so profiles without
    // no_new_privs get a filter too; it allows everything we do after it.
    crate::seccomp::install(plan.seccomp == SeccompMode::Restrictive)
        .map_err(|e| Failure::Setup(sys::context("install the seccomp filter")(e)))?;
    let keep: Vec<u32> = plan
        .capabilities
        .iter()
        .filter_map(|c| caps::number(c))
        .collect();
    caps::limit_bounding_set(&keep)
        .map_err(|e| Failure::Setup(sys::context("drop capabilities")(e)))?;
    user::switch(&identity, plan.rootless.is_none()).map_err(Failure::Setup)?;
    if identity.uid == 0 {
        caps::set(&keep).map_err(|e| Failure::Setup(sys::context("set capabilities")(e)))?;
    }
    std::env::set_current_dir(&plan.workdir).map_err(|e| {
        Failure::Setup(sys::context(format_args!(
            "working directory {}",
            plan.workdir
        ))(e))
    })?;

    let strings = |all: &[String]| -> Result<Vec<CString>, Failure> {
        all.iter()
            .map(|s| sys::cstr(s).map_err(|e| Failure::Setup(sys::context("the command")(e))))
            .collect()
    };
    let argv = strings(&plan.argv)?;
    let envp = strings(&env)?;
    crate::trace::phase("command: execs");
    execvpe(&argv, &envp, &path)
}

fn set_nofile_limit() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            let value = NOFILE.min(r.rlim_max);
            r.rlim_cur = value;
            r.rlim_max = value;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// `execvpe` with the sandbox's PATH (not ours), and the shell's exit-code
/// convention: 127 when nothing was found, 126 when found but not runnable.
fn execvpe(
    argv: &[CString],
    envp: &[CString],
    path: &str,
) -> Result<std::convert::Infallible, Failure> {
    let Some(program) = argv.first() else {
        return Err(Failure::NotFound);
    };
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut env_ptrs: Vec<*const libc::c_char> = envp.iter().map(|e| e.as_ptr()).collect();
    env_ptrs.push(std::ptr::null());
    let name = program.to_bytes();
    let candidates: Vec<CString> = if name.contains(&b'/') {
        vec![program.clone()]
    } else {
        path.split(':')
            .map(|dir| if dir.is_empty() { "." } else { dir })
            .map(|dir| {
                let mut full = dir.as_bytes().to_vec();
                full.push(b'/');
                full.extend_from_slice(name);
                CString::new(full).unwrap_or_default()
            })
            .collect()
    };
    let mut denied = None;
    let absent = |e: &io::Error| matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR));
    for candidate in &candidates {
        // A failed execve is dear (the kernel sets up a new address space
        // before it looks the file up: ~0.1 ms each); a path lookup is not.
        // SAFETY: a valid C string; F_OK only asks whether the path exists.
        if unsafe { libc::access(candidate.as_ptr(), libc::F_OK) } != 0
            && absent(&io::Error::last_os_error())
        {
            continue;
        }
        // SAFETY: NUL-terminated pointer arrays of valid C strings.
        unsafe { libc::execve(candidate.as_ptr(), argv_ptrs.as_ptr(), env_ptrs.as_ptr()) };
        let e = io::Error::last_os_error();
        if !absent(&e) {
            denied.get_or_insert(e);
        }
    }
    Err(match denied {
        Some(e) => Failure::CannotExecute(e),
        None => Failure::NotFound,
    })
}

pub(crate) fn become_command(plan: &Plan, slave: Option<OwnedFd>) -> ! {
    // SAFETY: resetting our own signal state before exec: the mask we
    // inherited, and SIGPIPE, which Rust ignores and exec would keep ignored.
    unsafe {
        let empty = signal_set(&[]);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::setsid();
    }
    if let Some(slave) = slave {
        let fd = slave.as_raw_fd();
        // SAFETY: the slave becomes our controlling terminal and stdio.
        unsafe {
            libc::ioctl(fd, libc::TIOCSCTTY, 0);
            libc::dup2(fd, 0);
            libc::dup2(fd, 1);
            libc::dup2(fd, 2);
        }
    }
    // Nothing of ours beyond stdio reaches the command.
    // SAFETY: closes every fd from 3 up in this process.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    exec(plan)
}
