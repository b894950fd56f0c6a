//! The secret vault behind `agentkernel secret` and `-S`/`--secret-file`.
//!
//! `<state>/secrets/vault` holds every secret, encrypted with
//! ChaCha20-Poly1305 (an AEAD: a changed byte makes it undecryptable rather
//! than wrong) under a random 256-bit key kept in a separate file,
//! `<state>/secrets/vault.key`. Both are 0600 in a 0700 directory inside the
//! private state directory. Every change is read-modify-write under an
//! exclusive `flock` of `vault.lock` and lands by rename, so concurrent
//! `secret set`s all survive and a reader never sees half a file.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::{Error, Result};

/// The vault file starts with this; it is also the AEAD's associated data,
/// so a file of another format or version cannot be mistaken for this one.
const MAGIC: &[u8; 8] = b"AKVAULT1";
const NONCE_LEN: usize = 12;
const KEY_LEN: usize = 32;

/// One stored secret. Only `secret list` shows `set_unix`; nothing shows `value`.
#[derive(Clone, Serialize, Deserialize)]
pub struct Entry {
    pub value: String,
    pub set_unix: u64,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("set_unix", &self.set_unix)
            .finish_non_exhaustive()
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.value.zeroize();
    }
}

pub struct Vault {
    dir: PathBuf,
}

impl Vault {
    /// The current user's vault: `<state>/secrets` (root's under
    /// `/var/lib/agentkernel`, a user's under their own state directory).
    pub fn open_default() -> Vault {
        Vault::new(crate::paths::state_dir().join("secrets"))
    }

    pub fn new(dir: PathBuf) -> Vault {
        Vault { dir }
    }

    pub fn file(&self) -> PathBuf {
        self.dir.join("vault")
    }

    pub fn key_file(&self) -> PathBuf {
        self.dir.join("vault.key")
    }

    /// Every entry; an empty map when nothing was ever set.
    pub fn entries(&self) -> Result<BTreeMap<String, Entry>> {
        let data = match fs::read(self.file()) {
            Ok(data) => data,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(Error::state(self.file(), e)),
        };
        let key = match self.read_key()? {
            Some(key) => key,
            None => return Err(self.undecryptable("its key file is missing")),
        };
        self.decrypt(&key, &data)
    }

    pub fn get(&self, name: &str) -> Result<Option<String>> {
        Ok(self.entries()?.get(name).map(|e| e.value.clone()))
    }

    pub fn set(&self, name: &str, value: &str) -> Result<()> {
        validate_key_name("secret name", name)?;
        self.update(|entries| {
            entries.insert(
                name.to_string(),
                Entry {
                    value: value.to_string(),
                    set_unix: crate::state::now_unix(),
                },
            );
            true
        })
    }

    /// Whether `name` was there.
    pub fn remove(&self, name: &str) -> Result<bool> {
        let mut found = false;
        self.update(|entries| {
            found = entries.remove(name).is_some();
            found
        })?;
        Ok(found)
    }

    /// Read-modify-write under the lock; `change` says whether to write.
    fn update(&self, change: impl FnOnce(&mut BTreeMap<String, Entry>) -> bool) -> Result<()> {
        // The state root (when this creates it) is private too, as every
        // command makes it.
        for dir in self.dir.parent().into_iter().chain([self.dir.as_path()]) {
            crate::state::create_private_dir_all(dir).map_err(|e| Error::state(dir, e))?;
        }
        let _lock = self.lock()?;
        let mut entries = self.entries()?;
        if !change(&mut entries) {
            return Ok(());
        }
        let key = match self.read_key()? {
            Some(key) => key,
            None => self.create_key()?,
        };
        let plain = Zeroizing::new(
            serde_json::to_vec(&entries).map_err(|e| Error::state(self.file(), e.into()))?,
        );
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::getrandom(&mut nonce)
            .map_err(|e| Error::state(self.file(), std::io::Error::other(e.to_string())))?;
        let sealed = ChaCha20Poly1305::new(Key::from_slice(&key[..]))
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: MAGIC,
                },
            )
            .map_err(|_| Error::state(self.file(), std::io::Error::other("encryption failed")))?;
        let mut file = Vec::with_capacity(MAGIC.len() + NONCE_LEN + sealed.len());
        file.extend_from_slice(MAGIC);
        file.extend_from_slice(&nonce);
        file.extend_from_slice(&sealed);
        crate::state::write_atomic(&self.file(), &file)
    }

    fn lock(&self) -> Result<fs::File> {
        let path = self.dir.join("vault.lock");
        let file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::state(&path, e))?;
        // SAFETY: flock on a descriptor we own; released when `file` closes.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(Error::state(&path, std::io::Error::last_os_error()));
        }
        Ok(file)
    }

    fn read_key(&self) -> Result<Option<Zeroizing<Vec<u8>>>> {
        let path = self.key_file();
        let mut key = Zeroizing::new(Vec::with_capacity(KEY_LEN));
        match fs::File::open(&path) {
            Ok(mut f) => f
                .read_to_end(&mut key)
                .map_err(|e| Error::state(&path, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::state(&path, e)),
        };
        if key.len() != KEY_LEN {
            return Err(self.undecryptable("its key file is not a 32-byte key"));
        }
        Ok(Some(key))
    }

    /// The first `set`: a new random key, written before any ciphertext.
    fn create_key(&self) -> Result<Zeroizing<Vec<u8>>> {
        let mut key = Zeroizing::new(vec![0u8; KEY_LEN]);
        getrandom::getrandom(&mut key)
            .map_err(|e| Error::state(self.key_file(), std::io::Error::other(e.to_string())))?;
        crate::state::write_atomic(&self.key_file(), &key)?;
        Ok(key)
    }

    fn decrypt(&self, key: &[u8], data: &[u8]) -> Result<BTreeMap<String, Entry>> {
        if data.len() < MAGIC.len() + NONCE_LEN || &data[..MAGIC.len()] != MAGIC {
            return Err(self.undecryptable("it is not an agentkernel vault"));
        }
        let (nonce, sealed) = data[MAGIC.len()..].split_at(NONCE_LEN);
        let plain = ChaCha20Poly1305::new(Key::from_slice(key))
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: MAGIC,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| self.undecryptable("it is corrupt or was encrypted with another key"))?;
        serde_json::from_slice(&plain)
            .map_err(|_| self.undecryptable("its decrypted content is not a vault"))
    }

    fn undecryptable(&self, why: &str) -> Error {
        Error::Conflict(format!(
            "secret vault {} cannot be decrypted with {}: {why}; restore both files from a backup, or delete them and set the secrets again with `agentkernel secret set`",
            self.file().display(),
            self.key_file().display(),
        ))
    }
}

/// Secret names are environment-variable names, since each becomes one in
/// the sandbox: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn validate_key_name(what: &'static str, name: &str) -> Result<()> {
    let valid = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(Error::invalid(
            what,
            name,
            "a secret name is letters, digits and _, not starting with a digit (like an environment variable)",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn round_trip_encrypted_private() {
        let tmp = tempfile::tempdir().unwrap();
        let vault = Vault::new(tmp.path().join("secrets"));
        assert!(vault.entries().unwrap().is_empty());
        vault.set("API_KEY", "sk-very-secret-value").unwrap();
        vault.set("OTHER", "two").unwrap();
        assert_eq!(
            vault.get("API_KEY").unwrap().as_deref(),
            Some("sk-very-secret-value")
        );
        let raw = fs::read(vault.file()).unwrap();
        assert!(!raw.windows(6).any(|w| w == b"secret"), "plaintext on disk");
        assert_eq!(mode(&vault.file()), 0o600);
        assert_eq!(mode(&vault.key_file()), 0o600);
        assert_eq!(mode(&tmp.path().join("secrets")), 0o700);
        let fresh = Vault::new(tmp.path().join("new-state/secrets"));
        fresh.set("K", "v").unwrap();
        assert_eq!(mode(&tmp.path().join("new-state")), 0o700);
        assert!(vault.remove("API_KEY").unwrap());
        assert!(!vault.remove("API_KEY").unwrap());
        assert_eq!(vault.get("API_KEY").unwrap(), None);
        assert_eq!(vault.get("OTHER").unwrap().as_deref(), Some("two"));
    }

    #[test]
    fn tampering_and_a_lost_key_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let vault = Vault::new(tmp.path().to_path_buf());
        vault.set("K", "v").unwrap();
        let mut raw = fs::read(vault.file()).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        fs::write(vault.file(), &raw).unwrap();
        let e = vault.entries().unwrap_err().to_string();
        assert!(
            e.contains("cannot be decrypted") && !e.contains('\n'),
            "{e}"
        );
        raw[last] ^= 1;
        fs::write(vault.file(), &raw).unwrap();
        assert_eq!(vault.get("K").unwrap().as_deref(), Some("v"));
        fs::remove_file(vault.key_file()).unwrap();
        assert!(vault.entries().is_err());
        // A set never overwrites a vault it cannot read.
        assert!(vault.set("K2", "v").is_err());
    }

    #[test]
    fn names_are_env_like() {
        for ok in ["A", "_x", "OPENAI_API_KEY", "k9"] {
            validate_key_name("k", ok).unwrap();
        }
        for bad in ["", "9a", "A-B", "A B", "A=B", "é"] {
            assert!(validate_key_name("k", bad).is_err(), "{bad}");
        }
    }
}
