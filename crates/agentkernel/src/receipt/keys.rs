//! The receipt signing key (created on first use, 0600, in the user's
//! config directory) and the set of signers `receipt verify` trusts.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use agentkernel_core::{Error, Result};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

const KEY_FILE: &str = "receipt-signing.key";

/// `$XDG_CONFIG_HOME/agentkernel`, else `~/.config/agentkernel` (the
/// directory of the user's config file, root's included).
pub fn config_dir() -> Result<PathBuf> {
    agentkernel_core::paths::user_config_files()
        .into_iter()
        .nth(1)
        .and_then(|f| f.parent().map(Path::to_path_buf))
        .ok_or_else(|| {
            Error::invalid(
                "receipt signing key",
                "$HOME",
                "neither HOME nor XDG_CONFIG_HOME is set; set one so the key has a home",
            )
        })
}

pub fn key_path() -> Result<PathBuf> {
    Ok(config_dir()?.join(KEY_FILE))
}

/// First 16 hex digits of sha256(public key): upstream's key id.
pub fn key_id(public: &VerifyingKey) -> String {
    hex::encode(Sha256::digest(public.as_bytes()))[..16].to_string()
}

pub fn encode_public(public: &VerifyingKey) -> String {
    BASE64.encode(public.as_bytes())
}

pub fn decode_public(text: &str) -> Option<VerifyingKey> {
    let bytes: [u8; 32] = BASE64.decode(text.trim()).ok()?.try_into().ok()?;
    VerifyingKey::from_bytes(&bytes).ok()
}

fn key_error(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::invalid(
        "receipt signing key",
        path.to_string_lossy(),
        format!("{why}; fix or remove the file (a new key is created on next use)"),
    )
}

/// The local signing key, created on first use. Creation is atomic and
/// race-free: the key is written to a private temporary file and linked into
/// place, which fails if another process got there first (then its key is used).
pub fn signing_key() -> Result<SigningKey> {
    let path = key_path()?;
    if let Some(key) = read_key(&path)? {
        return Ok(key);
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(|e| key_error(dir, e))?;
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).map_err(|e| key_error(&path, e))?;
    let temp = dir.join(format!(".{KEY_FILE}.{}", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .and_then(|mut f| {
            f.write_all(format!("{}\n", BASE64.encode(seed)).as_bytes())?;
            f.sync_all()
        })
        .and_then(|()| std::fs::hard_link(&temp, &path));
    let _ = std::fs::remove_file(&temp);
    match written {
        Ok(()) => Ok(SigningKey::from_bytes(&seed)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            read_key(&path)?.ok_or_else(|| key_error(&path, "vanished while being created"))
        }
        Err(e) => Err(key_error(&path, e)),
    }
}

fn read_key(path: &Path) -> Result<Option<SigningKey>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(key_error(path, e)),
    };
    let seed: [u8; 32] = BASE64
        .decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| key_error(path, "not a base64 ed25519 seed"))?;
    Ok(Some(SigningKey::from_bytes(&seed)))
}

/// The local public key without creating a key pair (verify on a machine
/// that never signed).
pub fn local_public() -> Result<Option<VerifyingKey>> {
    Ok(read_key(&key_path()?)?.map(|k| k.verifying_key()))
}

/// A public key given as base64 text, or as a file holding it (the output of
/// `receipt key`, plain or `--json`); a relative path is relative to `base`.
pub fn parse_trusted(spec: &str, base: &Path) -> Result<VerifyingKey> {
    if let Some(key) = decode_public(spec) {
        return Ok(key);
    }
    let text = std::fs::read_to_string(base.join(spec)).map_err(|e| {
        Error::invalid(
            "trusted receipt key",
            spec,
            format!("neither a base64 ed25519 public key nor a readable file ({e})"),
        )
    })?;
    let from_json = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["public_key"].as_str().and_then(decode_public));
    from_json
        .or_else(|| text.split_whitespace().find_map(decode_public))
        .ok_or_else(|| {
            Error::invalid(
                "trusted receipt key",
                spec,
                "the file holds no base64 ed25519 public key; write `agentkernel receipt key` output into it",
            )
        })
}
