//! What the warm pool has seen of each key, and the size it derives from it.
//!
//! A pooled run consumes its warm container; the refill replaces it in
//! roughly one create + start. Runs that come faster than that drain a fixed
//! number of warm containers, so each key's target follows what it sees: it
//! doubles when a run finds the key dry or takes its last warm container (and
//! is at least the runs that arrive during one refill, plus one), shrinks by
//! one after the pool turned over twice without running dry while the run
//! rate needs fewer, falls to what the run rate needs once the key has not
//! run dry for [`SURPLUS_IDLE_TTL`] (the surplus a burst grew expires then),
//! and starts again from `[pool] size` after the key sat idle for
//! `[pool] idle_ttl` (its warm containers have expired by then).
//! `[pool] max_total` bounds every target.

use std::path::{Path, PathBuf};
use std::time::Duration;

use agentkernel_core::state::{self, Store};
use serde::{Deserialize, Serialize};

use crate::pool::{Settings, SURPLUS_IDLE_TTL};

/// How one run went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Run {
    /// It found a warm container ready.
    Hit,
    /// It waited for one a refill was making.
    Waited,
    /// It took the normal path.
    Miss,
}

/// Per-key record in `<state>/pool/keys/<key>.stats.json`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyStats {
    /// Runs that found a warm container ready.
    pub hits: u64,
    /// Runs that waited for one a refill was making.
    #[serde(default)]
    pub waits: u64,
    /// Runs that found none and took the normal path.
    pub misses: u64,
    /// Warm containers the refill keeps for this key.
    pub target: u32,
    /// When the last run started (unix ms).
    pub last_run_ms: u64,
    /// Smoothed time between consecutive runs (ms), while the key is busy.
    pub run_interval_ms: Option<u64>,
    /// Smoothed time to create and start one warm container (ms).
    pub refill_ms: Option<u64>,
    /// Runs since one found the key dry.
    #[serde(default)]
    pub runs_since_dry: u32,
    /// When a run last found the key dry (unix ms).
    #[serde(default)]
    pub last_dry_ms: u64,
}

/// Exponential smoothing that follows a change within a few samples.
fn smooth(old: Option<u64>, sample: u64) -> u64 {
    match old {
        Some(old) => (old * 2 + sample) / 3,
        None => sample,
    }
}

impl KeyStats {
    /// Warm containers the key needs so that runs arriving every
    /// `run_interval_ms` still find one while each used one is replaced in
    /// `refill_ms`: the runs during one refill, plus one.
    pub fn demand(&self) -> u32 {
        match (self.refill_ms, self.run_interval_ms) {
            (Some(refill), Some(interval)) => {
                (refill.div_ceil(interval.max(1)) + 1).min(u32::MAX as u64) as u32
            }
            _ => 0,
        }
    }

    /// Hit rate in percent (runs that found a warm container ready), if any run was recorded.
    pub fn hit_percent(&self) -> Option<u64> {
        let runs = self.hits + self.waits + self.misses;
        (runs > 0).then(|| self.hits * 100 / runs)
    }

    /// What making one warm container takes (a guess before the first refill).
    pub fn refill_time(&self) -> Duration {
        Duration::from_millis(self.refill_ms.unwrap_or(1_000))
    }

    /// The target before any run said otherwise.
    pub fn initial_target(settings: &Settings) -> u32 {
        settings.size.min(settings.max_total)
    }

    /// Records one run at `now_ms`; `warm_left` is the key's warm containers
    /// it saw besides its own.
    pub fn record_run(&mut self, now_ms: u64, run: Run, warm_left: usize, settings: &Settings) {
        let floor = Self::initial_target(settings);
        let since = now_ms.saturating_sub(self.last_run_ms);
        // New, or idle long enough for its warm containers to have expired:
        // a miss then says nothing about the run rate.
        let fresh = self.last_run_ms == 0 || since > settings.idle_ttl.as_millis() as u64;
        if fresh {
            self.target = floor;
            self.run_interval_ms = None;
        } else {
            self.run_interval_ms = Some(smooth(self.run_interval_ms, since));
        }
        self.last_run_ms = now_ms;
        match run {
            Run::Hit => self.hits += 1,
            Run::Waited => self.waits += 1,
            Run::Miss => self.misses += 1,
        }
        let demand = self.demand();
        let dry = run != Run::Hit || warm_left == 0;
        self.runs_since_dry = if dry { 0 } else { self.runs_since_dry + 1 };
        let calm = now_ms.saturating_sub(self.last_dry_ms) > SURPLUS_IDLE_TTL.as_millis() as u64;
        if dry {
            self.last_dry_ms = now_ms;
        }
        if fresh {
            // Stays at the floor: one run says nothing about the rate.
        } else if dry {
            self.target = (self.target.max(1) * 2).max(demand);
        } else if calm {
            // The burst is over and its surplus has expired: refilling it
            // would make containers only to let them expire again.
            self.target = demand;
        } else if self.runs_since_dry >= 2 * self.target && demand < self.target {
            self.target -= 1;
            self.runs_since_dry = 0;
        }
        self.target = self.target.clamp(floor, settings.max_total);
    }

    /// Records how long one warm container took to create and start.
    pub fn record_refill(&mut self, ms: u64) {
        self.refill_ms = Some(smooth(self.refill_ms, ms));
    }
}

pub fn stats_path(store: &Store, key: &str) -> PathBuf {
    crate::pool::key_file_path(store, key).with_extension("stats.json")
}

/// The key's stats (empty when none were recorded).
pub fn load(store: &Store, key: &str) -> KeyStats {
    read(&stats_path(store, key))
}

fn read(path: &Path) -> KeyStats {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Changes the key's stats under a lock of their own (held for a read and a
/// write, never across engine calls). Best effort: the stats only size the
/// pool, so a failure to record leaves the previous sizing in place.
pub fn update(store: &Store, key: &str, change: impl FnOnce(&mut KeyStats)) -> KeyStats {
    let path = stats_path(store, key);
    let lock_path = path.with_extension("lock");
    let lock = std::fs::File::create(&lock_path).ok();
    if let Some(lock) = &lock {
        // Released when `lock` drops.
        let _ = lock.lock();
    }
    let mut stats = read(&path);
    change(&mut stats);
    let _ = state::write_atomic(&path, &serde_json::to_vec(&stats).expect("serializes"));
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            size: 2,
            idle_ttl: Duration::from_secs(600),
            max_total: 8,
        }
    }

    #[test]
    fn a_fresh_key_starts_at_the_configured_size() {
        let mut s = KeyStats::default();
        s.record_run(1_000, Run::Miss, 0, &settings());
        assert_eq!(s.target, 2);
        assert_eq!(s.misses, 1);
        // The next run found it empty: the key is evidently in use.
        s.record_run(1_500, Run::Miss, 0, &settings());
        assert_eq!(s.target, 4);
    }

    #[test]
    fn back_to_back_runs_grow_the_target_to_what_a_refill_needs() {
        let mut s = KeyStats::default();
        s.record_refill(400);
        let mut now = 1_000;
        s.record_run(now, Run::Miss, 0, &settings());
        for _ in 0..10 {
            now += 100;
            s.record_run(now, Run::Waited, 0, &settings());
        }
        // 400 ms refills, a run every 100 ms: 4 runs per refill, plus one.
        assert_eq!(s.demand(), 5);
        assert!(s.target >= 5, "{s:?}");
    }

    #[test]
    fn the_target_never_passes_max_total() {
        let mut s = KeyStats::default();
        s.record_refill(10_000);
        let mut now = 1_000;
        for _ in 0..20 {
            now += 10;
            s.record_run(now, Run::Miss, 0, &settings());
        }
        assert_eq!(s.target, 8);
    }

    #[test]
    fn a_surplus_shrinks_it_and_idleness_resets_it() {
        // It ran dry a moment ago; now a run a second, with warm ones to spare.
        let mut s = KeyStats {
            target: 6,
            last_run_ms: 1_000,
            last_dry_ms: 1_000,
            run_interval_ms: Some(1_000),
            refill_ms: Some(400),
            ..Default::default()
        };
        let mut now = 1_000;
        for _ in 0..11 {
            now += 1_000;
            s.record_run(now, Run::Hit, 4, &settings());
        }
        assert_eq!(s.target, 6, "no shrink before the pool turned over twice");
        s.record_run(now + 1_000, Run::Hit, 4, &settings());
        assert_eq!(s.target, 5);
        s.record_run(now + 1_000 + 601_000, Run::Miss, 0, &settings());
        // Idle past the ttl: back to the floor.
        assert_eq!(s.target, 2);
    }

    #[test]
    fn a_minute_without_running_dry_ends_the_burst() {
        let mut s = KeyStats::default();
        s.record_refill(400);
        let mut now = 1_000;
        for _ in 0..5 {
            now += 50;
            s.record_run(now, Run::Miss, 0, &settings());
        }
        assert_eq!(s.target, 8, "a burst grows the key to the cap");
        // Runs every 20 s from now on, each finding warm ones to spare.
        for _ in 0..3 {
            now += 20_000;
            s.record_run(now, Run::Hit, 3, &settings());
        }
        assert_eq!(s.target, 8, "less than a minute since the key ran dry");
        now += 20_000;
        s.record_run(now, Run::Hit, 3, &settings());
        // A run per 20 s, one 400 ms refill each: the floor does.
        assert_eq!(s.target, 2);
        now += 50;
        s.record_run(now, Run::Hit, 0, &settings());
        assert_eq!(s.target, 4, "a new burst grows it again");
    }

    #[test]
    fn hit_rate() {
        let s = KeyStats {
            hits: 3,
            waits: 1,
            misses: 0,
            ..Default::default()
        };
        assert_eq!(s.hit_percent(), Some(75));
        assert_eq!(KeyStats::default().hit_percent(), None);
    }
}
