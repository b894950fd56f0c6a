//! Unpacking one layer tar into a directory that overlayfs can use as a
//! lower layer.
//!
//! A layer is untrusted input, so nothing here follows a symlink or a `..`:
//! every entry is resolved one component at a time with
//! `openat(O_NOFOLLOW | O_DIRECTORY)` from a descriptor of the layer root.
//! Absolute paths are made relative to the root (as GNU tar does); a `..`
//! component, a path through a symlink, or a hard link to anything outside
//! the layer fails the whole layer. Symlinks themselves are stored verbatim:
//! they only mean something inside the sandbox's own root.
//!
//! OCI whiteouts become what overlayfs understands: `.wh.<name>` a 0/0
//! character device, `.wh..wh..opq` the `trusted.overlay.opaque=y` xattr.
//! Where that is not permitted (`trusted.*` needs CAP_SYS_ADMIN; the device
//! needs CAP_MKNOD before Linux 5.8) they are returned as [`LayerMarkers`]
//! for the runtime to apply another way; an opaque directory then also gets
//! `user.overlay.opaque=y`, which rootless overlayfs (`userxattr`) reads.
//! Device nodes in layers are not created: the sandbox builds its own `/dev`,
//! and a layer's device nodes would be a way around that.

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io::{self, BufReader, Cursor, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use agentkernel_sys::beneath::{self, Walk, WalkError};
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};
use crate::reference::Digest;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Whiteouts and opaque directories of one layer that could not be recorded
/// the overlayfs way (`trusted.*` xattrs need CAP_SYS_ADMIN; a 0/0
/// character device needs CAP_MKNOD before Linux 5.8). Empty when the store
/// was filled as root. Paths are relative to the layer directory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayerMarkers {
    /// Paths deleted from the layers below (`.wh.<name>` entries).
    pub whiteouts: Vec<PathBuf>,
    /// Directories whose lower-layer contents are hidden (`.wh..wh..opq`).
    pub opaque_dirs: Vec<PathBuf>,
}

impl LayerMarkers {
    /// Whether there is nothing the runtime must apply itself.
    pub fn is_empty(&self) -> bool {
        self.whiteouts.is_empty() && self.opaque_dirs.is_empty()
    }

    /// NUL-separated records, `w<path>` or `o<path>`: paths are arbitrary bytes.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (kind, paths) in [(b'w', &self.whiteouts), (b'o', &self.opaque_dirs)] {
            for p in paths {
                out.push(kind);
                out.extend_from_slice(p.as_os_str().as_bytes());
                out.push(0);
            }
        }
        out
    }

    pub(crate) fn decode(data: &[u8]) -> Option<LayerMarkers> {
        let mut markers = LayerMarkers::default();
        for record in data.split(|&b| b == 0).filter(|r| !r.is_empty()) {
            let path = PathBuf::from(OsStr::from_bytes(&record[1..]));
            match record[0] {
                b'w' => markers.whiteouts.push(path),
                b'o' => markers.opaque_dirs.push(path),
                _ => return None,
            }
        }
        Some(markers)
    }
}

/// What extracting a layer produced.
#[derive(Debug)]
pub(crate) struct Extracted {
    /// sha256 of the uncompressed tar stream (the layer's DiffID).
    pub diff_id: Digest,
    pub markers: LayerMarkers,
}

/// How much a layer may expand to, and why (for the error).
#[derive(Clone, Debug)]
pub(crate) struct SizeLimit {
    pub bytes: u64,
    pub bound: String,
}

impl SizeLimit {
    fn exceeded(&self, layer: &str) -> Error {
        Error::LayerTooLarge {
            layer: layer.to_string(),
            limit: self.bytes,
            bound: self.bound.clone(),
        }
    }
}

/// Unpacks the (gzip-, zstd- or un-compressed) tar stream `reader` into
/// `dest`, an existing empty directory, and hashes the uncompressed stream.
/// `layer` names the layer in errors. The layer may not expand beyond
/// `limit`: the decompressed stream is counted as it is read (a
/// decompression bomb stops there, not after), and each file's size is
/// checked before it is written (a sparse entry's holes count: it declares
/// its full size up front). Runs of zeros are written as holes, so a sparse
/// entry stays sparse on disk.
pub(crate) fn extract(
    mut reader: impl Read,
    dest: &Path,
    layer: &str,
    limit: &SizeLimit,
) -> Result<Extracted> {
    let overflowed = std::rc::Rc::new(std::cell::Cell::new(false));
    let bad = |e: io::Error| {
        if overflowed.get() {
            return limit.exceeded(layer);
        }
        Error::BadLayer {
            layer: layer.to_string(),
            detail: e.to_string(),
        }
    };
    // Sniff the compression from the bytes rather than trusting the media
    // type: registries and tools mislabel layers.
    let mut magic = [0u8; 4];
    let mut n = 0;
    while n < magic.len() {
        match reader.read(&mut magic[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(bad(e)),
        }
    }
    let head = Cursor::new(magic[..n].to_vec()).chain(reader);
    let decoded: Box<dyn Read> = if magic[..n].starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(head))
    } else if magic[..n] == [0x28, 0xb5, 0x2f, 0xfd] {
        Box::new(zstd::stream::read::Decoder::new(head).map_err(bad)?)
    } else {
        Box::new(head)
    };
    let hashing = HashingReader {
        inner: decoded,
        hasher: Sha256::new(),
        remaining: limit.bytes,
        overflowed: overflowed.clone(),
    };
    let mut archive = tar::Archive::new(BufReader::with_capacity(128 << 10, hashing));

    let mut x = Extractor::new(dest, layer)?;
    let mut declared: u64 = 0;
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        declared = declared.saturating_add(entry.size());
        if declared > limit.bytes {
            return Err(limit.exceeded(layer));
        }
        x.entry(&mut entry).map_err(|e| match e {
            _ if overflowed.get() => limit.exceeded(layer),
            e => e,
        })?;
    }
    x.finish()?;
    // Hash what tar did not need to read (the end-of-archive padding), so
    // the digest covers the whole stream.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(bad)?;
    let hashing = rest.into_inner();
    Ok(Extracted {
        diff_id: Digest::from_hasher(hashing.hasher),
        markers: x.markers,
    })
}

/// Hashes the decompressed stream and stops it (an error, with
/// `overflowed` set) once it passes the layer's size limit.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    remaining: u64,
    overflowed: std::rc::Rc<std::cell::Cell<bool>>,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        match self.remaining.checked_sub(n as u64) {
            Some(left) => self.remaining = left,
            None => {
                self.overflowed.set(true);
                return Err(io::Error::other("the layer expands beyond its size limit"));
            }
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Attributes applied to directories after everything else, deepest first:
/// a read-only directory must stay writable while its contents arrive, and
/// its mtime changes with every entry written into it.
struct DirMeta {
    rel: PathBuf,
    attrs: Attrs,
    xattrs: Vec<(String, Vec<u8>)>,
}

/// Extended attributes from PAX `SCHILY.xattr.*` records.
type Xattrs = Vec<(String, Vec<u8>)>;

#[derive(Clone, Copy)]
struct Attrs {
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: i64,
}

struct Extractor<'a> {
    root: OwnedFd,
    root_path: PathBuf,
    layer: &'a str,
    /// Ownership is restored only when we are root; otherwise every file is ours.
    chown: bool,
    /// The last parent directory opened: consecutive entries mostly share one.
    cache: Option<(PathBuf, OwnedFd)>,
    dirs: Vec<DirMeta>,
    markers: LayerMarkers,
    mknod_allowed: bool,
}

impl<'a> Extractor<'a> {
    fn new(dest: &Path, layer: &'a str) -> Result<Extractor<'a>> {
        let path = c_path(dest.as_os_str()).map_err(|e| Error::io(dest, e))?;
        // SAFETY: `path` is a valid NUL-terminated string; the returned fd is checked.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        let root = owned(fd).map_err(|e| Error::io(dest, e))?;
        Ok(Extractor {
            root,
            root_path: dest.to_path_buf(),
            layer,
            // SAFETY: geteuid has no preconditions and cannot fail.
            chown: unsafe { libc::geteuid() } == 0,
            cache: None,
            dirs: Vec::new(),
            markers: LayerMarkers::default(),
            mknod_allowed: true,
        })
    }

    fn unsafe_entry(&self, entry: &[u8], reason: impl Into<String>) -> Error {
        Error::UnsafeLayer {
            layer: self.layer.to_string(),
            entry: String::from_utf8_lossy(entry).into_owned(),
            reason: reason.into(),
        }
    }

    fn bad(&self, detail: impl Into<String>) -> Error {
        Error::BadLayer {
            layer: self.layer.to_string(),
            detail: detail.into(),
        }
    }

    fn io(&self, rel: &Path, e: io::Error) -> Error {
        Error::io(self.root_path.join(rel), e)
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<()> {
        let raw = entry.path_bytes().into_owned();
        let rel = sanitize(&raw).map_err(|reason| self.unsafe_entry(&raw, reason))?;
        let kind = entry.header().entry_type();
        let mut attrs = Attrs {
            mode: entry.header().mode().map_err(|e| self.bad(e.to_string()))? & 0o7777,
            uid: entry.header().uid().unwrap_or(0),
            gid: entry.header().gid().unwrap_or(0),
            mtime: entry.header().mtime().unwrap_or(0).try_into().unwrap_or(0),
        };
        let mut xattrs = Vec::new();
        if let Some(pax) = entry
            .pax_extensions()
            .map_err(|e| self.bad(e.to_string()))?
        {
            for ext in pax.flatten() {
                let Ok(key) = ext.key() else { continue };
                let num = || {
                    ext.value()
                        .ok()
                        .and_then(|v| v.split('.').next()?.parse::<i64>().ok())
                };
                match key {
                    "uid" => attrs.uid = num().map_or(attrs.uid, |v| v as u64),
                    "gid" => attrs.gid = num().map_or(attrs.gid, |v| v as u64),
                    "mtime" => attrs.mtime = num().unwrap_or(attrs.mtime),
                    _ => {
                        if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                            // A layer must not steer overlayfs itself (opaque,
                            // redirect, metacopy): only our whiteout handling may.
                            if !name.starts_with("trusted.overlay.")
                                && !name.starts_with("user.overlay.")
                            {
                                xattrs.push((name.to_string(), ext.value_bytes().to_vec()));
                            }
                        }
                    }
                }
            }
        }

        use tar::EntryType as T;
        let Some(name) = rel.file_name().map(OsStr::to_os_string) else {
            // The root itself (`./`): its attributes become the layer root's.
            if kind == T::Directory {
                self.dirs.push(DirMeta {
                    rel: PathBuf::new(),
                    attrs,
                    xattrs,
                });
                return Ok(());
            }
            return Err(self.unsafe_entry(&raw, "would replace the layer's root directory"));
        };
        let parent = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        let name_bytes = name.as_bytes();

        if let Some(target) = name_bytes.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            return self.whiteout(&raw, &parent, target);
        }

        match kind {
            T::Regular | T::Continuous | T::GNUSparse => {
                let dir = self.parent_dir(&raw, &parent)?;
                self.clear(dir, &name, &rel, false)?;
                let cname = c_path(&name).map_err(|e| self.io(&rel, e))?;
                // SAFETY: `dir` is an open directory fd and `cname` a valid C string.
                let fd = unsafe {
                    libc::openat(
                        dir,
                        cname.as_ptr(),
                        libc::O_WRONLY
                            | libc::O_CREAT
                            | libc::O_EXCL
                            | libc::O_NOFOLLOW
                            | libc::O_CLOEXEC,
                        0o600 as libc::c_uint,
                    )
                };
                let mut file = File::from(owned(fd).map_err(|e| self.io(&rel, e))?);
                self.copy_data(entry, &mut file, &rel)?;
                self.set_attrs_fd(file.as_raw_fd(), &rel, attrs, &xattrs)?;
            }
            T::Directory => {
                let dir = self.parent_dir(&raw, &parent)?;
                if !self.clear(dir, &name, &rel, true)? {
                    let cname = c_path(&name).map_err(|e| self.io(&rel, e))?;
                    // SAFETY: valid dir fd and C string.
                    cvt(unsafe { libc::mkdirat(dir, cname.as_ptr(), 0o700) })
                        .map_err(|e| self.io(&rel, e))?;
                }
                self.dirs.push(DirMeta {
                    rel: rel.clone(),
                    attrs,
                    xattrs,
                });
            }
            T::Symlink => {
                let Some(target) = entry.link_name_bytes().map(|t| t.into_owned()) else {
                    return Err(self.bad(format!("symlink `{}` has no target", rel.display())));
                };
                if target.is_empty() {
                    return Err(
                        self.bad(format!("symlink `{}` has an empty target", rel.display()))
                    );
                }
                let dir = self.parent_dir(&raw, &parent)?;
                self.clear(dir, &name, &rel, false)?;
                let cname = c_path(&name).map_err(|e| self.io(&rel, e))?;
                let ctarget =
                    CString::new(target).map_err(|_| self.bad("symlink target contains NUL"))?;
                // SAFETY: valid dir fd and C strings. The target is stored, never followed.
                cvt(unsafe { libc::symlinkat(ctarget.as_ptr(), dir, cname.as_ptr()) })
                    .map_err(|e| self.io(&rel, e))?;
                self.set_attrs_at(dir, &cname, &rel, attrs, false)?;
            }
            T::Link => {
                let Some(target) = entry.link_name_bytes().map(|t| t.into_owned()) else {
                    return Err(self.bad(format!("hard link `{}` has no target", rel.display())));
                };
                let target_rel = sanitize(&target).map_err(|reason| {
                    self.unsafe_entry(
                        &raw,
                        format!(
                            "is a hard link to `{}`, which {reason}",
                            String::from_utf8_lossy(&target)
                        ),
                    )
                })?;
                if target_rel == rel {
                    return Ok(());
                }
                let Some(target_name) = target_rel.file_name().map(OsStr::to_os_string) else {
                    return Err(
                        self.unsafe_entry(&raw, "is a hard link to the layer's root directory")
                    );
                };
                let target_parent = target_rel.parent().unwrap_or(Path::new(""));
                let target_dir = self.open_existing(&raw, target_parent)?;
                let ctarget = c_path(&target_name).map_err(|e| self.io(&target_rel, e))?;
                match fstatat(target_dir.as_raw_fd(), &ctarget)
                    .map_err(|e| self.io(&target_rel, e))?
                {
                    None => {
                        return Err(self.bad(format!(
                            "hard link `{}` points to `{}`, which is not in this layer",
                            rel.display(),
                            target_rel.display()
                        )))
                    }
                    Some(st) if is_dir(&st) => {
                        return Err(self.unsafe_entry(&raw, "is a hard link to a directory"));
                    }
                    Some(_) => {}
                }
                let dir = self.parent_dir(&raw, &parent)?;
                self.clear(dir, &name, &rel, false)?;
                let cname = c_path(&name).map_err(|e| self.io(&rel, e))?;
                // SAFETY: valid dir fds and C strings; flags 0 means a symlink
                // target is linked itself, not followed.
                cvt(unsafe {
                    libc::linkat(
                        target_dir.as_raw_fd(),
                        ctarget.as_ptr(),
                        dir,
                        cname.as_ptr(),
                        0,
                    )
                })
                .map_err(|e| self.io(&rel, e))?;
            }
            T::Fifo => {
                let dir = self.parent_dir(&raw, &parent)?;
                self.clear(dir, &name, &rel, false)?;
                let cname = c_path(&name).map_err(|e| self.io(&rel, e))?;
                // SAFETY: valid dir fd and C string; a FIFO needs no privilege.
                cvt(unsafe { libc::mknodat(dir, cname.as_ptr(), libc::S_IFIFO | 0o600, 0) })
                    .map_err(|e| self.io(&rel, e))?;
                self.set_attrs_at(dir, &cname, &rel, attrs, true)?;
            }
            // Device nodes: see the module doc. Metadata-only and unknown
            // entry types carry nothing to write.
            _ => {}
        }
        Ok(())
    }

    /// Copies an entry's data, telling a broken stream (the layer's fault)
    /// from a failed write (ours: disk full, permissions).
    /// Blocks of zeros become holes (a seek), so a sparse entry, whose
    /// holes the tar reader hands over as zeros, stays sparse on disk.
    fn copy_data(&self, from: &mut impl Read, to: &mut File, rel: &Path) -> Result<()> {
        use std::io::Seek;
        let mut buf = vec![0u8; 64 << 10];
        let mut ends_in_hole = false;
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.bad(format!("reading `{}`: {e}", rel.display()))),
            };
            ends_in_hole = buf[..n].iter().all(|&b| b == 0);
            if ends_in_hole {
                to.seek(io::SeekFrom::Current(n as i64))
                    .map_err(|e| self.io(rel, e))?;
            } else {
                to.write_all(&buf[..n]).map_err(|e| self.io(rel, e))?;
            }
        }
        if ends_in_hole {
            // A trailing hole: the seek alone does not extend the file.
            let len = to.stream_position().map_err(|e| self.io(rel, e))?;
            to.set_len(len).map_err(|e| self.io(rel, e))?;
        }
        Ok(())
    }

    fn whiteout(&mut self, raw: &[u8], parent: &Path, target: &[u8]) -> Result<()> {
        if target == &OPAQUE_MARKER.as_bytes()[WHITEOUT_PREFIX.len()..] {
            // The directory itself may come later in the tar, or only from a
            // lower layer: create it so the marker has somewhere to live.
            let dir = self.parent_dir(raw, parent)?;
            if !set_xattr(dir, c"trusted.overlay.opaque", b"y") {
                // Rootless overlayfs (`userxattr`) reads the user.* twin.
                set_xattr(dir, c"user.overlay.opaque", b"y");
                self.markers.opaque_dirs.push(parent.to_path_buf());
            }
            return Ok(());
        }
        if target.starts_with(WHITEOUT_PREFIX.as_bytes()) || target.is_empty() {
            // `.wh..wh.*` other than the opaque marker is aufs metadata
            // (hard-link directories), meaningless here.
            return Ok(());
        }
        if target == b"." || target == b".." {
            return Err(self.unsafe_entry(raw, "is a whiteout of `.` or `..`"));
        }
        let rel = parent.join(OsStr::from_bytes(target));
        let dir = self.parent_dir(raw, parent)?;
        let cname = c_path(OsStr::from_bytes(target)).map_err(|e| self.io(&rel, e))?;
        // A whiteout only hides lower layers: if this layer has the name too,
        // that entry stays (OCI image spec, layer.md).
        if fstatat(dir, &cname)
            .map_err(|e| self.io(&rel, e))?
            .is_some()
        {
            return Ok(());
        }
        if self.mknod_allowed {
            // SAFETY: valid dir fd and C string; 0/0 is overlayfs's whiteout device.
            let r = unsafe { libc::mknodat(dir, cname.as_ptr(), libc::S_IFCHR, 0) };
            match cvt(r) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => self.mknod_allowed = false,
                Err(e) => return Err(self.io(&rel, e)),
            }
        }
        self.markers.whiteouts.push(rel);
        Ok(())
    }

    /// Makes room for a new entry `name` in `dir`. Returns true if a
    /// directory is there and `keep_dir` asked to keep it (tar's merge rule).
    fn clear(&mut self, dir: RawFd, name: &OsStr, rel: &Path, keep_dir: bool) -> Result<bool> {
        let cname = c_path(name).map_err(|e| self.io(rel, e))?;
        let Some(st) = fstatat(dir, &cname).map_err(|e| self.io(rel, e))? else {
            return Ok(false);
        };
        if is_dir(&st) {
            if keep_dir {
                return Ok(true);
            }
            // Every ancestor was just resolved without following links and
            // this directory is ours alone, so a path is safe here; and
            // remove_dir_all never follows symlinks inside.
            remove_tree(&self.root_path.join(rel)).map_err(|e| self.io(rel, e))?;
            if self.cache.as_ref().is_some_and(|(p, _)| p.starts_with(rel)) {
                self.cache = None;
            }
            self.dirs.retain(|d| !d.rel.starts_with(rel));
        } else {
            // SAFETY: valid dir fd and C string.
            cvt(unsafe { libc::unlinkat(dir, cname.as_ptr(), 0) }).map_err(|e| self.io(rel, e))?;
        }
        Ok(false)
    }

    /// The directory `rel` (relative to the root), created as needed, every
    /// component a real directory: never a symlink, never outside.
    fn parent_dir(&mut self, raw: &[u8], rel: &Path) -> Result<RawFd> {
        if let Some((p, fd)) = &self.cache {
            if p == rel {
                return Ok(fd.as_raw_fd());
            }
        }
        let fd = self.walk(raw, rel, true)?;
        let raw_fd = fd.as_raw_fd();
        self.cache = Some((rel.to_path_buf(), fd));
        Ok(raw_fd)
    }

    /// Like `parent_dir`, but nothing is created: for hard-link targets and
    /// the final attribute pass.
    fn open_existing(&self, raw: &[u8], rel: &Path) -> Result<OwnedFd> {
        self.walk(raw, rel, false)
    }

    fn walk(&self, raw: &[u8], rel: &Path, create: bool) -> Result<OwnedFd> {
        let how = Walk {
            path_only: false,
            // A parent the tar never listed: like tar, create it, 0755
            // whatever the umask (overlayfs shows the topmost layer's
            // directory attributes).
            create: create.then_some(0o755),
            exact_mode: true,
        };
        beneath::open_dir(self.root.as_fd(), rel, how).map_err(|e| match e {
            WalkError::Missing { at } => self.bad(format!(
                "entry `{}` needs `{}`, which is not in this layer",
                String::from_utf8_lossy(raw),
                at.display()
            )),
            WalkError::Symlink { at } => self.unsafe_entry(
                raw,
                format!(
                    "goes through the symlink `{}` (possible path-escape attack)",
                    at.display()
                ),
            ),
            WalkError::NotADirectory { at } => self.unsafe_entry(
                raw,
                format!(
                    "has `{}` as a parent, which is not a directory",
                    at.display()
                ),
            ),
            WalkError::NotBeneath => {
                unreachable!("sanitized paths have only normal components")
            }
            WalkError::Name { at } => self.io(
                &at,
                io::Error::new(io::ErrorKind::InvalidInput, "name contains NUL"),
            ),
            WalkError::Io { at, source } => self.io(&at, source),
        })
    }

    /// Ownership first (chown clears set-id bits and file capabilities),
    /// then xattrs, mode and times.
    fn set_attrs_fd(
        &self,
        fd: RawFd,
        rel: &Path,
        a: Attrs,
        xattrs: &[(String, Vec<u8>)],
    ) -> Result<()> {
        if self.chown {
            // SAFETY: valid fd.
            ignore_unmapped(cvt(unsafe {
                libc::fchown(fd, a.uid as libc::uid_t, a.gid as libc::gid_t)
            }))
            .map_err(|e| self.io(rel, e))?;
        }
        for (name, value) in xattrs {
            // Best effort, like Docker: security.* and trusted.* need
            // privileges, and not every filesystem has xattrs.
            if let Ok(name) = CString::new(name.as_bytes()) {
                set_xattr(fd, &name, value);
            }
        }
        // SAFETY: valid fd.
        cvt(unsafe { libc::fchmod(fd, a.mode as libc::mode_t) }).map_err(|e| self.io(rel, e))?;
        let times = [timespec(a.mtime), timespec(a.mtime)];
        // SAFETY: valid fd; `times` has the two entries futimens reads.
        cvt(unsafe { libc::futimens(fd, times.as_ptr()) }).map_err(|e| self.io(rel, e))?;
        Ok(())
    }

    /// For entries that cannot be opened (symlinks, FIFOs): by name, never
    /// following a symlink.
    fn set_attrs_at(
        &self,
        dir: RawFd,
        name: &CStr,
        rel: &Path,
        a: Attrs,
        chmod: bool,
    ) -> Result<()> {
        if self.chown {
            // SAFETY: valid dir fd and C string.
            let r = unsafe {
                libc::fchownat(
                    dir,
                    name.as_ptr(),
                    a.uid as libc::uid_t,
                    a.gid as libc::gid_t,
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            };
            ignore_unmapped(cvt(r)).map_err(|e| self.io(rel, e))?;
        }
        if chmod {
            // SAFETY: valid dir fd and C string; only called for a FIFO we
            // just created, so the name is not a symlink.
            cvt(unsafe { libc::fchmodat(dir, name.as_ptr(), a.mode as libc::mode_t, 0) })
                .map_err(|e| self.io(rel, e))?;
        }
        let times = [timespec(a.mtime), timespec(a.mtime)];
        // SAFETY: valid dir fd, C string and two timespecs.
        cvt(unsafe {
            libc::utimensat(
                dir,
                name.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
        .map_err(|e| self.io(rel, e))?;
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        self.cache = None;
        // Last record of a directory wins; deepest first so no directory is
        // made read-only (or has its mtime set) before its contents are done.
        let mut last: HashMap<PathBuf, (Attrs, Xattrs)> = HashMap::new();
        let mut order = Vec::new();
        for d in std::mem::take(&mut self.dirs) {
            if last.insert(d.rel.clone(), (d.attrs, d.xattrs)).is_none() {
                order.push(d.rel);
            }
        }
        order.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for rel in order {
            let (attrs, xattrs) = &last[&rel];
            let fd = match self.open_existing(rel.as_os_str().as_bytes(), &rel) {
                Ok(fd) => fd,
                // Replaced by a later entry (the removal dropped its record,
                // but a parent may have become a file): nothing to do.
                Err(Error::UnsafeLayer { .. } | Error::BadLayer { .. }) => continue,
                Err(e) => return Err(e),
            };
            self.set_attrs_fd(fd.as_raw_fd(), &rel, *attrs, xattrs)?;
        }
        if !last.contains_key(Path::new("")) {
            // SAFETY: the root fd is open.
            cvt(unsafe { libc::fchmod(self.root.as_raw_fd(), 0o755) })
                .map_err(|e| self.io(Path::new(""), e))?;
        }
        // A later entry with the same name as a recorded whiteout wins.
        let mut whiteouts = std::mem::take(&mut self.markers.whiteouts);
        whiteouts.retain(|rel| {
            let parent = rel.parent().unwrap_or(Path::new(""));
            let Ok(dir) = self.open_existing(b"", parent) else {
                return false;
            };
            let Some(name) = rel.file_name().and_then(|n| c_path(n).ok()) else {
                return false;
            };
            matches!(fstatat(dir.as_raw_fd(), &name), Ok(None))
        });
        self.markers.whiteouts = whiteouts;
        Ok(())
    }
}

/// Turns a tar path into a relative path with only normal components.
/// Leading `/` and `.` components are dropped (GNU tar does the same);
/// `..` is refused outright: no legitimate layer needs it.
pub(crate) fn sanitize(raw: &[u8]) -> Result<PathBuf, String> {
    if raw.contains(&0) {
        return Err("contains a NUL byte".into());
    }
    let mut out = PathBuf::new();
    for comp in Path::new(OsStr::from_bytes(raw)).components() {
        match comp {
            Component::Normal(c) => out.push(c),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                return Err("contains `..` (possible path-escape attack)".into())
            }
        }
    }
    Ok(out)
}

/// Removes a directory tree, making read-only directories writable first
/// (a non-root store can hold layers with 0555 directories).
pub(crate) fn remove_tree(path: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            make_writable(path);
            std::fs::remove_dir_all(path)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Iterative, so a hostile layer's deep nesting cannot overflow the stack.
fn make_writable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if !std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
        if let Ok(entries) = std::fs::read_dir(&dir) {
            stack.extend(entries.flatten().map(|e| e.path()));
        }
    }
}

/// The one C-string rule (agentkernel-sys): a NUL byte is an error.
fn c_path(name: &OsStr) -> io::Result<CString> {
    agentkernel_sys::c_string(name.as_bytes())
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn owned(fd: libc::c_int) -> io::Result<OwnedFd> {
    let fd = cvt(fd)?;
    // SAFETY: `fd` was just returned by the kernel and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `lstat` relative to `dir`; `None` if the name does not exist.
fn fstatat(dir: RawFd, name: &CStr) -> io::Result<Option<libc::stat>> {
    // SAFETY: an all-zero `stat` is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid dir fd, C string and out-pointer.
    match cvt(unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) }) {
        Ok(_) => Ok(Some(st)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

fn is_dir(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

fn set_xattr(fd: RawFd, name: &CStr, value: &[u8]) -> bool {
    // SAFETY: valid fd, C string, and a pointer/length pair from a slice.
    unsafe { libc::fsetxattr(fd, name.as_ptr(), value.as_ptr().cast(), value.len(), 0) == 0 }
}

/// In a user namespace, ids outside the mapping cannot be set (EINVAL);
/// the file then keeps ours, as with rootless Docker.
fn ignore_unmapped(r: io::Result<libc::c_int>) -> io::Result<()> {
    match r {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        Err(e) => Err(e),
    }
}

fn timespec(secs: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

    /// A tar built entry by entry with raw headers, so that malicious
    /// paths (`..`, absolute) are written exactly as an attacker would.
    struct TarBuilder {
        out: Vec<u8>,
    }

    impl TarBuilder {
        fn new() -> Self {
            TarBuilder { out: Vec::new() }
        }

        fn raw(
            &mut self,
            path: &str,
            kind: tar::EntryType,
            mode: u32,
            link: Option<&str>,
            data: &[u8],
        ) -> &mut Self {
            let mut h = tar::Header::new_gnu();
            // set_path refuses `..`; write the name bytes directly instead.
            let name = &mut h.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_size(data.len() as u64);
            h.set_mtime(1_700_000_000);
            if let Some(link) = link {
                let l = &mut h.as_old_mut().linkname;
                l[..link.len()].copy_from_slice(link.as_bytes());
            }
            h.set_cksum();
            self.out.extend_from_slice(h.as_bytes());
            self.out.extend_from_slice(data);
            let pad = (512 - data.len() % 512) % 512;
            self.out.extend(std::iter::repeat_n(0, pad));
            self
        }
        fn file(&mut self, path: &str, data: &str) -> &mut Self {
            self.raw(path, tar::EntryType::Regular, 0o644, None, data.as_bytes())
        }
        fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
            self.raw(path, tar::EntryType::Directory, mode, None, b"")
        }
        fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
            self.raw(path, tar::EntryType::Symlink, 0o777, Some(target), b"")
        }
        fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
            self.raw(path, tar::EntryType::Link, 0o644, Some(target), b"")
        }
        fn finish(&mut self) -> Vec<u8> {
            let mut out = std::mem::take(&mut self.out);
            out.extend(std::iter::repeat_n(0, 1024));
            out
        }
    }

    fn unpack(tar: &[u8]) -> (tempfile::TempDir, Result<Extracted>) {
        unpack_limited(tar, 1 << 30)
    }

    fn unpack_limited(tar: &[u8], limit: u64) -> (tempfile::TempDir, Result<Extracted>) {
        let tmp = tempfile::tempdir().unwrap();
        let layer = tmp.path().join("layer");
        std::fs::create_dir(&layer).unwrap();
        let limit = SizeLimit {
            bytes: limit,
            bound: "test".into(),
        };
        let r = extract(tar, &layer, "sha256:test", &limit);
        (tmp, r)
    }

    /// A GNU sparse entry: 512 bytes of `x` at offset 0, then a hole up to
    /// `real_size`.
    pub(crate) fn sparse_tar(path: &str, real_size: u64) -> Vec<u8> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::GNUSparse);
        h.set_mode(0o644);
        h.set_size(512);
        h.set_mtime(1_700_000_000);
        let gnu = h.as_gnu_mut().unwrap();
        gnu.set_real_size(real_size);
        gnu.sparse[0].set_offset(0);
        gnu.sparse[0].set_length(512);
        gnu.sparse[1].set_offset(real_size);
        gnu.sparse[1].set_length(0);
        let mut b = tar::Builder::new(Vec::new());
        b.append_data(&mut h, path, &[b'x'; 512][..]).unwrap();
        b.into_inner().unwrap()
    }

    fn layer(tmp: &tempfile::TempDir) -> PathBuf {
        tmp.path().join("layer")
    }

    /// Asserts the attack was refused and that nothing landed outside the layer.
    fn assert_refused(tar: &[u8], expect: &str) {
        let (tmp, r) = unpack(tar);
        let err = r.expect_err("malicious layer must be refused").to_string();
        assert!(
            err.contains(expect),
            "error `{err}` should mention `{expect}`"
        );
        // Nothing outside `layer/` may have been created.
        let mut outside: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        outside.sort();
        assert_eq!(outside, ["layer"], "files escaped the layer directory");
    }

    #[test]
    fn plain_layer_with_links_and_modes() {
        let tar = TarBuilder::new()
            .dir("./", 0o755)
            .dir("etc/", 0o755)
            .file("etc/hosts", "127.0.0.1 localhost\n")
            .raw(
                "bin/tool",
                tar::EntryType::Regular,
                0o4755,
                None,
                b"#!/bin/sh\n",
            )
            .symlink("bin/sh", "/bin/busybox")
            .symlink("up", "../..")
            .hardlink("etc/hosts2", "etc/hosts")
            .hardlink("etc/hosts3", "/etc/hosts")
            .dir("ro/", 0o555)
            .file("ro/inside", "x")
            .raw("fifo", tar::EntryType::Fifo, 0o640, None, b"")
            .raw("dev/sda", tar::EntryType::Block, 0o660, None, b"")
            .finish();
        let (tmp, r) = unpack(&tar);
        let out = r.unwrap();
        assert!(out.markers.is_empty());
        assert_eq!(out.diff_id, Digest::of(&tar));
        let root = layer(&tmp);
        assert_eq!(
            std::fs::read_to_string(root.join("etc/hosts")).unwrap(),
            "127.0.0.1 localhost\n"
        );
        assert_eq!(
            std::fs::read_link(root.join("bin/sh")).unwrap(),
            Path::new("/bin/busybox")
        );
        assert_eq!(
            std::fs::read_link(root.join("up")).unwrap(),
            Path::new("../..")
        );
        let ino = std::fs::metadata(root.join("etc/hosts")).unwrap().ino();
        assert_eq!(
            std::fs::metadata(root.join("etc/hosts2")).unwrap().ino(),
            ino
        );
        assert_eq!(
            std::fs::metadata(root.join("etc/hosts3")).unwrap().ino(),
            ino
        );
        assert_eq!(
            std::fs::metadata(root.join("bin/tool")).unwrap().mode() & 0o7777,
            0o4755
        );
        assert_eq!(
            std::fs::metadata(root.join("ro")).unwrap().mode() & 0o7777,
            0o555
        );
        assert_eq!(
            std::fs::metadata(root.join("bin")).unwrap().mode() & 0o7777,
            0o755,
            "implicit parent"
        );
        assert_eq!(std::fs::metadata(&root).unwrap().mode() & 0o7777, 0o755);
        assert_eq!(
            std::fs::metadata(root.join("etc/hosts")).unwrap().mtime(),
            1_700_000_000
        );
        assert!(std::fs::symlink_metadata(root.join("fifo"))
            .unwrap()
            .file_type()
            .is_fifo());
        assert!(
            !root.join("dev/sda").exists(),
            "device nodes are not created"
        );
        remove_tree(&root).unwrap();
    }

    #[test]
    fn compressed_layers_hash_the_uncompressed_stream() {
        let tar = TarBuilder::new().file("a", "hello").finish();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::stream::encode_all(&tar[..], 3).unwrap();
        for (what, data) in [("tar", tar.clone()), ("gzip", gz), ("zstd", zst)] {
            let (tmp, r) = unpack(&data);
            let out = r.unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(out.diff_id, Digest::of(&tar), "{what}");
            assert_eq!(
                std::fs::read_to_string(layer(&tmp).join("a")).unwrap(),
                "hello",
                "{what}"
            );
        }
        // Not a tar at all.
        let (_tmp, r) = unpack(&[0x1f, 0x8b, 0, 1, 2, 3]);
        assert!(matches!(r, Err(Error::BadLayer { .. })), "{r:?}");
    }

    #[test]
    fn whiteouts_and_opaque_dirs() {
        let tar = TarBuilder::new()
            .dir("etc/", 0o755)
            .file("etc/.wh.passwd", "")
            .dir("var/cache/", 0o755)
            .file("var/cache/.wh..wh..opq", "")
            .file("var/cache/new", "n")
            // A whiteout and a file of the same name in one layer: the file stays.
            .file("keep", "k")
            .file(".wh.keep", "")
            .file(".wh.later", "")
            .file("later", "l")
            .file("usr/.wh..wh.plnk", "")
            .finish();
        let (tmp, r) = unpack(&tar);
        let out = r.unwrap();
        let root = layer(&tmp);
        assert_eq!(std::fs::read_to_string(root.join("keep")).unwrap(), "k");
        assert_eq!(std::fs::read_to_string(root.join("later")).unwrap(), "l");
        assert_eq!(
            std::fs::read_to_string(root.join("var/cache/new")).unwrap(),
            "n"
        );
        assert!(
            !root.join("etc/.wh.passwd").exists() && !root.join("var/cache/.wh..wh..opq").exists()
        );
        assert!(!root.join("usr/.wh..wh.plnk").exists());
        // Since Linux 5.8 anyone may create the 0/0 whiteout device; before,
        // it takes CAP_MKNOD, and without it the whiteout is a marker.
        match std::fs::symlink_metadata(root.join("etc/passwd")) {
            Ok(st) => {
                assert!(
                    st.file_type().is_char_device() && st.rdev() == 0,
                    "whiteout is a 0/0 char device"
                );
                assert!(out.markers.whiteouts.is_empty());
            }
            Err(_) => assert_eq!(out.markers.whiteouts, [PathBuf::from("etc/passwd")]),
        }
        let mut v = [0u8; 4];
        let c = CString::new(root.join("var/cache").as_os_str().as_bytes()).unwrap();
        // SAFETY: valid path, name and buffer.
        let n = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                c"trusted.overlay.opaque".as_ptr(),
                v.as_mut_ptr().cast(),
                4,
            )
        };
        if n == 1 {
            assert_eq!(v[0], b'y');
            assert!(out.markers.opaque_dirs.is_empty());
        } else {
            // trusted.* needs CAP_SYS_ADMIN: a marker, plus the rootless twin.
            assert_eq!(out.markers.opaque_dirs, [PathBuf::from("var/cache")]);
            // SAFETY: as above.
            let n = unsafe {
                libc::lgetxattr(
                    c.as_ptr(),
                    c"user.overlay.opaque".as_ptr(),
                    v.as_mut_ptr().cast(),
                    4,
                )
            };
            assert_eq!((n, v[0]), (1, b'y'));
        }
        let encoded = out.markers.encode();
        assert_eq!(LayerMarkers::decode(&encoded).unwrap(), out.markers);
    }

    #[test]
    fn markers_round_trip() {
        let m = LayerMarkers {
            whiteouts: vec![PathBuf::from("a/b"), PathBuf::from("c\nd")],
            opaque_dirs: vec![PathBuf::from("x")],
        };
        assert_eq!(LayerMarkers::decode(&m.encode()).unwrap(), m);
        assert!(LayerMarkers::decode(b"zfoo\0").is_none());
    }

    #[test]
    fn attack_dotdot_path() {
        assert_refused(&TarBuilder::new().file("../escaped", "x").finish(), "..");
        assert_refused(
            &TarBuilder::new().file("a/../../escaped", "x").finish(),
            "..",
        );
        assert_refused(
            &TarBuilder::new().dir("../escaped-dir/", 0o755).finish(),
            "..",
        );
    }

    #[test]
    fn attack_absolute_path_is_confined() {
        let tar = TarBuilder::new()
            .file("/abs-escape", "x")
            .file("//etc/abs2", "y")
            .finish();
        let (tmp, r) = unpack(&tar);
        r.unwrap();
        assert_eq!(
            std::fs::read_to_string(layer(&tmp).join("abs-escape")).unwrap(),
            "x"
        );
        assert_eq!(
            std::fs::read_to_string(layer(&tmp).join("etc/abs2")).unwrap(),
            "y"
        );
        assert!(!Path::new("/abs-escape").exists());
    }

    #[test]
    fn attack_symlink_to_absolute_dir_then_write_through_it() {
        // `a -> /etc` then `a/passwd`: would overwrite the host's /etc/passwd.
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().to_str().unwrap();
        let tar = TarBuilder::new()
            .symlink("a", target)
            .file("a/passwd", "pwned")
            .finish();
        assert_refused(&tar, "symlink `a`");
        assert!(!outside.path().join("passwd").exists());
        // Also via a directory entry and via a deeper path.
        let tar = TarBuilder::new()
            .symlink("a", target)
            .dir("a/sub/", 0o755)
            .finish();
        assert_refused(&tar, "symlink `a`");
        let tar = TarBuilder::new()
            .dir("d/", 0o755)
            .symlink("d/l", target)
            .file("d/l/x/y", "z")
            .finish();
        assert_refused(&tar, "symlink `d/l`");
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
    }

    #[test]
    fn attack_relative_symlink_up_then_write_through_it() {
        // `a -> ../..` then `a/escaped`: lands two levels above the layer.
        let tar = TarBuilder::new()
            .symlink("a", "../..")
            .file("a/escaped", "x")
            .finish();
        assert_refused(&tar, "symlink `a`");
        // The same with a hard link whose target goes through the symlink.
        let tar = TarBuilder::new()
            .symlink("a", "../..")
            .hardlink("h", "a/etc/passwd")
            .finish();
        assert_refused(&tar, "symlink `a`");
    }

    #[test]
    fn attack_symlink_replaced_directory() {
        // A directory is recorded, then replaced by a symlink to outside; the
        // final chmod/utime pass must not follow it.
        let outside = tempfile::tempdir().unwrap();
        std::fs::set_permissions(outside.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let target = outside.path().to_str().unwrap();
        let tar = TarBuilder::new()
            .dir("d/", 0o777)
            .symlink("d", target)
            .finish();
        let (tmp, r) = unpack(&tar);
        r.unwrap();
        assert_eq!(
            std::fs::metadata(outside.path()).unwrap().mode() & 0o777,
            0o711,
            "outside dir chmodded"
        );
        assert_eq!(
            std::fs::read_link(layer(&tmp).join("d")).unwrap(),
            outside.path()
        );
    }

    #[test]
    fn attack_file_over_symlink_does_not_follow() {
        // `f -> /outside/file` then a regular `f`: the symlink is replaced,
        // the outside file untouched.
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, "original").unwrap();
        let tar = TarBuilder::new()
            .symlink("f", victim.to_str().unwrap())
            .file("f", "pwned")
            .finish();
        let (tmp, r) = unpack(&tar);
        r.unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "original");
        assert_eq!(
            std::fs::read_to_string(layer(&tmp).join("f")).unwrap(),
            "pwned"
        );
        assert!(std::fs::symlink_metadata(layer(&tmp).join("f"))
            .unwrap()
            .is_file());
    }

    #[test]
    fn attack_hardlink_outside() {
        assert_refused(
            &TarBuilder::new().hardlink("h", "../../etc/passwd").finish(),
            "..",
        );
        // Absolute targets are confined, and /etc/passwd is not in the layer.
        assert_refused(
            &TarBuilder::new().hardlink("h", "/etc/passwd").finish(),
            "not in this layer",
        );
        // A hard link to a symlink links the symlink, not what it points to.
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, "original").unwrap();
        let tar = TarBuilder::new()
            .symlink("s", victim.to_str().unwrap())
            .hardlink("h", "s")
            .file("h", "x")
            .finish();
        let (tmp, r) = unpack(&tar);
        r.unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "original");
        assert_eq!(std::fs::read_link(layer(&tmp).join("s")).unwrap(), victim);
    }

    #[test]
    fn attack_whiteout_through_symlink_and_escape() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("victim"), "v").unwrap();
        let target = outside.path().to_str().unwrap();
        assert_refused(
            &TarBuilder::new()
                .symlink("a", target)
                .file("a/.wh.victim", "")
                .finish(),
            "symlink `a`",
        );
        assert_refused(
            &TarBuilder::new()
                .symlink("a", target)
                .file("a/.wh..wh..opq", "")
                .finish(),
            "symlink `a`",
        );
        assert_refused(&TarBuilder::new().file("../.wh.victim", "").finish(), "..");
        assert_refused(
            &TarBuilder::new().file("a/.wh...", "").finish(),
            "whiteout of",
        );
        assert_refused(&TarBuilder::new().file(".wh..", "").finish(), "whiteout of");
        assert!(outside.path().join("victim").exists());
    }

    #[test]
    fn attack_root_replacement_and_parent_files() {
        assert_refused(&TarBuilder::new().symlink(".", "/").finish(), "root");
        assert_refused(
            &TarBuilder::new().file("f", "x").file("f/x", "y").finish(),
            "not a directory",
        );
    }

    #[test]
    fn overlay_xattrs_from_the_tar_are_ignored() {
        // A PAX header asking for trusted.overlay.redirect must not be applied.
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([("SCHILY.xattr.trusted.overlay.opaque", &b"y"[..])])
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_path("d").unwrap();
        h.set_mode(0o755);
        h.set_size(0);
        h.set_cksum();
        b.append(&h, &[][..]).unwrap();
        let tar = b.into_inner().unwrap();
        let (tmp, r) = unpack(&tar);
        r.unwrap();
        let c = CString::new(layer(&tmp).join("d").as_os_str().as_bytes()).unwrap();
        let mut v = [0u8; 4];
        // SAFETY: valid path, name and buffer.
        let n = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                c"trusted.overlay.opaque".as_ptr(),
                v.as_mut_ptr().cast(),
                4,
            )
        };
        assert_eq!(n, -1, "overlay xattr from the archive must not be set");
    }

    #[test]
    fn replacing_entries() {
        let tar = TarBuilder::new()
            .dir("x/", 0o755)
            .file("x/inner", "i")
            .file("x", "now a file")
            .file("y", "file")
            .dir("y/", 0o700)
            .finish();
        let (tmp, r) = unpack(&tar);
        r.unwrap();
        assert_eq!(
            std::fs::read_to_string(layer(&tmp).join("x")).unwrap(),
            "now a file"
        );
        assert!(std::fs::symlink_metadata(layer(&tmp).join("y"))
            .unwrap()
            .is_dir());
        assert_eq!(
            std::fs::metadata(layer(&tmp).join("y")).unwrap().mode() & 0o777,
            0o700
        );
    }

    #[test]
    fn sparse_entries_stay_sparse() {
        let (tmp, r) = unpack_limited(&sparse_tar("big", 1 << 30), 1 << 31);
        r.unwrap();
        let meta = std::fs::metadata(layer(&tmp).join("big")).unwrap();
        assert_eq!(meta.len(), 1 << 30);
        // st_blocks counts 512-byte units: a few KiB, not a GiB.
        assert!(meta.blocks() * 512 < 1 << 20, "{} blocks", meta.blocks());
        let head = std::fs::read(layer(&tmp).join("big"))
            .map(|d| d[..512].to_vec())
            .ok();
        assert_eq!(head.as_deref(), Some(&[b'x'; 512][..]));
    }

    #[test]
    fn a_sparse_entry_beyond_the_limit_is_refused_before_writing() {
        let (tmp, r) = unpack_limited(&sparse_tar("bomb", 64 << 30), 1 << 30);
        let err = r.expect_err("a 64 GiB sparse entry must be refused");
        assert!(matches!(err, Error::LayerTooLarge { .. }), "{err}");
        assert!(!layer(&tmp).join("bomb").exists());
    }

    #[test]
    fn a_decompression_bomb_stops_at_the_limit() {
        use std::io::Write;
        // 256 MiB of zeros in one file, gzip-compressed to ~256 KiB.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(256 << 20);
        h.set_path("zeros").unwrap();
        h.set_cksum();
        gz.write_all(h.as_bytes()).unwrap();
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..256 {
            gz.write_all(&chunk).unwrap();
        }
        gz.write_all(&[0u8; 1024]).unwrap();
        let bomb = gz.finish().unwrap();
        assert!(bomb.len() < 1 << 20, "{}", bomb.len());
        // The header declares 256 MiB: refused before a byte is written.
        let (_, r) = unpack_limited(&bomb, 16 << 20);
        assert!(
            matches!(r, Err(Error::LayerTooLarge { .. })),
            "{:?}",
            r.err()
        );
        // A header that lies (a small size, then the zeros as further
        // "entries"): the stream count stops it.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        for _ in 0..256 {
            gz.write_all(&chunk).unwrap();
        }
        let bomb = gz.finish().unwrap();
        let (_, r) = unpack_limited(&bomb, 16 << 20);
        assert!(
            matches!(r, Err(Error::LayerTooLarge { .. })),
            "{:?}",
            r.err()
        );
    }

    #[test]
    fn sanitize_paths() {
        assert_eq!(sanitize(b"./a/./b/").unwrap(), PathBuf::from("a/b"));
        assert_eq!(
            sanitize(b"/etc/passwd").unwrap(),
            PathBuf::from("etc/passwd")
        );
        assert_eq!(sanitize(b"./").unwrap(), PathBuf::new());
        assert!(sanitize(b"a/../b").is_err());
        assert!(sanitize(b"..").is_err());
    }
}
