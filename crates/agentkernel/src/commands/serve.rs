//! `agentkernel serve`: the HTTP API (docs/api.md). JSON over HTTP/1 on a
//! unix socket in the state directory (mode 0600: only its owner gets in),
//! or on TCP with a bearer token. Each request runs this binary's CLI as a
//! child (see `cli_child`), so validation, messages and clean-up are the
//! CLI's own.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agentkernel_core::{names, Error, Result};
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use serde_json::{json, Value};
use tokio::sync::watch;

use super::cli_child::{self, CliError, CreateOptions, Event, ExecOptions, RunOptions};
use crate::cli::ServeArgs;

/// How long a streamed run may hold its response back to learn whether
/// agentkernel itself failed (then the answer is a 4xx/5xx `{error, fix}`):
/// until the command's first output, its exit, or this long.
const HOLD_BACK: Duration = Duration::from_millis(250);

/// The last stderr bytes kept to find agentkernel's message at exit.
const STDERR_TAIL: usize = 8 * 1024;

#[derive(Clone)]
struct Api {
    /// `Some` on TCP: every request must carry `Authorization: Bearer TOKEN`.
    token: Option<Arc<String>>,
    /// Turns true on SIGINT/SIGTERM: running children get SIGTERM.
    shutdown: watch::Receiver<bool>,
}

pub async fn serve(args: ServeArgs) -> Result<i32> {
    let token = match (&args.listen, &args.token_file) {
        (Some(_), None) => {
            return Err(Error::Conflict(
                "--listen needs --token-file FILE: a TCP port is open to every local user and process, so requests must carry a bearer token; put a long random token in a file only you can read (chmod 600) and pass it".into(),
            ))
        }
        (_, Some(file)) => Some(Arc::new(read_token(file)?)),
        (None, None) => None,
    };
    let (stop, shutdown) = watch::channel(false);
    let app = router(Api { token, shutdown });
    let stopping = async move {
        wait_for_signal().await;
        let _ = stop.send(true);
    };
    match &args.listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr.as_str())
                .await
                .map_err(|e| {
                    Error::Conflict(format!(
                        "cannot listen on {addr}: {e}; pick a free ADDR:PORT (e.g. 127.0.0.1:8880)"
                    ))
                })?;
            let local = listener.local_addr().map_err(|e| {
                Error::Conflict(format!("cannot listen on {addr}: {e}; pick another"))
            })?;
            eprintln!(
                "agentkernel: serving the HTTP API on http://{local} (bearer token required)"
            );
            axum::serve(listener, app)
                .with_graceful_shutdown(stopping)
                .await
                .map_err(|e| Error::Conflict(format!("the HTTP API on {local} failed: {e}")))?;
        }
        None => {
            let path = default_socket();
            let listener = bind_private_socket(&path).await?;
            eprintln!(
                "agentkernel: serving the HTTP API on unix socket {}",
                path.display()
            );
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(stopping)
                .await;
            let _ = std::fs::remove_file(&path);
            served
                .map_err(|e| Error::Conflict(format!("the HTTP API on {}: {e}", path.display())))?;
        }
    }
    Ok(0)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}

/// A bearer token from a file only its owner can read: a token others can
/// read is no secret, so it is refused rather than trusted.
fn read_token(file: &Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let shown = file.display();
    let meta = std::fs::metadata(file).map_err(|e| {
        Error::Conflict(format!(
            "--token-file {shown}: {e}; give a file holding the bearer token"
        ))
    })?;
    if meta.mode() & 0o077 != 0 {
        return Err(Error::Conflict(format!(
            "--token-file {shown} can be read by other users (mode {:o}); run `chmod 600 {shown}`",
            meta.mode() & 0o777
        )));
    }
    let text = std::fs::read_to_string(file).map_err(|e| {
        Error::Conflict(format!(
            "--token-file {shown}: {e}; give a readable UTF-8 file"
        ))
    })?;
    let token = text.trim();
    if token.len() < 16 || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::Conflict(format!(
            "--token-file {shown} must hold one token of at least 16 characters without spaces; e.g. `head -c 32 /dev/urandom | base64 > {shown}`"
        )));
    }
    Ok(token.to_string())
}

/// Binds the socket with mode 0600 from the start (umask), in the private
/// state directory; a socket left by a dead server is replaced, a live one
/// is not.
async fn bind_private_socket(path: &Path) -> Result<tokio::net::UnixListener> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    agentkernel_core::state::create_private_dir_all(dir).map_err(|e| Error::state(dir, e))?;
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(Error::Conflict(format!(
                "another `agentkernel serve` is listening on {}; use it, or stop it first",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(|e| Error::state(path, e))?;
    }
    // SAFETY: umask has no preconditions; nothing else creates files while
    // serve starts (one thread), and the old mask is put back at once.
    let old = unsafe { libc::umask(0o177) };
    let bound = tokio::net::UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    bound.map_err(|e| {
        Error::Conflict(format!(
            "cannot listen on {}: {e}; check the state directory (AGENTKERNEL_HOME, at most ~100 characters for a socket path)",
            path.display()
        ))
    })
}

fn router(api: Api) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/run", post(run))
        .route("/v1/sandboxes", get(list_sandboxes).post(create_sandbox))
        .route(
            "/v1/sandboxes/{name}",
            get(sandbox_info).delete(remove_sandbox),
        )
        .route("/v1/sandboxes/{name}/exec", post(exec))
        .route(
            "/v1/sandboxes/{name}/files/{*path}",
            get(read_file).put(write_file),
        )
        .fallback(no_endpoint)
        .method_not_allowed_fallback(wrong_method)
        .layer(middleware::from_fn_with_state(api.clone(), authorize))
        .with_state(api)
}

/// A failed request: `{error, fix}` with its status.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    error: String,
    fix: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, error: &str, fix: &str) -> ApiError {
        ApiError {
            status,
            error: error.to_string(),
            fix: Some(fix.to_string()),
        }
    }

    /// The CLI could not be started at all.
    fn spawn_failed(e: std::io::Error) -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot start agentkernel: {e}"),
            "check that the agentkernel binary the server was started from is still in place",
        )
    }

    /// A CLI child that did not exit 0: its own message, else its stderr.
    fn failed(out: &cli_child::Collected) -> ApiError {
        match CliError::from_exit(out.code, &out.stderr) {
            Some(e) => e.into(),
            None => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!(
                    "agentkernel exited {}: {}",
                    out.code,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                "see the server's documentation of this endpoint",
            ),
        }
    }
}

/// The CLI's message, with the status that fits it.
impl From<CliError> for ApiError {
    fn from(e: CliError) -> ApiError {
        ApiError {
            status: StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST),
            error: e.error,
            fix: e.fix,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": self.error, "fix": self.fix });
        (self.status, axum::Json(body)).into_response()
    }
}

type Answer = std::result::Result<Response, ApiError>;

/// Bearer token check on TCP, in constant time over the token's length.
async fn authorize(State(api): State<Api>, request: Request, next: Next) -> Response {
    if let Some(token) = &api.token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !same_secret(given.as_bytes(), token.as_bytes()) {
            let mut response = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token",
                "send `Authorization: Bearer TOKEN` with the token from the server's --token-file",
            )
            .into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("header"));
            return response;
        }
    }
    next.run(request).await
}

fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn no_endpoint(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        &format!("no endpoint {method} {}", uri.path()),
        "GET /v1/openapi.json lists the endpoints",
    )
}

async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("{} does not take {method}", uri.path()),
        "GET /v1/openapi.json lists each endpoint's methods",
    )
}

async fn health() -> Response {
    axum::Json(json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION") })).into_response()
}

async fn openapi() -> Response {
    axum::Json(super::openapi::document()).into_response()
}

/// A JSON body, or `{error, fix}` naming what is wrong with it.
fn parse_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> std::result::Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            &format!("invalid request body: {e}"),
            "send a JSON object with the fields GET /v1/openapi.json documents",
        )
    })
}

/// Names go into the CLI's argv: checked first, with the CLI's own rule,
/// so that no name is ever read as a flag.
fn checked_name(name: &str) -> std::result::Result<(), ApiError> {
    names::validate(name).map_err(|e| CliError::new(&e.to_string()).into())
}

/// A sandbox that has no record is answered 404 here, before a CLI starts:
/// left to the CLI, a loaded machine could take longer than [`HOLD_BACK`]
/// to say so, and the answer would be a 200 stream ending in the error.
fn known_sandbox(name: &str) -> std::result::Result<(), ApiError> {
    match agentkernel_core::state::Store::open_default().load(name) {
        Ok(None) => {
            let message = agentkernel_core::Error::NoSuchSandbox(name.to_string()).to_string();
            Err(CliError::new(&message).into())
        }
        // A record, or a store that cannot be read: the CLI says which.
        _ => Ok(()),
    }
}

async fn run(State(api): State<Api>, body: Bytes) -> Answer {
    let options: RunOptions = parse_body(&body)?;
    let stdin = options.stdin.clone().map(String::into_bytes);
    stream_cli(options.cli_args()?, stdin, &api).await
}

async fn exec(State(api): State<Api>, UrlPath(name): UrlPath<String>, body: Bytes) -> Answer {
    checked_name(&name)?;
    known_sandbox(&name)?;
    let options: ExecOptions = parse_body(&body)?;
    let stdin = options.stdin.clone().map(String::into_bytes);
    stream_cli(options.cli_args(&name)?, stdin, &api).await
}

/// Runs the CLI and streams its output as newline-delimited JSON events.
/// The response is held back until the first stdout bytes, the exit, or
/// [`HOLD_BACK`], so that agentkernel's own quick failures (bad option,
/// unknown sandbox) are answered with their 4xx/5xx status.
async fn stream_cli(args: Vec<std::ffi::OsString>, stdin: Option<Vec<u8>>, api: &Api) -> Answer {
    let mut events =
        cli_child::spawn(args, stdin, api.shutdown.clone()).map_err(ApiError::spawn_failed)?;
    let mut held = VecDeque::new();
    let mut stderr_seen = Vec::new();
    let hold = tokio::time::sleep(HOLD_BACK);
    tokio::pin!(hold);
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(Event::Exit(code)) => {
                    if let Some(e) = CliError::from_exit(code, &stderr_seen) {
                        return Err(e.into());
                    }
                    held.push_back(Event::Exit(code));
                    break;
                }
                Some(Event::Stderr(data)) => {
                    stderr_seen.extend_from_slice(&data);
                    held.push_back(Event::Stderr(data));
                }
                Some(stdout) => {
                    held.push_back(stdout);
                    break;
                }
                None => break,
            },
            _ = &mut hold => break,
        }
    }
    let state = (held, Some(events), EventEncoder::default());
    let stream =
        futures_util::stream::unfold(state, |(mut held, mut events, mut encoder)| async move {
            loop {
                let event = match held.pop_front() {
                    Some(e) => e,
                    None => events.as_mut()?.recv().await?,
                };
                if matches!(event, Event::Exit(_)) {
                    // The child has ended: nothing more will come.
                    events = None;
                }
                let line = encoder.encode(event);
                if !line.is_empty() {
                    return Some((
                        Ok::<_, Infallible>(Bytes::from(line)),
                        (held, events, encoder),
                    ));
                }
            }
        });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(stream))
        .expect("response"))
}

/// Turns output chunks into `{"type":"stdout","data":…}` lines: text when it
/// is UTF-8 (a character split across chunks waits for its rest), else
/// `data_base64`; the exit is `{"type":"exit","code":N}`, with `error` and
/// `fix` when agentkernel itself failed.
#[derive(Default)]
struct EventEncoder {
    stdout_pending: Vec<u8>,
    stderr_pending: Vec<u8>,
    stderr_tail: Vec<u8>,
}

impl EventEncoder {
    fn encode(&mut self, event: Event) -> Vec<u8> {
        let mut out = Vec::new();
        match event {
            Event::Stdout(data) => {
                chunk_line(&mut out, "stdout", &mut self.stdout_pending, &data, false)
            }
            Event::Stderr(data) => {
                self.stderr_tail.extend_from_slice(&data);
                let excess = self.stderr_tail.len().saturating_sub(STDERR_TAIL);
                self.stderr_tail.drain(..excess);
                chunk_line(&mut out, "stderr", &mut self.stderr_pending, &data, false)
            }
            Event::Exit(code) => {
                chunk_line(&mut out, "stdout", &mut self.stdout_pending, &[], true);
                chunk_line(&mut out, "stderr", &mut self.stderr_pending, &[], true);
                let mut exit = json!({ "type": "exit", "code": code });
                if let Some(e) = CliError::from_exit(code, &self.stderr_tail) {
                    exit["error"] = json!(e.error);
                    exit["fix"] = json!(e.fix);
                }
                push_line(&mut out, &exit);
            }
        }
        out
    }
}

fn chunk_line(out: &mut Vec<u8>, stream: &str, pending: &mut Vec<u8>, data: &[u8], last: bool) {
    pending.extend_from_slice(data);
    if pending.is_empty() {
        return;
    }
    let (whole, cut_character) = match std::str::from_utf8(pending) {
        Ok(_) => (pending.len(), false),
        Err(e) => (e.valid_up_to(), e.error_len().is_none()),
    };
    if whole > 0 {
        let text = std::str::from_utf8(&pending[..whole]).expect("valid prefix");
        push_line(out, &json!({ "type": stream, "data": text }));
        pending.drain(..whole);
    }
    // A character cut at the chunk's end waits for its rest; bytes that are
    // not UTF-8 go as base64, whatever follows them in this chunk.
    if pending.is_empty() || (cut_character && !last) {
        return;
    }
    let encoded = base64::engine::general_purpose::STANDARD.encode(&pending[..]);
    push_line(out, &json!({ "type": stream, "data_base64": encoded }));
    pending.clear();
}

fn push_line(out: &mut Vec<u8>, value: &Value) {
    serde_json::to_writer(&mut *out, value).expect("json");
    out.push(b'\n');
}

/// `agentkernel ARGS…` whose stdout is JSON: that JSON.
async fn cli_json(args: &[&str], api: &Api) -> std::result::Result<Value, ApiError> {
    let out = cli_collect(args, api).await?;
    if out.code != 0 {
        return Err(ApiError::failed(&out));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("agentkernel {} printed no JSON: {e}", args.join(" ")),
            "report this as a bug",
        )
    })
}

async fn cli_collect(
    args: &[&str],
    api: &Api,
) -> std::result::Result<cli_child::Collected, ApiError> {
    let words = args.iter().map(std::ffi::OsString::from).collect();
    cli_child::collect(words, None, api.shutdown.clone())
        .await
        .map_err(ApiError::spawn_failed)
}

async fn list_sandboxes(State(api): State<Api>) -> Answer {
    Ok(axum::Json(cli_json(&["sandbox", "list", "--json"], &api).await?).into_response())
}

async fn sandbox_info(State(api): State<Api>, UrlPath(name): UrlPath<String>) -> Answer {
    checked_name(&name)?;
    Ok(axum::Json(cli_json(&["sandbox", "info", &name, "--json"], &api).await?).into_response())
}

async fn create_sandbox(State(api): State<Api>, body: Bytes) -> Answer {
    let options: CreateOptions = parse_body(&body)?;
    let run = options.run_options();
    let name = run.name.clone().expect("named");
    let out = cli_child::collect(run.cli_args()?, None, api.shutdown.clone())
        .await
        .map_err(ApiError::spawn_failed)?;
    if out.code != 0 {
        return Err(ApiError::failed(&out));
    }
    let info = cli_json(&["sandbox", "info", &name, "--json"], &api).await?;
    Ok((StatusCode::CREATED, axum::Json(info)).into_response())
}

async fn remove_sandbox(State(api): State<Api>, UrlPath(name): UrlPath<String>) -> Answer {
    checked_name(&name)?;
    let out = cli_collect(&["sandbox", "remove", &name], &api).await?;
    if out.code != 0 {
        return Err(ApiError::failed(&out));
    }
    Ok(axum::Json(json!({ "removed": name })).into_response())
}

async fn read_file(
    State(api): State<Api>,
    UrlPath((name, path)): UrlPath<(String, String)>,
) -> Answer {
    checked_name(&name)?;
    let path = cli_child::sandbox_path(&path)?;
    let args = cli_child::read_file_args(&name, &path);
    let out = cli_child::collect(args, None, api.shutdown.clone())
        .await
        .map_err(ApiError::spawn_failed)?;
    if out.code != 0 {
        return Err(cli_child::file_error(&path, &out).into());
    }
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        out.stdout,
    )
        .into_response())
}

async fn write_file(
    State(api): State<Api>,
    UrlPath((name, path)): UrlPath<(String, String)>,
    body: Bytes,
) -> Answer {
    checked_name(&name)?;
    let path = cli_child::sandbox_path(&path)?;
    let size = body.len();
    let args = cli_child::write_file_args(&name, &path);
    let out = cli_child::collect(args, Some(body.to_vec()), api.shutdown.clone())
        .await
        .map_err(ApiError::spawn_failed)?;
    if out.code != 0 {
        return Err(cli_child::file_error(&path, &out).into());
    }
    Ok(axum::Json(json!({ "path": path, "bytes": size })).into_response())
}

/// Where `serve` listens without --listen.
fn default_socket() -> PathBuf {
    agentkernel_core::paths::state_dir().join("api.sock")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_characters_wait_for_their_rest_and_binary_is_base64() {
        let mut pending = Vec::new();
        let mut out = Vec::new();
        let e_acute = "é".as_bytes();
        chunk_line(&mut out, "stdout", &mut pending, &[b'a', e_acute[0]], false);
        chunk_line(&mut out, "stdout", &mut pending, &[e_acute[1]], false);
        chunk_line(
            &mut out,
            "stdout",
            &mut pending,
            &[b'b', 0xff, b'\n'],
            false,
        );
        let lines: Vec<Value> = out
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(lines[0]["data"], "a");
        assert_eq!(lines[1]["data"], "é");
        assert_eq!(lines[2]["data"], "b");
        assert_eq!(lines[3]["data_base64"], "/wo=");
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same_secret(b"abcdefgh", b"abcdefgh"));
        assert!(!same_secret(b"abcdefgx", b"abcdefgh"));
        assert!(!same_secret(b"abc", b"abcdefgh"));
    }
}
