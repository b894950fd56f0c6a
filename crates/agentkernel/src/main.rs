//! agentkernel: run any command in a throwaway, isolated sandbox.
//!
//! This binary is thin: clap types (`cli`), one module per command
//! (`commands/`), and the mapping of errors to exit code 125.

mod backend;
mod cli;
mod commands;
mod receipt;
mod ssh;

use std::io::Write;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::Parser;

/// agentkernel's own failures (the README's exit code table).
pub const EXIT_AGENTKERNEL_ERROR: i32 = agentkernel_core::exit::AGENTKERNEL_ERROR;

fn main() {
    // The native sandbox helper runs before clap and tokio: it must stay
    // single-threaded (it forks) and start as fast as possible.
    // args_os: any word may be non-UTF-8 (clap then says so), and args()
    // would panic on it.
    let mut args = std::env::args_os();
    if args
        .nth(1)
        .is_some_and(|a| a == agentkernel_native::HELPER_SUBCOMMAND)
    {
        agentkernel_native::trace::phase("helper started");
        let fd_arg = args.next().map(|a| a.to_string_lossy().into_owned());
        let report_fd = args.next().map(|a| a.to_string_lossy().into_owned());
        std::process::exit(agentkernel_native::helper::main(fd_arg, report_fd));
    }
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == agentkernel_native::egress::PROXY_SUBCOMMAND)
    {
        std::process::exit(commands::egress::proxy_main());
    }
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == agentkernel_vm::kept::HOLDER_SUBCOMMAND)
    {
        // A kept VM's holder: threads, no async runtime, no CLI.
        let args: Vec<String> = std::env::args().skip(2).collect();
        std::process::exit(agentkernel_vm::kept::holder_main(&args));
    }
    agentkernel_native::trace::phase("cli started");
    let cli = match cli::Cli::try_parse_run_alone(std::env::args_os()) {
        Some(cli) => cli,
        None => match cli::Cli::try_parse() {
            Ok(cli) => cli,
            Err(e) => std::process::exit(usage_error(e)),
        },
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    agentkernel_native::trace::phase("cli: arguments parsed, runtime built");
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
/// stderr with 125 (clap's default 2 would collide with commands' own codes),
/// naming what is wrong, the allowed values when there is a list, and the
/// help of the (sub)command that was being parsed.
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
            eprintln!("agentkernel: {}", usage_error_line(&e));
            EXIT_AGENTKERNEL_ERROR
        }
    }
}

fn usage_error_line(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let first = rendered.lines().next().unwrap_or("invalid arguments");
    let mut line = first
        .strip_prefix("error: ")
        .unwrap_or(first)
        .trim_end_matches(':')
        .to_string();
    let context = |kind| match e.get(kind) {
        Some(ContextValue::String(s)) => vec![s.clone()],
        Some(ContextValue::Strings(v)) => v.clone(),
        _ => Vec::new(),
    };
    if e.kind() == ErrorKind::MissingRequiredArgument {
        line = format!(
            "missing required argument {}",
            context(ContextKind::InvalidArg).join(", ")
        );
    }
    let valid = context(ContextKind::ValidValue);
    if !valid.is_empty() {
        line.push_str(&format!("; expected one of: {}", valid.join(", ")));
    }
    let suggested = [ContextKind::SuggestedArg, ContextKind::SuggestedSubcommand]
        .into_iter()
        .flat_map(context)
        .collect::<Vec<_>>();
    if let Some(suggestion) = suggested.first() {
        line.push_str(&format!(" (did you mean `{suggestion}`?)"));
    }
    // `-p` is --profile here, but docker users write it for ports.
    let arg = context(ContextKind::InvalidArg);
    let value = context(ContextKind::InvalidValue);
    if let (Some(arg), Some(value)) = (arg.first(), value.first()) {
        if arg.starts_with("--profile") && agentkernel_core::parse::port(value).is_ok() {
            line.push_str(&format!(
                " (did you mean `-P {value}`? -P publishes a port, -p is --profile)"
            ));
        }
    }
    let command = usage_command();
    line.push_str(&format!("; see `{command} --help`"));
    line
}

/// The (sub)command being parsed (`agentkernel run`, `agentkernel sandbox
/// info`): the subcommand names on the command line, down the tree.
fn usage_command() -> String {
    use clap::CommandFactory;
    let mut command = cli::Cli::command();
    let mut path = vec!["agentkernel".to_string()];
    // args_os: command words may be any bytes, and args() would panic on them.
    let args = std::env::args_os().skip(1);
    for arg in args.filter(|a| !a.to_string_lossy().starts_with('-')) {
        let Some(sub) = command.find_subcommand(&arg).cloned() else {
            break;
        };
        path.push(sub.get_name().to_string());
        command = sub;
    }
    path.join(" ")
}
