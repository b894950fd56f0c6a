//! `agentkernel image pull|list|rm|prune`: the native backend's image store
//! (`<state>/images`). Docker and Podman keep their own stores.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

use agentkernel_core::config::Config;
use agentkernel_core::parse::format_bytes;
use agentkernel_core::{terminal, Error, Result};
use agentkernel_image as store;
use serde_json::json;

use crate::cli::ImageCommand;

fn store_error(e: store::Error) -> Error {
    Error::Backend {
        backend: "image store",
        message: e.to_string(),
    }
}

fn reference(text: &str) -> Result<store::Reference> {
    store::Reference::parse(text).map_err(store_error)
}

pub async fn image(cmd: ImageCommand) -> Result<i32> {
    let images = open_store()?;
    match cmd {
        ImageCommand::Pull { image, always } => pull(&images, &image, always).await,
        ImageCommand::List { json } => {
            let list = images.list().map_err(store_error)?;
            if json {
                let rows: Vec<_> = list
                    .iter()
                    .map(|i| {
                        json!({
                            "reference": i.reference.to_string(),
                            "manifest_digest": i.manifest_digest.as_str(),
                            "id": i.config_digest.as_str(),
                            "size": i.size,
                            "layers": i.layers.len(),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows).expect("json"));
            } else {
                println!("{:<48} {:<14} {:>10} LAYERS", "REFERENCE", "ID", "SIZE");
                for i in list {
                    println!(
                        "{:<48} {:<14} {:>10} {}",
                        i.reference.familiar(),
                        i.config_digest.short(),
                        format_bytes(i.size),
                        i.layers.len()
                    );
                }
            }
            Ok(0)
        }
        ImageCommand::Rm { images: names } => {
            let refs = names
                .iter()
                .map(|n| reference(n))
                .collect::<Result<Vec<_>>>()?;
            for r in refs {
                images.remove(&r).map_err(|e| match e {
                    store::Error::NotPresent { .. } => Error::Image {
                        image: r.familiar(),
                        why: "it is not in agentkernel's image store".into(),
                        fix: "`agentkernel image list` shows what is".into(),
                    },
                    other => store_error(other),
                })?;
                eprintln!("agentkernel: removed {}", r.familiar());
            }
            Ok(0)
        }
        ImageCommand::Prune => {
            let report = images.prune().map_err(store_error)?;
            eprintln!(
                "agentkernel: removed {} and {}, {} freed",
                super::counted(report.blobs, "blob", "blobs"),
                super::counted(report.layers, "layer", "layers"),
                format_bytes(report.bytes)
            );
            // The qemu backend's disks of images no longer in the store.
            let live: Vec<String> = images
                .list()
                .map_err(store_error)?
                .iter()
                .map(|i| i.config_digest.hex().to_string())
                .collect();
            let disks = images.root().join("vm").join("disks");
            let (count, bytes) = agentkernel_vm::disk::prune(&disks, &live);
            if count > 0 {
                eprintln!(
                    "agentkernel: removed {} of the qemu backend, {} freed",
                    super::counted(count, "VM disk", "VM disks"),
                    format_bytes(bytes)
                );
            }
            Ok(0)
        }
    }
}

async fn pull(images: &store::Store, name: &str, always: bool) -> Result<i32> {
    let r = reference(name)?;
    let cwd = std::env::current_dir()
        .map_err(|e| Error::invalid("current directory", ".", e.to_string()))?;
    let config = Config::load(&cwd, None)?;
    let policy = if always {
        store::PullPolicy::Always
    } else {
        store::PullPolicy::Missing
    };
    let (image, pulled) = fetch(images, &r, policy, &config).await?;
    if pulled {
        return Ok(0);
    }
    eprintln!(
        "agentkernel: {} is {} ({}, {})",
        image.reference.familiar(),
        image.manifest_digest.as_str(),
        super::counted(image.layers.len(), "layer", "layers"),
        format_bytes(image.size)
    );
    Ok(0)
}

/// The image store at `<state>/images`.
pub(crate) fn open_store() -> Result<store::Store> {
    // Through the state store: it creates (or closes up) the private state root first.
    let state = agentkernel_core::state::Store::open_default();
    store::Store::open(state.root().join("images")).map_err(store_error)
}

/// A registry mirror for Docker Hub images, and where it was configured.
pub(crate) struct Mirror {
    pub url: String,
    pub source: &'static str,
}

/// The mirrors a pull tries, in order: `[images] mirrors`,
/// `AGENTKERNEL_REGISTRY_MIRRORS`, then dockerd's `registry-mirrors`.
/// Ours must be valid (a typo is an error); dockerd's that a pull would
/// refuse are left out.
pub(crate) fn mirrors(config: &Config) -> Result<Vec<Mirror>> {
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

/// A run's image from agentkernel's own store (the native and VM
/// backends), pulled as the run's pull policy allows.
pub(crate) async fn fetch_for_run(
    spec: &agentkernel_core::spec::SandboxSpec,
    config: &Config,
) -> Result<store::Image> {
    use agentkernel_core::spec::PullPolicy;
    let reference = store::Reference::parse(&spec.image)
        .map_err(|e| Error::invalid("image", spec.image.clone(), e.to_string()))?;
    let policy = match spec.pull {
        PullPolicy::Missing => store::PullPolicy::Missing,
        PullPolicy::Always => store::PullPolicy::Always,
        PullPolicy::Never => store::PullPolicy::Never,
    };
    let (image, _) = fetch(&open_store()?, &reference, policy, config).await?;
    Ok(image)
}

/// Pulls (or finds) an image with the configured mirrors. A pull says so
/// on stderr once the registry has resolved the image (so a name the
/// registry does not know stays a one-line error) and when it is done, as
/// Docker and Podman do; on a terminal that first line redraws itself with
/// the progress. Returns the image
/// and whether it was pulled. Failures are one line naming the image and
/// the fix.
pub(crate) async fn fetch(
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
        super::counted(image.layers.len(), "layer", "layers"),
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
                        super::counted(s.layers, "layer", "layers"),
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
