//! Making sure the image is in the engine, per the `--pull` policy.

use std::io::Write;

use agentkernel_core::spec::PullPolicy;
use agentkernel_core::terminal;
use agentkernel_core::Error;
use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{CreateContainerOptionsBuilder, CreateImageOptionsBuilder};
use futures_util::StreamExt;

use crate::engine::{is_not_found, message_of};
use crate::Engine;

/// Creates a container, pulling its image first when the policy says so or
/// when the engine reports it missing. Trying the create first saves an image
/// inspection round-trip on every run with a cached image. `engine_error`
/// maps the engine's refusals (a name conflict means different things to callers).
/// A container on agentkernel's network gets the network created if needed.
pub async fn create_container(
    engine: &Engine,
    image: &str,
    policy: PullPolicy,
    name: &str,
    mut body: ContainerCreateBody,
    engine_error: impl Fn(bollard::errors::Error) -> Error,
) -> Result<String, Error> {
    if let Some(mode) = body
        .host_config
        .as_mut()
        .and_then(|h| h.network_mode.as_mut())
        .filter(|m| *m == crate::network::NAME)
    {
        *mode = crate::network::ensure(engine).await?;
    }
    if policy == PullPolicy::Always {
        ensure_image(engine, image, policy).await?;
    }
    let options = || CreateContainerOptionsBuilder::default().name(name).build();
    match engine
        .docker
        .create_container(Some(options()), body.clone())
        .await
    {
        Ok(r) => Ok(r.id),
        Err(e) if is_not_found(&e) && policy != PullPolicy::Always => {
            ensure_image(engine, image, policy).await?;
            let r = engine
                .docker
                .create_container(Some(options()), body)
                .await
                .map_err(engine_error)?;
            Ok(r.id)
        }
        Err(e) => Err(engine_error(e)),
    }
}

/// Makes sure the image is in the engine and returns its content address:
/// `name@sha256:…` when it came from a registry, else the engine's image ID
/// (a locally built or loaded image has no registry digest).
pub async fn ensure_image(
    engine: &Engine,
    image: &str,
    policy: PullPolicy,
) -> Result<String, Error> {
    if policy != PullPolicy::Always {
        match engine.docker.inspect_image(image).await {
            Ok(found) => return Ok(content_address(image, found)),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(engine.error("inspecting the image", e)),
        }
        if policy == PullPolicy::Never {
            return Err(Error::Image {
                image: image.to_string(),
                why: "it is not in the local image store and --pull never forbids pulling".into(),
                fix: format!(
                    "pull or load it first (`{0} pull`, `{0} load`), or use --pull missing",
                    engine.name()
                ),
            });
        }
    }
    pull(engine, image).await?;
    let found = engine
        .docker
        .inspect_image(image)
        .await
        .map_err(|e| engine.error("inspecting the image", e))?;
    Ok(content_address(image, found))
}

/// The registry digest of `image`'s repository, else the image ID.
fn content_address(image: &str, found: bollard::models::ImageInspect) -> String {
    let repository = split_tag(image).0;
    let repo_digests = found.repo_digests.unwrap_or_default();
    repo_digests
        .iter()
        .find(|d| {
            d.split_once('@')
                .is_some_and(|(name, _)| name == repository)
        })
        .or(repo_digests.first())
        .cloned()
        .or(found.id)
        .unwrap_or_default()
}

/// Pulls with a one-line progress display on a terminal; nothing on stdout.
async fn pull(engine: &Engine, image: &str) -> Result<(), Error> {
    let (from_image, tag) = split_tag(image);
    let options = CreateImageOptionsBuilder::default()
        .from_image(from_image)
        .tag(tag)
        .build();
    let show_progress = terminal::is_tty(2);
    let mut stderr = std::io::stderr();
    let _ = writeln!(stderr, "agentkernel: pulling {image}");
    let mut stream = engine.docker.create_image(Some(options), None, None);
    while let Some(item) = stream.next().await {
        match item {
            Ok(info) => {
                if let Some(err) = info.error_detail.and_then(|d| d.message) {
                    return Err(pull_failed(engine, image, err));
                }
                if show_progress {
                    let progress = match info.progress_detail.and_then(|d| d.current.zip(d.total)) {
                        Some((cur, total)) if total > 0 => format!("{}%", cur * 100 / total),
                        _ => String::new(),
                    };
                    let line = format!(
                        "{} {} {progress}",
                        info.id.unwrap_or_default(),
                        info.status.unwrap_or_default(),
                    );
                    let width = terminal::size(2).map(|(_, c)| c as usize).unwrap_or(80);
                    let line: String = line.chars().take(width.saturating_sub(1)).collect();
                    let _ = write!(stderr, "\r\x1b[K{line}");
                }
            }
            Err(e) if is_not_found(&e) => return Err(pull_failed(engine, image, message_of(&e))),
            Err(e) => {
                return match engine.error("pulling", e) {
                    Error::Backend { message, .. } => Err(pull_failed(engine, image, message)),
                    other => Err(other),
                }
            }
        }
    }
    if show_progress {
        let _ = write!(stderr, "\r\x1b[K");
    }
    // Some engines report a failed pull only by not having the image afterwards.
    match engine.docker.inspect_image(image).await {
        Ok(_) => Ok(()),
        Err(e) => Err(pull_failed(engine, image, message_of(&e))),
    }
}

/// Names the engine's own commands: a Podman user has no `docker load`.
fn pull_failed(engine: &Engine, image: &str, why: String) -> Error {
    Error::Image {
        image: image.to_string(),
        why: format!("not found locally and the pull failed: {}", why.replace('\n', " ")),
        fix: format!(
            "check the name and your registry access, or load the image locally (`{0} load`, `{0} import`)",
            engine.name()
        ),
    }
}

/// A small image the engine already has, to try a sandbox with (`doctor`):
/// busybox or alpine when there is one, else the smallest tagged image.
pub async fn small_local_image(engine: &Engine) -> Result<Option<String>, Error> {
    let images = engine
        .docker
        .list_images(None::<bollard::query_parameters::ListImagesOptions>)
        .await
        .map_err(|e| engine.error("listing images", e))?;
    let mut tagged: Vec<(bool, i64, String)> = images
        .into_iter()
        .flat_map(|i| {
            let size = i.size;
            i.repo_tags
                .into_iter()
                .filter(|t| !t.is_empty() && !t.starts_with("<none>"))
                .map(move |t| (t.contains("busybox") || t.contains("alpine"), size, t))
        })
        .collect();
    // Small shells first: `true` is surely in them.
    tagged.sort_by_key(|(known, size, _)| (!known, *size));
    Ok(tagged.into_iter().next().map(|(_, _, tag)| tag))
}

/// `repo:tag` → (`repo`, `tag`); digests and registry ports are kept intact.
fn split_tag(image: &str) -> (&str, &str) {
    if image.contains('@') {
        return (image, "");
    }
    match image.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo, tag),
        _ => (image, "latest"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn split_tag() {
        assert_eq!(super::split_tag("alpine:3.20"), ("alpine", "3.20"));
        assert_eq!(super::split_tag("alpine"), ("alpine", "latest"));
        assert_eq!(
            super::split_tag("localhost:5000/x"),
            ("localhost:5000/x", "latest")
        );
        assert_eq!(
            super::split_tag("localhost:5000/x:1"),
            ("localhost:5000/x", "1")
        );
    }
}
