//! The real pull path: a `docker-registry` started on loopback for each
//! test (from a storage template filled once per run with skopeo and with
//! hand-built OCI images), reached directly or through a small HTTP proxy
//! that counts requests and can demand tokens, corrupt or stall blobs.
//!
//! Needs `docker-registry`, `skopeo` and the `agentkernel-test/busybox:1`
//! image (scripts/setup.sh). Without them the tests skip, except when
//! CI=true, where they fail.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use agentkernel_image::{
    Error, Image, Platform, Progress, PullOptions, PullPolicy, Reference, Store,
};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

// ---------------------------------------------------------------------------
// Fixtures: tools, the storage template, the registry process.

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

struct Fixtures {
    /// A registry storage directory holding every test image; each test
    /// serves a copy, so tests cannot disturb each other.
    storage: PathBuf,
    /// DiffIDs of test/layers:1, bottom to top.
    layers_diff_ids: Vec<String>,
    /// The index digest of test/multi:1.
    multi_index: String,
}

/// The fixtures, or None to skip (never under CI=true: there it panics).
fn fixtures() -> Option<&'static Fixtures> {
    static F: OnceLock<Result<Fixtures, String>> = OnceLock::new();
    match F.get_or_init(Fixtures::build) {
        Ok(f) => Some(f),
        Err(why) if ci() => panic!("CI=true and the registry tests cannot run: {why}"),
        Err(why) => {
            eprintln!("SKIPPED (not CI): {why}");
            None
        }
    }
}

macro_rules! fixtures_or_skip {
    () => {
        match fixtures() {
            Some(f) => f,
            None => return,
        }
    };
}

impl Fixtures {
    fn build() -> Result<Fixtures, String> {
        let missing: Vec<&str> = ["docker-registry", "skopeo"]
            .into_iter()
            .filter(|t| !have(t))
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "{missing:?} not installed (scripts/setup.sh installs them)"
            ));
        }
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("agentkernel-image-fixtures");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage).unwrap();
        let registry = Registry::start(&storage);
        let port = registry.port;

        push_busybox(port, &dir)?;
        let m = manifest_json(port, "test/busybox", "zstd");
        assert!(
            m["layers"][0]["mediaType"]
                .as_str()
                .unwrap()
                .ends_with("+zstd"),
            "skopeo did not push zstd: {m}"
        );
        let m = manifest_json(port, "test/busybox", "1");
        assert!(
            m["layers"][0]["mediaType"]
                .as_str()
                .unwrap()
                .ends_with("gzip"),
            "skopeo did not push gzip: {m}"
        );

        let layers_diff_ids = push_layers_image(port);
        let multi_index = push_multi_image(port, &dir);
        drop(registry);
        Ok(Fixtures {
            storage,
            layers_diff_ids,
            multi_index,
        })
    }
}

/// Pushes agentkernel-test/busybox:1 as test/busybox:1 (Docker v2, gzip)
/// and test/busybox:zstd (OCI, zstd).
fn push_busybox(port: u16, work: &Path) -> Result<(), String> {
    let skopeo = |args: &[&str]| {
        Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .args(args)
            .output()
            .map_err(|e| e.to_string())
    };
    let gzip = format!("docker://127.0.0.1:{port}/test/busybox:1");
    let mut source = "docker-daemon:agentkernel-test/busybox:1".to_string();
    let out = skopeo(&[&source, &gzip])?;
    if !out.status.success() {
        // No docker-daemon transport (or no socket access): go through a save.
        let archive = work.join("busybox.tar");
        let saved = Command::new("docker")
            .args([
                "save",
                "-o",
                archive.to_str().unwrap(),
                "agentkernel-test/busybox:1",
            ])
            .output()
            .map_err(|e| format!("docker save: {e}"))?;
        if !saved.status.success() {
            return Err(format!(
                "image agentkernel-test/busybox:1 unavailable (skopeo: {}; docker save: {}); run scripts/setup.sh",
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&saved.stderr).trim()
            ));
        }
        source = format!("docker-archive:{}", archive.display());
        let out = skopeo(&[&source, &gzip])?;
        if !out.status.success() {
            return Err(format!(
                "skopeo copy failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    // zstd through an OCI layout: pushed straight to the registry, skopeo
    // would reuse the gzip blob it already pushed instead of recompressing.
    let layout = format!("oci:{}:zstd", work.join("zstd-layout").display());
    let out = skopeo(&["--dest-compress-format", "zstd", &source, &layout])?;
    if !out.status.success() {
        return Err(format!(
            "skopeo zstd conversion failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let out = skopeo(&[
        "--preserve-digests",
        &layout,
        &format!("docker://127.0.0.1:{port}/test/busybox:zstd"),
    ])?;
    if !out.status.success() {
        return Err(format!(
            "skopeo zstd push failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// A `docker-registry serve` process on a free loopback port; killed on drop.
struct Registry {
    child: Child,
    port: u16,
    _config: tempfile::TempDir,
}

impl Registry {
    fn start(storage: &Path) -> Registry {
        for _ in 0..5 {
            let port = free_port();
            let config = tempfile::tempdir().unwrap();
            let yml = format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    \
                 rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                storage.display()
            );
            std::fs::write(config.path().join("config.yml"), yml).unwrap();
            let log = std::fs::File::create(config.path().join("log")).unwrap();
            let child = Command::new("docker-registry")
                .arg("serve")
                .arg(config.path().join("config.yml"))
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("spawn docker-registry");
            let mut r = Registry {
                child,
                port,
                _config: config,
            };
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if r.child.try_wait().unwrap().is_some() {
                    break; // Port taken in the meantime: try another.
                }
                if http(port, "GET", "/v2/", &[], b"").is_some_and(|resp| resp.status == 200) {
                    return r;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let log = std::fs::read_to_string(r._config.path().join("log")).unwrap_or_default();
            eprintln!("docker-registry did not start on {port}: {log}");
        }
        panic!("docker-registry did not start");
    }

    /// A registry serving a private copy of the fixtures.
    fn with_fixtures(f: &Fixtures) -> (Registry, tempfile::TempDir) {
        let copy = tempfile::tempdir().unwrap();
        let status = Command::new("cp")
            .arg("-a")
            .arg(&f.storage)
            .arg(copy.path().join("s"))
            .status()
            .unwrap();
        assert!(status.success());
        (Registry::start(&copy.path().join("s")), copy)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------------------
// A tiny HTTP/1.0 client, for pushing hand-built images and probing.

struct Resp {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<Resp> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    let mut req = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).ok()?;
    s.write_all(body).ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Option<Resp> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some(Resp {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    })
}

const ACCEPT_ALL: &str =
    "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
                          application/vnd.docker.distribution.manifest.v2+json, \
                          application/vnd.docker.distribution.manifest.list.v2+json";

fn manifest_json(port: u16, repo: &str, tag: &str) -> Value {
    let r = http(
        port,
        "GET",
        &format!("/v2/{repo}/manifests/{tag}"),
        &[("Accept", ACCEPT_ALL)],
        b"",
    )
    .unwrap();
    assert_eq!(
        r.status,
        200,
        "{repo}:{tag}: {}",
        String::from_utf8_lossy(&r.body)
    );
    serde_json::from_slice(&r.body).unwrap()
}

fn sha(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    format!(
        "sha256:{}",
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

fn push_blob(port: u16, repo: &str, data: &[u8]) -> String {
    let digest = sha(data);
    let r = http(
        port,
        "POST",
        &format!("/v2/{repo}/blobs/uploads/"),
        &[],
        b"",
    )
    .unwrap();
    assert_eq!(
        r.status,
        202,
        "start upload: {}",
        String::from_utf8_lossy(&r.body)
    );
    let location = &r.headers["location"];
    let path = location.find("/v2/").map(|i| &location[i..]).unwrap();
    let sep = if path.contains('?') { '&' } else { '?' };
    let r = http(
        port,
        "PUT",
        &format!("{path}{sep}digest={digest}"),
        &[("Content-Type", "application/octet-stream")],
        data,
    )
    .unwrap();
    assert_eq!(
        r.status,
        201,
        "upload: {}",
        String::from_utf8_lossy(&r.body)
    );
    digest
}

fn push_manifest(port: u16, repo: &str, reference: &str, media_type: &str, body: &[u8]) {
    let r = http(
        port,
        "PUT",
        &format!("/v2/{repo}/manifests/{reference}"),
        &[("Content-Type", media_type)],
        body,
    )
    .unwrap();
    assert_eq!(
        r.status,
        201,
        "push manifest {repo}:{reference}: {}",
        String::from_utf8_lossy(&r.body)
    );
}

// ---------------------------------------------------------------------------
// Hand-built images.

#[derive(Clone, Copy)]
enum Compression {
    None,
    Gzip,
    Zstd,
}

fn tar_of(build: impl FnOnce(&mut TarBuild)) -> Vec<u8> {
    let mut t = TarBuild(tar::Builder::new(Vec::new()));
    build(&mut t);
    t.0.into_inner().unwrap()
}

struct TarBuild(tar::Builder<Vec<u8>>);

impl TarBuild {
    fn header(kind: tar::EntryType, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(0);
        h
    }
    fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Directory, mode);
        self.0.append_data(&mut h, path, &[][..]).unwrap();
        self
    }
    fn file(&mut self, path: &str, mode: u32, data: &str) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Regular, mode);
        h.set_size(data.len() as u64);
        self.0.append_data(&mut h, path, data.as_bytes()).unwrap();
        self
    }
    fn link(&mut self, kind: tar::EntryType, path: &str, target: &str) -> &mut Self {
        let mut h = Self::header(kind, 0o777);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }
}

/// Pushes an OCI image (layers with their compression) and returns the
/// manifest's (digest, size, diff_ids).
fn push_image(
    port: u16,
    repo: &str,
    layers: &[(Vec<u8>, Compression)],
    run_config: Value,
    platform: (&str, &str, Option<&str>),
) -> (String, usize, Vec<String>) {
    let mut descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    for (tar, compression) in layers {
        diff_ids.push(sha(tar));
        let (data, media_type) = match compression {
            Compression::None => (tar.clone(), "application/vnd.oci.image.layer.v1.tar"),
            Compression::Gzip => {
                let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                gz.write_all(tar).unwrap();
                (
                    gz.finish().unwrap(),
                    "application/vnd.oci.image.layer.v1.tar+gzip",
                )
            }
            Compression::Zstd => (
                zstd::stream::encode_all(&tar[..], 3).unwrap(),
                "application/vnd.oci.image.layer.v1.tar+zstd",
            ),
        };
        let digest = push_blob(port, repo, &data);
        descriptors.push(json!({"mediaType": media_type, "digest": digest, "size": data.len()}));
    }
    let (os, arch, variant) = platform;
    let mut config = json!({
        "architecture": arch, "os": os, "config": run_config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    if let Some(v) = variant {
        config["variant"] = json!(v);
    }
    let config = serde_json::to_vec(&config).unwrap();
    let config_digest = push_blob(port, repo, &config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": descriptors,
    }))
    .unwrap();
    let digest = sha(&manifest);
    push_manifest(
        port,
        repo,
        &digest,
        "application/vnd.oci.image.manifest.v1+json",
        &manifest,
    );
    (digest, manifest.len(), diff_ids)
}

/// test/layers:1: three layers (uncompressed, gzip, zstd) exercising
/// whiteouts, an opaque directory, links and modes.
fn push_layers_image(port: u16) -> Vec<String> {
    use tar::EntryType::{Link, Symlink};
    let l1 = tar_of(|t| {
        t.dir("etc/", 0o755)
            .file("etc/passwd", 0o644, "root:x:0:0::/root:/bin/sh\n")
            .file("etc/motd", 0o644, "hello\n")
            .dir("var/", 0o755)
            .dir("var/cache/", 0o755)
            .file("var/cache/a", 0o644, "a")
            .file("var/cache/b", 0o644, "b")
            .dir("bin/", 0o755)
            .file("bin/tool", 0o755, "#!/bin/sh\necho tool\n")
            .link(Symlink, "bin/link", "tool")
            .link(Link, "bin/hard", "bin/tool")
            .dir("tmp/", 0o1777);
    });
    let l2 = tar_of(|t| {
        t.dir("etc/", 0o755)
            .file("etc/.wh.motd", 0o644, "")
            .file(
                "etc/passwd",
                0o644,
                "root:x:0:0::/root:/bin/sh\nagent:x:1000:1000::/home/agent:/bin/sh\n",
            )
            .dir("var/cache/", 0o755)
            .file("var/cache/.wh..wh..opq", 0o644, "")
            .file("var/cache/c", 0o644, "c");
    });
    let l3 = tar_of(|t| {
        t.dir("new/", 0o700)
            .file("new/secret", 0o600, "z")
            .dir("bin/", 0o755)
            .file("bin/.wh.link", 0o644, "");
    });
    let (digest, _, diff_ids) = push_image(
        port,
        "test/layers",
        &[
            (l1, Compression::None),
            (l2, Compression::Gzip),
            (l3, Compression::Zstd),
        ],
        json!({
            "Env": ["PATH=/bin", "GREETING=hi"],
            "Entrypoint": ["/bin/tool"],
            "Cmd": ["--flag"],
            "WorkingDir": "/tmp",
            "User": "1000:1000",
        }),
        ("linux", "amd64", None),
    );
    let manifest = http(
        port,
        "GET",
        &format!("/v2/test/layers/manifests/{digest}"),
        &[("Accept", ACCEPT_ALL)],
        b"",
    )
    .unwrap()
    .body;
    push_manifest(
        port,
        "test/layers",
        "1",
        "application/vnd.oci.image.manifest.v1+json",
        &manifest,
    );
    diff_ids
}

/// test/multi:1: an OCI index with amd64, arm64, arm/v7, arm/v6 and an
/// attestation-like unknown/unknown entry; each image holds `/arch`.
/// Pushed through an OCI layout with `skopeo copy --all`, so the registry
/// gets exactly what a real multi-arch push produces.
fn push_multi_image(port: u16, work: &Path) -> String {
    let platforms: [(&str, &str, Option<&str>); 5] = [
        ("unknown", "unknown", None),
        ("linux", "arm64", Some("v8")),
        ("linux", "amd64", None),
        ("linux", "arm", Some("v7")),
        ("linux", "arm", Some("v6")),
    ];
    let mut entries = Vec::new();
    for (os, arch, variant) in platforms {
        let name = format!(
            "{os}/{arch}{}",
            variant.map(|v| format!("/{v}")).unwrap_or_default()
        );
        let layer = tar_of(|t| {
            t.file("arch", 0o644, &name);
        });
        let (digest, size, _) = push_image(
            port,
            "test/multi-parts",
            &[(layer, Compression::Gzip)],
            json!({}),
            (os, arch, variant),
        );
        let mut platform = json!({"os": os, "architecture": arch});
        if let Some(v) = variant {
            platform["variant"] = json!(v);
        }
        entries.push(json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": size, "platform": platform}));
    }
    // Move everything into an OCI layout, then let skopeo push the index.
    let layout = work.join("multi-layout");
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let save = |data: &[u8]| {
        let d = sha(data);
        std::fs::write(layout.join("blobs/sha256").join(&d[7..]), data).unwrap();
        d
    };
    for e in &entries {
        let digest = e["digest"].as_str().unwrap();
        let manifest = http(
            port,
            "GET",
            &format!("/v2/test/multi-parts/manifests/{digest}"),
            &[("Accept", ACCEPT_ALL)],
            b"",
        )
        .unwrap()
        .body;
        save(&manifest);
        let m: Value = serde_json::from_slice(&manifest).unwrap();
        for blob in std::iter::once(&m["config"]).chain(m["layers"].as_array().unwrap()) {
            let d = blob["digest"].as_str().unwrap();
            let data = http(
                port,
                "GET",
                &format!("/v2/test/multi-parts/blobs/{d}"),
                &[],
                b"",
            )
            .unwrap()
            .body;
            save(&data);
        }
    }
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries,
    }))
    .unwrap();
    let index_digest = save(&index);
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json", "digest": index_digest, "size": index.len(),
            "annotations": {"org.opencontainers.image.ref.name": "1"}}]}))
        .unwrap(),
    )
    .unwrap();
    let out = Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--all",
            "--preserve-digests",
            "--dest-tls-verify=false",
        ])
        .arg(format!("oci:{}:1", layout.display()))
        .arg(format!("docker://127.0.0.1:{port}/test/multi:1"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo copy --all: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pushed = http(
        port,
        "GET",
        "/v2/test/multi/manifests/1",
        &[("Accept", ACCEPT_ALL)],
        b"",
    )
    .unwrap();
    assert_eq!(sha(&pushed.body), index_digest, "skopeo changed the index");
    index_digest
}

// ---------------------------------------------------------------------------
// The proxy: counts requests, and can demand tokens, corrupt or stall.

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Pass,
    /// 401 + `WWW-Authenticate: Bearer …` unless the request has our token.
    Bearer,
    /// Like Bearer, but the token endpoint refuses.
    BearerRefused,
    /// 401 + `WWW-Authenticate: Basic`.
    Basic,
    /// Flip one byte of the blob named in `target`.
    Corrupt,
    /// Send half of the blob named in `target`, then hang.
    Stall,
}

const TOKEN: &str = "tok-0123456789";

struct ProxyState {
    upstream: u16,
    port: u16,
    mode: Mutex<Mode>,
    target: Mutex<String>,
    log: Mutex<Vec<(String, Option<String>)>>,
    stalled: AtomicBool,
    stop: AtomicBool,
    requests: AtomicUsize,
}

struct Proxy {
    state: Arc<ProxyState>,
    thread: Option<JoinHandle<()>>,
}

impl Proxy {
    fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(ProxyState {
            upstream,
            port,
            mode: Mutex::new(Mode::Pass),
            target: Mutex::new(String::new()),
            log: Mutex::new(Vec::new()),
            stalled: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            requests: AtomicUsize::new(0),
        });
        let s = state.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let s = s.clone();
                std::thread::spawn(move || handle(&s, conn));
            }
        });
        Proxy {
            state,
            thread: Some(thread),
        }
    }

    fn port(&self) -> u16 {
        self.state.port
    }

    fn set(&self, mode: Mode, target: &str) {
        *self.state.mode.lock().unwrap() = mode;
        *self.state.target.lock().unwrap() = target.to_string();
    }

    fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    fn log(&self) -> Vec<(String, Option<String>)> {
        self.state.log.lock().unwrap().clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.state.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn handle(s: &ProxyState, mut conn: TcpStream) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() || request_line.is_empty() {
        return;
    }
    let path = request_line.split(' ').nth(1).unwrap_or("/").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    s.requests.fetch_add(1, Ordering::SeqCst);
    let auth = headers.get("authorization").cloned();
    s.log.lock().unwrap().push((path.clone(), auth.clone()));
    let mode = *s.mode.lock().unwrap();
    let target = s.target.lock().unwrap().clone();

    let respond = |conn: &mut TcpStream, status: &str, extra: &[(&str, String)], body: &[u8]| {
        let mut head = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        for (k, v) in extra {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let _ = conn.write_all(head.as_bytes());
        let _ = conn.write_all(body);
    };

    if path.starts_with("/token") {
        if mode == Mode::BearerRefused {
            respond(
                &mut conn,
                "401 Unauthorized",
                &[],
                br#"{"errors":[{"code":"DENIED","message":"no pulls for you"}]}"#,
            );
        } else {
            let body = format!(r#"{{"token":"{TOKEN}","expires_in":300}}"#);
            respond(
                &mut conn,
                "200 OK",
                &[("Content-Type", "application/json".into())],
                body.as_bytes(),
            );
        }
        return;
    }
    let repo = path
        .strip_prefix("/v2/")
        .and_then(|p| {
            p.rsplit_once("/manifests/")
                .or_else(|| p.rsplit_once("/blobs/"))
        })
        .map(|(r, _)| r.to_string())
        .unwrap_or_default();
    match mode {
        Mode::Bearer | Mode::BearerRefused
            if auth.as_deref() != Some(&format!("Bearer {TOKEN}")) =>
        {
            let challenge = format!(
                r#"Bearer realm="http://127.0.0.1:{}/token",service="test-registry",scope="repository:{repo}:pull""#,
                s.port
            );
            let body =
                br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#;
            respond(
                &mut conn,
                "401 Unauthorized",
                &[("WWW-Authenticate", challenge)],
                body,
            );
            return;
        }
        Mode::Basic => {
            respond(
                &mut conn,
                "401 Unauthorized",
                &[("WWW-Authenticate", r#"Basic realm="test realm""#.into())],
                b"",
            );
            return;
        }
        _ => {}
    }

    let accept = headers.get("accept").cloned().unwrap_or_default();
    let Some(mut up) = http(s.upstream, "GET", &path, &[("Accept", &accept)], b"") else {
        respond(&mut conn, "502 Bad Gateway", &[], b"upstream down");
        return;
    };
    let keep = ["content-type", "docker-content-digest", "www-authenticate"];
    let extra: Vec<(&str, String)> = keep
        .iter()
        .filter_map(|k| up.headers.get(*k).map(|v| (*k, v.clone())))
        .collect();
    let status = format!("{} X", up.status);
    let is_target = path.contains("/blobs/") && !target.is_empty() && path.ends_with(&target);
    if mode == Mode::Corrupt && is_target && !up.body.is_empty() {
        let i = up.body.len() / 2;
        up.body[i] ^= 0x55;
    }
    if mode == Mode::Stall && is_target {
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            up.body.len()
        );
        let _ = conn.write_all(head.as_bytes());
        let _ = conn.write_all(&up.body[..up.body.len() / 2]);
        let _ = conn.flush();
        s.stalled.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !s.stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        return;
    }
    respond(&mut conn, &status, &extra, &up.body);
}

// ---------------------------------------------------------------------------
// Helpers.

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn pull(store: &Store, reference: &str, opts: &PullOptions) -> Result<Image, Error> {
    rt().block_on(store.pull(&Reference::parse(reference).unwrap(), opts))
}

fn layer_dirs(store: &Store) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(store.root().join("layers/sha256"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_dir())
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// `tmp/` entries other than the per-layer lock files, which are kept.
fn tmp_leftovers(store: &Store) -> Vec<String> {
    std::fs::read_dir(store.root().join("tmp"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.ends_with(".lock"))
        .collect()
}

fn refs(store: &Store) -> usize {
    std::fs::read_dir(store.root().join("refs"))
        .unwrap()
        .count()
}

fn blob_requests(proxy: &Proxy, digest: &str) -> usize {
    proxy
        .log()
        .iter()
        .filter(|(p, _)| p.ends_with(&format!("/blobs/{digest}")))
        .count()
}

// ---------------------------------------------------------------------------
// Tests.

#[test]
fn pull_stores_once_and_cached_pulls_make_no_request() {
    let f = fixtures_or_skip!();
    let (registry, _copy) = Registry::with_fixtures(f);
    let proxy = Proxy::start(registry.port);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("images")).unwrap();
    let reference = format!("127.0.0.1:{}/test/busybox:1", proxy.port());

    let events = Arc::new(Mutex::new(Vec::new()));
    let e = events.clone();
    let opts = PullOptions {
        progress: Some(Arc::new(move |p: &Progress| {
            e.lock().unwrap().push(p.clone())
        })),
        ..Default::default()
    };
    let image = pull(&store, &reference, &opts).unwrap();
    assert_eq!(image.reference.to_string(), reference);
    assert_eq!(image.layers.len(), 1);
    assert_eq!(image.config.cmd, ["/bin/sh"]);
    assert!(
        image.config.env.iter().any(|e| e.starts_with("PATH=")),
        "{:?}",
        image.config.env
    );
    let root = &image.layers[0];
    assert!(root.join("bin/busybox").is_file());
    assert_eq!(
        std::fs::read_link(root.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    assert_eq!(
        std::fs::metadata(root.join("tmp")).unwrap().mode() & 0o7777,
        0o1777
    );
    assert!(std::fs::read_to_string(root.join("etc/passwd"))
        .unwrap()
        .starts_with("root:"));
    assert!(image.size > 500_000);
    // Layout: manifest and config blobs, the layer by DiffID, the ref.
    assert!(store
        .root()
        .join("blobs/sha256")
        .join(image.manifest_digest.hex())
        .is_file());
    assert!(store
        .root()
        .join("blobs/sha256")
        .join(image.config_digest.hex())
        .is_file());
    assert_eq!(root.parent().unwrap(), store.root().join("layers/sha256"));
    assert_eq!(refs(&store), 1);
    assert!(
        tmp_leftovers(&store).is_empty(),
        "{:?}",
        tmp_leftovers(&store)
    );
    {
        let events = events.lock().unwrap();
        assert!(
            matches!(events.first(), Some(Progress::Resolved { layers, .. }) if layers.len() == 1),
            "{events:?}"
        );
        assert!(events
            .iter()
            .any(|e| matches!(e, Progress::LayerDownloading { .. })));
        assert!(
            matches!(events.last(), Some(Progress::LayerDone { .. })),
            "{events:?}"
        );
    }

    // Cached: no request at all, with the default policy.
    let before = proxy.requests();
    let again = pull(&store, &reference, &PullOptions::default()).unwrap();
    assert_eq!(
        proxy.requests(),
        before,
        "a cached pull must not touch the network"
    );
    assert_eq!(again.manifest_digest, image.manifest_digest);
    assert_eq!(again.layers, image.layers);

    // Always: the manifest is fetched again, the layer is not.
    let events = Arc::new(Mutex::new(Vec::new()));
    let e = events.clone();
    let always = PullOptions {
        policy: PullPolicy::Always,
        progress: Some(Arc::new(move |p: &Progress| {
            e.lock().unwrap().push(p.clone())
        })),
        ..Default::default()
    };
    pull(&store, &reference, &always).unwrap();
    let layer_digest = match &events.lock().unwrap()[0] {
        Progress::Resolved { layers, .. } => layers[0].0.to_string(),
        other => panic!("{other:?}"),
    };
    assert!(events
        .lock()
        .unwrap()
        .iter()
        .any(|e| matches!(e, Progress::LayerCached { .. })));
    assert_eq!(
        blob_requests(&proxy, &layer_digest),
        1,
        "the layer was downloaded again"
    );

    // Registry and proxy gone: everything still resolves locally.
    drop(proxy);
    drop(registry);
    let r = Reference::parse(&reference).unwrap();
    assert_eq!(
        store.resolve_local(&r).unwrap().manifest_digest,
        image.manifest_digest
    );
    pull(
        &store,
        &reference,
        &PullOptions {
            policy: PullPolicy::Never,
            ..Default::default()
        },
    )
    .unwrap();
    pull(&store, &reference, &PullOptions::default()).unwrap();
    let err = pull(&store, &reference, &always).unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    assert!(err.to_string().contains("cannot reach registry"), "{err}");

    let listed = store.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].reference, r);

    // rm + prune: nothing left.
    assert_eq!(store.remove(&r).unwrap(), image.manifest_digest);
    assert!(store.resolve_local(&r).is_none());
    let report = store.prune().unwrap();
    assert_eq!((report.blobs, report.layers), (2, 1), "{report:?}");
    assert!(report.bytes > 1_000_000, "{report:?}");
    assert!(layer_dirs(&store).is_empty());
    assert_eq!(
        std::fs::read_dir(store.root().join("blobs/sha256"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn zstd_and_gzip_encodings_share_one_unpacked_layer() {
    let f = fixtures_or_skip!();
    let (registry, _copy) = Registry::with_fixtures(f);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let base = format!("127.0.0.1:{}/test/busybox", registry.port);
    let zstd = pull(&store, &format!("{base}:zstd"), &PullOptions::default()).unwrap();
    assert!(zstd.layers[0].join("bin/busybox").is_file());
    let gzip = pull(&store, &format!("{base}:1"), &PullOptions::default()).unwrap();
    assert_ne!(zstd.manifest_digest, gzip.manifest_digest);
    assert_eq!(zstd.layers, gzip.layers, "same DiffID, one directory");
    assert_eq!(layer_dirs(&store).len(), 1);
    assert_eq!(store.list().unwrap().len(), 2);
}

#[test]
fn hand_built_layers_whiteouts_and_overlay() {
    let f = fixtures_or_skip!();
    let (registry, _copy) = Registry::with_fixtures(f);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let image = pull(
        &store,
        &format!("127.0.0.1:{}/test/layers:1", registry.port),
        &PullOptions::default(),
    )
    .unwrap();
    assert_eq!(image.layers.len(), 3);
    let names: Vec<String> = image
        .layers
        .iter()
        .map(|p| format!("sha256:{}", p.file_name().unwrap().to_str().unwrap()))
        .collect();
    assert_eq!(
        names, f.layers_diff_ids,
        "layers keyed by DiffID, bottom to top"
    );
    assert_eq!(image.config.entrypoint, ["/bin/tool"]);
    assert_eq!(image.config.cmd, ["--flag"]);
    assert_eq!(image.config.env, ["PATH=/bin", "GREETING=hi"]);
    assert_eq!(image.config.working_dir.as_deref(), Some("/tmp"));
    assert_eq!(image.config.user.as_deref(), Some("1000:1000"));

    let [l1, l2, l3] = [&image.layers[0], &image.layers[1], &image.layers[2]];
    // Layer 1 (uncompressed): links and modes.
    let tool = std::fs::metadata(l1.join("bin/tool")).unwrap();
    assert_eq!(tool.mode() & 0o7777, 0o755);
    assert_eq!(
        std::fs::metadata(l1.join("bin/hard")).unwrap().ino(),
        tool.ino()
    );
    assert_eq!(
        std::fs::read_link(l1.join("bin/link")).unwrap(),
        Path::new("tool")
    );
    assert_eq!(
        std::fs::metadata(l1.join("tmp")).unwrap().mode() & 0o7777,
        0o1777
    );
    // Layer 3 (zstd): modes of a private directory.
    assert_eq!(
        std::fs::metadata(l3.join("new")).unwrap().mode() & 0o7777,
        0o700
    );
    assert_eq!(
        std::fs::metadata(l3.join("new/secret")).unwrap().mode() & 0o7777,
        0o600
    );

    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        // Unprivileged: the opaque directory comes back as a marker (and
        // whiteouts too on kernels before 5.8); overlayfs cannot be mounted.
        assert_eq!(image.markers[1].opaque_dirs, [PathBuf::from("var/cache")]);
        return;
    }
    assert!(
        image.markers.iter().all(|m| m.is_empty()),
        "{:?}",
        image.markers
    );
    // Layer 2 (gzip): whiteout device.
    let wh = std::fs::symlink_metadata(l2.join("etc/motd")).unwrap();
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
    assert!(!l2.join("etc/.wh.motd").exists() && !l2.join("var/cache/.wh..wh..opq").exists());

    // The real test of "usable as overlayfs lower dirs": mount them.
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let lower: Vec<String> = image
        .layers
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect();
    let script = format!(
        "mount -t overlay overlay -o ro,lowerdir={} {m} || exit 99
         cat {m}/etc/passwd
         for p in etc/motd bin/link var/cache/a var/cache/b var/cache/c bin/hard new/secret; do
           if [ -e {m}/$p ] || [ -L {m}/$p ]; then echo \"present $p\"; else echo \"absent $p\"; fi
         done",
        lower.join(":"),
        m = mnt.display()
    );
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "overlay mount failed: {} {}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("agent:x:1000"),
        "upper etc/passwd wins: {stdout}"
    );
    for line in [
        "absent etc/motd",
        "absent bin/link",
        "absent var/cache/a",
        "absent var/cache/b",
        "present var/cache/c",
        "present bin/hard",
        "present new/secret",
    ] {
        assert!(
            stdout.contains(line),
            "expected `{line}` in merged view:\n{stdout}"
        );
    }
}

#[test]
fn multi_arch_index_resolves_to_the_platform() {
    let f = fixtures_or_skip!();
    let (registry, _copy) = Registry::with_fixtures(f);
    let reference = format!("127.0.0.1:{}/test/multi:1", registry.port);
    let arch_of = |platform: Option<&str>| -> Result<String, Error> {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let opts = PullOptions {
            platform: platform.map(|p| Platform::parse(p).unwrap()),
            ..Default::default()
        };
        let image = pull(&store, &reference, &opts)?;
        Ok(std::fs::read_to_string(image.layers[0].join("arch")).unwrap())
    };
    let host = Platform::host();
    if ["amd64", "arm64"].contains(&host.architecture.as_str()) {
        assert_eq!(arch_of(None).unwrap(), host.to_string());
    }
    assert_eq!(arch_of(Some("linux/amd64")).unwrap(), "linux/amd64");
    assert_eq!(arch_of(Some("linux/arm64")).unwrap(), "linux/arm64/v8");
    assert_eq!(arch_of(Some("linux/arm/v7")).unwrap(), "linux/arm/v7");
    assert_eq!(arch_of(Some("linux/arm/v6")).unwrap(), "linux/arm/v6");
    // v8 32-bit ARM runs v7 code: the nearest older variant.
    assert_eq!(arch_of(Some("linux/arm/v8")).unwrap(), "linux/arm/v7");
    let err = arch_of(Some("linux/s390x")).unwrap_err();
    assert!(matches!(err, Error::NoMatchingPlatform { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("linux/s390x") && msg.contains("linux/arm/v7") && msg.contains("linux/amd64"),
        "{msg}"
    );

    // One store: a stored image of another platform does not count.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    for want in ["linux/amd64", "linux/arm/v7", "linux/arm/v7"] {
        let opts = PullOptions {
            platform: Platform::parse(want),
            ..Default::default()
        };
        let image = pull(&store, &reference, &opts).unwrap();
        assert_eq!(image.platform.to_string(), want);
        let arch = std::fs::read_to_string(image.layers[0].join("arch")).unwrap();
        assert_eq!(arch, want);
    }

    // By index digest: verified, stored under the digest reference.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let pinned = format!("127.0.0.1:{}/test/multi@{}", registry.port, f.multi_index);
    let opts = PullOptions {
        platform: Platform::parse("linux/amd64"),
        ..Default::default()
    };
    let image = pull(&store, &pinned, &opts).unwrap();
    assert_eq!(
        std::fs::read_to_string(image.layers[0].join("arch")).unwrap(),
        "linux/amd64"
    );
    assert!(store
        .resolve_local(&Reference::parse(&pinned).unwrap())
        .is_some());
    // A digest that does not match what the registry serves for it.
    let wrong = format!(
        "127.0.0.1:{}/test/multi@sha256:{}",
        registry.port,
        "0".repeat(64)
    );
    let err = pull(&store, &wrong, &opts).unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
}

#[test]
fn concurrent_pulls_both_succeed_and_store_once() {
    let f = fixtures_or_skip!();
    let (registry, _copy) = Registry::with_fixtures(f);
    let proxy = Proxy::start(registry.port);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("images");
    let reference = format!("127.0.0.1:{}/test/layers:1", proxy.port());
    let barrier = Arc::new(std::sync::Barrier::new(3));
    let threads: Vec<_> = (0..3)
        .map(|_| {
            let (root, reference, barrier) = (root.clone(), reference.clone(), barrier.clone());
            std::thread::spawn(move || {
                // Each thread opens its own Store and lock files, as separate
                // processes would: flock conflicts between open files.
                let store = Store::open(&root).unwrap();
                barrier.wait();
                pull(&store, &reference, &PullOptions::default()).map(|i| i.layers)
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for r in &results {
        assert_eq!(r.as_ref().unwrap(), results[0].as_ref().unwrap());
    }
    let store = Store::open(&root).unwrap();
    assert_eq!(layer_dirs(&store).len(), 3);
    assert!(
        tmp_leftovers(&store).is_empty(),
        "{:?}",
        tmp_leftovers(&store)
    );
    assert_eq!(refs(&store), 1);
    // Each layer blob crossed the network once: the others waited for it.
    let manifest = manifest_json(registry.port, "test/layers", "1");
    for layer in manifest["layers"].as_array().unwrap() {
        let d = layer["digest"].as_str().unwrap();
        assert_eq!(
            blob_requests(&proxy, d),
            1,
            "layer {d} downloaded more than once"
        );
    }
}

#[test]
fn corrupted_blobs_are_rejected_and_nothing_is_stored() {
    let f = fixtures_or_skip!();
    let (registry, _copy) = Registry::with_fixtures(f);
    let proxy = Proxy::start(registry.port);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let reference = format!("127.0.0.1:{}/test/layers:1", proxy.port());
    let manifest = manifest_json(registry.port, "test/layers", "1");

    // A corrupt layer of each encoding, and a corrupt config.
    let mut targets: Vec<String> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    targets.push(manifest["config"]["digest"].as_str().unwrap().to_string());
    for target in &targets {
        // A fresh store each time: a failed pull keeps the layers that did
        // verify, which would hide the next corruption.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        proxy.set(Mode::Corrupt, target);
        let err = pull(&store, &reference, &PullOptions::default()).unwrap_err();
        assert!(
            matches!(err, Error::DigestMismatch { .. }),
            "corrupt {target}: {err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(target.as_str()) && msg.contains("corrupted"),
            "{msg}"
        );
        assert_eq!(refs(&store), 0, "no ref after a failed pull");
        assert!(
            tmp_leftovers(&store).is_empty(),
            "{:?}",
            tmp_leftovers(&store)
        );
        assert!(!store
            .root()
            .join("blobs/sha256")
            .join(&target[7..])
            .exists());
        assert!(store
            .resolve_local(&Reference::parse(&reference).unwrap())
            .is_none());
    }
    // Uncorrupted, the same store completes the image.
    proxy.set(Mode::Pass, "");
    let image = pull(&store, &reference, &PullOptions::default()).unwrap();
    assert_eq!(image.layers.len(), 3);

    // Tampering with the registry's own storage is caught too.
    let dir2 = tempfile::tempdir().unwrap();
    let store2 = Store::open(dir2.path()).unwrap();
    let gz = manifest["layers"][1]["digest"].as_str().unwrap();
    let data = _copy
        .path()
        .join("s/docker/registry/v2/blobs/sha256")
        .join(&gz[7..9])
        .join(&gz[7..])
        .join("data");
    let mut bytes = std::fs::read(&data).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0xff;
    std::fs::write(&data, bytes).unwrap();
    let err = pull(
        &store2,
        &format!("127.0.0.1:{}/test/layers:1", registry.port),
        &PullOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    assert_eq!(refs(&store2), 0);
}

#[test]
fn bearer_token_challenge_and_retry() {
    let f = fixtures_or_skip!();
    let (registry, _copy) = Registry::with_fixtures(f);
    let proxy = Proxy::start(registry.port);
    proxy.set(Mode::Bearer, "");
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let reference = format!("127.0.0.1:{}/test/busybox:1", proxy.port());
    let image = pull(&store, &reference, &PullOptions::default()).unwrap();
    assert!(image.layers[0].join("bin/busybox").is_file());

    let log = proxy.log();
    let (first_path, first_auth) = &log[0];
    assert!(
        first_path.contains("/manifests/1") && first_auth.is_none(),
        "{log:?}"
    );
    let tokens: Vec<&String> = log
        .iter()
        .map(|(p, _)| p)
        .filter(|p| p.starts_with("/token"))
        .collect();
    assert_eq!(tokens.len(), 1, "one token for the whole pull: {log:?}");
    assert!(tokens[0].contains("service=test-registry"), "{}", tokens[0]);
    assert!(
        tokens[0].contains("scope=repository%3Atest%2Fbusybox%3Apull"),
        "{}",
        tokens[0]
    );
    let bearer = format!("Bearer {TOKEN}");
    let authed = log.iter().filter(|(p, _)| p.starts_with("/v2/")).skip(1);
    for (path, auth) in authed {
        assert_eq!(
            auth.as_deref(),
            Some(bearer.as_str()),
            "{path} without the token"
        );
    }

    // The token endpoint refuses: a token error naming the realm.
    proxy.set(Mode::BearerRefused, "");
    let store2 = Store::open(dir.path().join("2")).unwrap();
    let err = pull(&store2, &reference, &PullOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Token { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("/token") && msg.contains("401") && msg.contains("no pulls for you"),
        "{msg}"
    );

    // Basic auth: reported, not attempted.
    proxy.set(Mode::Basic, "");
    let err = pull(&store2, &reference, &PullOptions::default()).unwrap_err();
    assert!(matches!(err, Error::BasicAuthRequired { .. }), "{err}");
    assert!(err.to_string().contains("username and password"), "{err}");
}

#[test]
fn docker_hub_names_go_to_mirrors_first() {
    let f = fixtures_or_skip!();
    let (registry, _copy) = Registry::with_fixtures(f);
    let proxy = Proxy::start(registry.port);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    // A dead mirror first, then a working one; Docker Hub is never reached
    // because the second mirror answers.
    // 127.0.0.2 is loopback too, and no test server listens there.
    let dead_port = TcpListener::bind("127.0.0.2:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dead = format!("http://127.0.0.2:{dead_port}");
    let opts = PullOptions {
        mirrors: vec![dead, format!("http://127.0.0.1:{}/", proxy.port())],
        ..Default::default()
    };
    let image = pull(&store, "test/busybox:1", &opts).unwrap();
    assert_eq!(image.reference.to_string(), "docker.io/test/busybox:1");
    assert!(proxy.requests() > 0);
    assert!(store
        .resolve_local(&Reference::parse("docker.io/test/busybox:1").unwrap())
        .is_some());

    // A name on another registry never uses the mirrors.
    let before = proxy.requests();
    let other = format!("127.0.0.1:{}/test/busybox:1", registry.port);
    pull(&store, &other, &opts).unwrap();
    assert_eq!(proxy.requests(), before);
}

#[test]
fn missing_images_are_reported_with_the_fix() {
    let f = fixtures_or_skip!();
    let (registry, _copy) = Registry::with_fixtures(f);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let err = pull(
        &store,
        &format!("127.0.0.1:{}/test/nope:1", registry.port),
        &PullOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("not found") && msg.contains("(404)") && msg.contains("check the name"),
        "{msg}"
    );
    let err = pull(
        &store,
        &format!("127.0.0.1:{}/test/busybox:nope", registry.port),
        &PullOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
}

/// Run as a child process by `killed_pull_leaves_nothing_trusted`; a no-op
/// in the normal test run.
#[test]
fn helper_child_pull() {
    let Ok(spec) = std::env::var("AGENTKERNEL_IMAGE_TEST_CHILD") else {
        return;
    };
    let (root, reference) = spec.split_once('|').unwrap();
    let store = Store::open(root).unwrap();
    let _ = pull(&store, reference, &PullOptions::default());
}

#[test]
fn killed_pull_leaves_nothing_trusted() {
    let f = fixtures_or_skip!();
    let (registry, _copy) = Registry::with_fixtures(f);
    let proxy = Proxy::start(registry.port);
    let manifest = manifest_json(registry.port, "test/layers", "1");
    // Layer 2 stalls half-way, after layers 1 and 3 (concurrent) may be done.
    let stall = manifest["layers"][1]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    proxy.set(Mode::Stall, &stall);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("images");
    let reference = format!("127.0.0.1:{}/test/layers:1", proxy.port());

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "helper_child_pull",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            "AGENTKERNEL_IMAGE_TEST_CHILD",
            format!("{}|{reference}", root.display()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !proxy.state.stalled.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "the child never reached the stalled blob"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the child pull ended early"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Let it unpack what it got, then SIGKILL (what Child::kill sends).
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap();
    child.wait().unwrap();

    let store = Store::open(&root).unwrap();
    let r = Reference::parse(&reference).unwrap();
    assert!(
        store.resolve_local(&r).is_none(),
        "a killed pull must not produce an image"
    );
    assert_eq!(refs(&store), 0);
    let stalled_diff_id = &f.layers_diff_ids[1][7..];
    assert!(
        !layer_dirs(&store).contains(&stalled_diff_id.to_string()),
        "partial layer in place"
    );
    assert!(
        !tmp_leftovers(&store).is_empty(),
        "the kill should have left a partial unpack in tmp/"
    );

    // The next pull cleans up and completes.
    proxy.set(Mode::Pass, "");
    let image = pull(&store, &reference, &PullOptions::default()).unwrap();
    assert_eq!(image.layers.len(), 3);
    assert!(
        tmp_leftovers(&store).is_empty(),
        "{:?}",
        tmp_leftovers(&store)
    );
    assert_eq!(
        std::fs::read_to_string(image.layers[2].join("new/secret")).unwrap(),
        "z"
    );
}
