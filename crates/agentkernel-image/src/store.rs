//! The on-disk store and the pull that fills it. See the crate docs for the
//! layout and the crash and concurrency rules.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, IoContext, Result};
use crate::extract::{remove_tree, LayerMarkers};
use crate::manifest::{self, ConfigFile, Document, ImageManifest};
use crate::platform::Platform;
use crate::reference::{Digest, Reference};

/// What running an image needs from its config.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// `KEY=value` pairs.
    pub env: Vec<String>,
    /// Default arguments (or command, without an entrypoint).
    pub cmd: Vec<String>,
    /// The entrypoint, prepended to the command.
    pub entrypoint: Vec<String>,
    /// Working directory, if set.
    pub working_dir: Option<String>,
    /// `user[:group]` (names or ids), if set.
    pub user: Option<String>,
}

/// An image in the store, ready to run.
#[derive(Clone, Debug)]
pub struct Image {
    /// The reference it is stored under (canonical).
    pub reference: Reference,
    /// The platform-specific manifest's digest.
    pub manifest_digest: Digest,
    /// The config's digest (Docker's image ID).
    pub config_digest: Digest,
    /// The run configuration.
    pub config: ImageConfig,
    /// The platform the config declares (empty fields if it declares none).
    pub platform: Platform,
    /// Unpacked layer directories, bottom to top (overlayfs `lowerdir`
    /// takes them top to bottom).
    pub layers: Vec<PathBuf>,
    /// Per layer (same order as `layers`), whiteouts and opaque directories
    /// that could not be recorded the overlayfs way; empty when the store
    /// was filled as root.
    pub markers: Vec<LayerMarkers>,
    /// Download size: config plus compressed layers, in bytes.
    pub size: u64,
}

/// What [`Store::prune`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Manifest and config blobs removed.
    pub blobs: usize,
    /// Unpacked layers removed.
    pub layers: usize,
    /// Bytes freed (apparent sizes).
    pub bytes: u64,
}

/// A content-addressed image store rooted at a directory.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens (creating as needed) the store at `root`, e.g. `<state>/images`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        let root = root.into();
        for sub in ["blobs/sha256", "layers/sha256", "refs", "tmp"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).at(&dir)?;
        }
        Ok(Store { root })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(d.hex())
    }

    /// Where the layer with this DiffID is unpacked (whether or not it is).
    pub fn layer_path(&self, diff_id: &Digest) -> PathBuf {
        self.root.join("layers/sha256").join(diff_id.hex())
    }

    pub(crate) fn markers_path(&self, diff_id: &Digest) -> PathBuf {
        self.root
            .join("layers/sha256")
            .join(format!("{}.markers", diff_id.hex()))
    }

    pub(crate) fn ref_path(&self, reference: &Reference) -> PathBuf {
        self.root.join("refs").join(ref_file_name(reference))
    }

    /// The stored image for `reference`, without any network access. `None`
    /// when it was never pulled, was removed, or is incomplete.
    pub fn resolve_local(&self, reference: &Reference) -> Option<Image> {
        let (manifest_digest, _) = read_ref(&self.ref_path(reference))?;
        self.load(reference.clone(), manifest_digest).ok()
    }

    /// Reads an image from stored blobs. Everything in the store was
    /// verified before it was renamed into place, so nothing is re-hashed.
    pub(crate) fn load(
        &self,
        reference: Reference,
        manifest_digest: Digest,
    ) -> Result<Image, String> {
        let body = fs::read(self.blob_path(&manifest_digest)).map_err(|e| e.to_string())?;
        let Document::Manifest(m) = manifest::parse_document(&body, "")? else {
            return Err("ref points to an index".into());
        };
        let config_digest = m.config.digest()?;
        let config_bytes = fs::read(self.blob_path(&config_digest)).map_err(|e| e.to_string())?;
        let (config, diff_ids, platform) = parse_config(&config_bytes, &m)?;
        let mut layers = Vec::with_capacity(diff_ids.len());
        let mut markers = Vec::with_capacity(diff_ids.len());
        for diff_id in &diff_ids {
            let path = self.layer_path(diff_id);
            if !fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
                return Err(format!("layer {diff_id} is missing"));
            }
            layers.push(path);
            markers.push(match fs::read(self.markers_path(diff_id)) {
                Ok(data) => LayerMarkers::decode(&data).ok_or("corrupt markers file")?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => LayerMarkers::default(),
                Err(e) => return Err(e.to_string()),
            });
        }
        let size = m.config.size()? + m.layers.iter().map(|l| l.size().unwrap_or(0)).sum::<u64>();
        Ok(Image {
            reference,
            manifest_digest,
            config_digest,
            config,
            platform,
            layers,
            markers,
            size,
        })
    }

    /// Every complete image in the store, sorted by reference.
    pub fn list(&self) -> Result<Vec<Image>> {
        let dir = self.root.join("refs");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).at(&dir)? {
            let entry = entry.at(&dir)?;
            let Some((digest, name)) = read_ref(&entry.path()) else {
                continue;
            };
            let Ok(reference) = Reference::parse(&name) else {
                continue;
            };
            if let Ok(image) = self.load(reference, digest) {
                out.push(image);
            }
        }
        out.sort_by_key(|i| i.reference.to_string());
        Ok(out)
    }

    /// Forgets `reference` and returns the manifest digest it pointed to.
    /// Blobs and layers stay until [`Store::prune`].
    pub fn remove(&self, reference: &Reference) -> Result<Digest> {
        let path = self.ref_path(reference);
        let Some((digest, _)) = read_ref(&path) else {
            return Err(Error::NotPresent {
                reference: reference.to_string(),
            });
        };
        match fs::remove_file(&path) {
            Ok(()) => Ok(digest),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Error::NotPresent {
                reference: reference.to_string(),
            }),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    /// Deletes blobs and layers that no ref points to, and pull leftovers.
    /// Waits for running pulls to finish (they hold the store lock shared).
    ///
    /// Layers still used by a running sandbox whose image was removed are
    /// deleted too: callers must keep a ref for images in use.
    pub fn prune(&self) -> Result<PruneReport> {
        let lock = self.open_lock()?;
        flock(&lock, libc::LOCK_EX).at(self.root.join("lock"))?;
        self.clean_tmp();

        let mut keep_blobs = std::collections::HashSet::new();
        let mut keep_layers = std::collections::HashSet::new();
        let refs = self.root.join("refs");
        for entry in fs::read_dir(&refs).at(&refs)? {
            let entry = entry.at(&refs)?;
            let Some((digest, _)) = read_ref(&entry.path()) else {
                continue;
            };
            let Ok(body) = fs::read(self.blob_path(&digest)) else {
                continue;
            };
            keep_blobs.insert(digest.hex().to_string());
            let Ok(Document::Manifest(m)) = manifest::parse_document(&body, "") else {
                continue;
            };
            let Ok(config_digest) = m.config.digest() else {
                continue;
            };
            keep_blobs.insert(config_digest.hex().to_string());
            let Ok(config) = fs::read(self.blob_path(&config_digest)) else {
                continue;
            };
            if let Ok((_, diff_ids, _)) = parse_config(&config, &m) {
                keep_layers.extend(diff_ids.iter().map(|d| d.hex().to_string()));
            }
        }

        let mut report = PruneReport::default();
        let blobs = self.root.join("blobs/sha256");
        for entry in fs::read_dir(&blobs).at(&blobs)? {
            let entry = entry.at(&blobs)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !keep_blobs.contains(&name) {
                report.bytes += entry.metadata().map(|m| m.len()).unwrap_or(0);
                fs::remove_file(entry.path()).at(entry.path())?;
                report.blobs += 1;
            }
        }
        let layers = self.root.join("layers/sha256");
        for entry in fs::read_dir(&layers).at(&layers)? {
            let entry = entry.at(&layers)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let hex = name.strip_suffix(".markers").unwrap_or(&name);
            if keep_layers.contains(hex) {
                continue;
            }
            let path = entry.path();
            report.bytes += disk_usage(&path);
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&path).at(&path)?;
                report.layers += 1;
            } else {
                fs::remove_file(&path).at(&path)?;
            }
        }
        drop(lock);
        Ok(report)
    }

    pub(crate) fn open_lock(&self) -> Result<File> {
        let path = self.root.join("lock");
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .at(&path)
    }

    /// Pulls hold the store lock shared; prune holds it exclusive. Whoever
    /// gets it exclusive with no one else around clears `tmp/`: a leftover
    /// there belongs to a pull that died (kill -9), since live pulls hold
    /// the lock.
    pub(crate) async fn lock_shared(&self) -> Result<File> {
        let lock = self.open_lock()?;
        let path = self.root.join("lock");
        if flock(&lock, libc::LOCK_EX | libc::LOCK_NB).is_ok() {
            self.clean_tmp();
            // Downgrading never blocks: we are the only holder.
            flock(&lock, libc::LOCK_SH).at(&path)?;
            return Ok(lock);
        }
        tokio::task::spawn_blocking(move || flock(&lock, libc::LOCK_SH).map(|_| lock))
            .await
            .map_err(|e| Error::io(&path, io::Error::other(e)))?
            .at(&path)
    }

    /// Best effort: a leftover that cannot be removed now is retried next time.
    pub(crate) fn clean_tmp(&self) {
        let Ok(entries) = fs::read_dir(self.root.join("tmp")) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                let _ = remove_tree(&path);
            } else {
                let _ = fs::remove_file(&path);
            }
        }
    }

    /// A fresh name in `tmp/`, which is on the same filesystem as its
    /// destinations so the final rename is atomic.
    pub(crate) fn temp_path(&self, prefix: &str) -> PathBuf {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{prefix}-{}-{nanos:x}-{n}", std::process::id()))
    }

    /// Write to a temp file, fsync, rename over `dest`, fsync the directory.
    /// Renaming over an existing copy is harmless: content-addressed files
    /// are identical, and a ref is replaced whole.
    pub(crate) fn write_atomic(&self, dest: &Path, data: &[u8]) -> Result<()> {
        let tmp = self.temp_path("file");
        let result = (|| {
            let mut f = File::create_new(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            fs::rename(&tmp, dest)
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io(dest, e));
        }
        if let Some(parent) = dest.parent() {
            sync_dir(parent).at(parent)?;
        }
        Ok(())
    }
}

/// Moves a finished layer directory into place. If another process got
/// there first (the rename fails because the target exists), ours is
/// discarded: the two are the same content.
pub(crate) fn install_dir(work: &Path, dest: &Path, parent: &Path) -> Result<()> {
    syncfs(work).at(work)?;
    match fs::rename(work, dest) {
        Ok(()) => sync_dir(parent).at(parent),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EEXIST | libc::ENOTEMPTY)) => {
            remove_tree(work).at(work)
        }
        Err(e) => {
            let _ = remove_tree(work);
            Err(Error::io(dest, e))
        }
    }
}

/// Config → run settings and the layer DiffIDs, which must match the
/// manifest's layer count.
pub(crate) fn parse_config(
    bytes: &[u8],
    m: &ImageManifest,
) -> Result<(ImageConfig, Vec<Digest>, Platform), String> {
    let file: ConfigFile =
        serde_json::from_slice(bytes).map_err(|e| format!("its config is not valid JSON: {e}"))?;
    let diff_ids = file
        .rootfs
        .diff_ids
        .iter()
        .map(|d| Digest::parse(d))
        .collect::<Result<Vec<_>, _>>()?;
    if diff_ids.len() != m.layers.len() {
        return Err(format!(
            "its config lists {} layers but its manifest {}",
            diff_ids.len(),
            m.layers.len()
        ));
    }
    let c = file.config.unwrap_or_default();
    let config = ImageConfig {
        env: c.env.unwrap_or_default(),
        cmd: c.cmd.unwrap_or_default(),
        entrypoint: c.entrypoint.unwrap_or_default(),
        working_dir: c.working_dir.filter(|s| !s.is_empty()),
        user: c.user.filter(|s| !s.is_empty()),
    };
    let platform = Platform {
        os: file.os,
        architecture: file.architecture,
        variant: file.variant.filter(|v| !v.is_empty()),
    };
    Ok((config, diff_ids, platform))
}

/// `<manifest digest>\n<canonical reference>\n`.
fn read_ref(path: &Path) -> Option<(Digest, String)> {
    let text = fs::read_to_string(path).ok()?;
    let mut lines = text.lines();
    let digest = Digest::parse(lines.next()?).ok()?;
    Some((digest, lines.next()?.to_string()))
}

/// The canonical reference, percent-escaped to one file name; very long
/// names (a tag and a digest can exceed NAME_MAX) are hashed instead, the
/// name itself being inside the file.
fn ref_file_name(reference: &Reference) -> String {
    let name = reference.to_string();
    let mut escaped = String::with_capacity(name.len() * 2);
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            escaped.push(b as char);
        } else {
            escaped.push_str(&format!("%{b:02X}"));
        }
    }
    if escaped.len() <= 200 {
        escaped
    } else {
        format!("long-{}", Digest::of(name.as_bytes()).hex())
    }
}

pub(crate) fn flock(file: &File, op: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: a valid open fd.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// One syscall makes a whole unpacked tree durable, where an fsync per
/// file would cost thousands.
fn syncfs(dir: &Path) -> io::Result<()> {
    let f = File::open(dir)?;
    // SAFETY: a valid open fd.
    if unsafe { libc::syncfs(f.as_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Apparent size of a tree, never following symlinks.
fn disk_usage(path: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = fs::symlink_metadata(&p) else {
            continue;
        };
        total += meta.len();
        if meta.is_dir() {
            if let Ok(entries) = fs::read_dir(&p) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ref_names_are_escaped_and_bounded() {
        let r = Reference::parse("localhost:5000/a/b:1.0").unwrap();
        assert_eq!(ref_file_name(&r), "localhost%3A5000%2Fa%2Fb%3A1.0");
        let long = format!(
            "{}:{}@sha256:{}",
            "a/".repeat(60) + "b",
            "t".repeat(128),
            "0".repeat(64)
        );
        let r = Reference::parse(&long).unwrap();
        let name = ref_file_name(&r);
        assert!(name.starts_with("long-") && name.len() < 100, "{name}");
    }

    #[test]
    fn losing_a_rename_race_discards_the_copy() {
        let tmp = tempfile::tempdir().unwrap();
        let parent = tmp.path().join("layers");
        fs::create_dir(&parent).unwrap();
        let dest = parent.join("abc");
        for (i, content) in ["first", "second"].iter().enumerate() {
            let work = tmp.path().join(format!("work{i}"));
            fs::create_dir(&work).unwrap();
            fs::write(work.join("f"), content).unwrap();
            install_dir(&work, &dest, &parent).unwrap();
            assert!(!work.exists(), "the work dir is consumed either way");
        }
        assert_eq!(
            fs::read_to_string(dest.join("f")).unwrap(),
            "first",
            "the winner is never replaced"
        );
    }
}
