//! Image auto-detection: which image a command runs in when none is named.
//!
//! Order (README, "Images"): `--image`, `--template`, config, then the command's first
//! word, then project files in the current directory, else `alpine:3.20`.

use std::path::Path;

pub const DEFAULT_IMAGE: &str = "alpine:3.20";

/// The seed's table: a command's first word (its basename) → image.
pub fn for_command(program: &str) -> Option<&'static str> {
    let base = Path::new(program)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(program);
    let image = match base {
        "python3" | "python" | "pip" | "pip3" => "python:3.12-alpine",
        "node" | "npm" | "npx" | "yarn" => "node:22-alpine",
        "cargo" | "rustc" => "rust:1.85-alpine",
        "go" => "golang:1.23-alpine",
        "ruby" | "gem" | "bundle" => "ruby:3.3-alpine",
        _ => return None,
    };
    Some(image)
}

/// Project files in `dir` → image, in the documented order (README, "Images").
pub fn for_project(dir: &Path) -> Option<&'static str> {
    const MARKERS: [(&str, &str); 6] = [
        ("package.json", "node:22-alpine"),
        ("pyproject.toml", "python:3.12-alpine"),
        ("requirements.txt", "python:3.12-alpine"),
        ("Cargo.toml", "rust:1.85-alpine"),
        ("go.mod", "golang:1.23-alpine"),
        ("Gemfile", "ruby:3.3-alpine"),
    ];
    MARKERS
        .iter()
        .find(|(file, _)| dir.join(file).is_file())
        .map(|(_, image)| *image)
}

/// Where the chosen image came from, for `--help`-level honesty in messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageSource {
    Flag,
    Config,
    Command,
    ProjectFile,
    Default,
}

/// Picks the image for `command` run in `dir`, given an explicit choice
/// (`--image` or template) and a configured one.
pub fn detect(
    explicit: Option<&str>,
    configured: Option<&str>,
    command: &[String],
    dir: &Path,
) -> (String, ImageSource) {
    if let Some(image) = explicit {
        return (image.to_string(), ImageSource::Flag);
    }
    if let Some(image) = configured {
        return (image.to_string(), ImageSource::Config);
    }
    if let Some(image) = command.first().and_then(|p| for_command(p)) {
        return (image.to_string(), ImageSource::Command);
    }
    if let Some(image) = for_project(dir) {
        return (image.to_string(), ImageSource::ProjectFile);
    }
    (DEFAULT_IMAGE.to_string(), ImageSource::Default)
}

/// Checks that `name` is a plausible Docker reference, so a typo fails with a
/// clear message before any engine sees it.
pub fn validate_reference(name: &str) -> crate::Result<()> {
    let bad = |why: &str| crate::Error::invalid("image", name, why.to_string());
    if name.is_empty() {
        return Err(bad("empty image name"));
    }
    if name.len() > 255 + 128 {
        return Err(bad("too long"));
    }
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "._-/:@+".contains(c);
    if !name.chars().all(ok_char) {
        return Err(bad("only letters, digits and . _ - / : @ are allowed"));
    }
    let (path, _digest) = name.split_once('@').unwrap_or((name, ""));
    let last = path.rsplit('/').next().unwrap_or(path);
    let repo_part = last.split(':').next().unwrap_or(last);
    if repo_part.is_empty() || repo_part.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(bad("repository names are lowercase"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn seed_table_every_row() {
        let rows = [
            ("python3", "python:3.12-alpine"),
            ("python", "python:3.12-alpine"),
            ("pip", "python:3.12-alpine"),
            ("node", "node:22-alpine"),
            ("npm", "node:22-alpine"),
            ("npx", "node:22-alpine"),
            ("yarn", "node:22-alpine"),
            ("cargo", "rust:1.85-alpine"),
            ("rustc", "rust:1.85-alpine"),
            ("go", "golang:1.23-alpine"),
            ("ruby", "ruby:3.3-alpine"),
            ("gem", "ruby:3.3-alpine"),
            ("bundle", "ruby:3.3-alpine"),
            ("/usr/bin/python3", "python:3.12-alpine"),
        ];
        let empty = tempfile::tempdir().unwrap();
        for (word, image) in rows {
            let (got, src) = detect(None, None, &cmd(&[word, "x"]), empty.path());
            assert_eq!((got.as_str(), src), (image, ImageSource::Command), "{word}");
        }
        let (got, src) = detect(None, None, &cmd(&["ls"]), empty.path());
        assert_eq!((got.as_str(), src), (DEFAULT_IMAGE, ImageSource::Default));
    }

    #[test]
    fn project_files_every_row() {
        let rows = [
            ("package.json", "node:22-alpine"),
            ("pyproject.toml", "python:3.12-alpine"),
            ("requirements.txt", "python:3.12-alpine"),
            ("Cargo.toml", "rust:1.85-alpine"),
            ("go.mod", "golang:1.23-alpine"),
            ("Gemfile", "ruby:3.3-alpine"),
        ];
        for (file, image) in rows {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join(file), "").unwrap();
            let (got, src) = detect(None, None, &cmd(&["make", "test"]), dir.path());
            assert_eq!(
                (got.as_str(), src),
                (image, ImageSource::ProjectFile),
                "{file}"
            );
        }
    }

    #[test]
    fn explicit_and_config_win() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("package.json"), "").unwrap();
        let c = cmd(&["python3"]);
        assert_eq!(
            detect(Some("ubuntu:24.04"), Some("x"), &c, dir.path()).0,
            "ubuntu:24.04"
        );
        assert_eq!(
            detect(None, Some("debian:12"), &c, dir.path()).0,
            "debian:12"
        );
        // The command's first word beats project files.
        assert_eq!(detect(None, None, &c, dir.path()).0, "python:3.12-alpine");
    }

    #[test]
    fn references() {
        for ok in [
            "alpine",
            "alpine:3.20",
            "ghcr.io/a/b:1",
            "localhost:5000/x@sha256:ab",
        ] {
            validate_reference(ok).unwrap();
        }
        for bad in ["", "Alpine", "a b", "x;rm"] {
            assert!(validate_reference(bad).is_err(), "{bad}");
        }
    }
}

/// `reference` with its tag replaced by `digest` (`alpine:3.20` +
/// `sha256:…` → `alpine@sha256:…`): the same repository, pinned to content.
pub fn pinned(reference: &str, digest: &str) -> String {
    let name = reference.split_once('@').map_or(reference, |(n, _)| n);
    let last_slash = name.rfind('/').map_or(0, |i| i + 1);
    let name = match name[last_slash..].rfind(':') {
        Some(colon) => &name[..last_slash + colon],
        None => name,
    };
    format!("{name}@{digest}")
}

#[cfg(test)]
mod pinned_tests {
    #[test]
    fn tag_becomes_digest() {
        let d = "sha256:ab";
        assert_eq!(super::pinned("alpine:3.20", d), "alpine@sha256:ab");
        assert_eq!(
            super::pinned("localhost:5000/x:1", d),
            "localhost:5000/x@sha256:ab"
        );
        assert_eq!(
            super::pinned("localhost:5000/x", d),
            "localhost:5000/x@sha256:ab"
        );
        assert_eq!(super::pinned("x@sha256:cd", d), "x@sha256:ab");
    }
}
