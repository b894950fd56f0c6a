//! `agentkernel mcp` with a real MCP client: the official Python SDK
//! (`mcp`, installed by scripts/setup.sh into /opt/agentkernel-pytools)
//! runs tests/mcp_client.py, which lists the tools, calls each one, a
//! failing command and bad arguments.
//!
//! In `native_only`: the MCP server is backend-neutral (each tool call runs
//! the CLI), so one backend proves the protocol side; native is the fast one.

mod common;

use common::*;

/// The venv scripts/setup.sh fills (shared with other Python test tools).
const PYTHON: &str = "/opt/agentkernel-pytools/bin/python";

mod native_only {
    use super::*;

    #[test]
    fn mcp_python_sdk_client_calls_every_tool() {
        let env = TestEnv::new();
        assert!(
            std::path::Path::new(PYTHON).exists(),
            "{PYTHON} is missing: run scripts/setup.sh (it installs the MCP Python SDK)"
        );
        let name = unique_name("mcp");
        let _guard = KeptGuard::new(&name);
        let script = workspace_root().join("crates/agentkernel/tests/mcp_client.py");
        let mut cmd = std::process::Command::new(PYTHON);
        env.configure(&mut cmd);
        let out = cmd
            .arg(script)
            .arg(binary())
            .arg(BUSYBOX)
            .arg(&name)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let printed = stdout(&out);
        assert!(
            out.status.success(),
            "the MCP client failed:\n{printed}\n{}",
            stderr(&out)
        );
        for check in [
            "initialize",
            "list_tools",
            "run_command",
            "failing command",
            "bad arguments",
            "create_sandbox",
            "list_sandboxes",
            "write_file",
            "exec",
            "read_file",
            "remove_sandbox",
        ] {
            assert!(
                printed.contains(&format!("AKMCP ok {check}\n")),
                "check {check} did not pass:\n{printed}"
            );
        }
        assert!(env.leftover_runs().is_empty());
        assert!(!native_sandbox_exists(&name));
    }
}
