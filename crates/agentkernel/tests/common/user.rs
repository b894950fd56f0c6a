//! A user of the test's own, for running agentkernel without root: the
//! tests run as root and drop to a uid of their own per test, so "nothing
//! left behind" can be checked as "no live process of that uid". The
//! backend is the pass's (`AGENTKERNEL_TEST_BACKEND`).

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{binary, TEST_REGISTRY};

/// A user of its own (`uid` = gid), with a home, state dir and project.
pub struct User {
    pub uid: u32,
    pub dir: tempfile::TempDir,
}

impl User {
    pub fn new(uid: u32) -> User {
        let dir = tempfile::Builder::new()
            .prefix("ak-rootless-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        for sub in ["home", "state", "project"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        let user = User { uid, dir };
        user.chown_all();
        user
    }

    pub fn chown_all(&self) {
        let status = Command::new("chown")
            .args(["-R", &format!("{0}:{0}", self.uid)])
            .arg(self.dir.path())
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn project(&self) -> PathBuf {
        self.dir.path().join("project")
    }

    pub fn cmd(&self) -> Command {
        let mut cmd = Command::new(binary());
        cmd.uid(self.uid)
            .gid(self.uid)
            .env("HOME", self.dir.path().join("home"))
            .env("AGENTKERNEL_HOME", self.state())
            .env("AGENTKERNEL_BACKEND", super::backend())
            .env("AGENTKERNEL_REGISTRY_MIRRORS", TEST_REGISTRY)
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("XDG_DATA_HOME")
            .current_dir(self.project())
            .stdin(Stdio::null());
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    /// Live (not zombie) processes of this user.
    pub fn processes(&self) -> Vec<(u32, String)> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
                continue;
            };
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
            };
            if field("Uid:").as_deref() != Some(&self.uid.to_string())
                || field("State:").as_deref() == Some("Z")
            {
                continue;
            }
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            found.push((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")));
        }
        found
    }

    /// Waits (a little) for this user's processes to be gone.
    pub fn assert_no_processes(&self) {
        let start = Instant::now();
        loop {
            let left = self.processes();
            if left.is_empty() {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "processes left behind: {left:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn runs_left(&self) -> Vec<PathBuf> {
        match std::fs::read_dir(self.state().join("runs")) {
            Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
            Err(_) => Vec::new(),
        }
    }
}

impl Drop for User {
    fn drop(&mut self) {
        // Kept sandboxes, then anything still running: by PID, only this uid's.
        let _ = self.cmd().args(["sandbox", "gc"]).output();
        for (pid, _) in self.processes() {
            // SAFETY: signalling a process of this test's own uid.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}
