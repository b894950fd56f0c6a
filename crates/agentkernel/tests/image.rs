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
        assert!(stderr(&out).contains("sha256:"), "{}", stderr(&out));
        // "(1 layer, …)", "(2 layers, …)": the count agrees with its noun.
        let err = stderr(&out);
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
