//! The on-disk store and the pull that fills it. See the crate docs for the
//! layout and the crash and concurrency rules.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use crate::error::{Error, IoContext, Result};
use crate::extract::{self, remove_tree, Extracted, LayerMarkers};
use crate::manifest::{self, ConfigFile, Document, ImageManifest};
use crate::platform::Platform;
use crate::reference::{Digest, Reference};
use crate::registry::{self, Session};

/// How many layers download (and unpack) at once, as dockerd's default.
const DEFAULT_CONCURRENT_DOWNLOADS: usize = 3;

/// A progress callback. Called from the pulling task; keep it quick.
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// What a pull reports as it goes.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Progress {
    /// The manifest is resolved; these layers (compressed digest, size) make the image.
    Resolved {
        /// The platform-specific manifest.
        manifest_digest: Digest,
        /// Every layer, bottom to top.
        layers: Vec<(Digest, u64)>,
    },
    /// A layer was already unpacked in the store; nothing to fetch.
    LayerCached {
        /// The layer's compressed digest.
        digest: Digest,
    },
    /// Bytes of a layer received so far.
    LayerDownloading {
        /// The layer's compressed digest.
        digest: Digest,
        /// Bytes received.
        downloaded: u64,
        /// The layer's size.
        total: u64,
    },
    /// A layer is downloaded, verified and unpacked.
    LayerDone {
        /// The layer's compressed digest.
        digest: Digest,
    },
}

/// When to contact the registry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PullPolicy {
    /// Only if the image is not in the store (no network request otherwise).
    #[default]
    Missing,
    /// Always resolve the tag again; layers already stored are not fetched
    /// again. A digest reference that is stored is never re-fetched.
    Always,
    /// Never: the image must be in the store ([`Error::NotPresent`] otherwise).
    Never,
}

/// Options for [`Store::pull`].
#[derive(Clone, Default)]
pub struct PullOptions {
    /// Mirror URLs tried, in order, before Docker Hub for Docker Hub images
    /// (`[images] mirrors` or [`mirrors_from_env`](crate::mirrors_from_env)).
    /// `http://` only for loopback hosts.
    pub mirrors: Vec<String>,
    /// When to contact the registry.
    pub policy: PullPolicy,
    /// The platform to pick from a multi-platform image; default: this
    /// machine's. A stored image of another platform counts as missing. A
    /// reference holds one platform at a time: pulling another replaces it,
    /// as `docker pull --platform` does.
    pub platform: Option<Platform>,
    /// Called as the pull progresses.
    pub progress: Option<ProgressFn>,
    /// Layers fetched at once; 0 means the default (3).
    pub concurrent_downloads: usize,
    /// The most one layer may expand to, in bytes (`[images]
    /// max_layer_size`); `None` means [`DEFAULT_MAX_LAYER_SIZE`]. Either way
    /// a layer may not use the store's free disk space but a margin of
    /// [`FREE_DISK_MARGIN`].
    pub max_layer_size: Option<u64>,
}

/// The default bound on what one layer may expand to: far above real
/// layers (the largest common images' layers are a few GiB), far below
/// what a bomb asks for.
pub const DEFAULT_MAX_LAYER_SIZE: u64 = 32 << 30;

/// Disk space a pull leaves free for everything else on the filesystem.
pub const FREE_DISK_MARGIN: u64 = 1 << 30;

impl std::fmt::Debug for PullOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullOptions")
            .field("mirrors", &self.mirrors)
            .field("policy", &self.policy)
            .field("platform", &self.platform)
            .field("progress", &self.progress.is_some())
            .field("concurrent_downloads", &self.concurrent_downloads)
            .finish()
    }
}

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

    fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(d.hex())
    }

    /// Where the layer with this DiffID is unpacked (whether or not it is).
    pub fn layer_path(&self, diff_id: &Digest) -> PathBuf {
        self.root.join("layers/sha256").join(diff_id.hex())
    }

    fn markers_path(&self, diff_id: &Digest) -> PathBuf {
        self.root
            .join("layers/sha256")
            .join(format!("{}.markers", diff_id.hex()))
    }

    fn ref_path(&self, reference: &Reference) -> PathBuf {
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
    fn load(&self, reference: Reference, manifest_digest: Digest) -> Result<Image, String> {
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

    /// Pulls `reference` (subject to `opts.policy`) and returns the stored
    /// image. Docker Hub images are tried on each mirror first, then on
    /// Docker Hub itself.
    pub async fn pull(&self, reference: &Reference, opts: &PullOptions) -> Result<Image> {
        let local = || {
            self.resolve_local(reference).filter(|image| {
                opts.platform
                    .as_ref()
                    .is_none_or(|p| p.score(&image.platform).is_some())
            })
        };
        match opts.policy {
            PullPolicy::Never => {
                return local().ok_or_else(|| Error::NotPresent {
                    reference: reference.to_string(),
                })
            }
            PullPolicy::Missing => {
                if let Some(image) = local() {
                    return Ok(image);
                }
            }
            PullPolicy::Always => {
                // Content behind a digest cannot change: nothing to refresh.
                if reference.digest().is_some() {
                    if let Some(image) = local() {
                        return Ok(image);
                    }
                }
            }
        }
        let endpoints = registry::endpoints(reference, &opts.mirrors)?;
        let _lock = self.lock_shared().await?;
        let http = registry::http_client()?;
        let mut mirror_errors = Vec::new();
        for endpoint in endpoints {
            let (is_mirror, label) = (endpoint.mirror, endpoint.label.clone());
            let session = Session::new(&http, endpoint, reference);
            match self.pull_from(&session, reference, opts).await {
                Ok(image) => return Ok(image),
                Err(e) if is_mirror => mirror_errors.push((label, e)),
                Err(e) if mirror_errors.is_empty() => return Err(e),
                Err(e) => {
                    return Err(Error::MirrorsFailed {
                        last: Box::new(e),
                        tried: mirror_errors,
                    })
                }
            }
        }
        unreachable!("endpoints always ends with the registry itself")
    }

    async fn pull_from(
        &self,
        s: &Session<'_>,
        reference: &Reference,
        opts: &PullOptions,
    ) -> Result<Image> {
        let invalid = |detail: String| Error::InvalidImage {
            reference: reference.to_string(),
            detail,
        };
        let platform = opts.platform.clone().unwrap_or_else(Platform::host);
        let mut target = reference.manifest_target().to_string();
        let mut expected: Option<(Digest, Option<u64>)> =
            reference.digest().map(|d| (d.clone(), None));
        let mut hops = 0;
        let (manifest_body, manifest_digest, manifest) = loop {
            let (body, content_type) = s.manifest(&target).await?;
            let digest = Digest::of(&body);
            if let Some((want, size)) = &expected {
                if *want != digest {
                    return Err(Error::DigestMismatch {
                        what: format!("manifest {want}"),
                        source_name: s.endpoint.label.clone(),
                        expected: want.to_string(),
                        actual: digest.to_string(),
                    });
                }
                if let Some(size) = size.filter(|&n| n != body.len() as u64) {
                    return Err(Error::SizeMismatch {
                        what: format!("manifest {want}"),
                        source_name: s.endpoint.label.clone(),
                        expected: size,
                        actual: body.len() as u64,
                    });
                }
            }
            match manifest::parse_document(&body, &content_type).map_err(invalid)? {
                Document::Manifest(m) => break (body, digest, m),
                Document::Index(entries) => {
                    hops += 1;
                    if hops > 2 {
                        return Err(invalid("its image indexes are nested too deeply".into()));
                    }
                    let Some(i) = platform.select(entries.iter().map(|e| e.platform.as_ref()))
                    else {
                        let mut available: Vec<String> = entries
                            .iter()
                            .filter_map(|e| e.platform.as_ref())
                            .map(|p| p.to_string())
                            .collect();
                        available.dedup();
                        return Err(Error::NoMatchingPlatform {
                            reference: reference.to_string(),
                            platform: platform.to_string(),
                            available: if available.is_empty() {
                                "none".into()
                            } else {
                                available.join(", ")
                            },
                        });
                    };
                    let d = entries[i].digest().map_err(invalid)?;
                    target = d.to_string();
                    expected = Some((d, Some(entries[i].size().map_err(invalid)?)));
                }
            }
        };

        let config_digest = manifest.config.digest().map_err(invalid)?;
        let config_size = manifest.config.size().map_err(invalid)?;
        if config_size > manifest::MAX_CONFIG_SIZE {
            return Err(invalid(format!(
                "its config is larger than {} MiB",
                manifest::MAX_CONFIG_SIZE >> 20
            )));
        }
        let config_bytes = match fs::read(self.blob_path(&config_digest)) {
            Ok(b) => b,
            Err(_) => {
                let b = self
                    .fetch_small_blob(s, &config_digest, config_size)
                    .await?;
                self.write_atomic(&self.blob_path(&config_digest), &b)?;
                b
            }
        };
        let (_, diff_ids, _) = parse_config(&config_bytes, &manifest).map_err(invalid)?;
        let mut layers = Vec::with_capacity(manifest.layers.len());
        for (desc, diff_id) in manifest.layers.iter().zip(diff_ids) {
            manifest::check_layer_media_type(&desc.media_type).map_err(invalid)?;
            layers.push((
                desc.digest().map_err(invalid)?,
                desc.size().map_err(invalid)?,
                diff_id,
            ));
        }
        if let Some(progress) = &opts.progress {
            progress(&Progress::Resolved {
                manifest_digest: manifest_digest.clone(),
                layers: layers
                    .iter()
                    .map(|(d, size, _)| (d.clone(), *size))
                    .collect(),
            });
        }

        // Every layer runs to completion (no early abort): a finished layer
        // is kept for the next attempt, and no unpacker is left running.
        let limit = if opts.concurrent_downloads == 0 {
            DEFAULT_CONCURRENT_DOWNLOADS
        } else {
            opts.concurrent_downloads
        };
        let results: Vec<Result<()>> = futures_util::stream::iter(
            layers
                .iter()
                .map(|(digest, size, diff_id)| self.pull_layer(s, digest, *size, diff_id, opts)),
        )
        .buffered(limit)
        .collect()
        .await;
        results.into_iter().collect::<Result<()>>()?;

        // The ref last: only now is the image complete.
        self.write_atomic(&self.blob_path(&manifest_digest), &manifest_body)?;
        let ref_body = format!("{manifest_digest}\n{reference}\n");
        self.write_atomic(&self.ref_path(reference), ref_body.as_bytes())?;
        self.load(reference.clone(), manifest_digest).map_err(|e| {
            invalid(format!(
                "stored image is unreadable right after the pull: {e}"
            ))
        })
    }

    async fn fetch_small_blob(
        &self,
        s: &Session<'_>,
        digest: &Digest,
        size: u64,
    ) -> Result<Vec<u8>> {
        let mut resp = s.blob(digest).await?;
        let mut body = Vec::with_capacity(size as usize);
        while let Some(chunk) = resp.chunk().await.map_err(|e| s.stream_error(&e))? {
            body.extend_from_slice(&chunk);
            if body.len() as u64 > size {
                break;
            }
        }
        let what = format!("blob {digest}");
        if body.len() as u64 != size {
            return Err(Error::SizeMismatch {
                what,
                source_name: s.endpoint.label.clone(),
                expected: size,
                actual: body.len() as u64,
            });
        }
        let actual = Digest::of(&body);
        if actual != *digest {
            return Err(Error::DigestMismatch {
                what,
                source_name: s.endpoint.label.clone(),
                expected: digest.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok(body)
    }

    async fn pull_layer(
        &self,
        s: &Session<'_>,
        digest: &Digest,
        size: u64,
        diff_id: &Digest,
        opts: &PullOptions,
    ) -> Result<()> {
        let report = |p: Progress| {
            if let Some(f) = &opts.progress {
                f(&p);
            }
        };
        let dest = self.layer_path(diff_id);
        let present = |p: &Path| fs::symlink_metadata(p).is_ok_and(|m| m.is_dir());
        if present(&dest) {
            report(Progress::LayerCached {
                digest: digest.clone(),
            });
            return Ok(());
        }
        // One download per layer across processes: the loser of this lock
        // finds the layer in place when it gets it.
        let lock_path = self
            .root
            .join("tmp")
            .join(format!("layer-{}.lock", diff_id.hex()));
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .at(&lock_path)?;
        let lock = tokio::task::spawn_blocking(move || flock(&lock, libc::LOCK_EX).map(|_| lock))
            .await
            .map_err(|e| Error::io(&lock_path, io::Error::other(e)))?
            .at(&lock_path)?;
        if present(&dest) {
            report(Progress::LayerCached {
                digest: digest.clone(),
            });
            return Ok(());
        }

        let work = self.temp_path(&format!("layer-{}", diff_id.short()));
        fs::create_dir(&work).at(&work)?;
        let result = self
            .download_and_extract(s, digest, size, &work, &report, self.layer_limit(opts))
            .await;
        let result = result.and_then(|extracted| {
            if extracted.diff_id != *diff_id {
                return Err(Error::DigestMismatch {
                    what: format!("layer {digest} (uncompressed)"),
                    source_name: s.endpoint.label.clone(),
                    expected: diff_id.to_string(),
                    actual: extracted.diff_id.to_string(),
                });
            }
            Ok(extracted)
        });
        let extracted = match result {
            Ok(x) => x,
            Err(e) => {
                let w = work.clone();
                let _ = tokio::task::spawn_blocking(move || remove_tree(&w)).await;
                return Err(e);
            }
        };
        // The markers file goes first: a layer directory in place is complete.
        if !extracted.markers.is_empty() {
            self.write_atomic(&self.markers_path(diff_id), &extracted.markers.encode())?;
        }
        let parent = self.root.join("layers/sha256");
        tokio::task::spawn_blocking(move || install_dir(&work, &dest, &parent))
            .await
            .map_err(|e| Error::io(&lock_path, io::Error::other(e)))??;
        drop(lock);
        report(Progress::LayerDone {
            digest: digest.clone(),
        });
        Ok(())
    }

    /// Streams a layer blob into the unpacker while hashing it. Unpacking
    /// happens before the digest is known, but only into a private temp
    /// directory that is thrown away unless both digests match.
    async fn download_and_extract(
        &self,
        s: &Session<'_>,
        digest: &Digest,
        size: u64,
        work: &Path,
        report: &(dyn Fn(Progress) + Sync),
        limit: extract::SizeLimit,
    ) -> Result<Extracted> {
        let mut resp = s.blob(digest).await?;
        let (tx, rx) = mpsc::channel(16);
        let (work_dir, layer_name) = (work.to_path_buf(), digest.to_string());
        let unpacker = tokio::task::spawn_blocking(move || {
            extract::extract(
                ChannelReader {
                    rx,
                    current: None,
                    pos: 0,
                },
                &work_dir,
                &layer_name,
                &limit,
            )
        });
        let mut hasher = Sha256::new();
        let mut received: u64 = 0;
        let mut unpacker_alive = true;
        let mut stream_error = None;
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    received += chunk.len() as u64;
                    if received > size {
                        break;
                    }
                    hasher.update(&chunk);
                    report(Progress::LayerDownloading {
                        digest: digest.clone(),
                        downloaded: received,
                        total: size,
                    });
                    // If the unpacker stopped (a bad entry), keep hashing:
                    // when the blob is corrupt, that is the error to report.
                    if unpacker_alive && tx.send(chunk).await.is_err() {
                        unpacker_alive = false;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    stream_error = Some(s.stream_error(&e));
                    break;
                }
            }
        }
        drop(tx);
        let unpacked = unpacker.await.unwrap_or_else(|e| {
            Err(Error::BadLayer {
                layer: digest.to_string(),
                detail: format!("the unpacker failed: {e}"),
            })
        });
        if let Some(e) = stream_error {
            return Err(e);
        }
        let what = format!("blob {digest}");
        if received != size {
            return Err(Error::SizeMismatch {
                what,
                source_name: s.endpoint.label.clone(),
                expected: size,
                actual: received,
            });
        }
        let actual = Digest::from_hasher(hasher);
        if actual != *digest {
            return Err(Error::DigestMismatch {
                what,
                source_name: s.endpoint.label.clone(),
                expected: digest.to_string(),
                actual: actual.to_string(),
            });
        }
        unpacked
    }

    /// What the next layer may expand to: the configured (or default)
    /// bound, lowered to the free space of the store's disk minus a margin,
    /// as it is when the layer starts.
    fn layer_limit(&self, opts: &PullOptions) -> extract::SizeLimit {
        let configured = opts.max_layer_size.unwrap_or(DEFAULT_MAX_LAYER_SIZE);
        let bound = match opts.max_layer_size {
            Some(_) => "[images] max_layer_size",
            None => "the default max_layer_size",
        };
        match free_bytes(&self.root.join("tmp")) {
            Some(free) if free.saturating_sub(FREE_DISK_MARGIN) < configured => {
                extract::SizeLimit {
                    bytes: free.saturating_sub(FREE_DISK_MARGIN),
                    bound: format!(
                        "the free disk space of {} less a 1 GiB margin",
                        self.root.display()
                    ),
                }
            }
            _ => extract::SizeLimit {
                bytes: configured,
                bound: bound.to_string(),
            },
        }
    }

    fn open_lock(&self) -> Result<File> {
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
    async fn lock_shared(&self) -> Result<File> {
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
    fn clean_tmp(&self) {
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
    fn temp_path(&self, prefix: &str) -> PathBuf {
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
    fn write_atomic(&self, dest: &Path, data: &[u8]) -> Result<()> {
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
fn install_dir(work: &Path, dest: &Path, parent: &Path) -> Result<()> {
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
fn parse_config(
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

/// Feeds the blocking unpacker from the async download.
struct ChannelReader<B> {
    rx: mpsc::Receiver<B>,
    current: Option<B>,
    pos: usize,
}

impl<B: AsRef<[u8]>> Read for ChannelReader<B> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(chunk) = &self.current {
                let data = &chunk.as_ref()[self.pos..];
                if !data.is_empty() {
                    let n = data.len().min(buf.len());
                    buf[..n].copy_from_slice(&data[..n]);
                    self.pos += n;
                    return Ok(n);
                }
            }
            match self.rx.blocking_recv() {
                Some(chunk) => {
                    self.current = Some(chunk);
                    self.pos = 0;
                }
                None => return Ok(0),
            }
        }
    }
}

/// Bytes an unprivileged writer may still use on `path`'s filesystem.
fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: a plain C struct, for which all zeroes is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs writes into the struct we pass; `c` is a valid C string.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

fn flock(file: &File, op: libc::c_int) -> io::Result<()> {
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
    fn never_policy_and_missing_images() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path().join("images")).unwrap();
        let r = Reference::parse("alpine:3.20").unwrap();
        assert!(store.resolve_local(&r).is_none());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let opts = PullOptions {
            policy: PullPolicy::Never,
            ..Default::default()
        };
        let err = rt.block_on(store.pull(&r, &opts)).unwrap_err();
        assert!(matches!(err, Error::NotPresent { .. }), "{err}");
        assert!(err.to_string().contains("docker.io/library/alpine:3.20"));
        assert!(matches!(store.remove(&r), Err(Error::NotPresent { .. })));
        assert!(store.list().unwrap().is_empty());
        assert_eq!(store.prune().unwrap(), PruneReport::default());
    }

    #[test]
    fn insecure_mirror_is_refused_before_any_request() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let r = Reference::parse("alpine").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let opts = PullOptions {
            mirrors: vec!["http://mirror.example.com".into()],
            ..Default::default()
        };
        let err = rt.block_on(store.pull(&r, &opts)).unwrap_err().to_string();
        assert!(
            err.contains("mirror.example.com") && err.contains("plain HTTP"),
            "{err}"
        );
        let insecure = Reference::parse("registry.example.com/x").unwrap();
        // A non-loopback registry is always https; http only comes from mirrors.
        assert_eq!(
            registry::endpoints(&insecure, &[]).unwrap()[0].base,
            "https://registry.example.com"
        );
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

    #[test]
    fn mirror_failures_are_listed_after_the_registry_error() {
        let e = Error::MirrorsFailed {
            last: Box::new(Error::Connect {
                registry: "registry-1.docker.io".into(),
                detail: "dns error".into(),
            }),
            tried: vec![(
                "http://127.0.0.1:5000".into(),
                Error::NotFound {
                    reference: "docker.io/library/x:1".into(),
                    registry: "http://127.0.0.1:5000".into(),
                },
            )],
        };
        let (mirror, answer) = e.mirror_answer().expect("the mirror answered");
        assert_eq!(mirror, "http://127.0.0.1:5000");
        assert!(matches!(answer, Error::NotFound { .. }));
        let msg = e.to_string();
        assert!(
            msg.starts_with("cannot reach registry registry-1.docker.io"),
            "{msg}"
        );
        assert!(
            msg.contains("mirrors tried first: http://127.0.0.1:5000"),
            "{msg}"
        );
    }

    #[test]
    fn channel_reader_reassembles_chunks() {
        let (tx, rx) = mpsc::channel::<Vec<u8>>(4);
        let reader = std::thread::spawn(move || {
            let mut r = ChannelReader {
                rx,
                current: None,
                pos: 0,
            };
            let mut out = Vec::new();
            r.read_to_end(&mut out).unwrap();
            out
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            for chunk in [&b"ab"[..], b"", b"cde", b"f"] {
                tx.send(chunk.to_vec()).await.unwrap();
            }
        });
        drop(tx);
        assert_eq!(reader.join().unwrap(), b"abcdef");
    }
}
