//! `exec --detach`: the command starts in the sandbox and `exec` returns at
//! once with 0. A background `agentkernel exec` (its own session, stdio on
//! /dev/null) runs it exactly as a foreground `exec` would, so it keeps the
//! sandbox's deadline moving while the command runs and `sandbox stop` or
//! `remove` ends it like any other command.

use std::process::Command;

use agentkernel_core::spec::ExecRequest;
use agentkernel_core::{Error, Result};

pub fn detach(name: &str, req: &ExecRequest) -> Result<i32> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::Conflict(format!("cannot find agentkernel's own binary: {e}")))?;
    let mut cmd = Command::new(exe);
    cmd.arg("exec");
    // Values travel in the environment, never on a command line others can read.
    for (key, value) in &req.env {
        cmd.env(key, value).arg("-e").arg(key);
    }
    if let Some(workdir) = &req.workdir {
        cmd.arg("-w").arg(workdir);
    }
    if let Some(timeout) = req.timeout {
        cmd.arg("--timeout")
            .arg(format!("{}s", timeout.as_secs().max(1)));
    }
    if req.user.is_some() {
        cmd.arg("--sudo");
    }
    cmd.arg(name).arg("--").args(&req.argv);
    let child = agentkernel_core::detached::spawn_command(&mut cmd)
        .map_err(|e| Error::Conflict(format!("cannot start the detached command: {e}")))?;
    eprintln!(
        "agentkernel: started in {name} (detached, host pid {}); `agentkernel sandbox stop {name}` ends it",
        child.id()
    );
    Ok(0)
}
