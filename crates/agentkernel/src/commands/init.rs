//! `agentkernel init`: writes `./agentkernel.toml` in upstream's schema
//! (so upstream reads it too), with the image detected from the project the
//! way `run` detects it (core `image::for_project`). An existing file is
//! never replaced without `--force`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;

use agentkernel_core::{image, names, Error, Result};

use crate::cli::InitArgs;

pub fn init(args: InitArgs) -> Result<i32> {
    if args.template.is_some() {
        return Err(Error::not_supported("init --template"));
    }
    let dir = std::env::current_dir()
        .map_err(|e| Error::invalid("current directory", ".", e.to_string()))?;
    let name = match args.name {
        Some(name) => {
            names::validate(&name)?;
            name
        }
        None => default_name(&dir),
    };
    if let Some(agent) = &args.agent {
        if !["claude", "gemini", "codex", "opencode"].contains(&agent.as_str()) {
            return Err(Error::invalid(
                "--agent",
                agent,
                "expected one of: claude, gemini, codex, opencode",
            ));
        }
    }
    let detected = image::for_project(&dir);
    let mut text = format!(
        "# agentkernel configuration (upstream's schema; see `agentkernel run --help`)\n\n\
         [sandbox]\nname = \"{name}\"\nruntime = \"base\"\n"
    );
    if let Some(image) = detected {
        text.push_str(&format!(
            "base_image = \"{image}\"    # detected from the project's files\n"
        ));
    }
    // Only when asked: we have no agent profiles, so the key would earn a
    // notice on every run.
    if let Some(agent) = &args.agent {
        text.push_str(&format!("\n[agent]\npreferred = \"{agent}\"\n"));
    }
    text.push_str("\n[resources]\nvcpus = 1\nmemory_mb = 512\n");
    let path = dir.join("agentkernel.toml");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).mode(0o644);
    if args.force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Error::Conflict(format!(
                "{} already exists; keep it, or replace it with `agentkernel init --force`",
                path.display()
            ))
        } else {
            Error::invalid("agentkernel.toml", path.to_string_lossy(), e.to_string())
        }
    })?;
    file.write_all(text.as_bytes())
        .map_err(|e| Error::invalid("agentkernel.toml", path.to_string_lossy(), e.to_string()))?;
    eprintln!(
        "agentkernel: wrote {} for sandbox {name}{}; `agentkernel sandbox create` creates it",
        path.display(),
        detected
            .map(|i| format!(" (image {i})"))
            .unwrap_or_default()
    );
    Ok(0)
}

/// The directory's name as a sandbox name (upstream uses it as is; ours
/// must be a valid name, so anything else is sanitized).
fn default_name(dir: &std::path::Path) -> String {
    let raw = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if names::validate(&raw).is_ok() {
        return raw;
    }
    let mut name = names::sanitize(&raw);
    name.truncate(names::MAX_LEN);
    let name = name.trim_end_matches('-').to_string();
    if name.is_empty() {
        "my-sandbox".into()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_are_valid() {
        for dir in ["/p/My_App", "/p/my app!", "/", "/p/.hidden", "/p/ä"] {
            let name = default_name(std::path::Path::new(dir));
            names::validate(&name).unwrap_or_else(|e| panic!("{dir}: {name}: {e}"));
        }
        assert_eq!(default_name(std::path::Path::new("/p/My_App")), "My_App");
    }
}
