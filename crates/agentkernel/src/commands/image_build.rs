//! `[build]` and `[[files]]` on the command's side (`run`, `sandbox create`):
//! what a config asks to build or copy in is decided before the spec is
//! resolved, and done only after it passed every check (trust first), so a
//! refused run builds and reads nothing.

use agentkernel_core::backend::{Backend, BackendKind};
use agentkernel_core::config::Config;
use agentkernel_core::files::InjectedFile;
use agentkernel_core::image_build::BuildSpec;
use agentkernel_core::spec::{PullPolicy, SandboxSpec};
use agentkernel_core::{Error, Result};

/// A build this run will make: the section, and the tag the spec runs.
pub struct Planned {
    build: BuildSpec,
    tag: String,
}

/// Before `resolve`: when the config has `[build]` and neither `-i` nor the
/// `--template` (a layer above the files) names the image, the config's
/// image becomes the build's tag (`[build]` wins over the files'
/// `base_image`, as upstream documents). Only Docker and Podman build.
pub fn plan(
    config: &mut Config,
    image_flag: bool,
    template: Option<&super::template::Applied>,
    kind: BackendKind,
) -> Result<Option<Planned>> {
    let Some(build) = config.build.clone() else {
        return Ok(None);
    };
    let named_by = if image_flag {
        Some("-i names the image")
    } else if template.is_some_and(|t| t.sets_image) {
        Some("the template names the image")
    } else {
        None
    };
    if let Some(why) = named_by {
        eprintln!(
            "agentkernel: notice: {}: [build] skipped: {why}",
            build.config.display()
        );
        return Ok(None);
    }
    if !matches!(kind, BackendKind::Docker | BackendKind::Podman) {
        return Err(Error::not_supported_hint(
            format!("[build] ({}) on the {kind} backend", build.config.display()),
            "images are built by Docker or Podman: run with -B docker (or -B podman), or build the image yourself and set base_image (or -i)",
        ));
    }
    let tag = build.tag(config.name.as_deref());
    config.image = Some(tag.clone());
    Ok(Some(Planned { build, tag }))
}

/// After `resolve`: the built tag is local, never pulled.
pub fn pin(planned: &Option<Planned>, spec: &mut SandboxSpec) {
    if planned.is_some() {
        spec.pull = PullPolicy::Never;
    }
}

/// Once the run is admitted: builds the image, then reads the `[[files]]`
/// sources (a missing one is one line, before any sandbox exists).
pub async fn prepare(
    planned: &Option<Planned>,
    config: &Config,
    backend: &dyn Backend,
) -> Result<Vec<InjectedFile>> {
    let files = agentkernel_core::files::read_all(&config.files)?;
    if let Some(p) = planned {
        backend.build_image(&p.build, &p.tag).await?;
    }
    Ok(files)
}

/// `run --dry-run`: the `[[files]]` that would be copied in and the build
/// that would run (sources are named, never read).
pub fn describe(planned: &Option<Planned>, config: &Config, resolved: &mut serde_json::Value) {
    use serde_json::json;
    resolved["files"] = config
        .files
        .iter()
        .map(|f| json!({"source": f.source, "dest": f.dest, "mode": format!("{:04o}", f.mode)}))
        .collect();
    resolved["build"] = match planned {
        Some(p) => json!({
            "dockerfile": p.build.dockerfile,
            "context": p.build.context,
            "target": p.build.target,
            "args": p.build.args,
            "no_cache": p.build.no_cache,
            "tag": p.tag,
        }),
        None => serde_json::Value::Null,
    };
}
