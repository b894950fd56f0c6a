//! `sandbox cp` on a kept native sandbox: files are read and written through
//! the sandbox's own root (`/proc/<init>/root`, which carries its mounts),
//! and every path is resolved with `openat2(RESOLVE_IN_ROOT)`: `..` and
//! symlinks, absolute ones included, are resolved as they would be inside
//! the sandbox, so a symlink the sandbox planted (`/tmp/x -> /etc/shadow`,
//! `-> /proc/self/root/…`) can only ever name a file of the sandbox. Magic
//! links (`/proc/*/fd`, `/proc/*/root`) are refused outright. Beneath a
//! copied directory nothing is followed (`O_NOFOLLOW`, one component at a
//! time). Only regular files are read or written, and only after an
//! `O_PATH` descriptor showed them to be regular: a FIFO or a device would
//! block, never end, or act when opened.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use agentkernel_core::copy::{base_name, host_error, report_skipped};
use agentkernel_core::files::InjectedFile;
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

    /// The root of the sandbox this process is building, once it has
    /// pivoted into it (`[[files]]` are written from there).
    pub fn current() -> io::Result<SandboxRoot> {
        Ok(SandboxRoot {
            root: sys::open_dir(Path::new("/"))?,
        })
    }

    /// Opens `path` (absolute, as the sandbox sees it) with `flags`.
    fn open_in(&self, path: &str, flags: i32, mode: u32) -> io::Result<OwnedFd> {
        let how = OpenHow {
            flags: (flags | libc::O_CLOEXEC) as u64,
            mode: u64::from(mode),
            resolve: libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
        };
        let c = sys::cstr(path)?;
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

    /// What is at `path`, for copying it out: a regular file (open for
    /// reading) or a directory. Anything else is refused before it is opened
    /// for I/O (opening a device or FIFO could block or act).
    pub fn source(&self, path: &str) -> io::Result<Source> {
        let fd = self
            .open_in(path, libc::O_PATH, 0)
            .map_err(sys::context(format_args!("{path} in the sandbox")))?;
        Source::of(fd).map_err(sys::context(format_args!("{path} in the sandbox")))
    }

    /// Creates (or truncates) the regular file at `path`, mode `mode` if new.
    pub fn create_file(&self, path: &str, mode: u32) -> io::Result<File> {
        let (parent, name) = split(path);
        let dir = self
            .open_in(parent, libc::O_PATH | libc::O_DIRECTORY, 0)
            .map_err(sys::context(format_args!("{parent} in the sandbox")))?;
        create_file_at(&dir, name, mode)
            .map_err(sys::context(format_args!("{path} in the sandbox")))
    }

    /// Creates the directory at `path` (or takes the one there) and returns it.
    pub fn create_dir(&self, path: &str, mode: u32) -> io::Result<OwnedFd> {
        let (parent, name) = split(path);
        let dir = self
            .open_in(parent, libc::O_PATH | libc::O_DIRECTORY, 0)
            .map_err(sys::context(format_args!("{parent} in the sandbox")))?;
        create_dir_at(&dir, name, mode).map_err(sys::context(format_args!("{path} in the sandbox")))
    }
}

/// A copy's source in the sandbox.
pub enum Source {
    /// A regular file, open for reading, and its permission bits.
    File(File, u32),
    /// A directory (an `O_PATH` descriptor) and its permission bits.
    Dir(OwnedFd, u32),
}

impl Source {
    /// `fd` is an `O_PATH` descriptor: it is classified without being opened
    /// for I/O, and a regular file is then reopened through it (the same
    /// inode, whatever has been renamed meanwhile).
    fn of(fd: OwnedFd) -> io::Result<Source> {
        let meta = fstat(&fd)?;
        let mode = meta.st_mode & 0o777;
        match meta.st_mode & libc::S_IFMT {
            libc::S_IFREG => Ok(Source::File(reopen(&fd, libc::O_RDONLY)?, mode)),
            libc::S_IFDIR => Ok(Source::Dir(fd, mode)),
            _ => Err(io::Error::other(
                "not a regular file or directory (a symlink, FIFO, socket or device); not copied",
            )),
        }
    }
}

/// Copies the sandbox directory `dir` to the host path `host` (created with
/// `mode`, or an existing directory), recursively: files and directories
/// only, never following a symlink; names what it skipped in `skipped`.
pub fn copy_dir_out(
    dir: &OwnedFd,
    mode: u32,
    host: &Path,
    skipped: &mut Vec<String>,
) -> io::Result<()> {
    match std::fs::DirBuilder::new().mode(mode).create(host) {
        Err(e) if !(e.kind() == io::ErrorKind::AlreadyExists && host.is_dir()) => {
            return Err(sys::context(format_args!("create {}", host.display()))(e))
        }
        _ => {}
    }
    for name in entries(dir)? {
        let target = host.join(&name);
        let Ok(fd) = openat(dir, &name, libc::O_PATH | libc::O_NOFOLLOW, 0) else {
            skipped.push(target.display().to_string());
            continue;
        };
        match Source::of(fd) {
            Ok(Source::File(mut file, mode)) => {
                let mut out = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(mode)
                    .open(&target)
                    .map_err(sys::context(format_args!("create {}", target.display())))?;
                io::copy(&mut file, &mut out)?;
            }
            Ok(Source::Dir(sub, mode)) => copy_dir_out(&sub, mode, &target, skipped)?,
            Err(_) => skipped.push(target.display().to_string()),
        }
    }
    Ok(())
}

/// Copies the host directory `host` into the sandbox directory `dir`,
/// recursively: files, directories and symlinks (made as symlinks: inside
/// the sandbox they can only name the sandbox's own files); names what it
/// skipped in `skipped`.
pub fn copy_dir_in(host: &Path, dir: &OwnedFd, skipped: &mut Vec<String>) -> io::Result<()> {
    let listing =
        std::fs::read_dir(host).map_err(sys::context(format_args!("read {}", host.display())))?;
    for entry in listing {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let meta = entry.metadata()?;
        let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions());
        if meta.is_file() {
            let mut from = File::open(&path)?;
            let mut to = create_file_at(dir, &name, mode)?;
            io::copy(&mut from, &mut to)?;
        } else if meta.is_dir() {
            let sub = create_dir_at(dir, &name, mode)?;
            copy_dir_in(&path, &sub, skipped)?;
        } else if meta.file_type().is_symlink() {
            let target = sys::cpath(&std::fs::read_link(&path)?)?;
            let link = sys::cstr(&name)?;
            // SAFETY: a valid directory fd and C strings.
            if unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), link.as_ptr()) } != 0 {
                skipped.push(path.display().to_string());
            }
        } else {
            skipped.push(path.display().to_string());
        }
    }
    Ok(())
}

/// `(parent, last component)` of an absolute sandbox path.
fn split(path: &str) -> (&str, &str) {
    let trimmed = path.trim_end_matches('/');
    match trimmed.rsplit_once('/') {
        Some(("", name)) => ("/", name),
        Some((parent, name)) => (parent, name),
        None => ("/", trimmed),
    }
}

/// Creates `name` in `dir` as a regular file, or truncates the regular file
/// there; never follows a symlink or opens anything else for writing.
fn create_file_at(dir: &OwnedFd, name: &str, mode: u32) -> io::Result<File> {
    check_name(name)?;
    match openat(
        dir,
        name,
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
        mode & 0o777,
    ) {
        Ok(fd) => Ok(File::from(fd)),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            let fd = openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
            if fstat(&fd)?.st_mode & libc::S_IFMT != libc::S_IFREG {
                return Err(io::Error::other(
                    "exists and is not a regular file (a symlink, directory, FIFO or device); not written",
                ));
            }
            let file = reopen(&fd, libc::O_WRONLY)?;
            file.set_len(0)?;
            Ok(file)
        }
        Err(e) => Err(e),
    }
}

/// Creates directory `name` in `dir` (or takes the directory there, never a
/// symlink) and returns it.
fn create_dir_at(dir: &OwnedFd, name: &str, mode: u32) -> io::Result<OwnedFd> {
    check_name(name)?;
    let c = sys::cstr(name)?;
    // SAFETY: a valid directory fd and C string.
    if unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode & 0o777) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(e);
        }
    }
    openat(
        dir,
        name,
        libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )
}

fn check_name(name: &str) -> io::Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(io::Error::other(format!("`{name}` names no file")));
    }
    Ok(())
}

/// The names in directory `dir` (an `O_PATH` descriptor).
fn entries(dir: &OwnedFd) -> io::Result<Vec<String>> {
    let listing = reopen_path(dir, libc::O_RDONLY | libc::O_DIRECTORY)?;
    std::fs::read_dir(format!("/proc/self/fd/{}", listing.as_raw_fd()))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect()
}

fn fstat(fd: &OwnedFd) -> io::Result<libc::stat> {
    // SAFETY: stat is plain data; fstat fills it for a valid fd.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// Opens the inode an `O_PATH` descriptor names for I/O.
fn reopen(fd: &OwnedFd, flags: i32) -> io::Result<File> {
    reopen_path(fd, flags | libc::O_NOCTTY).map(File::from)
}

fn reopen_path(fd: &OwnedFd, flags: i32) -> io::Result<OwnedFd> {
    let path = sys::cstr(&format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    // SAFETY: a valid C string; the result is checked.
    let new = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor returned by open.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// `struct open_how` of openat2(2) (libc's is non-exhaustive).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

fn openat(dir: &OwnedFd, name: &str, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let c = sys::cstr(name)?;
    // SAFETY: a valid directory fd and C string.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags | libc::O_CLOEXEC, mode) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor returned by openat.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `[[files]]`: each file written at its path, resolved inside `root` like
/// every `sandbox cp` path; missing parent directories are made (0755), and
/// the file gets exactly its mode (whatever the umask, and over an existing
/// file's). A later entry for the same path replaces an earlier one.
pub fn inject(root: &SandboxRoot, files: &[InjectedFile]) -> io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::PermissionsExt as _;
    for file in files {
        let at = |e: io::Error| sys::context(format_args!("[[files]] {}", file.dest))(e);
        for dir in agentkernel_core::files::parent_dirs(&file.dest) {
            if !root.is_dir(dir) {
                root.create_dir(dir, 0o755).map_err(at)?;
            }
        }
        let mut out = root.create_file(&file.dest, file.mode).map_err(at)?;
        out.write_all(&file.content).map_err(at)?;
        out.set_permissions(std::fs::Permissions::from_mode(file.mode))
            .map_err(at)?;
    }
    Ok(())
}

fn native_error(e: io::Error) -> agentkernel_core::Error {
    crate::Error::from(e).into()
}

/// `sandbox cp HOST NAME:PATH`: into the kept sandbox `name` (into `path`
/// when it is a directory there).
pub fn copy_in(store: &Store, name: &str, host: &Path, path: &str) -> agentkernel_core::Result<()> {
    let root = SandboxRoot::open(store, name).map_err(native_error)?;
    let meta = std::fs::metadata(host).map_err(|e| host_error(host, e))?;
    let target = if path.ends_with('/') || root.is_dir(path) {
        format!(
            "{}/{}",
            path.trim_end_matches('/'),
            base_name(&host.to_string_lossy())?
        )
    } else {
        path.to_string()
    };
    let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions());
    if meta.is_dir() {
        let dir = root.create_dir(&target, mode).map_err(native_error)?;
        let mut skipped = Vec::new();
        copy_dir_in(host, &dir, &mut skipped).map_err(native_error)?;
        report_skipped(&skipped, "not a file, directory or symlink");
        return Ok(());
    }
    if !meta.is_file() {
        return Err(agentkernel_core::Error::invalid(
            "host path",
            host.to_string_lossy(),
            "is not a regular file or directory",
        ));
    }
    let mut from = File::open(host).map_err(|e| host_error(host, e))?;
    let mut to = root.create_file(&target, mode).map_err(native_error)?;
    io::copy(&mut from, &mut to).map_err(native_error)?;
    Ok(())
}

/// `sandbox cp NAME:PATH HOST`: out of the kept sandbox `name` (into `host`
/// when it is a directory).
pub fn copy_out(
    store: &Store,
    name: &str,
    path: &str,
    host: &Path,
) -> agentkernel_core::Result<()> {
    let root = SandboxRoot::open(store, name).map_err(native_error)?;
    let target = if host.is_dir() {
        host.join(base_name(path)?)
    } else {
        host.to_path_buf()
    };
    match root.source(path).map_err(native_error)? {
        Source::File(mut from, mode) => {
            let mut to = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(&target)
                .map_err(|e| host_error(&target, e))?;
            io::copy(&mut from, &mut to).map_err(|e| host_error(&target, e))?;
            Ok(())
        }
        Source::Dir(dir, mode) => {
            let mut skipped = Vec::new();
            copy_dir_out(&dir, mode, &target, &mut skipped).map_err(native_error)?;
            report_skipped(
                &skipped,
                "only files and directories are copied out of a sandbox",
            );
            Ok(())
        }
    }
}
