//! Thin, checked wrappers over the syscalls the runtime uses (over
//! agentkernel-sys, and rustix where it covers a call). Each returns an
//! `io::Error` that names what was being done, so a failed setup is one
//! clear line.

use std::ffi::CString;
use std::io;
use std::os::fd::AsFd;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use agentkernel_sys::beneath::{self, Walk, WalkError};
pub use agentkernel_sys::syscall::{Host, Syscall};
use rustix::fs::{AtFlags, Mode, OFlags};

/// The one C-string rule (agentkernel-sys): a NUL byte is an error.
pub fn cstr(s: &str) -> io::Result<CString> {
    agentkernel_sys::c_string(s.as_bytes())
}

pub fn cpath(p: &Path) -> io::Result<CString> {
    agentkernel_sys::c_path(p)
}

pub fn context(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

pub fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    Host.mount(source, target, fstype, flags, data)
}

/// The path through which a mount can target an fd we opened safely.
pub fn fd_path(fd: &OwnedFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let c = cpath(path)?;
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
    rustix::fs::open(&*c, flags, Mode::empty())
        .map_err(|e| context(format_args!("open {}", path.display()))(e.into()))
}

/// What to create at the end of a path that does not exist yet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Leaf {
    Dir,
    File,
}

/// Opens `rel` beneath `root` one component at a time, never following a
/// symlink and creating what is missing, so a path inside an image can never
/// lead out of the sandbox's root (an image whose `/workspace` is a symlink to
/// `/etc` must not get a host directory mounted over the host's `/etc`).
pub fn open_beneath(root: &OwnedFd, rel: &str, leaf: Leaf) -> io::Result<OwnedFd> {
    let refused = |e: WalkError| {
        let why = match &e {
            WalkError::NotBeneath => format!("{rel}: `..` is not allowed in a sandbox path"),
            WalkError::Symlink { at } | WalkError::NotADirectory { at } => format!(
                "{rel}: `{}` is a symlink or not a directory in the sandbox's root; refusing to follow it",
                at.display()
            ),
            other => format!("open {rel}: {other}"),
        };
        io::Error::new(io::Error::from(e).kind(), why)
    };
    // Sandbox paths are absolute in the sandbox: beneath its root here.
    let path = Path::new(rel.trim_start_matches('/'));
    let parts = beneath::components(path).map_err(refused)?;
    let dirs = Walk {
        path_only: true,
        create: Some(0o755),
        exact_mode: false,
    };
    let (parent, name) = match (leaf, parts.split_last()) {
        (Leaf::File, Some((name, parents))) => (parents.iter().collect::<PathBuf>(), *name),
        _ => return beneath::open_dir(root.as_fd(), path, dirs).map_err(refused),
    };
    let dir = beneath::open_dir(root.as_fd(), &parent, dirs).map_err(refused)?;
    let name = agentkernel_sys::c_string(name.as_bytes())?;
    let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let open = || rustix::fs::openat(&dir, &*name, flags, Mode::empty());
    let opened = match open() {
        Err(rustix::io::Errno::NOENT) => {
            let create =
                OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            match rustix::fs::openat(&dir, &*name, create, Mode::from_raw_mode(0o644)) {
                Ok(_) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(context(format_args!("create {rel}"))(e.into())),
            }
            open()
        }
        other => other,
    };
    opened.map_err(|e| context(format_args!("open {rel}"))(e.into()))
}

/// Writes a small file at `rel` beneath `root` without following symlinks
/// (an image's symlinked `/etc/hosts` is replaced, not written through).
pub fn write_beneath(root: &OwnedFd, rel: &str, contents: &str) -> io::Result<()> {
    let (parent, name) = rel.rsplit_once('/').unwrap_or(("", rel));
    let dir = open_beneath(root, parent, Leaf::Dir)?;
    let cname = cstr(name)?;
    // O_PATH fds cannot be used for writes: reopen the directory for real.
    let real = reopen_dir(&dir)?;
    // A symlink or other non-file is removed first (ENOENT: nothing there).
    let _ = rustix::fs::unlinkat(&real, &*cname, AtFlags::empty());
    let create =
        OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let file = rustix::fs::openat(&real, &*cname, create, Mode::from_raw_mode(0o644))
        .map(std::fs::File::from)
        .map_err(|e| context(format_args!("write {rel}"))(e.into()))?;
    io::Write::write_all(&mut &file, contents.as_bytes())
        .map_err(context(format_args!("write {rel}")))
}

fn reopen_dir(dir: &OwnedFd) -> io::Result<OwnedFd> {
    let path = cstr(&fd_path(dir))?;
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    Ok(rustix::fs::open(&*path, flags, Mode::empty())?)
}

pub fn write_all_fd(fd: RawFd, data: &[u8]) -> io::Result<()> {
    let mut done = 0;
    while done < data.len() {
        // SAFETY: the slice is valid for the given length.
        let n = unsafe { libc::write(fd, data[done..].as_ptr().cast(), data.len() - done) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// Reads one byte; `None` at end of file (the other side is gone).
pub fn read_byte(fd: RawFd) -> io::Result<Option<u8>> {
    let mut b = 0u8;
    loop {
        // SAFETY: reads at most one byte into `b`.
        let n = unsafe { libc::read(fd, (&mut b as *mut u8).cast(), 1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok((n == 1).then_some(b));
    }
}

/// Closes every descriptor of this process from 3 up, except those in
/// `keep` (any order; negative entries are ignored). The caller must own
/// none of them through a value it will still drop or use (a forked child
/// about to exec or exit). Allocates nothing: a child sharing its parent's
/// memory may call it (see `process/cleanup.rs`).
pub fn close_descriptors_from_3_except(keep: &[RawFd]) {
    let mut from: u32 = 3;
    loop {
        // The lowest kept descriptor at or above `from`: `keep` is tiny.
        let next = keep
            .iter()
            .filter(|&&fd| fd >= 0 && fd as u32 >= from)
            .map(|&fd| fd as u32)
            .min();
        let Some(kept) = next else {
            // SAFETY: close_range takes plain integers; see above for ownership.
            unsafe { libc::syscall(libc::SYS_close_range, from, u32::MAX, 0u32) };
            return;
        };
        if kept > from {
            // SAFETY: as above.
            unsafe { libc::syscall(libc::SYS_close_range, from, kept - 1, 0u32) };
        }
        from = kept + 1;
    }
}

/// Makes the calling thread background work: nice 19, the lowest CFS
/// weight (not SCHED_IDLE, which could starve it on a saturated host while
/// it holds what later runs need back). A run's own processes, started
/// meanwhile, then take the CPU first.
pub fn lower_priority_of_this_thread() {
    // SAFETY: gettid and setpriority take and return plain integers; on
    // Linux, PRIO_PROCESS with a thread id applies to that thread alone.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19);
    }
}

/// A pidfd of process `pid`: it names that process even after its pid is
/// reused (open it while the pid is known to be the process's: our
/// unreaped child, say).
pub fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just created, ours; pidfds are close-on-exec.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A pipe, both ends close-on-exec: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The stack a [`spawn_until_exec`] child runs on: the command's set-up
/// (its user from the image's `/etc/passwd`, its environment, the seccomp
/// program) needs a few KiB; only the pages it touches are ever allocated.
const SPAWN_STACK_BYTES: usize = 1 << 20;

/// Starts `child` in a new process that shares our memory, as `vfork`
/// does, and returns its pid once it has exec'd or exited.
///
/// Why not `fork`: a forked child gets a copy of our page tables, and its
/// `execve` then tears that copy down again — for this ~28 MB binary with
/// its heap, a large part of a sandbox's start-up (the kernel's
/// `exit_mmap` inside the command's `execve`). Sharing the memory makes
/// `execve` drop one reference instead.
///
/// The child must end in `execve` or `_exit` (hence `-> !`), and must not
/// free anything we still own: capture descriptors as raw numbers, not as
/// `OwnedFd`s moved in. What it allocates stays allocated in our heap
/// (unreachable, harmlessly). Our thread is suspended meanwhile
/// (`CLONE_VFORK`), so the child may use our thread-local state (malloc's
/// caches among it) as if it were us. It has its own descriptor table,
/// working directory, credentials, signal mask and handlers (no
/// `CLONE_FILES`/`CLONE_FS`/`CLONE_SIGHAND`), as after `fork`.
///
/// Only from a single-threaded process (init, the helper): libc's
/// `setresuid` and friends, which the command's set-up calls, would
/// otherwise take our other threads for the child's and try to change
/// their credentials too.
pub fn spawn_until_exec<F: FnOnce() -> std::convert::Infallible>(
    child: F,
) -> io::Result<libc::pid_t> {
    extern "C" fn start<F: FnOnce() -> std::convert::Infallible>(
        slot: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: `slot` is the parent's `Option<F>`, which the parent does
        // not touch until we have exec'd or exited (CLONE_VFORK).
        let slot = unsafe { &mut *slot.cast::<Option<F>>() };
        #[allow(unreachable_code)] // `child()` never returns: it is `Infallible`
        match slot.take() {
            Some(child) => match child() {},
            // SAFETY: unreachable (the slot is filled once); ends the child.
            None => unsafe { libc::_exit(125) },
        }
    }
    // SAFETY: a fresh private anonymous mapping, unmapped below.
    let stack = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SPAWN_STACK_BYTES,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if stack == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let mut slot = Some(child);
    // SAFETY: the child runs `start::<F>` on its own stack (the top of the
    // mapping; x86_64 and aarch64 stacks grow down) while we are suspended,
    // and ends in execve or _exit; `slot` outlives it.
    let pid = unsafe {
        libc::clone(
            start::<F>,
            stack.cast::<u8>().add(SPAWN_STACK_BYTES).cast(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&mut slot as *mut Option<F>).cast(),
        )
    };
    let error = io::Error::last_os_error();
    // SAFETY: our mapping; the child no longer runs on it (it exec'd or exited).
    unsafe { libc::munmap(stack, SPAWN_STACK_BYTES) };
    // The child took the closure out of `slot` (what it captured went
    // with its exec); after a failed clone `slot` still holds it and drops
    // it here.
    if pid < 0 {
        return Err(error);
    }
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In a forked child: kept descriptors survive in any order, every
    /// other one from 3 up is closed.
    #[test]
    fn close_descriptors_keeps_exactly_the_kept_ones() {
        let files: Vec<std::fs::File> = (0..6)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        let fds: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
        let keep = [fds[4], -1, fds[1], fds[4]];
        // SAFETY: the child only makes system calls and _exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            close_descriptors_from_3_except(&keep);
            // SAFETY: F_GETFD only asks whether the descriptor is open.
            let open = |fd: RawFd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0;
            let right = fds
                .iter()
                .all(|&fd| open(fd) == (fd == fds[1] || fd == fds[4]));
            // SAFETY: ends the forked child.
            unsafe { libc::_exit(if right && open(0) { 0 } else { 1 }) }
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    }

    /// The child runs with our memory until it ends (here by `_exit`, and
    /// by `execve`): its exit status is its own, what we own is intact
    /// afterwards, and a descriptor it closes stays open for us.
    #[test]
    fn spawn_until_exec_runs_the_child_and_leaves_ours_intact() {
        let ours: Vec<u64> = (0..1000).collect();
        let file = std::fs::File::open("/dev/null").unwrap();
        let fd = file.as_raw_fd();
        let pid = spawn_until_exec(|| {
            // SAFETY: the child's own descriptor table; then it ends.
            unsafe {
                libc::close(fd);
                libc::_exit(if ours.len() == 1000 { 7 } else { 1 })
            }
        })
        .unwrap();
        let mut status = 0;
        // SAFETY: waits for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 7);
        assert_eq!(ours.iter().sum::<u64>(), 499_500);
        // SAFETY: F_GETFD only asks whether the descriptor is open.
        assert!(unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0);

        let pid = spawn_until_exec(|| {
            let argv = [c"true".as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null()];
            // SAFETY: NUL-terminated arrays of valid C strings.
            unsafe {
                libc::execve(c"/bin/true".as_ptr(), argv.as_ptr(), envp.as_ptr());
                libc::_exit(127)
            }
        })
        .unwrap();
        // SAFETY: waits for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    }

    /// Sandbox paths are given absolute; they stay beneath the root, and a
    /// symlink or `..` on the way is refused (the file is created only at
    /// the end of a walk that followed nothing).
    #[test]
    fn open_beneath_takes_sandbox_paths_and_refuses_escapes() {
        let tmp = tempfile::tempdir().unwrap();
        let root = open_dir(tmp.path()).unwrap();
        open_beneath(&root, "/workspace/sub", Leaf::Dir).unwrap();
        open_beneath(&root, "/etc/hosts", Leaf::File).unwrap();
        assert!(tmp.path().join("workspace/sub").is_dir());
        assert!(tmp.path().join("etc/hosts").is_file());
        std::os::unix::fs::symlink("/etc", tmp.path().join("escape")).unwrap();
        let e = open_beneath(&root, "/escape/x", Leaf::File).unwrap_err();
        assert!(e.to_string().contains("refusing to follow it"), "{e}");
        let e = open_beneath(&root, "/a/../../x", Leaf::Dir).unwrap_err();
        assert!(e.to_string().contains("`..` is not allowed"), "{e}");
        assert!(!Path::new("/etc/x").exists());
    }
}
