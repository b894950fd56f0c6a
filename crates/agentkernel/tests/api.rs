//! `agentkernel serve`, the HTTP API (docs/api.md), driven over its real
//! unix socket or TCP port by a plain HTTP/1.1 client.
//!
//! The tests outside a scope module exercise only what the server and the
//! CLI decide before any backend is touched (auth, request and option
//! validation), so they run on every backend. Those that run commands are
//! in `native_only`: the server is backend-neutral (each request runs the
//! CLI), and the native backend is what the API's figures are measured on.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// A running `agentkernel serve`, stopped (SIGTERM, by PID) when dropped.
struct Server {
    child: Child,
    /// The unix socket, or None on TCP.
    socket: Option<PathBuf>,
}

impl Server {
    fn start(env: &TestEnv, extra: &[&str]) -> Server {
        let mut child = env
            .std_cmd()
            .arg("serve")
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stderr.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains("serving the HTTP API"), "serve said: {line}");
        let socket = line
            .split_once("unix socket ")
            .map(|(_, p)| PathBuf::from(p.trim()));
        Server { child, socket }
    }

    fn stop(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill with our own child's PID.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        wait_child(&mut self.child, Duration::from_secs(60))
    }

    fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> Response {
        let stream = UnixStream::connect(self.socket.as_ref().expect("unix socket")).unwrap();
        http(stream, method, path, &[], body)
    }

    fn json(&self, method: &str, path: &str, body: Value) -> Response {
        self.request(method, path, Some(body.to_string().as_bytes()))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop();
        }
    }
}

#[derive(Debug)]
struct Response {
    status: u16,
    headers: String,
    body: Vec<u8>,
}

impl Response {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The newline-delimited events of a streamed run.
    fn events(&self) -> Vec<Value> {
        assert_eq!(self.status, 200, "{}", String::from_utf8_lossy(&self.body));
        self.body
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect()
    }

    /// `{error, fix}` with this status; returns the error.
    fn assert_error(&self, status: u16) -> String {
        assert_eq!(
            self.status,
            status,
            "body: {}",
            String::from_utf8_lossy(&self.body)
        );
        let body = self.json();
        assert!(body.get("fix").is_some(), "no fix field: {body}");
        body["error"].as_str().expect("error string").to_string()
    }
}

/// The text a stream carried, joined, and the exit event.
fn stream_text(events: &[Value], stream: &str) -> String {
    events
        .iter()
        .filter(|e| e["type"] == stream)
        .map(|e| e["data"].as_str().unwrap_or_default())
        .collect()
}

fn exit_event(events: &[Value]) -> &Value {
    let last = events.last().expect("events");
    assert_eq!(
        last["type"], "exit",
        "the last event is the exit: {events:?}"
    );
    last
}

/// One HTTP/1.1 request with `Connection: close`; the whole response, its
/// chunked body decoded.
fn http<S: Read + Write>(
    mut stream: S,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Response {
    let body = body.unwrap_or_default();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of headers");
    let headers = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = headers.split(' ').nth(1).unwrap().parse().unwrap();
    let mut rest = &raw[split + 4..];
    let body = if headers
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = Vec::new();
        loop {
            let end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let size =
                usize::from_str_radix(std::str::from_utf8(&rest[..end]).unwrap(), 16).unwrap();
            rest = &rest[end + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
        out
    } else {
        rest.to_vec()
    };
    Response {
        status,
        headers,
        body,
    }
}

fn write_token(dir: &Path, token: &str, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let file = dir.join("token");
    std::fs::write(&file, token).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
    file
}

#[test]
fn api_socket_is_private_and_removed_at_exit() {
    use std::os::unix::fs::PermissionsExt;
    let env = TestEnv::new();
    let mut server = Server::start(&env, &[]);
    let socket = server.socket.clone().unwrap();
    assert_eq!(socket, env.state_dir().join("api.sock"));
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the socket must be its owner's only");
    let health = server.request("GET", "/v1/health", None);
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["status"], "ok");
    // A second server on the same socket is refused, the first one untouched.
    let second = env.run(&["serve"]);
    assert!(assert_one_line_error(&second).contains("another `agentkernel serve`"));
    assert_eq!(server.request("GET", "/v1/health", None).status, 200);
    assert!(server.stop().success());
    assert!(!socket.exists(), "the socket outlived the server");
}

#[test]
fn api_tcp_refuses_to_start_without_a_private_token() {
    let env = TestEnv::new();
    let port = free_port().to_string();
    let addr = format!("127.0.0.1:{port}");
    let out = env.run(&["serve", "--listen", &addr]);
    assert!(assert_one_line_error(&out).contains("--token-file"));
    let shared = write_token(env.home_dir(), "0123456789abcdef0123", 0o644);
    let out = env.run(&[
        "serve",
        "--listen",
        &addr,
        "--token-file",
        shared.to_str().unwrap(),
    ]);
    assert!(assert_one_line_error(&out).contains("chmod 600"));
    let short = write_token(env.home_dir(), "short", 0o600);
    let out = env.run(&[
        "serve",
        "--listen",
        &addr,
        "--token-file",
        short.to_str().unwrap(),
    ]);
    assert!(assert_one_line_error(&out).contains("at least 16"));
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "a refused server must not listen"
    );
}

#[test]
fn api_tcp_requires_the_bearer_token() {
    let env = TestEnv::new();
    let token = "s3cret-token-0123456789";
    let file = write_token(env.home_dir(), token, 0o600);
    let addr = format!("127.0.0.1:{}", free_port());
    let _server = Server::start(
        &env,
        &["--listen", &addr, "--token-file", file.to_str().unwrap()],
    );
    let tcp = || std::net::TcpStream::connect(&addr).unwrap();
    let none = http(tcp(), "GET", "/v1/health", &[], None);
    none.assert_error(401);
    assert!(none.headers.contains("www-authenticate: Bearer"));
    let wrong = http(
        tcp(),
        "GET",
        "/v1/sandboxes",
        &[("Authorization", "Bearer s3cret-token-0123456780")],
        None,
    );
    wrong.assert_error(401);
    let bearer = format!("Bearer {token}");
    let right = http(
        tcp(),
        "GET",
        "/v1/health",
        &[("Authorization", &bearer)],
        None,
    );
    assert_eq!(right.status, 200);
    // The run endpoint is guarded too: no token, nothing runs.
    let run = http(
        tcp(),
        "POST",
        "/v1/run",
        &[],
        Some(br#"{"command":["touch","/workspace/ran"]}"#),
    );
    run.assert_error(401);
    assert!(!env.project_dir().join("ran").exists());
}

#[test]
fn api_errors_are_the_clis_messages() {
    let env = TestEnv::new();
    let server = Server::start(&env, &[]);
    // The CLI's own validation, word for word.
    let cli = env.run(&["run", "--profile", "bogus", "--", "true"]);
    let cli_line = assert_one_line_error(&cli);
    let api = server.json(
        "POST",
        "/v1/run",
        json!({"command": ["true"], "profile": "bogus"}),
    );
    let error = api.assert_error(400);
    let fix = api.json()["fix"].as_str().unwrap().to_string();
    assert_eq!(cli_line, format!("agentkernel: {error}; {fix}"));
    // A body the API cannot read, an unknown field, a bare env name.
    assert!(server
        .request("POST", "/v1/run", Some(b"{not json"))
        .assert_error(400)
        .contains("invalid request body"));
    assert!(server
        .json("POST", "/v1/run", json!({"comand": ["true"]}))
        .assert_error(400)
        .contains("unknown field `comand`"));
    assert!(server
        .json(
            "POST",
            "/v1/run",
            json!({"command": ["true"], "env": ["HOME"]})
        )
        .assert_error(400)
        .contains("KEY=VALUE"));
    // No command: clap's message, as the CLI gives it.
    assert!(server
        .json("POST", "/v1/run", json!({"command": []}))
        .assert_error(400)
        .contains("missing required argument"));
    // Sandboxes that do not exist, names that are flags, unknown endpoints.
    assert!(server
        .request("GET", "/v1/sandboxes/nothing-here", None)
        .assert_error(404)
        .contains("no sandbox named nothing-here"));
    server
        .json(
            "POST",
            "/v1/sandboxes/nothing-here/exec",
            json!({"command": ["true"]}),
        )
        .assert_error(404);
    assert!(server
        .request("GET", "/v1/sandboxes/--help", None)
        .assert_error(400)
        .contains("invalid sandbox name"));
    server.request("GET", "/v1/nowhere", None).assert_error(404);
    server.request("DELETE", "/v1/run", None).assert_error(405);
    // The description lists every endpoint.
    let doc = server.request("GET", "/v1/openapi.json", None).json();
    for path in [
        "/v1/run",
        "/v1/sandboxes",
        "/v1/sandboxes/{name}",
        "/v1/sandboxes/{name}/exec",
        "/v1/sandboxes/{name}/files/{path}",
        "/v1/health",
    ] {
        assert!(doc["paths"].get(path).is_some(), "openapi lacks {path}");
    }
    assert!(doc["components"]["schemas"]["RunOptions"]["properties"]["command"].is_object());
}

mod native_only {
    use super::*;

    #[test]
    fn api_run_streams_output_and_the_exit_code() {
        let env = TestEnv::new();
        let server = Server::start(&env, &[]);
        let response = server.json(
            "POST",
            "/v1/run",
            json!({
                "command": ["sh", "-c", "read line; echo \"out $line $V\"; echo err >&2; printf '\\377'; exit 3"],
                "image": BUSYBOX, "env": ["V=from-env"], "stdin": "from-stdin\n",
            }),
        );
        assert!(response.headers.contains("application/x-ndjson"));
        let events = response.events();
        assert_eq!(stream_text(&events, "stdout"), "out from-stdin from-env\n");
        assert_eq!(stream_text(&events, "stderr"), "err\n");
        assert!(
            events.iter().any(|e| e["data_base64"] == "/w=="),
            "non-UTF-8 output comes base64: {events:?}"
        );
        assert_eq!(exit_event(&events)["code"], 3);
        // agentkernel's own failure after the start is in the exit event.
        let timeout = server
            .json(
                "POST",
                "/v1/run",
                json!({"command": ["sleep", "5"], "image": BUSYBOX, "timeout": "1s"}),
            )
            .events();
        assert_eq!(exit_event(&timeout)["code"], 124);
        assert!(env.leftover_runs().is_empty());
    }

    #[test]
    fn api_kept_sandbox_lifecycle_and_files() {
        let env = TestEnv::new();
        let server = Server::start(&env, &[]);
        let name = unique_name("api").replace('_', "-");
        let _guard = KeptGuard::new(&name);
        let created = server.json(
            "POST",
            "/v1/sandboxes",
            json!({"name": name, "image": BUSYBOX}),
        );
        assert_eq!(
            created.status,
            201,
            "{}",
            String::from_utf8_lossy(&created.body)
        );
        assert_eq!(created.json()["name"], name.as_str());
        assert_eq!(created.json()["status"], "running");
        let clash = server.json(
            "POST",
            "/v1/sandboxes",
            json!({"name": name, "image": BUSYBOX}),
        );
        clash.assert_error(409);
        let list = server.request("GET", "/v1/sandboxes", None).json();
        assert!(list
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == name.as_str()));
        let info = server.request("GET", &format!("/v1/sandboxes/{name}"), None);
        assert_eq!(info.json()["backend"], "native");
        // `sandbox info --json` (the API's answer) has the fields docs/json.md lists.
        assert_eq!(keys(&info.json()), documented_fields("Sandbox"));
        let images = env.run(&["image", "list", "--json"]);
        assert_code(&images, 0);
        let images: Value = serde_json::from_slice(&images.stdout).unwrap();
        assert_eq!(keys(&images[0]), documented_fields("Image"));

        // Files go in and out through the sandbox, state kept between calls.
        let put = server.request(
            "PUT",
            &format!("/v1/sandboxes/{name}/files/tmp/note.txt"),
            Some(b"hello\x00\xffbytes"),
        );
        assert_eq!(put.status, 200, "{}", String::from_utf8_lossy(&put.body));
        assert_eq!(put.json()["bytes"], 12);
        let exec = server
            .json(
                "POST",
                &format!("/v1/sandboxes/{name}/exec"),
                json!({"command": ["wc", "-c", "/tmp/note.txt"]}),
            )
            .events();
        assert!(stream_text(&exec, "stdout").starts_with("12 "), "{exec:?}");
        assert_eq!(exit_event(&exec)["code"], 0);
        let got = server.request(
            "GET",
            &format!("/v1/sandboxes/{name}/files/tmp/note.txt"),
            None,
        );
        assert_eq!(got.status, 200);
        assert_eq!(got.body, b"hello\x00\xffbytes");
        server
            .request(
                "GET",
                &format!("/v1/sandboxes/{name}/files/tmp/missing"),
                None,
            )
            .assert_error(404);

        // Attack: a symlink in the sandbox to a host file, and `..` in the
        // path, must resolve inside the sandbox and never reach the host.
        let host_secret = env.home_dir().join("host-secret");
        std::fs::write(&host_secret, "HOST-ONLY-CONTENT").unwrap();
        let link = server
            .json(
                "POST",
                &format!("/v1/sandboxes/{name}/exec"),
                json!({"command": ["ln", "-s", host_secret.to_str().unwrap(), "/tmp/escape"]}),
            )
            .events();
        assert_eq!(exit_event(&link)["code"], 0);
        let through_link = server.request(
            "GET",
            &format!("/v1/sandboxes/{name}/files/tmp/escape"),
            None,
        );
        through_link.assert_error(404);
        let dotdot = format!(
            "/v1/sandboxes/{name}/files/../../../..{}",
            host_secret.display()
        );
        let through_dots = server.request("GET", &dotdot, None);
        through_dots.assert_error(404);
        // The link's target directory made inside the sandbox: a write
        // through the link lands there, in the sandbox's own file.
        let host_dir = host_secret.parent().unwrap().to_str().unwrap();
        let mkdir = server
            .json(
                "POST",
                &format!("/v1/sandboxes/{name}/exec"),
                json!({"command": ["mkdir", "-p", host_dir]}),
            )
            .events();
        assert_eq!(exit_event(&mkdir)["code"], 0);
        let write_link = server.request(
            "PUT",
            &format!("/v1/sandboxes/{name}/files/tmp/escape"),
            Some(b"overwritten"),
        );
        assert_eq!(
            write_link.status, 200,
            "writing through the link stays inside the sandbox"
        );
        assert_eq!(
            std::fs::read_to_string(&host_secret).unwrap(),
            "HOST-ONLY-CONTENT",
            "a write through a sandbox symlink reached the host"
        );
        let inside = server.request(
            "GET",
            &format!("/v1/sandboxes/{name}/files/tmp/escape"),
            None,
        );
        assert_eq!(inside.body, b"overwritten");

        let removed = server.request("DELETE", &format!("/v1/sandboxes/{name}"), None);
        assert_eq!(removed.status, 200);
        assert_eq!(removed.json()["removed"], name.as_str());
        server
            .request("GET", &format!("/v1/sandboxes/{name}"), None)
            .assert_error(404);
        assert!(!native_sandbox_exists(&name));
    }

    #[test]
    fn api_50_concurrent_runs_all_answered_nothing_leaked() {
        let env = TestEnv::new();
        let server = std::sync::Arc::new(Server::start(&env, &[]));
        let marker = unique_name("api-many");
        let clients: Vec<_> = (0..50)
            .map(|i| {
                let server = server.clone();
                let marker = marker.clone();
                std::thread::spawn(move || {
                    let events = server
                        .json(
                            "POST",
                            "/v1/run",
                            json!({"command": ["sh", "-c", "echo reply-$1; true", &marker, &i.to_string()], "image": BUSYBOX}),
                        )
                        .events();
                    (i, stream_text(&events, "stdout"), exit_event(&events)["code"].clone())
                })
            })
            .collect();
        for client in clients {
            let (i, stdout, code) = client.join().expect("a client thread panicked");
            assert_eq!(stdout, format!("reply-{i}\n"));
            assert_eq!(code, 0, "run {i}");
        }
        // Nothing left: no process carrying the marker (the sandboxed shells
        // keep it as $0), no scratch dirs, no kept sandboxes.
        poll_until(Duration::from_secs(60), "every run's clean-up", || {
            host_processes_with_arg(&marker).is_empty()
                && env.leftover_runs().is_empty()
                && std::fs::read_dir(env.state_dir().join("finished"))
                    .map(|d| d.count() == 0)
                    .unwrap_or(true)
        });
        assert_eq!(
            server.request("GET", "/v1/sandboxes", None).json(),
            json!([])
        );
        assert_eq!(
            children_of(server.child.id()),
            Vec::<u32>::new(),
            "the server kept CLI children (unreaped or still running)"
        );
    }

    /// PIDs whose parent is `pid` (zombies included).
    fn children_of(pid: u32) -> Vec<u32> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
                continue;
            };
            // The fields after the command's `(name)`: state, then ppid.
            let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
            if after.split_whitespace().nth(1) == Some(pid.to_string().as_str()) {
                out.push(child);
            }
        }
        out
    }

    #[test]
    fn api_client_gone_stops_the_run_and_cleans_up() {
        let env = TestEnv::new();
        let mut server = Server::start(&env, &[]);
        let marker = unique_name("api-gone");
        let body = json!({"command": ["sh", "-c", "echo started; sleep 300; true", &marker], "image": BUSYBOX})
            .to_string();
        let mut stream = UnixStream::connect(server.socket.as_ref().unwrap()).unwrap();
        write!(
            stream,
            "POST /v1/run HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("started") {
            let n = stream.read(&mut buf).unwrap();
            assert!(n > 0, "the stream ended early");
            seen.extend_from_slice(&buf[..n]);
        }
        assert!(!host_processes_with_arg(&marker).is_empty());
        drop(stream);
        poll_until(
            Duration::from_secs(30),
            "the abandoned run's clean-up",
            || host_processes_with_arg(&marker).is_empty() && env.leftover_runs().is_empty(),
        );
        // And the server lives on for the next client.
        assert_eq!(server.request("GET", "/v1/health", None).status, 200);
        assert!(server.stop().success());
    }
}

/// The field names docs/json.md lists in the table under `## {section}`.
fn documented_fields(section: &str) -> Vec<String> {
    let doc = std::fs::read_to_string(workspace_root().join("docs/json.md")).unwrap();
    let body = doc
        .split(&format!("## {section}"))
        .nth(1)
        .unwrap_or_else(|| panic!("docs/json.md has no section {section}"));
    let body = body.split("\n## ").next().unwrap();
    let mut fields: Vec<String> = body
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(String::from)
        .collect();
    fields.sort();
    fields
}

fn keys(value: &Value) -> Vec<String> {
    let mut keys: Vec<String> = value.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    keys
}
