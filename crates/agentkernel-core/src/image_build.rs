//! `[build]` (thrashr888/agentkernel's schema): the sandbox's image is built
//! by the engine (Docker or Podman) from a Dockerfile, tagged, and run.
//!
//! ```toml
//! [build]
//! dockerfile = "Dockerfile.dev"   # relative to the config file (default: Dockerfile)
//! context = "."                   # relative to the config file (default: the Dockerfile's directory)
//! target = "dev"                  # multi-stage target
//! no_cache = false
//! [build.args]
//! NODE_VERSION = "22"
//! ```
//!
//! `--image` (and a `--template` naming an image) wins over `[build]` (as
//! upstream: the flag names the image, so nothing is built); `[build]` wins
//! over the files' `base_image`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

/// One `[build]` section, paths resolved against its file's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildSpec {
    pub dockerfile: PathBuf,
    pub context: PathBuf,
    pub target: Option<String>,
    pub args: BTreeMap<String, String>,
    pub no_cache: bool,
    /// The config file that asked for it (named in errors).
    pub config: PathBuf,
}

impl BuildSpec {
    /// The section of the file at `config`, whose directory is `base`.
    pub fn new(
        config: &Path,
        base: &Path,
        dockerfile: Option<&str>,
        context: Option<&str>,
        target: Option<String>,
        args: BTreeMap<String, String>,
        no_cache: bool,
    ) -> BuildSpec {
        let dockerfile = base.join(dockerfile.unwrap_or("Dockerfile"));
        let context = match context {
            Some(c) => base.join(c),
            None => match dockerfile.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
                _ => PathBuf::from("."),
            },
        };
        BuildSpec {
            dockerfile,
            context,
            target,
            args,
            no_cache,
            config: config.to_path_buf(),
        }
    }

    /// The tag the built image gets: `agentkernel-build/NAME:HASH`, NAME from
    /// `name` (the `[sandbox] name`) or the context's directory, HASH from
    /// what is built (Dockerfile path, context, target, args), so two
    /// projects never share a tag and rebuilding a project replaces its own.
    pub fn tag(&self, name: Option<&str>) -> String {
        let fallback = self
            .context
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "project".to_string());
        let raw = name.unwrap_or(&fallback);
        let mut safe: String = raw
            .chars()
            .map(|c| match c.to_ascii_lowercase() {
                c @ ('a'..='z' | '0'..='9') => c,
                _ => '-',
            })
            .collect();
        safe = safe.trim_matches('-').to_string();
        safe.truncate(48);
        if safe.is_empty() {
            safe = "project".into();
        }
        let mut hash = Sha256::new();
        for part in [
            self.dockerfile.to_string_lossy().as_ref(),
            self.context.to_string_lossy().as_ref(),
            self.target.as_deref().unwrap_or(""),
        ] {
            hash.update(part.as_bytes());
            hash.update([0]);
        }
        for (k, v) in &self.args {
            hash.update(format!("{k}={v}\0").as_bytes());
        }
        let digest = hex::encode(hash.finalize());
        format!("agentkernel-build/{safe}:{}", &digest[..12])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_default_as_upstream_documents() {
        let b = BuildSpec::new(
            Path::new("/p/agentkernel.toml"),
            Path::new("/p"),
            Some("docker/Dockerfile.dev"),
            None,
            None,
            BTreeMap::new(),
            false,
        );
        assert_eq!(b.dockerfile, Path::new("/p/docker/Dockerfile.dev"));
        assert_eq!(b.context, Path::new("/p/docker"));
        let d = BuildSpec::new(
            Path::new("/p/a.toml"),
            Path::new("/p"),
            None,
            Some("."),
            None,
            BTreeMap::new(),
            false,
        );
        assert_eq!(d.dockerfile, Path::new("/p/Dockerfile"));
        assert_eq!(d.context, Path::new("/p/."));
    }

    #[test]
    fn tags_are_valid_and_differ_by_input() {
        let mut b = BuildSpec::new(
            Path::new("/p/a.toml"),
            Path::new("/p"),
            None,
            None,
            None,
            BTreeMap::new(),
            false,
        );
        let t = b.tag(Some("My_Project"));
        assert!(t.starts_with("agentkernel-build/my-project:"), "{t}");
        crate::image::validate_reference(&t).unwrap();
        b.args.insert("V".into(), "1".into());
        assert_ne!(b.tag(Some("My_Project")), t);
        assert!(b.tag(None).starts_with("agentkernel-build/p:"));
    }
}
