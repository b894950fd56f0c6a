//! How the SSH server runs a command in its sandbox: as `agentkernel exec`
//! would. On native the server starts the sandbox helper itself — the
//! process `agentkernel exec` turns into (it execs the helper with the plan
//! built here the same way, `agentkernel_native::helper`) — which saves that
//! `exec` process's start-up on every session and SFTP operation. The helper
//! then enters the sandbox's namespaces and cgroup and runs the command as
//! the sandbox's user, with its env, workdir and policy: the same plan, so
//! nothing about the command differs. Docker and Podman sandboxes get a
//! child `agentkernel exec`.

use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::OnceLock;

use agentkernel_core::backend::BackendKind;
use agentkernel_core::spec::ExecRequest;
use agentkernel_core::state::Store;

/// The sandbox a server serves.
pub struct Sandbox {
    pub name: String,
    exe: PathBuf,
    backend: OnceLock<BackendKind>,
}

impl Sandbox {
    pub fn new(name: String, exe: PathBuf) -> Sandbox {
        Sandbox {
            name,
            exe,
            backend: OnceLock::new(),
        }
    }

    /// Its backend, from its record (cached once it exists).
    pub fn backend(&self, store: &Store) -> Option<BackendKind> {
        if let Some(kind) = self.backend.get() {
            return Some(*kind);
        }
        let kind = store.load(&self.name).ok().flatten()?.backend;
        Some(*self.backend.get_or_init(|| kind))
    }

    /// ARGV in the sandbox with ENV added, as `agentkernel exec [-e K=V…]
    /// NAME -- ARGV` would run it; TTY: the command gets a terminal of the
    /// sandbox's own, bridged to the child's stdin/stdout (which must then
    /// be a terminal). The child gets SIGHUP when the server ends.
    pub fn command(
        &self,
        env: &[(String, String)],
        argv: &[String],
        tty: bool,
    ) -> io::Result<SandboxCommand> {
        let store = Store::open_default();
        let (mut command, plan) = match self.backend(&store) {
            Some(BackendKind::Native) => {
                let (command, plan) = self.native_helper(&store, env, argv, tty)?;
                (tokio::process::Command::from(command), Some(plan))
            }
            _ => (self.exec_child(env, argv), None),
        };
        command.kill_on_drop(true);
        // SAFETY: prctl only, between fork and exec.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGHUP as libc::c_ulong);
                Ok(())
            });
        }
        Ok(SandboxCommand { command, plan })
    }

    /// What `agentkernel exec` checks and builds before it execs the helper:
    /// the names of ENV, that the sandbox is native and not stopped, and the
    /// kept sandbox's plan with this command.
    fn native_helper(
        &self,
        store: &Store,
        env: &[(String, String)],
        argv: &[String],
        tty: bool,
    ) -> io::Result<(std::process::Command, OwnedFd)> {
        let refused = |e: agentkernel_core::Error| io::Error::other(e.to_string());
        let env = env
            .iter()
            .map(|(k, v)| agentkernel_core::parse::env_pair(&format!("{k}={v}")))
            .collect::<agentkernel_core::Result<Vec<_>>>()
            .map_err(refused)?;
        if env.iter().any(|(_, v)| v.contains('\0')) || argv.iter().any(|a| a.contains('\0')) {
            return Err(io::Error::other("a NUL byte in the command or environment"));
        }
        crate::commands::sandbox_lifecycle::refuse_if_stopped(store, &self.name)
            .map_err(refused)?;
        let request = ExecRequest {
            argv: argv.to_vec(),
            env,
            workdir: None,
            tty,
            timeout: None,
            user: None,
        };
        agentkernel_native::helper::exec_command(store, &self.name, &request).map_err(refused)
    }

    fn exec_child(&self, env: &[(String, String)], argv: &[String]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(&self.exe);
        command.arg("exec");
        for (k, v) in env {
            command.arg("-e").arg(format!("{k}={v}"));
        }
        command.arg(&self.name).arg("--").args(argv);
        command
    }
}

/// A command ready to start in the sandbox: set its stdio, then spawn it.
pub struct SandboxCommand {
    pub command: tokio::process::Command,
    /// The native helper's plan, inherited by the child: closed here once
    /// it is started.
    plan: Option<OwnedFd>,
}

impl SandboxCommand {
    pub fn spawn(mut self) -> io::Result<tokio::process::Child> {
        let child = self.command.spawn();
        drop(self.plan.take());
        child
    }
}
