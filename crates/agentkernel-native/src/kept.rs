//! Kept sandboxes without a daemon: a small detached **holder** process per
//! sandbox (`process/holder.rs`) owns its init (so the sandbox lives while
//! the holder does), enforces the TTL by reading `ctl/deadline` (moved by
//! every use), and tears the sandbox down when it expires, is removed, or
//! its init dies. Commands join the running sandbox (`join.rs`). Here: the
//! record the holder leaves, removal, gc, status, stop/start.
//!
//! `<sandbox dir>/native.json` says who holds what; if the holder is killed,
//! its init dies with it (PDEATHSIG) and a later `gc` removes the cgroup,
//! the network lease and the directory.

use std::io;
use std::path::PathBuf;

use agentkernel_core::state::{proc_stat_field, Owner, Store};
use serde::{Deserialize, Serialize};

use crate::cgroup::Cgroup;
use crate::error::KeptError;
use crate::process::kill;

/// What a kept native sandbox is made of, for commands that join or remove it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Held {
    /// The holder process (`<boot>:<pid>:<start>`).
    pub holder: String,
    /// Init's host pid and start time (to tell it from a reused pid).
    pub init_pid: i32,
    pub init_start: u64,
    pub cgroup: Cgroup,
    /// Rootless only: the namespace anchor (see [`spawn_anchor`]).
    #[serde(default)]
    pub anchor_pid: Option<i32>,
}

impl Held {
    pub fn load(store: &Store, name: &str) -> Option<Held> {
        let data = std::fs::read(state_file(store, name)).ok()?;
        serde_json::from_slice(&data).ok()
    }

    /// The sandbox's parts while its holder lives; else the error to show.
    pub fn live(store: &Store, name: &str) -> io::Result<Held> {
        Held::load(store, name)
            .filter(Held::holder_alive)
            .ok_or_else(|| {
                io::Error::other(format!(
                    "sandbox {name} is gone; `agentkernel sandbox gc` removes what it left"
                ))
            })
    }

    pub fn holder_alive(&self) -> bool {
        !Owner(self.holder.clone()).is_dead()
    }

    pub(crate) fn holder_pid(&self) -> Option<i32> {
        self.holder.split(':').nth(1)?.parse().ok()
    }

    /// True while init is the process we started (not a reused pid).
    pub fn init_alive(&self) -> bool {
        proc_stat_field(self.init_pid as u32, 22) == Some(self.init_start)
            && !agentkernel_core::state::is_zombie(self.init_pid as u32)
    }
}

pub(crate) fn state_file(store: &Store, name: &str) -> PathBuf {
    store.sandbox_dir(name).join("native.json")
}

/// The plan commands in this sandbox start from (argv, env, workdir are theirs).
pub fn plan_file(store: &Store, name: &str) -> PathBuf {
    store.sandbox_dir(name).join("plan.json")
}

/// `sandbox remove`: asks the holder to end the sandbox and waits for it;
/// if the holder is gone, removes what it left. Fails (rather than claiming
/// success) when the sandbox is another user's or its directory stays.
pub fn remove(store: &Store, name: &str) -> Result<(), KeptError> {
    let denied = || KeptError::RemoveDenied(name.to_string());
    match Held::load(store, name) {
        Some(held) if held.holder_alive() => {
            if let Some(pid) = held.holder_pid() {
                // SAFETY: kill has no memory-safety preconditions.
                if unsafe { libc::kill(pid, libc::SIGTERM) } != 0
                    && io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
                {
                    return Err(denied());
                }
            }
            for _ in 0..200 {
                if !store.sandbox_dir(name).exists() {
                    return Ok(());
                }
                std::thread::sleep(std::time::Duration::from_millis(25));
            }
            teardown(store, name, Some(&held));
        }
        held => teardown(store, name, held.as_ref()),
    }
    match std::fs::symlink_metadata(store.sandbox_dir(name)) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Err(denied()),
        Err(e) => Err(e.into()),
        Ok(_) => Err(KeptError::StillThere {
            name: name.to_string(),
            dir: store.sandbox_dir(name),
        }),
    }
}

/// Removes what a dead holder left: init (if somehow alive), the cgroup, the
/// lease (collected by holder liveness) and the directory.
pub(crate) fn teardown(store: &Store, name: &str, held: Option<&Held>) {
    if let Some(held) = held {
        let _ = held.cgroup.set_frozen(false);
        if held.init_alive() {
            kill(held.init_pid, libc::SIGKILL);
        }
        held.cgroup.remove();
    } else {
        Cgroup::of(name).remove();
    }
    crate::net::collect_dead();
    let _ = store.forget(name);
}

/// Kept native sandboxes whose holder died: removed. Returns how many.
pub fn collect(store: &Store) -> usize {
    let mut n = 0;
    for record in store.list_of(agentkernel_core::backend::BackendKind::Native) {
        match Held::load(store, &record.name) {
            Some(held) if held.holder_alive() => {}
            held => {
                teardown(store, &record.name, held.as_ref());
                n += 1;
            }
        }
    }
    n
}

/// Status for `sandbox list`: `running` or `stopped` while the holder lives.
pub fn status(store: &Store, name: &str) -> Option<&'static str> {
    Held::load(store, name).filter(Held::holder_alive).map(|h| {
        if h.cgroup.is_frozen() {
            "stopped"
        } else {
            "running"
        }
    })
}

/// `sandbox stop` (freeze: processes and files kept, no CPU used; the TTL
/// still runs) and `sandbox start` (thaw).
pub fn set_stopped(store: &Store, name: &str, stopped: bool) -> Result<(), KeptError> {
    let held = Held::load(store, name)
        .filter(Held::holder_alive)
        .ok_or_else(|| KeptError::Gone(name.to_string()))?;
    if held.cgroup.dirs.is_empty() {
        return Err(KeptError::NoFreezer(name.to_string()));
    }
    Ok(held.cgroup.set_frozen(stopped)?)
}
