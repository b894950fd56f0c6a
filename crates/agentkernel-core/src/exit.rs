//! How a run ends: agentkernel's own exit code, and the one stderr line
//! about an ending the command's code alone does not explain. Shared by the
//! CLI and the native sandbox helper (which exits with the command's code
//! itself).

use std::time::Duration;

use crate::parse::{format_bytes, format_duration};
use crate::spec::Outcome;

/// agentkernel's own failures (the README's exit code table).
pub const AGENTKERNEL_ERROR: i32 = 125;

/// Prints a message about how the command ended, when there is one to say, and
/// returns the exit code.
pub fn finish(outcome: Outcome, memory: Option<u64>, timeout: Option<Duration>) -> i32 {
    match outcome {
        Outcome::OutOfMemory => eprintln!(
            "agentkernel: the command was killed: out of memory (limit {}); raise it with --memory",
            memory.map(format_bytes).unwrap_or_else(|| "unknown".into())
        ),
        Outcome::TimedOut => eprintln!(
            "agentkernel: timed out after {}; the command and everything it started were killed",
            timeout.map(format_duration).unwrap_or_default()
        ),
        Outcome::Exited(_) => {}
    }
    outcome.exit_code()
}
