//! The pull: from a registry (or its mirrors) into the store — manifests
//! resolved to this platform, blobs and layers verified while they stream,
//! layers unpacked in `tmp/` and renamed into place (see the crate docs).

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::Path;
use std::sync::Arc;

use futures_util::StreamExt;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use crate::error::{Error, IoContext, Result};
use crate::extract::{self, remove_tree, Extracted};
use crate::manifest::{self, Document};
use crate::platform::Platform;
use crate::reference::{Digest, Reference};
use crate::registry::{self, Session};
use crate::store::{flock, install_dir, parse_config, Image, Store};

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

impl Store {
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
            .root()
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
        let parent = self.root().join("layers/sha256");
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
        match free_bytes(&self.root().join("tmp")) {
            Some(free) if free.saturating_sub(FREE_DISK_MARGIN) < configured => {
                extract::SizeLimit {
                    bytes: free.saturating_sub(FREE_DISK_MARGIN),
                    bound: format!(
                        "the free disk space of {} less a 1 GiB margin",
                        self.root().display()
                    ),
                }
            }
            _ => extract::SizeLimit {
                bytes: configured,
                bound: bound.to_string(),
            },
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::PruneReport;

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
