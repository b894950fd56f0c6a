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
        self.copy_in(&format!("docker-archive:{}", archive.display()), repo);
    }

    /// `skopeo copy SOURCE` to `repo` in this registry.
    fn copy_in(&self, source: &str, repo: &str) {
        let out = Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false", source])
            .arg(format!("docker://127.0.0.1:{}/{repo}", self.port))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo copy {source}: {}",
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

/// The registry gets the busybox image from Docker's own store (through
/// the engine), so this runs in the Docker pass; what it tests, the native
/// image store's mirrors, is the same whatever the backend.
mod mirrors_docker_only {
    use super::*;

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
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(data))
}

impl Registry {
    /// Pushes a one-layer OCI image whose layer blob is `layer` exactly as
    /// given (skopeo copies an OCI layout's blobs without looking inside).
    fn push_one_layer(&self, repo: &str, layer: &[u8], media_type: &str, diff_id: &str) {
        let dir = tempfile::tempdir().unwrap();
        let blobs = dir.path().join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        let put = |data: &[u8]| {
            let hex = sha256_hex(data);
            std::fs::write(blobs.join(&hex), data).unwrap();
            format!("sha256:{hex}")
        };
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }))
        .unwrap();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(&config), "size": config.len()},
            "layers": [{"mediaType": media_type, "digest": put(layer), "size": layer.len()}],
        }))
        .unwrap();
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": put(&manifest),
                "size": manifest.len(),
            }],
        });
        std::fs::write(dir.path().join("index.json"), index.to_string()).unwrap();
        std::fs::write(
            dir.path().join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        self.copy_in(&format!("oci:{}", dir.path().display()), repo);
    }
}

/// Layer bombs. The image store is the same whatever the backend under test,
/// so these run once, with Docker (whose TestEnv has a private store: the
/// assertions that nothing was kept need one).
mod layer_bombs_docker_only {
    use super::*;

    /// Bytes allocated on disk under `path` (not the apparent sizes).
    fn allocated_bytes(path: &std::path::Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            return 0;
        };
        let mut total = meta.blocks() * 512;
        if meta.is_dir() {
            for entry in std::fs::read_dir(path).unwrap().flatten() {
                total += allocated_bytes(&entry.path());
            }
        }
        total
    }

    /// Pulls `name` into the test's own image store (not the native tests'
    /// shared one) and asserts a one-line refusal that names the layer bound,
    /// with nothing stored and (almost) no disk used.
    fn assert_bomb_refused(env: &TestEnv, name: &str) {
        let images = env.state_dir().join("images");
        let _ = std::fs::remove_file(&images); // the native tests' shared store link
        let started = Instant::now();
        let out = env.run(&["image", "pull", name]);
        // The refusal is one line; before it, as for any pull without a
        // terminal, the one "pulling" line once the image was resolved.
        assert_code(&out, AK_ERROR);
        assert!(out.stdout.is_empty(), "{}", stdout(&out));
        let text = stderr(&out);
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("agentkernel: pulling "))
            .collect();
        assert_eq!(lines.len(), 1, "expected one error line: {text}");
        let err = lines[0];
        assert!(
            err.contains("expands to more than") && err.contains("max_layer_size"),
            "{err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the refusal took {:?}",
            started.elapsed()
        );
        let count = |sub: &str| {
            std::fs::read_dir(images.join(sub))
                .map(|d| {
                    d.flatten()
                        .filter(|e| !e.file_name().to_string_lossy().ends_with(".lock"))
                        .count()
                })
                .unwrap_or(0)
        };
        assert_eq!(count("layers/sha256"), 0, "a layer was stored");
        assert_eq!(count("refs"), 0, "the image was recorded");
        assert_eq!(count("tmp"), 0, "the partial extraction was left");
        let used = allocated_bytes(&images);
        assert!(used < 64 << 20, "the pull left {used} bytes on disk");
    }

    /// A 1 MB layer holding one GNU sparse file that claims 64 GiB: it used to
    /// be written out in full. Refused by the default bound before a byte of it
    /// is written.
    #[test]
    fn a_sparse_layer_bomb_is_refused() {
        let env = TestEnv::new();
        let registry = Registry::start();
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::GNUSparse);
        header.set_mode(0o644);
        header.set_size(512);
        let gnu = header.as_gnu_mut().unwrap();
        gnu.set_real_size(64 << 30);
        gnu.sparse[0].set_offset(0);
        gnu.sparse[0].set_length(512);
        gnu.sparse[1].set_offset(64 << 30);
        gnu.sparse[1].set_length(0);
        let mut tar = tar::Builder::new(Vec::new());
        tar.append_data(&mut header, "bomb", &[b'x'; 512][..])
            .unwrap();
        let layer = tar.into_inner().unwrap();
        let diff_id = format!("sha256:{}", sha256_hex(&layer));
        registry.push_one_layer(
            "test/sparse-bomb:1",
            &layer,
            "application/vnd.oci.image.layer.v1.tar",
            &diff_id,
        );
        assert_bomb_refused(
            &env,
            &format!("127.0.0.1:{}/test/sparse-bomb:1", registry.port),
        );
    }

    /// 10 GiB of zeros in 10,240 files, gzip-compressed to ~10 MB: stopped at
    /// `[images] max_layer_size` (64m here) while streaming. (The config's
    /// diff_id is not the stream's: computing it would mean hashing 10 GiB, and
    /// a refused stream is never compared with it.)
    #[test]
    fn a_gzip_layer_bomb_is_refused_while_streaming() {
        use std::io::{Read, Write};
        let env = TestEnv::new();
        std::fs::write(
            env.project_dir().join("agentkernel.toml"),
            "[images]\nmax_layer_size = \"64m\"\n",
        )
        .unwrap();
        let registry = Registry::start();
        // One gzip member: a 1 MiB file of zeros; gzip members concatenate.
        let mut member = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_size(1 << 20);
        member
            .append_data(&mut header, "zeros", std::io::repeat(0).take(1 << 20))
            .unwrap();
        let member = member.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&member[..member.len() - 1024]).unwrap(); // no end-of-archive
        let member = gz.finish().unwrap();
        let layer: Vec<u8> = member.repeat(10 << 10);
        assert!(layer.len() < 16 << 20, "{} bytes", layer.len());
        registry.push_one_layer(
            "test/gzip-bomb:1",
            &layer,
            "application/vnd.oci.image.layer.v1.tar+gzip",
            &format!("sha256:{}", sha256_hex(b"not computed")),
        );
        assert_bomb_refused(
            &env,
            &format!("127.0.0.1:{}/test/gzip-bomb:1", registry.port),
        );
    }
}
