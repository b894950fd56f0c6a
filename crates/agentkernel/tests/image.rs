//! `agentkernel image pull|list|rm|prune` against a real `docker-registry`
//! on loopback, fed with the offline busybox image by skopeo.

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

struct Registry {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start() -> Registry {
        for tool in ["docker-registry", "skopeo"] {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output();
            assert!(
                found.is_ok_and(|o| o.status.success()),
                "PREREQUISITE MISSING: {tool} (scripts/setup.sh installs it)"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("storage").display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn docker-registry");
        let registry = Registry {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "docker-registry did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }

    /// Pushes the offline busybox image as `repo`.
    fn push_busybox(&self, repo: &str) {
        let archive = self._dir.path().join("busybox.tar");
        if !archive.exists() {
            engine_ok(&["save", "-o", archive.to_str().unwrap(), BUSYBOX]);
        }
        let out = Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("docker-archive:{}", archive.display()))
            .arg(format!("docker://127.0.0.1:{}/{repo}", self.port))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The image store is the same whatever the backend under test, so these run
/// once: with Docker, whose CLI exports the offline busybox image for the
/// registry (and whose TestEnv has a private store; native's shares one).
mod docker_only {
    use super::*;

    #[test]
    fn pull_list_rm_prune() {
        let env = TestEnv::new();
        let registry = Registry::start();
        registry.push_busybox("test/busybox:1");
        let name = format!("127.0.0.1:{}/test/busybox:1", registry.port);

        let out = env.run(&["image", "pull", &name]);
        assert_code(&out, 0);
        assert!(
            out.stdout.is_empty(),
            "messages belong on stderr: {}",
            stdout(&out)
        );
        // No terminal: no progress line, but a line when the pull starts and
        // one when it is done, as Docker and Podman print.
        let err = stderr(&out);
        assert!(
            err.contains(&format!("agentkernel: pulling {name} (1 layer,")),
            "{err}"
        );
        assert!(
            err.contains(&format!("agentkernel: pulled {name}: sha256:")),
            "{err}"
        );
        assert!(
            !err.contains('\r'),
            "progress drawn without a terminal: {err:?}"
        );
        // "(1 layer, …)", "(2 layers, …)": the count agrees with its noun.
        let counted = err.split_once(" (").map(|(_, c)| c).unwrap_or_default();
        let (n, noun) = counted.split_once(' ').unwrap_or_default();
        let expected = if n == "1" { "layer," } else { "layers," };
        assert!(noun.starts_with(expected), "{err}");

        // Stored: a second pull needs no registry at all.
        drop(registry);
        assert_code(&env.run(&["image", "pull", &name]), 0);
        let list = env.run(&["image", "list", "--json"]);
        assert_code(&list, 0);
        let rows: serde_json::Value = serde_json::from_slice(&list.stdout).expect("json");
        assert_eq!(rows.as_array().map(Vec::len), Some(1), "{rows}");
        assert!(rows[0]["reference"]
            .as_str()
            .unwrap()
            .contains("test/busybox:1"));

        assert_code(&env.run(&["image", "rm", &name]), 0);
        let out = env.run(&["image", "prune"]);
        assert_code(&out, 0);
        assert!(stderr(&out).contains("layer"), "{}", stderr(&out));
        let layers = env.state_dir().join("images/layers/sha256");
        let left = std::fs::read_dir(&layers).map(|d| d.count()).unwrap_or(0);
        assert_eq!(left, 0, "prune left layers in {}", layers.display());
    }

    #[test]
    fn docker_hub_names_go_to_the_mirror() {
        let env = TestEnv::new();
        let registry = Registry::start();
        registry.push_busybox("library/agentkernel-mirror-test:1");
        let out = env
            .cmd()
            .env(
                "AGENTKERNEL_REGISTRY_MIRRORS",
                format!("http://127.0.0.1:{}", registry.port),
            )
            .args(["image", "pull", "agentkernel-mirror-test:1"])
            .output()
            .unwrap();
        assert_code(&out, 0);
    }

    #[test]
    fn plain_http_off_loopback_and_unknown_images_are_one_line_125() {
        let env = TestEnv::new();
        let out = env
            .cmd()
            .env("AGENTKERNEL_REGISTRY_MIRRORS", "http://10.0.0.1:5000")
            .args(["image", "pull", "alpine:3.20"])
            .output()
            .unwrap();
        assert_code(&out, AK_ERROR);
        assert_one_line_error(&out);
        assert!(stderr(&out).contains("10.0.0.1"), "{}", stderr(&out));

        let registry = Registry::start();
        let out = env.run(&[
            "image",
            "pull",
            &format!("127.0.0.1:{}/no/such:1", registry.port),
        ]);
        assert_code(&out, AK_ERROR);
        assert_one_line_error(&out);
    }
}

/// Docker Hub made unreachable for this process only: HTTPS goes to a
/// proxy port where nothing listens (loopback mirrors are plain HTTP and
/// unaffected).
const NO_INTERNET: (&str, &str) = ("HTTPS_PROXY", "http://127.0.0.1:9");

fn pull_offline(env: &TestEnv, mirrors: Option<&str>, image: &str) -> std::process::Output {
    let mut cmd = env.cmd();
    cmd.env(NO_INTERNET.0, NO_INTERNET.1)
        .env_remove("AGENTKERNEL_REGISTRY_MIRRORS");
    if let Some(m) = mirrors {
        cmd.env("AGENTKERNEL_REGISTRY_MIRRORS", m);
    }
    cmd.args(["image", "pull", image]).output().unwrap()
}

#[test]
fn offline_a_docker_hub_pull_says_in_one_short_line_how_to_set_a_mirror() {
    let env = TestEnv::new();
    let err = assert_one_line_error(&pull_offline(&env, None, "python:3.12-alpine"));
    assert!(
        err.contains("cannot reach registry registry-1.docker.io")
            && err.contains("[images] mirrors")
            && err.contains("AGENTKERNEL_REGISTRY_MIRRORS")
            && err.contains("--image host"),
        "{err}"
    );
    assert!(err.len() < 300, "{} characters: {err}", err.len());
}

#[test]
fn a_mirrors_404_is_reported_not_docker_hubs_connection_error() {
    let env = TestEnv::new();
    let registry = Registry::start();
    let mirror = format!("http://127.0.0.1:{}", registry.port);
    let err = assert_one_line_error(&pull_offline(&env, Some(&mirror), "no-such-image:1"));
    assert!(
        err.contains(&format!("not found on mirror {mirror} (404)")),
        "{err}"
    );
    assert!(!err.contains("cannot reach"), "{err}");
}

#[test]
fn images_off_docker_hub_are_not_told_to_configure_a_mirror() {
    let env = TestEnv::new();
    let err = assert_one_line_error(&pull_offline(&env, None, "ghcr.io/agentkernel/nosuch:1"));
    assert!(err.contains("cannot reach registry ghcr.io"), "{err}");
    assert!(err.contains("mirrors apply only to Docker Hub"), "{err}");
    assert!(!err.contains("AGENTKERNEL_REGISTRY_MIRRORS"), "{err}");
}

#[test]
fn removing_an_image_that_is_not_there_does_not_advise_pulling_it() {
    let env = TestEnv::new();
    let err = assert_one_line_error(&env.run(&["image", "rm", "nosuch:1"]));
    assert!(err.contains("not in agentkernel's image store"), "{err}");
    assert!(!err.contains("pull"), "{err}");
}

mod engine_only {
    use super::common::*;

    /// The fix names the engine in use: a Podman user has no `docker load`.
    #[test]
    fn a_missing_image_names_this_engines_own_commands() {
        let env = TestEnv::new();
        let err = assert_one_line_error(&env.run(&[
            "run",
            "--pull",
            "never",
            "--image",
            "agentkernel-no-such:1",
            "--",
            "true",
        ]));
        let other = if backend() == "podman" {
            "docker"
        } else {
            "podman"
        };
        assert!(err.contains(&format!("`{} load`", backend())), "{err}");
        assert!(!err.contains(other), "{err}");
    }
}

/// dockerd's `registry-mirrors` serve native pulls too. The daemon.json is
/// this test's own, on a tmpfs over /etc/docker in a private mount
/// namespace: the machine's dockerd never sees it.
#[test]
fn dockerds_registry_mirrors_serve_native_pulls() {
    let env = TestEnv::new();
    let registry = Registry::start();
    registry.push_busybox("library/agentkernel-dockerd-mirror-test:1");
    let mirror = format!("http://127.0.0.1:{}", registry.port);
    let script = format!(
        "mount -t tmpfs tmpfs /etc/docker && \
         printf '{{\"registry-mirrors\": [\"{mirror}\"]}}' > /etc/docker/daemon.json && \
         exec \"$0\" \"$@\""
    );
    let run = |args: &[&str]| {
        let mut cmd = env.cmd();
        cmd.env(NO_INTERNET.0, NO_INTERNET.1)
            .env_remove("AGENTKERNEL_REGISTRY_MIRRORS");
        let mut unshare = std::process::Command::new("unshare");
        unshare
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .arg(binary())
            .args(args);
        let std_cmd = cmd.get_envs().fold(unshare, |mut u, (k, v)| {
            match v {
                Some(v) => u.env(k, v),
                None => u.env_remove(k),
            };
            u
        });
        assert_cmd::Command::from_std(std_cmd)
            .current_dir(env.project_dir())
            .output()
            .unwrap()
    };
    let out = run(&["image", "pull", "agentkernel-dockerd-mirror-test:1"]);
    assert_code(&out, 0);
    assert!(
        stderr(&out).contains("pulled agentkernel-dockerd-mirror-test:1"),
        "{}",
        stderr(&out)
    );
    let doctor = run(&["doctor", "--json"]);
    let doc: serde_json::Value = serde_json::from_slice(&doctor.stdout).expect("json");
    let listed = doc["registries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["url"] == mirror.as_str())
        .unwrap_or_else(|| panic!("dockerd's mirror is not probed: {doc:#}"));
    assert_eq!(listed["source"], "/etc/docker/daemon.json");
    assert_eq!(listed["reachable"], true);
}
