//! Thin, checked wrappers over the syscalls the runtime uses. Each returns an
//! `io::Error` that names what was being done, so a failed setup is one clear
//! line.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

pub fn cstr(s: &str) -> CString {
    CString::new(s).unwrap_or_else(|_| CString::new("?").expect("no NUL"))
}

pub fn cpath(p: &Path) -> CString {
    use std::os::unix::ffi::OsStrExt;
    CString::new(p.as_os_str().as_bytes()).unwrap_or_else(|_| cstr("?"))
}

pub fn context(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn check(rc: libc::c_int, what: impl std::fmt::Display) -> io::Result<()> {
    if rc < 0 {
        Err(context(what)(io::Error::last_os_error()))
    } else {
        Ok(())
    }
}

pub fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let (s, t, f) = (cstr(source), cstr(target), cstr(fstype));
    let d = data.map(cstr);
    // SAFETY: all pointers are valid C strings (or null) for the call's duration.
    let rc = unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            if fstype.is_empty() {
                std::ptr::null()
            } else {
                f.as_ptr()
            },
            flags,
            d.as_ref()
                .map_or(std::ptr::null(), |d| d.as_ptr() as *const libc::c_void),
        )
    };
    check(rc, format_args!("mount {fstype} {source} on {target}"))
}

/// The path through which a mount can target an fd we opened safely.
pub fn fd_path(fd: &OwnedFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let c = cpath(path);
    // SAFETY: `c` is a valid C string; the returned fd is owned below.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(context(format_args!("open {}", path.display()))(
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: `fd` was just returned by open and is ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
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
    let parts: Vec<&str> = rel
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if parts.contains(&"..") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{rel}: `..` is not allowed in a sandbox path"),
        ));
    }
    // SAFETY: dup of a valid fd; checked before ownership is taken (EMFILE
    // would otherwise make an OwnedFd of -1).
    let duplicate = unsafe { libc::fcntl(root.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if duplicate < 0 {
        return Err(context(format_args!(
            "{rel}: duplicate the root descriptor"
        ))(io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let mut dir = unsafe { OwnedFd::from_raw_fd(duplicate) };
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let want_file = last && leaf == Leaf::File;
        let name = cstr(part);
        let flags = libc::O_PATH
            | libc::O_NOFOLLOW
            | libc::O_CLOEXEC
            | if want_file { 0 } else { libc::O_DIRECTORY };
        // SAFETY: `dir` is a valid directory fd and `name` a valid C string.
        let mut fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags) };
        if fd < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOENT) {
            // SAFETY: as above; creating the missing component.
            let rc = unsafe {
                if want_file {
                    let f = libc::openat(
                        dir.as_raw_fd(),
                        name.as_ptr(),
                        libc::O_CREAT
                            | libc::O_EXCL
                            | libc::O_WRONLY
                            | libc::O_NOFOLLOW
                            | libc::O_CLOEXEC,
                        0o644,
                    );
                    if f >= 0 {
                        libc::close(f);
                        0
                    } else {
                        -1
                    }
                } else {
                    libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o755)
                }
            };
            if rc < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
                return Err(context(format_args!("create {rel}"))(
                    io::Error::last_os_error(),
                ));
            }
            // SAFETY: as above.
            fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags) };
        }
        if fd < 0 {
            let e = io::Error::last_os_error();
            let why = match e.raw_os_error() {
                Some(libc::ELOOP) | Some(libc::ENOTDIR) => format!(
                    "{rel}: `{part}` is a symlink or not a directory in the sandbox's root; refusing to follow it"
                ),
                _ => format!("open {rel}: {e}"),
            };
            return Err(io::Error::new(e.kind(), why));
        }
        // SAFETY: `fd` was just returned by openat and is ours.
        dir = unsafe { OwnedFd::from_raw_fd(fd) };
    }
    Ok(dir)
}

/// Writes a small file at `rel` beneath `root` without following symlinks
/// (an image's symlinked `/etc/hosts` is replaced, not written through).
pub fn write_beneath(root: &OwnedFd, rel: &str, contents: &str) -> io::Result<()> {
    let (parent, name) = rel.rsplit_once('/').unwrap_or(("", rel));
    let dir = open_beneath(root, parent, Leaf::Dir)?;
    let cname = cstr(name);
    // O_PATH fds cannot be used for writes: reopen the directory for real.
    let real = reopen_dir(&dir)?;
    // SAFETY: valid dir fd and C string; a symlink or other non-file is removed first.
    unsafe { libc::unlinkat(real.as_raw_fd(), cname.as_ptr(), 0) };
    // SAFETY: valid dir fd and C string; the fd is owned below.
    let fd = unsafe {
        libc::openat(
            real.as_raw_fd(),
            cname.as_ptr(),
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o644,
        )
    };
    if fd < 0 {
        return Err(context(format_args!("write {rel}"))(
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: `fd` was just returned by openat and is ours.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    io::Write::write_all(&mut &file, contents.as_bytes())
        .map_err(context(format_args!("write {rel}")))
}

fn reopen_dir(dir: &OwnedFd) -> io::Result<OwnedFd> {
    let path = cstr(&fd_path(dir));
    // SAFETY: valid C string; the fd is owned below.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just opened, ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
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
