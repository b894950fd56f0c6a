//! `sandbox cp` on a kept native sandbox: files are read and written through
//! the sandbox's own root (`/proc/<init>/root`, which carries its mounts),
//! and every path is resolved with `openat2(RESOLVE_IN_ROOT)`: `..` and
//! symlinks, absolute ones included, are resolved as they would be inside
//! the sandbox, so a symlink the sandbox planted (`/tmp/x -> /etc/shadow`,
//! `-> /proc/self/root/…`) can only ever name a file of the sandbox. Magic
//! links (`/proc/*/fd`, `/proc/*/root`) are refused outright. Only regular
//! files are read or written: a FIFO or a device at the path would block or
//! never end.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;

use agentkernel_core::state::{proc_stat_field, stat_field, Store};

use crate::kept::Held;
use crate::sys;

/// A kept sandbox's root directory, opened from the host.
pub struct SandboxRoot {
    root: OwnedFd,
}

impl SandboxRoot {
    pub fn open(store: &Store, name: &str) -> io::Result<SandboxRoot> {
        let held = Held::live(store, name)?;
        // A rootless init is non-dumpable, so its /proc entry is closed to
        // us; the anchor shares its mount namespace (and so its root).
        let (pid, start) = match held.anchor_pid {
            Some(anchor) => (anchor, proc_stat_field(anchor as u32, 22)),
            None => (held.init_pid, Some(held.init_start)),
        };
        // The /proc/<pid> directory pins the process: if it exits (and the
        // pid is reused), lookups through this descriptor fail.
        let proc_dir = sys::open_dir(std::path::Path::new(&format!("/proc/{pid}")))?;
        let stat = openat(&proc_dir, "stat", libc::O_RDONLY, 0)
            .and_then(|fd| io::read_to_string(File::from(fd)))
            .unwrap_or_default();
        if start.is_none() || stat_field(&stat, 22) != start {
            return Err(io::Error::other(format!(
                "sandbox {name} is gone; `agentkernel sandbox gc` removes what it left"
            )));
        }
        let root = openat(&proc_dir, "root", libc::O_PATH | libc::O_DIRECTORY, 0).map_err(
            sys::context(format_args!("open the root of sandbox {name}")),
        )?;
        Ok(SandboxRoot { root })
    }

    /// Opens `path` (absolute, as the sandbox sees it) with `flags`.
    fn open_in(&self, path: &str, flags: i32, mode: u32) -> io::Result<OwnedFd> {
        let how = OpenHow {
            flags: (flags | libc::O_CLOEXEC) as u64,
            mode: u64::from(mode),
            resolve: libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
        };
        let c = sys::cstr(path);
        loop {
            // SAFETY: a valid directory fd, C string and open_how of the size passed.
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_openat2,
                    self.root.as_raw_fd(),
                    c.as_ptr(),
                    &how as *const OpenHow,
                    std::mem::size_of::<OpenHow>(),
                )
            };
            if fd >= 0 {
                // SAFETY: a fresh descriptor returned by openat2.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
            }
            let e = io::Error::last_os_error();
            // EAGAIN: a rename raced the resolution of `..`; try again.
            if e.raw_os_error() != Some(libc::EAGAIN) {
                return Err(e);
            }
        }
    }

    /// True when `path` is a directory in the sandbox.
    pub fn is_dir(&self, path: &str) -> bool {
        self.open_in(path, libc::O_PATH | libc::O_DIRECTORY, 0)
            .is_ok()
    }

    /// Opens the regular file at `path` for reading; returns it and its mode.
    pub fn read_file(&self, path: &str) -> io::Result<(File, u32)> {
        let fd = self
            .open_in(path, libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY, 0)
            .map_err(sys::context(format_args!("{path} in the sandbox")))?;
        let file = File::from(fd);
        let meta = file.metadata()?;
        if meta.is_dir() {
            return Err(io::Error::other(format!(
                "{path} in the sandbox is a directory; copying directories out of a native sandbox is not supported yet: `agentkernel exec NAME -- tar -cf - {path}` streams it"
            )));
        }
        if !meta.is_file() {
            return Err(io::Error::other(format!(
                "{path} in the sandbox is not a regular file (a FIFO, socket or device); only regular files are copied"
            )));
        }
        Ok((file, meta.permissions().mode() & 0o777))
    }

    /// Creates (or truncates) the regular file at `path`, mode `mode` if new.
    pub fn create_file(&self, path: &str, mode: u32) -> io::Result<File> {
        // No O_TRUNC yet: the file is checked to be regular first.
        let fd = self
            .open_in(
                path,
                libc::O_WRONLY | libc::O_CREAT | libc::O_NONBLOCK | libc::O_NOCTTY,
                mode & 0o777,
            )
            .map_err(sys::context(format_args!("{path} in the sandbox")))?;
        let file = File::from(fd);
        if !file.metadata()?.is_file() {
            return Err(io::Error::other(format!(
                "{path} in the sandbox is not a regular file; only regular files are written"
            )));
        }
        file.set_len(0)?;
        Ok(file)
    }
}

/// `struct open_how` of openat2(2) (libc's is non-exhaustive).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

fn openat(dir: &OwnedFd, name: &str, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let c = sys::cstr(name);
    // SAFETY: a valid directory fd and C string.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags | libc::O_CLOEXEC, mode) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor returned by openat.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
