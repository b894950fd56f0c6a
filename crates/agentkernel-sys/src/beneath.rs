//! Walking a relative path beneath a directory descriptor one component at
//! a time with `openat(O_NOFOLLOW | O_DIRECTORY)`: a symlink anywhere on the
//! way is refused, not followed, and `..` is never accepted, so what an
//! image puts in its tree (a `/workspace` that is a symlink to `/etc`, a
//! layer entry beneath a symlink to `/`) cannot make us touch anything
//! outside the directory.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use crate::c_string;

/// How a walk opens directories and what it does about missing ones.
#[derive(Clone, Copy, Debug)]
pub struct Walk {
    /// `O_PATH` descriptors (enough to walk further and to name a mount
    /// target) rather than readable ones.
    pub path_only: bool,
    /// Create a missing directory with this mode; `None`: a missing
    /// component is [`WalkError::Missing`].
    pub create: Option<u32>,
    /// Set a created directory's mode exactly (`fchmod`), whatever the umask.
    pub exact_mode: bool,
}

/// Why a walk stopped. `at` is the path walked so far, the offending
/// component last.
#[derive(Debug)]
pub enum WalkError {
    /// `..`, or an absolute path: never beneath.
    NotBeneath,
    /// A symlink on the way (refused, never followed).
    Symlink {
        at: PathBuf,
    },
    /// Something that is not a directory on the way.
    NotADirectory {
        at: PathBuf,
    },
    /// A missing component, and the walk creates nothing.
    Missing {
        at: PathBuf,
    },
    /// A NUL byte in a component.
    Name {
        at: PathBuf,
    },
    Io {
        at: PathBuf,
        source: io::Error,
    },
}

impl std::fmt::Display for WalkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WalkError::NotBeneath => write!(f, "`..` or an absolute path is not allowed"),
            WalkError::Symlink { at } => write!(f, "`{}` is a symlink", at.display()),
            WalkError::NotADirectory { at } => {
                write!(f, "`{}` is not a directory", at.display())
            }
            WalkError::Missing { at } => write!(f, "`{}` does not exist", at.display()),
            WalkError::Name { at } => write!(f, "`{}` contains a NUL byte", at.display()),
            WalkError::Io { at, source } => write!(f, "{}: {source}", at.display()),
        }
    }
}

impl std::error::Error for WalkError {}

impl From<WalkError> for io::Error {
    fn from(e: WalkError) -> io::Error {
        let kind = match &e {
            WalkError::NotBeneath | WalkError::Name { .. } => io::ErrorKind::InvalidInput,
            WalkError::Symlink { .. } | WalkError::NotADirectory { .. } => {
                io::ErrorKind::NotADirectory
            }
            WalkError::Missing { .. } => io::ErrorKind::NotFound,
            WalkError::Io { source, .. } => source.kind(),
        };
        io::Error::new(kind, e)
    }
}

/// The normal components of `rel` (`.` skipped); `..` or a root refused.
pub fn components(rel: &Path) -> Result<Vec<&OsStr>, WalkError> {
    rel.components()
        .filter(|c| *c != Component::CurDir)
        .map(|c| match c {
            Component::Normal(name) => Ok(name),
            _ => Err(WalkError::NotBeneath),
        })
        .collect()
}

/// Opens the directory `rel` beneath `root` (see the module docs).
pub fn open_dir(root: BorrowedFd<'_>, rel: &Path, how: Walk) -> Result<OwnedFd, WalkError> {
    let names = components(rel)?;
    let mut dir = root.try_clone_to_owned().map_err(|source| WalkError::Io {
        at: PathBuf::new(),
        source,
    })?;
    let mut at = PathBuf::new();
    for name in names {
        at.push(name);
        dir = step(dir.as_fd(), name, &at, how)?;
    }
    Ok(dir)
}

fn step(dir: BorrowedFd<'_>, name: &OsStr, at: &Path, how: Walk) -> Result<OwnedFd, WalkError> {
    let cname = c_string(name.as_bytes()).map_err(|_| WalkError::Name { at: at.into() })?;
    let flags = OFlags::DIRECTORY
        | OFlags::NOFOLLOW
        | OFlags::CLOEXEC
        | if how.path_only {
            OFlags::PATH
        } else {
            OFlags::RDONLY
        };
    let io = |e: rustix::io::Errno| WalkError::Io {
        at: at.into(),
        source: e.into(),
    };
    match rustix::fs::openat(dir, &*cname, flags, Mode::empty()) {
        Ok(fd) => Ok(fd),
        Err(rustix::io::Errno::NOENT) => {
            let Some(mode) = how.create else {
                return Err(WalkError::Missing { at: at.into() });
            };
            match rustix::fs::mkdirat(dir, &*cname, Mode::from_raw_mode(mode)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(io(e)),
            }
            let fd = rustix::fs::openat(dir, &*cname, flags, Mode::empty()).map_err(io)?;
            if how.exact_mode {
                rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode)).map_err(io)?;
            }
            Ok(fd)
        }
        Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) => {
            let symlink = rustix::fs::statat(dir, &*cname, AtFlags::SYMLINK_NOFOLLOW)
                .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink);
            Err(if symlink {
                WalkError::Symlink { at: at.into() }
            } else {
                WalkError::NotADirectory { at: at.into() }
            })
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const CREATE: Walk = Walk {
        path_only: true,
        create: Some(0o755),
        exact_mode: false,
    };
    const EXISTING: Walk = Walk {
        path_only: false,
        create: None,
        exact_mode: false,
    };

    fn root() -> (tempfile::TempDir, OwnedFd) {
        let tmp = tempfile::tempdir().unwrap();
        let fd = OwnedFd::from(std::fs::File::open(tmp.path()).unwrap());
        (tmp, fd)
    }

    #[test]
    fn creates_what_is_missing_and_reopens_what_exists() {
        let (tmp, root) = root();
        open_dir(root.as_fd(), Path::new("./a/b/c"), CREATE).unwrap();
        assert!(tmp.path().join("a/b/c").is_dir());
        open_dir(root.as_fd(), Path::new("a/b"), EXISTING).unwrap();
        let exact = Walk {
            path_only: false,
            create: Some(0o751),
            exact_mode: true,
        };
        open_dir(root.as_fd(), Path::new("x"), exact).unwrap();
        let mode = std::fs::metadata(tmp.path().join("x"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o751);
        assert!(matches!(
            open_dir(root.as_fd(), Path::new("a/nope"), EXISTING),
            Err(WalkError::Missing { at }) if at == Path::new("a/nope")
        ));
    }

    /// The escapes an image can try: a symlink to the host's `/etc`, `..`,
    /// an absolute path, a file where a directory should be.
    #[test]
    fn attack_symlinks_dotdot_and_files_are_refused() {
        let (tmp, root) = root();
        std::os::unix::fs::symlink("/etc", tmp.path().join("workspace")).unwrap();
        std::fs::write(tmp.path().join("file"), "").unwrap();
        match open_dir(root.as_fd(), Path::new("workspace/x"), CREATE) {
            Err(WalkError::Symlink { at }) => assert_eq!(at, Path::new("workspace")),
            other => panic!("{other:?}"),
        }
        assert!(!Path::new("/etc/x").exists());
        for rel in ["../x", "a/../../x", "/etc"] {
            assert!(
                matches!(
                    open_dir(root.as_fd(), Path::new(rel), CREATE),
                    Err(WalkError::NotBeneath)
                ),
                "{rel}"
            );
        }
        assert!(matches!(
            open_dir(root.as_fd(), Path::new("file/x"), CREATE),
            Err(WalkError::NotADirectory { .. })
        ));
    }
}
