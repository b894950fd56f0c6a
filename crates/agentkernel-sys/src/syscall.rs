//! The seam between planning a root filesystem and doing it (after youki's
//! `Syscall` trait): rootfs code asks a [`Syscall`] to mount, look and
//! create; [`Host`] does it, and [`Recorder`] writes the calls down against
//! a described tree, so which mounts a root gets — masks, read-only
//! remounts, cgroup hierarchies — is unit-tested without root.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;

/// What is at a path, not following a final symlink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    Other,
}

pub trait Syscall {
    /// mount(2); an empty `fstype` or `None` data is passed as NULL.
    fn mount(
        &self,
        source: &str,
        target: &str,
        fstype: &str,
        flags: libc::c_ulong,
        data: Option<&str>,
    ) -> io::Result<()>;
    /// What is at `path` (lstat), or None.
    fn kind(&self, path: &str) -> Option<Kind>;
    fn create_dir(&self, path: &str) -> io::Result<()>;
}

/// The kernel.
pub struct Host;

impl Syscall for Host {
    fn mount(
        &self,
        source: &str,
        target: &str,
        fstype: &str,
        flags: libc::c_ulong,
        data: Option<&str>,
    ) -> io::Result<()> {
        let context = |e: io::Error| {
            io::Error::new(
                e.kind(),
                format!("mount {fstype} {source} on {target}: {e}"),
            )
        };
        let (s, t, f) = (
            crate::c_string(source.as_bytes())?,
            crate::c_string(target.as_bytes())?,
            crate::c_string(fstype.as_bytes())?,
        );
        let d = data.map(|d| crate::c_string(d.as_bytes())).transpose()?;
        // rustix's mount takes typed flags per operation (bind, remount,
        // new mount) where callers here pass the one flags word: libc's.
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
                    .map_or(std::ptr::null(), |d| d.as_ptr().cast::<libc::c_void>()),
            )
        };
        if rc != 0 {
            return Err(context(io::Error::last_os_error()));
        }
        Ok(())
    }

    fn kind(&self, path: &str) -> Option<Kind> {
        let meta = std::fs::symlink_metadata(path).ok()?;
        Some(if meta.is_dir() {
            Kind::Dir
        } else {
            Kind::Other
        })
    }

    fn create_dir(&self, path: &str) -> io::Result<()> {
        std::fs::create_dir(path)
            .map_err(|e| io::Error::new(e.kind(), format!("create {path}: {e}")))
    }
}

/// One call a [`Recorder`] saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Mount {
        source: String,
        target: String,
        fstype: String,
        flags: libc::c_ulong,
        data: Option<String>,
    },
    CreateDir(String),
}

/// Records calls against a described tree (paths → kinds) instead of
/// making them; a created directory joins the tree.
#[derive(Default)]
pub struct Recorder {
    tree: RefCell<BTreeMap<String, Kind>>,
    calls: RefCell<Vec<Call>>,
}

impl Recorder {
    pub fn with(paths: &[(&str, Kind)]) -> Recorder {
        let recorder = Recorder::default();
        recorder
            .tree
            .borrow_mut()
            .extend(paths.iter().map(|(p, k)| (p.to_string(), *k)));
        recorder
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.borrow().clone()
    }
}

impl Syscall for Recorder {
    fn mount(
        &self,
        source: &str,
        target: &str,
        fstype: &str,
        flags: libc::c_ulong,
        data: Option<&str>,
    ) -> io::Result<()> {
        self.calls.borrow_mut().push(Call::Mount {
            source: source.into(),
            target: target.into(),
            fstype: fstype.into(),
            flags,
            data: data.map(Into::into),
        });
        Ok(())
    }

    fn kind(&self, path: &str) -> Option<Kind> {
        self.tree.borrow().get(path).copied()
    }

    fn create_dir(&self, path: &str) -> io::Result<()> {
        if self.tree.borrow().contains_key(path) {
            return Err(io::Error::from(io::ErrorKind::AlreadyExists));
        }
        self.tree.borrow_mut().insert(path.into(), Kind::Dir);
        self.calls.borrow_mut().push(Call::CreateDir(path.into()));
        Ok(())
    }
}
