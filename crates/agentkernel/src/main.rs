//! agentkernel: run any command in a throwaway, isolated sandbox.
//!
//! This binary is thin: clap types (`cli`), one module per command
//! (`commands/`), and the mapping of errors to exit code 125.

mod backend;
mod cli;
mod commands;

use std::io::Write;

use clap::error::ErrorKind;
use clap::Parser;

/// agentkernel's own failures (SPEC.md exit codes).
pub const EXIT_AGENTKERNEL_ERROR: i32 = 125;

fn main() {
    // The native sandbox helper runs before clap and tokio: it must stay
    // single-threaded (it forks) and start as fast as possible.
    let mut args = std::env::args();
    if args.nth(1).as_deref() == Some(agentkernel_native::HELPER_SUBCOMMAND) {
        agentkernel_native::trace::phase("helper started");
        std::process::exit(commands::native::helper(args.next()));
    }
    agentkernel_native::trace::phase("cli started");
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => std::process::exit(usage_error(e)),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = match runtime.block_on(commands::dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("agentkernel: {}", one_line(&e.to_string()));
            EXIT_AGENTKERNEL_ERROR
        }
    };
    let _ = std::io::stdout().flush();
    // Exit without dropping the runtime: a blocking read of our stdin (forwarded
    // to the sandbox) may still be pending and would otherwise hold us here.
    std::process::exit(code);
}

/// An error is one line on stderr, whatever a value in it contains (a newline
/// in an `-e` name, say): control characters are shown escaped.
fn one_line(message: &str) -> String {
    message
        .chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Help and version go to stdout with 0; every usage error is one line on
/// stderr with 125 (clap's default 2 would collide with commands' own codes).
fn usage_error(e: clap::Error) -> i32 {
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            0
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand | ErrorKind::MissingSubcommand => {
            let _ = e.print();
            EXIT_AGENTKERNEL_ERROR
        }
        _ => {
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("agentkernel: {first}; see `agentkernel --help`");
            EXIT_AGENTKERNEL_ERROR
        }
    }
}
