//! `[[files]]` (thrashr888/agentkernel's schema): host files copied into the
//! sandbox when it is created, before its first command — for a one-shot
//! run, before the command; for a kept sandbox, once.
//!
//! ```toml
//! [[files]]
//! source = ".env"          # host file, relative to the config file's directory
//! dest = "/app/.env"       # absolute path in the sandbox
//! mode = "0600"            # optional, octal permission bits (default 0644)
//! ```
//!
//! The CLI reads every source here (one line and exit 125 for a missing or
//! unreadable one, before anything is created); the backend writes the bytes
//! through its own symlink-safe copier, resolving `dest` inside the sandbox's
//! root. Where a project's `agentkernel.toml` may take sources from is
//! `crate::trust`'s business.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// All of a run's `[[files]]` together may hold at most this much: they are
/// held in memory and written into the sandbox's writable layer (configuration,
/// `.env`, scripts). Larger trees belong in a volume (`-v HOST:PATH:ro`).
pub const MAX_TOTAL_BYTES: u64 = 16 << 20;

/// The mode of a copied file when its entry sets none (upstream's default).
pub const DEFAULT_MODE: u32 = 0o644;

/// One `[[files]]` entry, as read from a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileCopy {
    /// The host file: the entry's `source`, joined to its config file's directory.
    pub source: PathBuf,
    /// Absolute path in the sandbox.
    pub dest: String,
    /// Permission bits.
    pub mode: u32,
}

/// A file ready to be written into a sandbox: the bytes were read on the host.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InjectedFile {
    pub dest: String,
    pub mode: u32,
    /// Hex in JSON (the native backend's plan travels as JSON).
    #[serde(with = "hex_bytes")]
    pub content: Vec<u8>,
}

impl std::fmt::Debug for InjectedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InjectedFile")
            .field("dest", &self.dest)
            .field("mode", &format_args!("{:o}", self.mode))
            .field("bytes", &self.content.len())
            .finish()
    }
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        hex::decode(text).map_err(serde::de::Error::custom)
    }
}

/// One entry of a config file whose directory is `base`; `Err` is the message
/// (the caller names the file).
pub fn entry(
    base: &Path,
    source: &str,
    dest: &str,
    mode: Option<&str>,
) -> Result<FileCopy, String> {
    if source.is_empty() {
        return Err("files.source: empty; name a host file".into());
    }
    check_dest(dest).map_err(|why| format!("files.dest `{dest}`: {why}"))?;
    let mode = match mode {
        None => DEFAULT_MODE,
        Some(m) => parse_mode(m).map_err(|why| format!("files.mode `{m}`: {why}"))?,
    };
    Ok(FileCopy {
        source: base.join(source),
        dest: dest.to_string(),
        mode,
    })
}

/// `dest` must be an absolute path naming a file: no `.`/`..` components,
/// no NUL, not `/` itself.
fn check_dest(dest: &str) -> Result<(), &'static str> {
    if !dest.starts_with('/') {
        return Err("must be an absolute path in the sandbox");
    }
    if dest.contains('\0') {
        return Err("contains a NUL byte");
    }
    if dest.ends_with('/') {
        return Err("names a directory; give the file's full path");
    }
    if dest.split('/').any(|c| c == "." || c == "..") {
        return Err("may not contain `.` or `..` components");
    }
    Ok(())
}

/// Octal permission bits, `"0644"` or `"644"`. Set-id and sticky bits are
/// refused: a set-uid file owned by the sandbox's root is a way up.
fn parse_mode(text: &str) -> Result<u32, &'static str> {
    let digits = text.trim_start_matches("0o");
    let mode =
        u32::from_str_radix(digits, 8).map_err(|_| "expected octal digits, e.g. \"0644\"")?;
    if mode > 0o777 {
        return Err("only permission bits (0000-0777); set-id and sticky bits are refused");
    }
    Ok(mode)
}

/// Reads every source, in order; one line naming the entry for a missing,
/// unreadable or non-regular one, or when they pass [`MAX_TOTAL_BYTES`].
pub fn read_all(copies: &[FileCopy]) -> Result<Vec<InjectedFile>> {
    let mut total = 0u64;
    let mut read = Vec::with_capacity(copies.len());
    for copy in copies {
        let failed = |why: String| {
            Error::invalid(
                "[[files]] source",
                copy.source.to_string_lossy(),
                format!("{why} (for {}); fix the entry's source", copy.dest),
            )
        };
        let file = std::fs::File::open(&copy.source).map_err(|e| failed(e.to_string()))?;
        let meta = file.metadata().map_err(|e| failed(e.to_string()))?;
        if !meta.is_file() {
            return Err(failed("not a regular file".into()));
        }
        let mut content = Vec::new();
        file.take(MAX_TOTAL_BYTES - total + 1)
            .read_to_end(&mut content)
            .map_err(|e| failed(e.to_string()))?;
        total += content.len() as u64;
        if total > MAX_TOTAL_BYTES {
            return Err(Error::Conflict(format!(
                "[[files]] hold more than {} MiB in all; mount large files with -v HOST:PATH:ro instead",
                MAX_TOTAL_BYTES >> 20
            )));
        }
        read.push(InjectedFile {
            dest: copy.dest.clone(),
            mode: copy.mode,
            content,
        });
    }
    Ok(read)
}

/// The directories above `dest`, outermost first (`/a`, `/a/b` for `/a/b/c`).
pub fn parent_dirs(dest: &str) -> Vec<&str> {
    dest.match_indices('/')
        .skip(1)
        .map(|(i, _)| &dest[..i])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_resolve_and_validate() {
        let e = entry(Path::new("/p"), ".env", "/app/.env", None).unwrap();
        assert_eq!(e.source, Path::new("/p/.env"));
        assert_eq!(e.mode, 0o644);
        assert_eq!(
            entry(Path::new("/p"), "/abs", "/x", Some("0755"))
                .unwrap()
                .source,
            Path::new("/abs")
        );
        assert_eq!(
            entry(Path::new("/p"), "a", "/x", Some("600")).unwrap().mode,
            0o600
        );
        for (dest, mode) in [
            ("relative", None),
            ("/", None),
            ("/a/../etc/passwd", None),
            ("/dir/", None),
            ("/x", Some("4755")),
            ("/x", Some("rw")),
        ] {
            assert!(
                entry(Path::new("/p"), "a", dest, mode).is_err(),
                "{dest} {mode:?}"
            );
        }
    }

    #[test]
    fn parents_outermost_first() {
        assert_eq!(parent_dirs("/a/b/c"), ["/a", "/a/b"]);
        assert!(parent_dirs("/c").is_empty());
    }

    #[test]
    fn plan_form_round_trips_as_hex() {
        let f = InjectedFile {
            dest: "/x".into(),
            mode: 0o600,
            content: b"hi\0".to_vec(),
        };
        let json = serde_json::to_string(&f).unwrap();
        assert!(json.contains("\"686900\""), "{json}");
        assert_eq!(serde_json::from_str::<InjectedFile>(&json).unwrap(), f);
    }
}
