//! A one-shot run's cleanup process: what is left once the command's
//! status is known and the network lease with its port rules is released
//! (the supervisor does both): init's exit, the cgroup and the scratch
//! directory, all named by this run's unique id, so no later command can
//! trip over them — the caller need not wait for them (init's exit tears
//! down the sandbox's namespaces and mounts; rmdir of a cgroup waits for
//! the kernel to let go of it; unlinking the scratch dir's files — the
//! workspace's disk image, its upper layer — writes to the host's disk).
//!
//! The process is started while the command runs, right after "go", so
//! neither its creation nor this process's exit is on the caller's path:
//! it shares our memory (`CLONE_VM`, no copy of page tables) and waits,
//! holding nothing of the caller's, until this process has exited — the
//! end of file on a pipe whose only writer we are, which the kernel closes
//! in our exit after our memory is let go of. Our exit then drops one
//! reference to the memory instead of tearing it down (the ~0.5 ms the
//! kernel spends unmapping the binary's pages), and the cleanup process,
//! alone with the memory from then on, does that after its work. Until
//! then it touches nothing of it: no allocation, no lock, only the
//! system calls that detach it, on a stack of its own, and what it needs
//! afterwards is a leaked copy no one frees. A `kill -9` of the supervisor
//! starts the cleanup too. It outlives the supervisor (reparented); if it
//! is killed, gc collects the scratch dir and the cgroup like any dead
//! run's.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use crate::cgroup::Cgroup;
use crate::plan::Plan;
use crate::sys;

/// A started cleanup process, waiting for our exit.
pub(crate) struct Cleanup {
    /// Our end of its pipe: the kernel closes it in our exit.
    exit_signal: OwnedFd,
}

impl Cleanup {
    /// Lets the cleanup begin when this process exits (explicitly closing
    /// our end earlier would let it run beside us in our memory). Close the
    /// workspace's disk first: its unmount happens where its last
    /// descriptor closes, which must be the cleanup process's copy.
    pub(crate) fn begin_at_exit(self) {
        std::mem::forget(self.exit_signal);
        crate::trace::phase("cleanup begins at our exit");
    }
}

/// Everything the cleanup process uses, leaked: our copies may be freed
/// while it waits, and our stack reused.
struct Job {
    plan: Plan,
    cgroup: Option<Cgroup>,
    init: Option<RawFd>,
    disk: Option<RawFd>,
    wait_end: RawFd,
    /// The descriptors it keeps, -1 for none (an array: no allocation may
    /// happen before our exit).
    keep: [RawFd; 3],
    trace: bool,
}

/// The cleanup process's stack: only what the cleanup's calls need.
const STACK_BYTES: usize = 1 << 20;

/// Starts the cleanup process for `plan`'s run: once this process has
/// exited it waits for the exit of the process of the pidfd `init`, then
/// removes `cgroup` and the scratch directory (moved by then, or not, into
/// `finished/`), attaches the next runs' workspace disks and collects what
/// killed runs left. `workspace_disk` is the disk's mount, whose copy it
/// closes. None when it could not be started (then call
/// [`clean_up_here`]).
pub(crate) fn start(
    plan: &Plan,
    cgroup: Option<&Cgroup>,
    init: Option<&OwnedFd>,
    workspace_disk: Option<&OwnedFd>,
) -> Option<Cleanup> {
    let (wait_end, exit_signal) = sys::pipe().ok()?;
    let init = init.map(AsRawFd::as_raw_fd);
    let disk = workspace_disk.map(AsRawFd::as_raw_fd);
    let keep = [Some(wait_end.as_raw_fd()), init, disk].map(|fd| fd.unwrap_or(-1));
    let job: &'static Job = Box::leak(Box::new(Job {
        plan: plan.clone(),
        cgroup: cgroup.cloned(),
        init,
        disk,
        wait_end: wait_end.as_raw_fd(),
        keep,
        trace: crate::trace::enabled(),
    }));
    // SAFETY: a fresh anonymous mapping, ours; leaked like the job.
    let stack = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            STACK_BYTES,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        )
    };
    if stack == libc::MAP_FAILED {
        return None;
    }
    // SAFETY: the child runs `cleanup_main` on its own stack (the top of
    // the mapping; x86_64 and aarch64 stacks grow down) in our memory and
    // touches none of it but `job` and that stack until we have exited
    // (see the module's comment); it ends with _exit.
    let pid = unsafe {
        libc::clone(
            cleanup_main,
            stack.cast::<u8>().add(STACK_BYTES).cast(),
            libc::CLONE_VM | libc::SIGCHLD,
            (job as *const Job).cast_mut().cast(),
        )
    };
    if pid < 0 {
        // SAFETY: the mapping is ours and unused.
        unsafe { libc::munmap(stack, STACK_BYTES) };
        return None;
    }
    // The child has its own descriptor table: ours of the read end goes.
    drop(wait_end);
    crate::trace::phase("cleanup started");
    Some(Cleanup { exit_signal })
}

extern "C" fn cleanup_main(job: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `start` passes a leaked, never freed Job.
    let job: &Job = unsafe { &*job.cast::<Job>() };
    detach_from_caller(job);
    // No byte ever comes: end of file is our parent's exit (or death).
    let _ = sys::read_byte(job.wait_end);
    // From here the memory is ours alone.
    // SAFETY: our copy of the descriptor, closed by nobody else.
    let disk = job.disk.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
    // A disk the keeper can recycle goes back to it once the sandbox is
    // gone; any other unmounts here, as the sandbox's namespace goes.
    let recycled = disk.filter(|_| recyclable(&job.plan));
    // SAFETY: the pidfd is ours, open (kept by detach_from_caller), and
    // closed by nobody else; this borrow ends before _exit.
    let init = job
        .init
        .map(|fd| unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) });
    clean_up_here(&job.plan, job.cgroup.as_ref(), init, recycled);
    // SAFETY: ends the cleanup process without running any exit path.
    unsafe { libc::_exit(0) }
}

/// Whether the run's workspace disk goes back to the disk keeper: a
/// one-shot run's disk of the keeper's kind (`disk_keeper::give_back`).
fn recyclable(plan: &Plan) -> bool {
    plan.workspace_held && plan.keep.is_none() && crate::disk_keeper::enabled()
}

/// The cleanup itself, in this process. `disk`, the run's workspace disk
/// if it is to be recycled, goes back to the keeper once init has exited.
pub(crate) fn clean_up_here(
    plan: &Plan,
    cgroup: Option<&Cgroup>,
    init: Option<std::os::fd::BorrowedFd<'_>>,
    disk: Option<OwnedFd>,
) {
    if let Some(init) = init {
        wait_for_exit(init);
        crate::trace::phase("cleanup: init exited");
    }
    if let (Some(disk), Some(root)) = (disk, plan.state_root()) {
        // Only once nothing of the sandbox runs: init has exited.
        if init.is_some() {
            crate::disk_keeper::give_back(&root, disk);
            crate::trace::phase("cleanup: disk given back");
        }
    }
    if let Some(cgroup) = cgroup {
        cgroup.remove();
    }
    crate::trace::phase("cleanup: cgroup removed");
    let _ = agentkernel_core::state::remove_tree(&scratch_dir(plan));
    crate::trace::phase("cleaned up");
    let root = plan.state_root();
    // The next runs' workspace disks, attached here, off their path.
    if let (Some(root), Some(bytes), None) = (&root, plan.workspace_disk_bytes, &plan.keep) {
        if crate::disk_keeper::enabled() {
            // The keeper mounts them; a live one switches to this size when
            // the next run asks for it.
            crate::disk_keeper::start(root, bytes);
            crate::trace::phase("disk keeper running");
        } else {
            let template = crate::disk::template_path(root, bytes);
            if crate::disk_pool::refill(root, &template, bytes).is_ok() {
                crate::trace::phase("disk pool refilled");
            }
        }
    }
    // What killed runs left (cgroups, leases, scratch, dead kept sandboxes),
    // at most once per SWEEP_INTERVAL per state directory.
    if let Some(root) = root.filter(|r| sweep_is_due(r)) {
        let store = agentkernel_core::state::Store::new(root);
        crate::gc::orphaned_runs(&store);
        crate::kept::collect(&store);
        crate::trace::phase("cleanup: gc swept");
    }
}

/// How often a run's cleanup also sweeps for what killed runs left. The
/// sweep (cgroups, leases, every loop device, scratch dirs) costs about a
/// third of a millisecond of CPU, which back-to-back runs on a small machine
/// otherwise pay each time; a `kill -9`'s leftovers are all named by their
/// run, so collecting them seconds later trips no one. `sandbox gc` and
/// `sandbox list` sweep whenever they are run.
const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether this cleanup sweeps: no sweep of `state_root` within
/// SWEEP_INTERVAL. Claims the sweep by touching a marker (two cleanups at
/// the same moment may both sweep, which is harmless).
fn sweep_is_due(state_root: &std::path::Path) -> bool {
    let marker = state_root.join("gc-swept");
    let recent = std::fs::metadata(&marker)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < SWEEP_INTERVAL);
    if recent {
        return false;
    }
    // The marker's contents do not matter, only its time.
    let _ = std::fs::write(&marker, b"");
    true
}

/// Moves the run's scratch directory out of `runs/` into `finished/` (one
/// rename, on the caller's path: from then on no gc takes it for a live
/// run's). Where it is afterwards either way is [`scratch_dir`].
pub(crate) fn retire_scratch_dir(plan: &Plan) {
    if let Some(finished) = crate::gc::finished_path(plan) {
        let _ = std::fs::rename(&plan.scratch, finished);
    }
}

/// The run's scratch directory: in `finished/` once retired.
fn scratch_dir(plan: &Plan) -> PathBuf {
    match crate::gc::finished_path(plan) {
        Some(finished) if finished.exists() => finished,
        _ => plan.scratch.clone(),
    }
}

/// Blocks until the process of `pidfd` has exited (it need not be our child).
fn wait_for_exit(pidfd: std::os::fd::BorrowedFd<'_>) {
    let mut fds = [libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: polls one valid pollfd; EINTR is retried.
    while unsafe { libc::poll(fds.as_mut_ptr(), 1, -1) } < 0
        && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
    {}
}

/// The cleanup process holds nothing of the caller's: a pipe on its stdout
/// or stderr would keep a `$(agentkernel run …)` waiting, and an inherited
/// listening socket would keep a published port busy. (Tracing keeps stderr,
/// so its last phase shows when the cleanup ended.) Only system calls: our
/// parent still runs in this memory.
fn detach_from_caller(job: &Job) {
    // SAFETY: plain fd calls on our own descriptor table; a new session,
    // so the caller's terminal signals (already blocked here) never reach us.
    unsafe {
        libc::setsid();
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::dup2(null, 1);
            if !job.trace {
                libc::dup2(null, 2);
            }
        }
    }
    sys::close_descriptors_from_3_except(&job.keep);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_is_due_once_per_interval_per_state_directory() {
        let state = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        assert!(sweep_is_due(state.path()), "never swept: due");
        assert!(!sweep_is_due(state.path()), "just swept: not due");
        assert!(sweep_is_due(other.path()), "another state dir has its own");
        // The last sweep long enough ago: due again.
        let marker = std::fs::File::options()
            .write(true)
            .open(state.path().join("gc-swept"))
            .unwrap();
        let then =
            std::time::SystemTime::now() - SWEEP_INTERVAL - std::time::Duration::from_secs(1);
        marker.set_modified(then).unwrap();
        assert!(sweep_is_due(state.path()));
        assert!(!sweep_is_due(state.path()));
    }
}
