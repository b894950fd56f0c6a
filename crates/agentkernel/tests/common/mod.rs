//! Shared helpers for the integration tests: they run the real `agentkernel`
//! binary against the real backend under test (Docker, Podman or native).
//!
//! Every test gets its own [`TestEnv`]: a private `AGENTKERNEL_HOME`, a
//! private `HOME` (so no user config leaks in) and a private project
//! directory that is the binary's current directory. Tests can therefore run
//! in parallel. Prerequisites (a reachable engine and the offline test images)
//! are checked once per test binary; a missing engine is a loud failure,
//! never a skip.
//!
//! One-shot runs use the warm pool by default: a test's first run of a given
//! spec takes the normal path (its container carries the `agentkernel.owner`
//! label, see [`Tracked`]) and starts a detached `pool refill`; later runs may
//! be served by a warm container. When a [`TestEnv`] is dropped it waits for
//! its refills and removes every container labelled with its state dir, so
//! nothing outlives the test.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tempfile::TempDir;

mod commands;
pub mod netprobe;
pub mod upstream;
pub mod user;

/// busybox applets (sh, nc, httpd, wget, unshare…), built offline.
pub const BUSYBOX: &str = "agentkernel-test/busybox:1";
/// The busybox image with `USER nobody` (scripts/build-test-images.sh).
#[allow(dead_code)]
pub const NOBODY: &str = "agentkernel-test/nobody:1";
/// The busybox image whose /bin/sh first tries to leave traces (files in /
/// and /tmp, a background `sleep 600`), then is busybox's sh.
#[allow(dead_code)]
pub const HOSTILE_SH: &str = "agentkernel-test/hostile-sh:1";
/// The above plus the host's python3.
pub const PYTHON: &str = "agentkernel-test/python:3";
/// The busybox image plus the host's curl: a real client for the egress proxy.
#[allow(dead_code)]
pub const CURL: &str = "agentkernel-test/curl:1";
/// The busybox image plus Node.js 24 (its fetch honours the proxy variables).
#[allow(dead_code)]
pub const NODE: &str = "agentkernel-test/node:24";

/// Starts 2000 sleeping processes: a pids limit must make fork fail first.
pub const FORK_BOMB: &str = "for i in $(seq 1 2000); do sleep 30 & done; echo spawned";

/// The fork bomb's run: fork failed (the limit bit), and not at the timeout.
pub fn assert_fork_bomb_contained(out: &Output) {
    let err = stderr(out);
    assert!(
        err.contains("can't fork") || err.contains("Resource temporarily unavailable"),
        "the pids limit should make fork fail: {err}"
    );
    assert_ne!(code(out), 124, "the fork bomb ran into the safety timeout");
}

/// The longest any one agentkernel command of a test may take ([`TestEnv::run`]):
/// far beyond a VM's boot under TCG on a busy host.
pub const RUN_LIMIT: Duration = Duration::from_secs(300);

/// Exit code of agentkernel's own failures.
pub const AK_ERROR: i32 = 125;

/// The workspace root (where `scripts/` lives).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Path of the binary under test.
pub fn binary() -> PathBuf {
    assert_cmd::cargo::cargo_bin("agentkernel")
}

/// The backend under test: `AGENTKERNEL_TEST_BACKEND` = docker (default),
/// podman or native. Every test file runs against every backend, minus the
/// tests scoped to others (see [`BACKEND_SCOPES`]). agentkernel gets it through
/// `AGENTKERNEL_BACKEND`; the tests inspect containers with that engine's
/// CLI, or native sandboxes through their scratch dirs and cgroups.
pub fn backend() -> &'static str {
    static BACKEND: OnceLock<&'static str> = OnceLock::new();
    BACKEND.get_or_init(
        || match std::env::var("AGENTKERNEL_TEST_BACKEND").as_deref() {
            Err(_) | Ok("") | Ok("docker") => "docker",
            Ok("podman") => "podman",
            Ok("native") => "native",
            Ok("qemu") => "qemu",
            Ok(other) => {
                panic!("AGENTKERNEL_TEST_BACKEND={other}: expected docker, podman, native or qemu")
            }
        },
    )
}

pub fn is_native() -> bool {
    backend() == "native"
}

/// Backends that run images from agentkernel's own store (pulled from the
/// test registry), not an engine's.
pub fn uses_own_image_store() -> bool {
    matches!(backend(), "native" | "qemu")
}

/// Backend scopes. A test inside a module of one of these names applies
/// only to those backends; scripts/test.sh runs every test file against
/// every backend and skips the other scopes by name (`--skip native_only::`),
/// so they are counted as "filtered out", never as passed. Tests outside
/// any of them run on every backend.
pub const BACKEND_SCOPES: [(&str, &[&str]); 6] = [
    ("native_only::", &["native"]),
    ("own_root_only::", &["native", "qemu"]),
    ("engine_only::", &["docker", "podman"]),
    ("docker_only::", &["docker"]),
    ("podman_only::", &["podman"]),
    ("qemu_only::", &["qemu"]),
];

/// Panics when the running test sits in a scope that excludes the backend
/// under test: a runner that forgot a `--skip` must fail loudly, not run a
/// test where it means nothing. libtest names each test's thread after the
/// test's path, which is where the scope is read from.
pub fn assert_backend_in_scope() {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or_default();
    for (scope, backends) in BACKEND_SCOPES {
        if test.contains(scope) && !backends.contains(&backend()) {
            panic!(
                "WRONG BACKEND: {test} is in `{}` ({}) but AGENTKERNEL_TEST_BACKEND is {}; \
                 run this backend with `--skip {scope}` (scripts/test.sh does)",
                scope.trim_end_matches("::"),
                backends.join(", "),
                backend()
            );
        }
    }
}

/// The loopback registry scripts/setup.sh serves the test images from; native
/// runs pull through it as a mirror (the real pull path).
pub const TEST_REGISTRY: &str = "http://127.0.0.1:5055";

/// One image store shared by every native test (each test still has its own
/// state dir; its `images` is a symlink here), filled once per test binary.
fn shared_image_state() -> PathBuf {
    PathBuf::from("/var/tmp/agentkernel-test-images")
}

/// Runs the engine CLI (`docker` or `podman`, see [`backend`]) and returns its
/// output (never panics on a non-zero exit).
pub fn engine(args: &[&str]) -> Output {
    assert!(
        !uses_own_image_store(),
        "engine CLI used under the {} backend: put this test in `mod engine_only`",
        backend()
    );
    std::process::Command::new(backend())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run the {} CLI ({e}); the tests need it on PATH",
                backend()
            )
        })
}

/// The engine CLI's stdout as text; panics if it fails.
pub fn engine_ok(args: &[&str]) -> String {
    // `podman ps` can fail when a container vanishes mid-listing; retry that.
    let mut out = engine(args);
    for _ in 0..3 {
        if out.status.success() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        out = engine(args);
    }
    assert!(
        out.status.success(),
        "`{} {}` failed: {}",
        backend(),
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Makes sure the engine answers and the test images exist (building them
/// with `scripts/build-test-images.sh` if not). Panics with a clear message
/// otherwise. Runs once per test binary.
pub fn ensure_prerequisites() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        if uses_own_image_store() {
            return prepare_native_images();
        }
        let engine_name = backend();
        match std::process::Command::new(engine_name)
            .arg("info")
            .stdin(Stdio::null())
            .output()
        {
            Err(e) => panic!(
                "PREREQUISITE MISSING: cannot run the {engine_name} CLI ({e}). These integration \
                 tests need it (scripts/setup.sh installs and starts everything)."
            ),
            Ok(out) if !out.status.success() => panic!(
                "PREREQUISITE MISSING: `{engine_name} info` failed: {}. Start the engine \
                 (scripts/setup.sh does) and rerun the tests.",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Ok(_) => {}
        }
        let missing = |img: &str| !engine(&["image", "inspect", img]).status.success();
        if missing(BUSYBOX) || missing(PYTHON) {
            let script = workspace_root().join("scripts/build-test-images.sh");
            let status = std::process::Command::new("bash")
                .arg(&script)
                .arg(backend())
                .current_dir(workspace_root())
                .status()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
            assert!(
                status.success(),
                "PREREQUISITE MISSING: {} failed ({status}); the test images {BUSYBOX} and \
                 {PYTHON} are needed",
                script.display()
            );
            for img in [BUSYBOX, PYTHON] {
                assert!(
                    !missing(img),
                    "PREREQUISITE MISSING: {img} still absent after building the test images"
                );
            }
        }
    });
}

/// Pulls the test images from the test registry into the shared store, with
/// the real `agentkernel image pull`.
fn prepare_native_images() {
    for image in [BUSYBOX, PYTHON] {
        let out = std::process::Command::new(binary())
            .args(["image", "pull", image])
            .env("AGENTKERNEL_HOME", shared_image_state())
            .env("AGENTKERNEL_REGISTRY_MIRRORS", TEST_REGISTRY)
            .stdin(Stdio::null())
            .output()
            .expect("run agentkernel image pull");
        assert!(
            out.status.success(),
            "PREREQUISITE MISSING: cannot pull {image} from the test registry {TEST_REGISTRY} \
             (scripts/setup.sh starts it and pushes the test images): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
}

/// A name unique to this test process and call: `[a-z0-9-]`, short enough
/// for a sandbox name.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{:x}-{n}-{:x}", std::process::id(), nanos & 0xffff)
}

/// One test's private world.
pub struct TestEnv {
    /// `AGENTKERNEL_HOME`.
    pub state: TempDir,
    /// `HOME` of the agentkernel process.
    pub home: TempDir,
    /// The current directory of the agentkernel process.
    pub project: TempDir,
    /// More environment for every agentkernel process ([`TestEnv::with_env`]).
    extra_env: Vec<(String, String)>,
}

impl TestEnv {
    pub fn new() -> TestEnv {
        assert_backend_in_scope();
        ensure_prerequisites();
        let env = TestEnv {
            state: tempfile::Builder::new()
                .prefix("ak-state")
                .tempdir()
                .unwrap(),
            home: tempfile::Builder::new()
                .prefix("ak-home")
                .tempdir()
                .unwrap(),
            project: tempfile::Builder::new()
                .prefix("ak-proj")
                .tempdir()
                .unwrap(),
            extra_env: Vec::new(),
        };
        if uses_own_image_store() {
            std::os::unix::fs::symlink(
                shared_image_state().join("images"),
                env.state.path().join("images"),
            )
            .unwrap();
        }
        env
    }

    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    pub fn project_dir(&self) -> &Path {
        self.project.path()
    }

    pub fn home_dir(&self) -> &Path {
        self.home.path()
    }

    /// The environment every agentkernel process of this test gets (also for
    /// commands that start agentkernel themselves, like `script`).
    /// Sets `key=value` for every agentkernel process of this test.
    pub fn with_env(mut self, key: &str, value: &str) -> TestEnv {
        self.extra_env.push((key.to_string(), value.to_string()));
        self
    }

    pub fn configure(&self, cmd: &mut std::process::Command) {
        cmd.envs(self.extra_env.iter().map(|(k, v)| (k, v)));
        cmd.env("AGENTKERNEL_HOME", self.state.path())
            .env("AGENTKERNEL_BACKEND", backend())
            .env("HOME", self.home.path())
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("XDG_DATA_HOME")
            .current_dir(self.project.path());
        if uses_own_image_store() {
            cmd.env("AGENTKERNEL_REGISTRY_MIRRORS", TEST_REGISTRY);
        }
    }

    /// `agentkernel` through assert_cmd, configured for this test.
    pub fn cmd(&self) -> assert_cmd::Command {
        let mut std_cmd = std::process::Command::new(binary());
        self.configure(&mut std_cmd);
        assert_cmd::Command::from_std(std_cmd)
    }

    /// `agentkernel` as a plain std Command (for spawning), configured for this test.
    pub fn std_cmd(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new(binary());
        self.configure(&mut cmd);
        cmd
    }

    /// `agentkernel ARGS…` with no backend chosen (auto-selection, `doctor`).
    pub fn run_unchosen(&self, args: &[&str]) -> Output {
        self.cmd()
            .env_remove("AGENTKERNEL_BACKEND")
            .args(args)
            .output()
            .unwrap()
    }

    /// `agentkernel ARGS…` to completion, stdin closed. A run that has not
    /// ended after [`RUN_LIMIT`] is killed and fails the test (a hung run
    /// must fail its test, never stall the whole suite).
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd()
            .args(args)
            .timeout(RUN_LIMIT)
            .output()
            .unwrap_or_else(|e| panic!("agentkernel {args:?}: {e} (limit {RUN_LIMIT:?})"))
    }

    /// `agentkernel run --dry-run ARGS…`: the resolved sandbox as JSON
    /// (panics unless it exits 0 with JSON on stdout). Observes resolution
    /// directly, whatever images this machine happens to hold.
    pub fn dry_run(&self, args: &[&str]) -> serde_json::Value {
        let out = self
            .cmd()
            .arg("run")
            .arg("--dry-run")
            .args(args)
            .output()
            .unwrap();
        assert_code(&out, 0);
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("--dry-run printed no JSON ({e}): {}", stdout(&out)))
    }

    /// `agentkernel run --name NAME EXTRA… -i BUSYBOX CMD…`: creates the kept
    /// sandbox NAME and runs CMD in it.
    pub fn run_kept(&self, name: &str, extra: &[&str], cmd: &[&str]) -> Output {
        self.run_with().name(name).flags(extra).output(cmd)
    }

    /// Spawns `agentkernel ARGS…` with piped stdout/stderr and null stdin,
    /// and returns it with its owner label.
    pub fn spawn(&self, args: &[&str]) -> Tracked {
        let mut cmd = self.std_cmd();
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Tracked::spawn(cmd)
    }

    /// Runs `agentkernel ARGS…` to completion and also returns the owner
    /// label its one-shot containers carry.
    pub fn run_tracked(&self, args: &[&str]) -> (Output, String) {
        let t = self.spawn(args);
        let owner = t.owner.clone();
        (t.wait_output(Duration::from_secs(120)), owner)
    }

    /// Directories left under `$AGENTKERNEL_HOME/runs`.
    pub fn leftover_runs(&self) -> Vec<PathBuf> {
        match std::fs::read_dir(self.state.path().join("runs")) {
            Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
            Err(_) => Vec::new(),
        }
    }
}

impl TestEnv {
    /// PIDs of detached `agentkernel pool refill` (and `refill-native`)
    /// processes of this state dir.
    pub fn refills_running(&self) -> Vec<u32> {
        self.processes_matching(|args| {
            args.windows(2)
                .any(|w| w[0] == b"pool" && (w[1] == b"refill" || w[1] == b"refill-native"))
        })
    }

    /// PIDs of every agentkernel process of this state dir: once the
    /// commands have returned, their cleanup processes and refills.
    pub fn processes_running(&self) -> Vec<u32> {
        self.processes_matching(|_| true)
    }

    /// PIDs of native's disk keeper of this state dir (`pool hold-disks`).
    pub fn keeper_pids(&self) -> Vec<u32> {
        self.processes_matching(|args| args.contains(&&b"hold-disks"[..]))
    }

    /// The sandboxes of this state dir's native warm pool
    /// (`native-pool/<key>/sandboxes/<name>`), whatever their state.
    pub fn native_pool_sandboxes(&self) -> Vec<PathBuf> {
        let keys = std::fs::read_dir(self.state_dir().join("native-pool"));
        keys.into_iter()
            .flatten()
            .flatten()
            .flat_map(|key| {
                std::fs::read_dir(key.path().join("sandboxes"))
                    .into_iter()
                    .flatten()
            })
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .map(|e| e.path())
            .collect()
    }

    /// Those of [`TestEnv::native_pool_sandboxes`] that are ready and unclaimed.
    pub fn ready_warm_sandboxes(&self) -> Vec<PathBuf> {
        self.native_pool_sandboxes()
            .into_iter()
            .filter(|d| d.join("ready").exists() && !d.join("claimed").exists())
            .collect()
    }

    /// The network namespaces (`net:[inode]`) this state dir's disk keeper
    /// holds for later runs.
    pub fn keeper_namespaces(&self) -> Vec<String> {
        self.keeper_pids()
            .iter()
            .flat_map(|pid| {
                std::fs::read_dir(format!("/proc/{pid}/fd"))
                    .into_iter()
                    .flatten()
            })
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .map(|link| link.to_string_lossy().into_owned())
            .filter(|link| link.starts_with("net:["))
            .collect()
    }

    /// Waits (up to `limit`) until no process of this state dir runs.
    pub fn wait_for_processes(&self, limit: Duration) -> bool {
        wait_until(limit, || self.processes_running().is_empty())
    }

    pub fn processes_matching(&self, wanted: impl Fn(&[&[u8]]) -> bool) -> Vec<u32> {
        let want = format!("AGENTKERNEL_HOME={}", self.state.path().display());
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return out;
        };
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            if !wanted(&args) {
                continue;
            }
            if let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) {
                if environ.split(|b| *b == 0).any(|v| v == want.as_bytes()) {
                    out.push(pid);
                }
            }
        }
        out
    }

    /// Waits (up to `limit`) until no refill of this state dir runs.
    pub fn wait_for_refills(&self, limit: Duration) -> bool {
        let start = Instant::now();
        while !self.refills_running().is_empty() {
            if start.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        true
    }

    /// Containers (any state) labelled with this state dir (kept and pool).
    pub fn labelled_containers(&self, kind: Option<&str>) -> Vec<String> {
        // Native and qemu have no containers: their runs' leftovers are
        // checked through containers_of_owner and the state directory.
        if uses_own_image_store() {
            return Vec::new();
        }
        let mut args = vec![
            "ps".to_string(),
            "-a".into(),
            "--filter".into(),
            format!("label=agentkernel.state={}", self.state.path().display()),
        ];
        if let Some(kind) = kind {
            args.push("--filter".into());
            args.push(format!("label=agentkernel.kind={kind}"));
        }
        args.extend(["--format".into(), "{{.Names}}".into()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        engine_ok(&args).lines().map(str::to_string).collect()
    }

    /// Running warm pool containers of this state dir that no run has claimed.
    pub fn warm_pool(&self) -> Vec<String> {
        let running = engine_ok(&[
            "ps",
            "--filter",
            &format!("label=agentkernel.state={}", self.state.path().display()),
            "--filter",
            "label=agentkernel.kind=pool",
            "--filter",
            "status=running",
            "--format",
            "{{.Names}}",
        ]);
        running
            .lines()
            .filter(|n| !self.pool_dir(n).join("ctl/claimed").exists())
            .map(str::to_string)
            .collect()
    }

    /// True when a run has claimed this pool container.
    pub fn is_claimed(&self, container: &str) -> bool {
        self.pool_dir(container).join("ctl/claimed").exists()
    }

    /// Asserts that the warm containers `warm` are all still there and
    /// unclaimed once this state dir's refills have finished: no run used them.
    pub fn assert_pool_untouched(&self, warm: &[String]) {
        self.wait_for_refills(Duration::from_secs(60));
        for w in warm {
            assert!(
                container_exists(w) && !self.is_claimed(w),
                "warm container {w} was used"
            );
        }
    }

    fn pool_dir(&self, container: &str) -> PathBuf {
        self.state.path().join("pool/containers").join(container)
    }

    /// Pool containers claimed by the agentkernel process with this owner label.
    pub fn claimed_by(&self, owner: &str) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.state.path().join("pool/containers")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| {
                std::fs::read_to_string(e.path().join("owner"))
                    .map(|o| o.trim() == owner)
                    .unwrap_or(false)
            })
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    }

    /// Runs `agentkernel ARGS…` once (warming the pool for that spec) and
    /// waits until a warm container is ready, so the next identical run is
    /// served by the pool.
    pub fn warm_up(&self, args: &[&str]) {
        let out = self.run(args);
        assert!(out.status.success(), "warm-up run failed: {}", stderr(&out));
        poll_until(
            Duration::from_secs(60),
            "the pool should warm up after a run",
            || !self.warm_pool().is_empty(),
        );
    }
}

impl Drop for TestEnv {
    /// Leaves nothing of this test behind: waits for the detached pool
    /// refills the test's runs started, then removes every container
    /// labelled with this test's state directory.
    fn drop(&mut self) {
        if uses_own_image_store() {
            // Kept native sandboxes and kept VMs live in detached holders:
            // remove them (and let gc collect what killed runs left) before
            // the state directory, which records them, is deleted.
            let names: Vec<String> = std::fs::read_dir(self.state.path().join("sandboxes"))
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            for name in names {
                let _ = self.run(&["sandbox", "remove", &name]);
            }
            let _ = self.run(&["sandbox", "gc"]);
            // Native: the workspace disks runs attached ahead (disk_pool.rs);
            // qemu: the warm VMs runs left booting for the next run.
            let _ = self.run(&["pool", "prune"]);
            return;
        }
        self.wait_for_refills(Duration::from_secs(60));
        for name in self.labelled_containers(None) {
            let _ = engine(&["rm", "-f", "-v", &name]);
        }
    }
}

/// A spawned agentkernel process and the owner label (`<boot>:<pid>:<start>`)
/// its one-shot containers carry. Killed (SIGKILL) and its containers removed on drop.
pub struct Tracked {
    pub child: Option<Child>,
    pub pid: u32,
    pub owner: String,
}

impl Tracked {
    pub fn spawn(mut cmd: std::process::Command) -> Tracked {
        let child = cmd.spawn().expect("spawn agentkernel");
        let pid = child.id();
        // Start time is fixed at fork, so reading it now gives the exact label
        // agentkernel computes for itself.
        let owner = owner_label(pid).expect("read /proc/PID/stat of the spawned agentkernel");
        Tracked {
            child: Some(child),
            pid,
            owner,
        }
    }

    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("child already waited for")
    }

    /// Sends `signo` to the agentkernel process.
    pub fn signal(&self, signo: i32) {
        // SAFETY: kill has no memory-safety preconditions; pid is our own child.
        let rc = unsafe { libc::kill(self.pid as libc::pid_t, signo) };
        assert_eq!(rc, 0, "kill({}, {signo}) failed", self.pid);
    }

    /// Waits for exit and collects output; after `limit`, kills the process
    /// and returns `None`.
    pub fn wait_output_within(mut self, limit: Duration) -> Option<Output> {
        let start = Instant::now();
        while self.child().try_wait().unwrap().is_none() {
            if start.elapsed() > limit {
                let _ = self.child().kill();
                let _ = self.child().wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(self.wait_output(Duration::from_secs(5)))
    }

    /// Waits for exit (panics after `limit`, killing the process) and collects output.
    pub fn wait_output(mut self, limit: Duration) -> Output {
        let mut child = self.child.take().unwrap();
        let stdout = child.stdout.take().map(spawn_reader);
        let stderr = child.stderr.take().map(spawn_reader);
        let status = wait_child(&mut child, limit);
        let out = stdout.map(|h| h.join().unwrap()).unwrap_or_default();
        let err = stderr.map(|h| h.join().unwrap()).unwrap_or_default();
        Output {
            status,
            stdout: out,
            stderr: err,
        }
    }

    /// Forgets the (already exited) process without cleaning up after it, so
    /// that a test can check the product does; returns the owner label.
    pub fn disarm(mut self) -> String {
        if let Some(mut child) = self.child.take() {
            assert!(
                child.try_wait().unwrap().is_some(),
                "disarm() needs an exited process"
            );
        }
        let owner = std::mem::take(&mut self.owner);
        std::mem::forget(self);
        owner
    }

    /// Names of containers labelled with this process as owner.
    pub fn containers(&self) -> Vec<String> {
        containers_of_owner(&self.owner)
    }

    /// Waits until a container of this process is running; panics after `limit`.
    pub fn wait_running(&mut self, limit: Duration) -> String {
        let start = Instant::now();
        loop {
            if uses_own_image_store() {
                let running = if is_native() {
                    native_sandboxes_of_owner(&self.owner)
                        .into_iter()
                        .find(|id| native_sandbox_has_processes(id))
                } else {
                    // A VM booted or claimed for this run (not yet proof
                    // that its command started: callers wait for output).
                    qemu_sandboxes_of_owner(&self.owner).into_iter().next()
                };
                if let Some(id) = running {
                    return id;
                }
                if let Some(status) = self.child().try_wait().unwrap() {
                    panic!("agentkernel exited ({status}) before its sandbox ran");
                }
                assert!(
                    start.elapsed() < limit,
                    "no running sandbox after {limit:?}"
                );
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            let running = engine_ok(&[
                "ps",
                "--filter",
                &format!("label=agentkernel.owner={}", self.owner),
                "--filter",
                "status=running",
                "--format",
                "{{.Names}}",
            ]);
            if let Some(name) = running.lines().next() {
                return name.to_string();
            }
            if let Some(status) = self.child().try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = self.child().stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("agentkernel exited ({status}) before its container ran; stderr: {err}");
            }
            assert!(
                start.elapsed() < limit,
                "no running container for owner {} after {limit:?}",
                self.owner
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Native sandboxes and one-shot VMs die with their process (a
        // claimed warm VM with its holder, once the claim is over).
        if uses_own_image_store() {
            return;
        }
        for name in containers_of_owner(&self.owner) {
            let _ = engine(&["rm", "-f", "-v", &name]);
        }
    }
}

fn spawn_reader<R: Read + Send + 'static>(mut r: R) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// Waits for `child`; kills it and panics after `limit`.
pub fn wait_child(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "agentkernel (pid {}) did not exit within {limit:?}",
                child.id()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `<boot id>:<pid>:<start time>` as agentkernel labels its one-shot containers.
pub fn owner_label(pid: u32) -> Option<String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let start = rest.split(' ').nth(19)?;
    Some(format!("{}:{pid}:{start}", boot.trim()))
}

/// All containers (any state) whose `agentkernel.owner` label is exactly `owner`.
pub fn containers_of_owner(owner: &str) -> Vec<String> {
    if is_native() {
        return native_sandboxes_of_owner(owner);
    }
    if backend() == "qemu" {
        return qemu_sandboxes_of_owner(owner);
    }
    engine_ok(&[
        "ps",
        "-a",
        "--filter",
        &format!("label=agentkernel.owner={owner}"),
        "--format",
        "{{.Names}}",
    ])
    .lines()
    .map(str::to_string)
    .collect()
}

/// True when a container of exactly this name exists (any state).
pub fn container_exists(name: &str) -> bool {
    if is_native() {
        return native_sandbox_exists(name);
    }
    if backend() == "qemu" {
        return qemu_sandbox_exists(name);
    }
    engine_ok(&[
        "ps",
        "-a",
        "--filter",
        &format!("name={name}"),
        "--format",
        "{{.Names}}",
    ])
    .lines()
    .any(|l| l == name)
}

/// Polls `cond` every 200ms until true; panics with `what` after `limit`.
pub fn poll_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out after {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Removes a kept sandbox's container on drop, whatever happened in the test.
pub struct KeptGuard(pub String);

impl KeptGuard {
    pub fn new(sandbox: &str) -> KeptGuard {
        KeptGuard(sandbox.to_string())
    }
    /// The engine's container, or for native and qemu the sandbox itself
    /// (its cgroup, directory or holder carry its name).
    pub fn container(&self) -> String {
        kept_object(&self.0)
    }

    /// Removes a leftover of an earlier, aborted test run.
    pub fn remove_leftover(&self) {
        if !uses_own_image_store() {
            let _ = engine(&["rm", "-f", "-v", &self.container()]);
        }
    }
}

/// What holds kept sandbox `name`: its container, or (native, qemu) its own name.
pub fn kept_object(name: &str) -> String {
    if uses_own_image_store() {
        name.to_string()
    } else {
        format!("agentkernel-{name}")
    }
}

impl Drop for KeptGuard {
    fn drop(&mut self) {
        // Native and qemu: TestEnv's drop removes the test's kept sandboxes.
        self.remove_leftover();
    }
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or_else(|| {
        panic!(
            "agentkernel was killed by a signal: {:?}; stderr: {}",
            out.status,
            stderr(out)
        )
    })
}

/// Asserts the exit code, showing both streams on failure.
#[track_caller]
pub fn assert_code(out: &Output, expected: i32) {
    assert_eq!(
        out.status.code(),
        Some(expected),
        "unexpected exit status {:?}\n--- stdout:\n{}\n--- stderr:\n{}",
        out.status,
        stdout(out),
        stderr(out)
    );
}

/// Asserts an agentkernel failure: exit 125, nothing on stdout, exactly one
/// line on stderr; returns that line.
#[track_caller]
pub fn assert_one_line_error(out: &Output) -> String {
    assert_code(out, AK_ERROR);
    assert!(
        out.stdout.is_empty(),
        "agentkernel wrote to stdout on error: {:?}",
        stdout(out)
    );
    let err = stderr(out);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "expected exactly one line on stderr, got {}:\n{err}",
        lines.len()
    );
    assert!(
        err.ends_with('\n') && err.matches('\n').count() == 1,
        "stderr should be a single newline-terminated line: {err:?}"
    );
    lines[0].to_string()
}

/// A TCP port free on this host right now (the kernel picks it), so a test
/// does not depend on a fixed port being unused by whatever else runs here.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("0.0.0.0:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// Minimal HTTP/1.0 GET of `/` on 127.0.0.1:`port`; returns the whole response.
pub fn http_get(port: u16) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    Ok(resp)
}

/// Retries [`http_get`] until the body contains `needle`; panics after `limit`.
pub fn http_get_until(port: u16, needle: &str, limit: Duration) -> String {
    let start = Instant::now();
    let mut last: String;
    loop {
        match http_get(port) {
            Ok(resp) if resp.contains(needle) => return resp,
            Ok(resp) => last = format!("response without {needle:?}: {resp:?}"),
            Err(e) => last = e.to_string(),
        }
        assert!(
            start.elapsed() < limit,
            "http://127.0.0.1:{port}/ never served {needle:?} within {limit:?}; last: {last}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Host processes whose command line contains `token` (as one argument).
pub fn host_processes_with_arg(token: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            if cmdline
                .split(|b| *b == 0)
                .any(|arg| arg == token.as_bytes())
            {
                out.push(pid);
            }
        }
    }
    out
}

// ---------------------------------------------------------------- native

/// State dirs of every test (tempdirs named `ak-state*`).
fn all_test_state_dirs() -> Vec<PathBuf> {
    let tmp = std::env::temp_dir();
    std::fs::read_dir(&tmp)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("ak-state"))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Native sandboxes (run ids) whose scratch dir names this owner.
pub fn native_sandboxes_of_owner(owner: &str) -> Vec<String> {
    let mut ids = Vec::new();
    for state in all_test_state_dirs() {
        let Ok(runs) = std::fs::read_dir(state.join("runs")) else {
            continue;
        };
        for run in runs.flatten() {
            if std::fs::read_to_string(run.path().join("owner")).is_ok_and(|o| o.trim() == owner) {
                ids.push(run.file_name().to_string_lossy().into_owned());
            }
        }
    }
    ids
}

/// The cgroup directories a native sandbox would have (v1 or v2).
pub fn native_cgroup_dirs(id: &str) -> Vec<PathBuf> {
    ["memory/", "cpu/", "pids/", "freezer/", ""]
        .iter()
        .map(|c| PathBuf::from(format!("/sys/fs/cgroup/{c}agentkernel/{id}")))
        .collect()
}

fn native_sandbox_has_processes(id: &str) -> bool {
    native_cgroup_dirs(id).iter().any(|d| {
        std::fs::read_to_string(d.join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty())
    })
}

/// True while anything of the native sandbox `id` exists: its cgroup, its
/// network lease or its scratch directory.
pub fn native_sandbox_exists(id: &str) -> bool {
    native_cgroup_dirs(id).iter().any(|d| d.exists())
        || !native_leases_of(id).is_empty()
        || all_test_state_dirs()
            .iter()
            .any(|s| s.join("sandboxes").join(id).exists())
        || all_test_state_dirs().iter().any(|s| {
            // A finished run's scratch waits for its cleanup process in `finished/`.
            s.join("runs").join(id).exists() || s.join("finished").join(id).exists()
        })
}

/// Network leases (machine-wide, under /run/agentkernel) held for sandbox `id`.
pub fn native_leases_of(id: &str) -> Vec<PathBuf> {
    let prefix = format!("sandbox={id}.");
    std::fs::read_dir("/run/agentkernel/net/leases")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read_to_string(e.path())
                        .is_ok_and(|t| t.lines().any(|l| l.starts_with(&prefix)))
                })
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Polls `done` until it holds or `limit` passes; its last answer.
pub fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    done()
}

/// Tests that hold on every backend with an egress proxy — native, Docker
/// and Podman (qemu has none): one body each, run by a `#[test]` wrapper in
/// a native-scoped and an engine-scoped module (named by the caller, e.g.
/// `native_only, engine_only`). Needs `#[macro_use] mod common;`.
#[allow(unused_macros)]
macro_rules! on_every_proxy_backend {
    ($native:ident, $engine:ident: $($test:ident),* $(,)?) => {
        mod $native {
            $(#[test]
            fn $test() {
                super::$test()
            })*
        }
        mod $engine {
            $(#[test]
            fn $test() {
                super::$test()
            })*
        }
    };
}

// ---------------------------------------------------------------- qemu
//
// A qemu sandbox, as the tests name it: `qemu:<pid>` for a VM process (its
// environment carries the owner label of what started it, session.rs
// OWNER_ENV), the directory of a warm pool VM a run claimed (`claimed/by`
// names the run), or a kept sandbox's name.

/// QEMU processes started by the process with owner label `owner`.
pub fn qemu_vms_of_owner(owner: &str) -> Vec<u32> {
    let want = format!("AGENTKERNEL_OWNER={owner}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == want.as_bytes()))
        })
        .collect()
}

/// The warm pool's VM directories under state dir `state`
/// (`vm-pool/<key>/<id>/`; a key's `about.json` is not one).
pub fn qemu_pool_vm_dirs(state: &Path) -> Vec<PathBuf> {
    let keys = std::fs::read_dir(state.join("vm-pool"))
        .into_iter()
        .flatten();
    keys.flatten()
        .flat_map(|key| {
            std::fs::read_dir(key.path())
                .into_iter()
                .flatten()
                .flatten()
        })
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

/// Warm pool VMs (their directories, in any test's state dir) claimed by the
/// run with owner label `owner`.
fn qemu_claimed_by(owner: &str) -> Vec<PathBuf> {
    all_test_state_dirs()
        .iter()
        .flat_map(|state| qemu_pool_vm_dirs(state))
        .filter(|vm| {
            std::fs::read_to_string(vm.join("claimed/by")).is_ok_and(|by| by.trim() == owner)
        })
        .collect()
}

/// A run's VMs: the ones it booted and the warm ones it claimed.
pub fn qemu_sandboxes_of_owner(owner: &str) -> Vec<String> {
    let booted = qemu_vms_of_owner(owner)
        .into_iter()
        .map(|pid| format!("qemu:{pid}"));
    let claimed = qemu_claimed_by(owner)
        .into_iter()
        .map(|dir| dir.to_string_lossy().into_owned());
    booted.chain(claimed).collect()
}

/// True while the qemu sandbox `name` (see above) exists: its VM process,
/// its claimed pool directory, or a kept sandbox's record or holder.
pub fn qemu_sandbox_exists(name: &str) -> bool {
    if let Some(pid) = name.strip_prefix("qemu:") {
        return std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
            c.split(|b| *b == 0)
                .next()
                .is_some_and(|a| a.ends_with(b"qemu-system-x86_64"))
        });
    }
    if name.starts_with('/') {
        return Path::new(name).exists();
    }
    all_test_state_dirs()
        .iter()
        .any(|s| s.join("sandboxes").join(name).exists())
        || qemu_holder_of("ak-state", name).is_some()
}

/// The holder process of kept VM `name` (`agentkernel __vm-holder STATE
/// NAME`) of a state dir whose path contains `state` (`ak-state`: any test's).
pub fn qemu_holder_of(state: &str, name: &str) -> Option<u32> {
    let entries = std::fs::read_dir("/proc").ok()?;
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            args.iter().any(|a| a == "__vm-holder")
                && args.iter().any(|a| a.contains(state))
                && args.last().is_some_and(|a| a == name)
        })
}
