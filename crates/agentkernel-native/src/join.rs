//! Running a command in a kept native sandbox (`agentkernel exec`, and the
//! first command of `run --keep`): the helper enters the sandbox's
//! namespaces with `setns`, forks the command there (into the sandbox's pid
//! namespace and cgroup), and supervises it like a one-shot run: signals,
//! `--timeout`, a terminal from the sandbox's own devpts, the exit code.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use agentkernel_core::spec::Outcome;
use agentkernel_core::state::{now_unix, Store};

use crate::error::KeptError;
use crate::kept::Held;
use crate::plan::Plan;
use crate::process::{self, relay, wait_for};
use crate::sys;

/// Namespaces to enter, mount last (it changes our root and cwd).
pub(crate) const NAMESPACES: [&str; 6] = ["cgroup", "ipc", "uts", "net", "pid", "mnt"];

/// Runs `plan.argv` in the kept sandbox `plan.keep.name`. Call from a
/// single-threaded process: entering a mount namespace requires it.
pub fn exec(plan: &Plan) -> Result<Outcome, KeptError> {
    let keep = plan.keep.as_ref().expect("kept plan");
    let store = Store::new(keep.state_root.clone());
    let gone = || KeptError::HolderExited(keep.name.clone());
    let held = Held::load(&store, &keep.name).ok_or_else(gone)?;
    if !held.holder_alive() || !held.init_alive() {
        return Err(gone());
    }
    if held.cgroup.is_frozen() {
        return Err(KeptError::Stopped(keep.name.clone()));
    }
    let control = sys::open_dir(&store.control_dir(&keep.name))?;
    touch_at(&control, keep.ttl).map_err(sys::context("move the sandbox's deadline"))?;

    // Everything on the host side is opened before we enter: paths resolve
    // differently afterwards.
    // A rootless sandbox is entered through its anchor (see kept.rs), whose
    // pid namespace for children is the sandbox's; and its namespaces
    // belong to its user namespace: enter that first (unless this helper
    // just created the sandbox from inside it).
    let (source, pid_ns) = match held.anchor_pid {
        Some(anchor) => (anchor, "pid_for_children"),
        None => (held.init_pid, "pid"),
    };
    let mut names: Vec<&str> = NAMESPACES
        .iter()
        .map(|ns| if *ns == "pid" { pid_ns } else { ns })
        .collect();
    if plan.rootless.is_some() && !same_namespace("user", source) {
        names.insert(0, "user");
    }
    let namespaces: Vec<File> = names
        .iter()
        .map(|ns| {
            File::open(format!("/proc/{source}/ns/{ns}")).map_err(sys::context(format_args!(
                "enter the sandbox's {ns} namespace"
            )))
        })
        .collect::<io::Result<_>>()?;
    // Opened on the host's side, before entering the sandbox's namespaces.
    let self_move = held.cgroup.self_move_files()?;
    let oom_counter = held.cgroup.oom_counter_file();
    let oom_before = oom_counter
        .as_ref()
        .map_or(0, crate::cgroup::read_oom_kills);
    let sfd = process::supervisor_signalfd()?;

    for (ns, file) in names.iter().zip(&namespaces) {
        // SAFETY: setns with an fd of a namespace file we opened.
        if unsafe { libc::setns(file.as_raw_fd(), 0) } != 0 {
            return Err(
                sys::context(format_args!("enter the sandbox's {ns} namespace"))(
                    io::Error::last_os_error(),
                )
                .into(),
            );
        }
    }
    drop(namespaces);
    let terminal = if plan.tty {
        Some(relay::open_terminal().map_err(sys::context("allocate a terminal"))?)
    } else {
        None
    };

    // The command shares our memory until its execve (see
    // sys::spawn_until_exec), so it only borrows what we own: the cgroup's
    // files are closed with all its other descriptors before the exec.
    let slave_fd = terminal.as_ref().map(|(_, slave)| slave.as_raw_fd());
    let child = sys::spawn_until_exec(|| {
        if let Err(e) = crate::cgroup::move_self(&self_move) {
            eprintln!("agentkernel: cannot join the sandbox's cgroup: {e}");
            // SAFETY: ends the child.
            unsafe { libc::_exit(125) }
        }
        // SAFETY: the child's own copy of the slave's descriptor, which it
        // makes its stdio before it execs.
        let slave = slave_fd.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
        process::command::become_command(plan, slave)
    })?;
    drop(self_move);
    let master = terminal.map(|(master, _slave)| master);
    let _raw = match &master {
        Some(m) => {
            relay::copy_window_size(m.as_raw_fd());
            agentkernel_core::terminal::RawMode::enable(0)
        }
        None => None,
    };
    // A running command keeps the sandbox alive: move the deadline as we go.
    let ttl = keep.ttl;
    let mut last_touch = now_unix();
    let mut tick = || {
        if now_unix() >= last_touch + 5 {
            last_touch = now_unix();
            let _ = touch_at(&control, ttl);
        }
    };
    let result = process::watch(&sfd, child, None, master, plan.timeout, &mut tick);
    let _ = touch_at(&control, ttl);
    let process::Ended {
        code, timed_out, ..
    } = match result {
        Ok(r) => r,
        Err(e) => {
            wait_for(child);
            return Err(e.into());
        }
    };
    let oom_after = oom_counter
        .as_ref()
        .map_or(0, crate::cgroup::read_oom_kills);
    Ok(if timed_out {
        Outcome::TimedOut
    } else if code == 137 && oom_after > oom_before {
        Outcome::OutOfMemory
    } else {
        Outcome::Exited(code)
    })
}

/// Moves the deadline through the control directory's fd (its path is not
/// visible from inside the sandbox's mount namespace). In place, not by
/// writing a new file and renaming it over the old: the rename made every
/// `exec` ~0.5 ms slower (measured with hyperfine against this write; the
/// filesystem's work for replacing an inode lands on the caller). The
/// number is padded with newlines to 20 bytes, the most a `u64` takes, so
/// it covers whatever was there; every reader trims (Rust's `trim`, the
/// shell's `$(cat …)`). A reader racing the write could in principle see a
/// mix of old and new digits: the holder reads again before it ends a
/// sandbox (see `holder::wait_until_done`).
fn touch_at(control: &OwnedFd, ttl: std::time::Duration) -> io::Result<()> {
    let text = format!("{:\n<20}", agentkernel_core::state::deadline_after(ttl));
    let file = rustix::fs::openat(
        control,
        "deadline",
        rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    File::from(file).write_all_at(text.as_bytes(), 0)
}

/// Whether we are already in `pid`'s namespace of kind `ns`.
fn same_namespace(ns: &str, pid: libc::pid_t) -> bool {
    match (
        std::fs::read_link(format!("/proc/self/ns/{ns}")),
        std::fs::read_link(format!("/proc/{pid}/ns/{ns}")),
    ) {
        (Ok(ours), Ok(theirs)) => ours == theirs,
        _ => false,
    }
}
