//! One module per command.

mod cli_child;
mod doctor;
pub mod egress;
mod exec;
mod exec_detach;
mod image;
mod image_build;
mod init;
mod mcp;
mod openapi;
mod pool;
pub mod qemu;
pub mod qemu_kept;
pub mod qemu_pool;
mod receipt;
mod run;
mod sandbox;
mod sandbox_cp;
mod sandbox_create;
pub(crate) mod sandbox_lifecycle;
mod secret;
mod serve;
mod template;
mod trust;

use agentkernel_core::{Error, Result};
use clap::CommandFactory;

use crate::cli::{Cli, Command};

/// Runs a parsed command line; `Ok` carries the process exit code.
pub async fn dispatch(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Run(args) => run::run(*args).await,
        Command::Exec(args) => exec::exec(args).await,
        Command::Attach { env, name } => {
            exec::exec(crate::cli::ExecArgs {
                env,
                workdir: None,
                timeout: None,
                sudo: false,
                detach: false,
                receipt: None,
                receipt_format: None,
                name,
                command: vec!["/bin/sh".into()],
            })
            .await
        }
        Command::Sandbox(cmd) => sandbox::sandbox(cmd).await,
        Command::Init(args) => init::init(args),
        Command::Trust(args) => trust::trust(args),
        Command::Doctor { json } => doctor::doctor(json).await,
        Command::Pool(cmd) => pool::pool(cmd).await,
        Command::Serve(args) => serve::serve(args).await,
        Command::Mcp => mcp::mcp().await,
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "agentkernel", &mut script);
            print_stdout(&script)?;
            Ok(0)
        }
        Command::Receipt(cmd) => receipt::receipt(cmd).await,
        Command::Image(cmd) => image::image(cmd).await,
        Command::Template(cmd) => template::template(cmd).await,
        Command::Secret(cmd) => secret::secret(cmd),
        Command::Ssh(args) if args.config => {
            print_stdout(crate::ssh::config_block(&args.name)?.as_bytes())?;
            Ok(0)
        }
        Command::Ssh(args) => crate::ssh::connect(&args.name, &args.command),
        Command::SshConfig { name } => {
            print_stdout(crate::ssh::config_block(&name)?.as_bytes())?;
            Ok(0)
        }
        Command::SshServer { name, creator } => Ok(crate::ssh::server::serve(name, creator).await),
    }
}

/// Command words must be UTF-8: the Engine API carries them as JSON strings.
pub(crate) fn utf8_command(words: Vec<std::ffi::OsString>) -> Result<Vec<String>> {
    words
        .into_iter()
        .map(|w| {
            w.into_string().map_err(|w| {
                Error::invalid(
                    "command argument",
                    w.to_string_lossy(),
                    "is not valid UTF-8, which the Docker API cannot carry",
                )
            })
        })
        .collect()
}

/// A TTY is given when both our stdin and stdout are terminals, as `docker run -it` would give one.
pub(crate) fn wants_tty() -> bool {
    agentkernel_core::terminal::is_tty(0) && agentkernel_core::terminal::is_tty(1)
}

/// Records how the command ended for a receipt, prints a message about it
/// when there is one to say, and returns the exit code.
pub(crate) fn finish(
    outcome: agentkernel_core::spec::Outcome,
    memory: Option<u64>,
    timeout: Option<std::time::Duration>,
) -> i32 {
    agentkernel_core::observe::outcome(outcome);
    agentkernel_core::exit::finish(outcome, memory, timeout)
}

/// Writes a command's output to stdout. A reader that stopped reading
/// (`| head -1`) is not an error: the rest is simply not wanted.
pub(crate) fn print_stdout(data: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(data).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Error::Conflict(format!(
            "cannot write to standard output: {e}; check where it is redirected"
        ))),
        _ => Ok(()),
    }
}

pub(crate) use agentkernel_core::parse::counted;
