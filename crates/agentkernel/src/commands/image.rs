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
                images.remove(&r).map_err(store_error)?;
                eprintln!("agentkernel: removed {}", r.familiar());
            }
            Ok(0)
        }
        ImageCommand::Prune => {
            let report = images.prune().map_err(store_error)?;
            eprintln!(
                "agentkernel: removed {} blob(s) and {} layer(s), {} freed",
                report.blobs,
                report.layers,
                format_bytes(report.bytes)
            );
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
    let image = fetch(images, &r, policy, &config).await?;
    eprintln!(
        "agentkernel: {} is {} ({} layers, {})",
        image.reference.familiar(),
        image.manifest_digest.as_str(),
        image.layers.len(),
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

/// Pulls (or finds) an image with the configured mirrors, drawing progress
/// on stderr when it is a terminal. Failures name the image and the fix.
pub(crate) async fn fetch(
    images: &store::Store,
    r: &store::Reference,
    policy: store::PullPolicy,
    config: &Config,
) -> Result<store::Image> {
    let mut mirrors = config.mirrors.clone();
    mirrors.extend(store::mirrors_from_env());
    for m in &mirrors {
        store::validate_mirror(m).map_err(store_error)?;
    }
    let progress = terminal::is_tty(2).then(|| progress_line(r.familiar()));
    let options = store::PullOptions {
        mirrors,
        policy,
        progress,
        max_layer_size: config.max_layer_size,
        ..Default::default()
    };
    let result = images.pull(r, &options).await;
    if terminal::is_tty(2) {
        eprint!("\r\x1b[K");
    }
    result.map_err(|e| Error::Image {
        image: r.familiar(),
        why: e.to_string(),
        fix:
            "check the image name (offline, `--image host` runs this machine's own root read-only)"
                .into(),
    })
}

/// One self-rewriting stderr line: layers done and bytes received.
fn progress_line(name: String) -> store::ProgressFn {
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
