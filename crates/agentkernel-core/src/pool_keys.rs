//! What the warm pools that keep no daemon (qemu's VMs, native's
//! sandboxes) record per key, for `pool status`: `<key dir>/about.json`,
//! what the key is for people and how often a run found one ready.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::spec::SandboxSpec;
use crate::state::{create_private_dir_all, write_atomic};

const ABOUT: &str = "about.json";

/// What a key is and how its runs went, rewritten by each run of the key.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct About {
    pub image: String,
    pub profile: String,
    pub workspace: Option<String>,
    /// Runs that found a warm one ready, and runs that made their own.
    pub hits: u64,
    pub misses: u64,
}

impl About {
    /// The key of a run of `spec`, before any run is counted.
    pub fn for_spec(spec: &SandboxSpec) -> About {
        About {
            image: spec.image.clone(),
            profile: spec.policy.profile.to_string(),
            workspace: spec
                .workspace
                .as_ref()
                .map(|w| w.host.display().to_string()),
            ..About::default()
        }
    }

    /// The record in `key_dir` (empty when there is none).
    pub fn load(key_dir: &Path) -> About {
        std::fs::read(key_dir.join(ABOUT))
            .ok()
            .and_then(|data| serde_json::from_slice(&data).ok())
            .unwrap_or_default()
    }

    /// Whether `key_dir` has a record, and how old it is.
    pub fn age(key_dir: &Path) -> Option<std::time::Duration> {
        crate::state::file_age(&key_dir.join(ABOUT))
    }

    pub fn forget(key_dir: &Path) {
        let _ = std::fs::remove_file(key_dir.join(ABOUT));
    }
}

/// Counts a run of the key in `key_dir` (`hit`: it was served by a warm
/// one) and records what the key is. Concurrent runs of a key may lose a
/// count: status only.
pub fn record_run(key_dir: &Path, about: About, hit: bool) {
    if create_private_dir_all(key_dir).is_err() {
        return;
    }
    let before = About::load(key_dir);
    let now = About {
        hits: before.hits + u64::from(hit),
        misses: before.misses + u64::from(!hit),
        ..about
    };
    if let Ok(data) = serde_json::to_vec(&now) {
        let _ = write_atomic(&key_dir.join(ABOUT), &data);
    }
}

/// One key of a pool, for `pool status`.
#[derive(Debug, Clone, Serialize)]
pub struct KeyStatus {
    pub key: String,
    #[serde(flatten)]
    pub about: About,
    /// Unclaimed, ready or being made.
    pub warm: usize,
    /// Claimed, still running their command.
    pub in_use: usize,
}
