//! `agentkernel image pull|list|rm|prune`: the native backend's image store
//! (`<state>/images`). Docker and Podman keep their own stores.

use agentkernel_core::config::Config;
use agentkernel_core::parse::format_bytes;
use agentkernel_core::{Error, Result};
use agentkernel_image as store;
use agentkernel_native::images::{fetch, open_store, store_error};
use serde_json::json;

use crate::cli::ImageCommand;

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
