//! The native backend's images: agentkernel's own OCI store
//! (`<state>/images`), pulls through the configured mirrors with a progress
//! line, and the root (layers and config) a sandbox is built from. Also what
//! `agentkernel image` works on; Docker and Podman keep their own stores.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

use agentkernel_core::config::Config;
use agentkernel_core::parse::{counted, format_bytes};
use agentkernel_core::spec::{PullPolicy, SandboxSpec};
use agentkernel_core::{terminal, Error, Result};
use agentkernel_image as store;

use crate::prepare::{ImageRoot, HOST_IMAGE};
use crate::rootless;

/// An image store error as agentkernel's one-line error.
pub fn store_error(e: store::Error) -> Error {
    Error::Backend {
        backend: "image store",
        message: e.to_string(),
    }
}

/// The root a sandbox of `spec` is built from: the image's layers (pulled
/// when the policy allows) and its config, or the host's own root for
/// `--image host`.
pub async fn image_root(spec: &SandboxSpec, config: &Config) -> Result<ImageRoot> {
    if spec.image == HOST_IMAGE {
        return Ok(ImageRoot::default());
    }
    let image = fetch_for_run(spec, config).await?;
    // Rootless overlayfs reads opaque directories from the `user.*` xattrs
    // an unprivileged unpack leaves; whiteouts it cannot do without.
    let rootless = rootless::UserMap::for_caller().is_some();
    if image
        .markers
        .iter()
        .any(|m| !m.whiteouts.is_empty() || (!rootless && !m.opaque_dirs.is_empty()))
    {
        return Err(Error::Image {
            image: spec.image.clone(),
            why: "its layers were unpacked without root, so overlayfs cannot show their deletions"
                .into(),
            fix: "remove it with `agentkernel image rm` and pull it again as root".into(),
        });
    }
    Ok(ImageRoot {
        layers: image.layers,
        env: image.config.env,
        entrypoint: image.config.entrypoint,
        cmd: image.config.cmd,
        working_dir: image.config.working_dir,
        user: image.config.user,
    })
}

/// A run's image from agentkernel's own store (the native and VM
/// backends), pulled as the run's pull policy allows.
pub async fn fetch_for_run(spec: &SandboxSpec, config: &Config) -> Result<store::Image> {
    let reference = store::Reference::parse(&spec.image)
        .map_err(|e| Error::invalid("image", spec.image.clone(), e.to_string()))?;
    let policy = match spec.pull {
        PullPolicy::Missing => store::PullPolicy::Missing,
        PullPolicy::Always => store::PullPolicy::Always,
        PullPolicy::Never => store::PullPolicy::Never,
    };
    let (image, _) = fetch(&open_store()?, &reference, policy, config).await?;
    // What a receipt pins the run to (every backend on this store: native, qemu).
    agentkernel_core::observe::image_digest(agentkernel_core::image::pinned(
        &spec.image,
        image.manifest_digest.as_str(),
    ));
    Ok(image)
}

/// The image store at `<state>/images`.
pub fn open_store() -> Result<store::Store> {
    // Through the state store: it creates (or closes up) the private state root first.
    let state = agentkernel_core::state::Store::open_default();
    store::Store::open(state.root().join("images")).map_err(store_error)
}

/// A registry mirror for Docker Hub images, and where it was configured.
pub struct Mirror {
    pub url: String,
    pub source: &'static str,
}

/// The mirrors a pull tries, in order: `[images] mirrors`,
/// `AGENTKERNEL_REGISTRY_MIRRORS`, then dockerd's `registry-mirrors`.
/// Ours must be valid (a typo is an error); dockerd's that a pull would
/// refuse are left out.
pub fn mirrors(config: &Config) -> Result<Vec<Mirror>> {
    let ours = config
        .mirrors
        .iter()
        .map(|url| (url.clone(), "[images] mirrors"))
        .chain(
            store::mirrors_from_env()
                .into_iter()
                .map(|url| (url, store::MIRRORS_ENV)),
        );
    let mut out: Vec<Mirror> = Vec::new();
    for (url, source) in ours {
        store::validate_mirror(&url).map_err(store_error)?;
        out.push(Mirror { url, source });
    }
    for url in store::mirrors_from_dockerd() {
        if !out.iter().any(|m| m.url == url) {
            out.push(Mirror {
                url,
                source: store::DOCKERD_CONFIG,
            });
        }
    }
    Ok(out)
}

/// Pulls (or finds) an image with the configured mirrors. A pull says so
/// on stderr once the registry has resolved the image (so a name the
/// registry does not know stays a one-line error) and when it is done, as
/// Docker and Podman do; on a terminal that first line redraws itself with
/// the progress. Returns the image
/// and whether it was pulled. Failures are one line naming the image and
/// the fix.
pub async fn fetch(
    images: &store::Store,
    r: &store::Reference,
    policy: store::PullPolicy,
    config: &Config,
) -> Result<(store::Image, bool)> {
    let local = images.resolve_local(r);
    let pulls = match policy {
        store::PullPolicy::Never => false,
        store::PullPolicy::Missing => local.is_none(),
        store::PullPolicy::Always => local.is_none() || r.digest().is_none(),
    };
    if !pulls {
        return match local {
            Some(image) => Ok((image, false)),
            None => Err(Error::Image {
                image: r.familiar(),
                why: "it is not in agentkernel's image store and --pull never forbids pulling"
                    .into(),
                fix: format!(
                    "pull it (`agentkernel image pull {}`) or use --pull missing",
                    r.familiar()
                ),
            }),
        };
    }
    let mirrors: Vec<String> = mirrors(config)?.into_iter().map(|m| m.url).collect();
    let tty = terminal::is_tty(2);
    let options = store::PullOptions {
        mirrors,
        policy,
        progress: Some(progress_line(r.familiar(), tty)),
        max_layer_size: config.max_layer_size,
        ..Default::default()
    };
    let result = images.pull(r, &options).await;
    if tty {
        eprint!("\r\x1b[K");
    }
    let image = result.map_err(|e| pull_error(r, e))?;
    eprintln!(
        "agentkernel: pulled {}: {} ({}, {})",
        r.familiar(),
        image.manifest_digest.as_str(),
        counted(image.layers.len(), "layer", "layers"),
        format_bytes(image.size)
    );
    Ok((image, true))
}

/// What to do when Docker Hub cannot be reached.
const OFFLINE_FIX: &str = "offline? set a Docker Hub mirror (`[images] mirrors` in the config or AGENTKERNEL_REGISTRY_MIRRORS=URL), or use --image host";

/// A failed pull in one short line: the registry's (or the mirror's) own
/// answer, and a fix that fits it.
fn pull_error(r: &store::Reference, e: store::Error) -> Error {
    let image = r.familiar();
    let error = |why: String, fix: &str| Error::Image {
        image: image.clone(),
        why,
        fix: fix.into(),
    };
    let name_fix = "check the name and tag";
    if let Some((mirror, answer)) = e.mirror_answer() {
        // The mirror answered; an unreachable Docker Hub behind it is noise.
        return match answer {
            store::Error::NotFound { .. } => {
                error(format!("not found on mirror {mirror} (404)"), name_fix)
            }
            other => error(format!("mirror {mirror} answered: {other}"), name_fix),
        };
    }
    match e {
        store::Error::MirrorsFailed { last, tried } => {
            let mirrors: Vec<&str> = tried.iter().map(|(m, _)| m.as_str()).collect();
            error(
                format!("{last}, nor its mirrors ({})", mirrors.join(", ")),
                "check the network and the mirrors",
            )
        }
        store::Error::Connect { .. } if r.is_docker_hub() => error(e.to_string(), OFFLINE_FIX),
        // Mirrors serve Docker Hub images only: no use suggesting one.
        store::Error::Connect { .. } => error(
            e.to_string(),
            "check the network and the registry's name (mirrors apply only to Docker Hub images)",
        ),
        store::Error::NotFound { registry, .. } => {
            error(format!("not found in registry {registry} (404)"), name_fix)
        }
        // Names its own fix (raise the bound, free disk space).
        store::Error::LayerTooLarge { .. } => {
            Error::Conflict(format!("image {}: {e}", r.familiar()))
        }
        other => error(
            other.to_string(),
            "see the message; `agentkernel doctor` checks registry access",
        ),
    }
}

/// On a terminal, one self-rewriting stderr line: layers done and bytes
/// received. Otherwise one `pulling` line once the image is resolved.
fn progress_line(name: String, tty: bool) -> store::ProgressFn {
    #[derive(Default)]
    struct Seen {
        total: u64,
        layers: usize,
        done: usize,
        received: HashMap<String, u64>,
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    Arc::new(move |p: &store::Progress| {
        let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
        match p {
            store::Progress::Resolved { layers, .. } => {
                s.layers = layers.len();
                s.total = layers.iter().map(|(_, size)| size).sum();
                if !tty {
                    eprintln!(
                        "agentkernel: pulling {name} ({}, {})",
                        counted(s.layers, "layer", "layers"),
                        format_bytes(s.total)
                    );
                }
            }
            store::Progress::LayerCached { .. } | store::Progress::LayerDone { .. } => s.done += 1,
            store::Progress::LayerDownloading {
                digest, downloaded, ..
            } => {
                s.received.insert(digest.as_str().to_string(), *downloaded);
            }
            // Progress is non-exhaustive: later kinds just redraw the line.
            _ => {}
        }
        if !tty {
            return;
        }
        let received: u64 = s.received.values().sum();
        let mut err = std::io::stderr();
        let _ = write!(
            err,
            "\r\x1b[K{name}: {}/{} layers, {} of {}",
            s.done,
            s.layers,
            format_bytes(received),
            format_bytes(s.total)
        );
    })
}
