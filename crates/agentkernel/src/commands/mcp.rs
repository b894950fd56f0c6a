//! `agentkernel mcp`: a Model Context Protocol server on stdin/stdout
//! (docs/mcp.md), with the official Rust SDK. Like `serve`, each tool call
//! runs this binary's CLI as a child (`cli_child`): same validation, same
//! one-line messages, same clean-up.

use std::ffi::OsString;

use agentkernel_core::{names, Error, Result};
use base64::Engine as _;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, Implementation, ServerCapabilities, ServerConfig};
use rmcp::{tool, tool_handler, tool_router, ErrorData, ServerHandler, ServiceExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::watch;

use super::cli_child::{self, CliError, Collected, CreateOptions, ExecOptions, RunOptions};

pub async fn mcp() -> Result<i32> {
    let (stop, shutdown) = watch::channel(false);
    let server = Tools {
        tool_router: Tools::tool_router(),
        shutdown,
    };
    let running = server.serve(rmcp::transport::stdio()).await.map_err(|e| {
        Error::Conflict(format!(
            "MCP session could not start: {e}; the client must speak MCP on our stdin/stdout"
        ))
    })?;
    let ended = running.waiting().await;
    // The client is gone: commands still running get SIGTERM and clean up.
    let _ = stop.send(true);
    ended.map_err(|e| Error::Conflict(format!("MCP session failed: {e}")))?;
    Ok(0)
}

#[derive(Clone)]
struct Tools {
    tool_router: ToolRouter<Tools>,
    shutdown: watch::Receiver<bool>,
}

/// `exec`'s input: the sandbox and `agentkernel exec`'s options.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct ExecInput {
    /// The kept sandbox's name, as list_sandboxes shows it.
    name: String,
    /// The command and its arguments (at least one word).
    command: Vec<String>,
    /// Environment variables as KEY=VALUE.
    #[serde(default)]
    env: Vec<String>,
    /// Working directory inside the sandbox (absolute).
    workdir: Option<String>,
    /// Kill the command and everything it started after this long (e.g. 30s); exit 124.
    timeout: Option<String>,
    /// Text given to the command on its standard input.
    stdin: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct SandboxName {
    /// The kept sandbox's name, as list_sandboxes shows it.
    name: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct ReadFileInput {
    /// The kept sandbox's name.
    name: String,
    /// The file's absolute path inside the sandbox (resolved there: symlinks cannot lead out).
    path: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct WriteFileInput {
    /// The kept sandbox's name.
    name: String,
    /// The file's absolute path inside the sandbox; created or replaced.
    path: String,
    /// The file's new content (text).
    content: String,
}

/// An MCP error carrying the CLI's one-line message (and its fix as data).
fn mcp_error(e: &CliError) -> ErrorData {
    let data = Some(json!({ "error": e.error, "fix": e.fix }));
    if e.status() >= 500 {
        ErrorData::internal_error(e.message.clone(), data)
    } else {
        ErrorData::invalid_params(e.message.clone(), data)
    }
}

fn name_checked(name: &str) -> std::result::Result<(), ErrorData> {
    names::validate(name).map_err(|e| mcp_error(&CliError::new(&e.to_string())))
}

impl Tools {
    async fn cli(
        &self,
        args: Vec<OsString>,
        stdin: Option<Vec<u8>>,
    ) -> std::result::Result<Collected, ErrorData> {
        cli_child::collect(args, stdin, self.shutdown.clone())
            .await
            .map_err(|e| ErrorData::internal_error(format!("cannot start agentkernel: {e}"), None))
    }

    /// A command's result: its exit code and output; agentkernel's own
    /// failure (exit 125 with its message) is an MCP error instead.
    fn command_result(out: Collected) -> std::result::Result<CallToolResult, ErrorData> {
        if let Some(e) = CliError::from_exit(out.code, &out.stderr) {
            return Err(mcp_error(&e));
        }
        let mut result = CallToolResult::structured(json!({
            "exit_code": out.code,
            "stdout": String::from_utf8_lossy(&out.stdout),
            "stderr": String::from_utf8_lossy(&out.stderr),
        }));
        result.is_error = Some(out.code != 0);
        Ok(result)
    }

    /// A CLI call that must exit 0, and what it printed as JSON (or Null).
    async fn cli_ok(&self, args: &[&str]) -> std::result::Result<Value, ErrorData> {
        let out = self
            .cli(args.iter().map(OsString::from).collect(), None)
            .await?;
        if out.code != 0 {
            return Err(failure(&out));
        }
        Ok(serde_json::from_slice(&out.stdout).unwrap_or(Value::Null))
    }
}

fn failure(out: &Collected) -> ErrorData {
    match CliError::from_exit(out.code, &out.stderr) {
        Some(e) => mcp_error(&e),
        None => ErrorData::internal_error(
            format!(
                "agentkernel exited {}: {}",
                out.code,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            None,
        ),
    }
}

#[tool_router]
impl Tools {
    #[tool(
        description = "Run a command in a fresh, isolated sandbox that is removed afterwards (`agentkernel run`). Returns exit_code, stdout and stderr; a non-zero exit marks the result as an error. agentkernel's own failures (bad option, missing image) are MCP errors with its one-line message."
    )]
    async fn run_command(
        &self,
        Parameters(options): Parameters<RunOptions>,
    ) -> std::result::Result<CallToolResult, ErrorData> {
        let stdin = options.stdin.clone().map(String::into_bytes);
        let args = options.cli_args().map_err(|e| mcp_error(&e))?;
        Self::command_result(self.cli(args, stdin).await?)
    }

    #[tool(
        description = "Create a kept sandbox (`agentkernel run --keep`) for later exec, read_file and write_file calls. Returns the sandbox as `sandbox info --json` shows it, with its name."
    )]
    async fn create_sandbox(
        &self,
        Parameters(options): Parameters<CreateOptions>,
    ) -> std::result::Result<CallToolResult, ErrorData> {
        let run = options.run_options();
        let name = run.name.clone().expect("named");
        let args = run.cli_args().map_err(|e| mcp_error(&e))?;
        let out = self.cli(args, None).await?;
        if out.code != 0 {
            return Err(failure(&out));
        }
        let info = self.cli_ok(&["sandbox", "info", &name, "--json"]).await?;
        Ok(CallToolResult::structured(info))
    }

    #[tool(
        description = "Run a command in a kept sandbox (`agentkernel exec`). Returns exit_code, stdout and stderr; a non-zero exit marks the result as an error."
    )]
    async fn exec(
        &self,
        Parameters(input): Parameters<ExecInput>,
    ) -> std::result::Result<CallToolResult, ErrorData> {
        name_checked(&input.name)?;
        let options = ExecOptions {
            command: input.command,
            env: input.env,
            workdir: input.workdir,
            timeout: input.timeout,
            stdin: input.stdin,
        };
        let stdin = options.stdin.clone().map(String::into_bytes);
        let args = options.cli_args(&input.name).map_err(|e| mcp_error(&e))?;
        Self::command_result(self.cli(args, stdin).await?)
    }

    #[tool(
        description = "List the kept sandboxes (`agentkernel sandbox list --json`): name, backend, status, image, profile, expiry."
    )]
    async fn list_sandboxes(&self) -> std::result::Result<CallToolResult, ErrorData> {
        let list = self.cli_ok(&["sandbox", "list", "--json"]).await?;
        Ok(CallToolResult::structured(json!({ "sandboxes": list })))
    }

    #[tool(
        description = "Remove a kept sandbox and everything in it (`agentkernel sandbox remove`)."
    )]
    async fn remove_sandbox(
        &self,
        Parameters(SandboxName { name }): Parameters<SandboxName>,
    ) -> std::result::Result<CallToolResult, ErrorData> {
        name_checked(&name)?;
        self.cli_ok(&["sandbox", "remove", &name]).await?;
        Ok(CallToolResult::structured(json!({ "removed": name })))
    }

    #[tool(
        description = "Read a file inside a kept sandbox. The path is resolved inside the sandbox, never on the host. Returns `content` (text), or `content_base64` when the file is not UTF-8."
    )]
    async fn read_file(
        &self,
        Parameters(ReadFileInput { name, path }): Parameters<ReadFileInput>,
    ) -> std::result::Result<CallToolResult, ErrorData> {
        name_checked(&name)?;
        let path = cli_child::sandbox_path(&path).map_err(|e| mcp_error(&e))?;
        let out = self
            .cli(cli_child::read_file_args(&name, &path), None)
            .await?;
        if out.code != 0 {
            return Err(mcp_error(&cli_child::file_error(&path, &out)));
        }
        let body = match String::from_utf8(out.stdout) {
            Ok(text) => json!({ "path": path, "content": text }),
            Err(e) => json!({
                "path": path,
                "content_base64": base64::engine::general_purpose::STANDARD.encode(e.as_bytes()),
            }),
        };
        Ok(CallToolResult::structured(body))
    }

    #[tool(
        description = "Write (create or replace) a text file inside a kept sandbox. The path is resolved inside the sandbox, never on the host."
    )]
    async fn write_file(
        &self,
        Parameters(WriteFileInput {
            name,
            path,
            content,
        }): Parameters<WriteFileInput>,
    ) -> std::result::Result<CallToolResult, ErrorData> {
        name_checked(&name)?;
        let path = cli_child::sandbox_path(&path).map_err(|e| mcp_error(&e))?;
        let size = content.len();
        let args = cli_child::write_file_args(&name, &path);
        let out = self.cli(args, Some(content.into_bytes())).await?;
        if out.code != 0 {
            return Err(mcp_error(&cli_child::file_error(&path, &out)));
        }
        Ok(CallToolResult::structured(
            json!({ "path": path, "bytes": size }),
        ))
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Tools {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("agentkernel", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "Run commands in throwaway, isolated sandboxes (agentkernel). run_command for one-off commands; create_sandbox, then exec/read_file/write_file, then remove_sandbox for a sandbox that keeps its state.",
            )
    }
}
