//! Start-up phases on stderr, for finding where a run's milliseconds go:
//! with `AGENTKERNEL_TRACE_STARTUP=1`, each process of a run (the CLI, the
//! helper, init, the command) prints `agentkernel-trace <µs> <phase>` as it
//! passes a phase, on the monotonic clock, so lines from different processes
//! compare. `bench/startup.py` turns many runs into a median timeline.
//! Off (the default), a phase costs one relaxed atomic load.

use std::sync::atomic::{AtomicU8, Ordering};

const UNKNOWN: u8 = 0;
const OFF: u8 = 1;
const ON: u8 = 2;

static STATE: AtomicU8 = AtomicU8::new(UNKNOWN);

/// Whether tracing is on (`AGENTKERNEL_TRACE_STARTUP=1`).
pub fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        OFF => false,
        ON => true,
        _ => {
            let on = std::env::var_os("AGENTKERNEL_TRACE_STARTUP").is_some_and(|v| v == "1");
            STATE.store(if on { ON } else { OFF }, Ordering::Relaxed);
            on
        }
    }
}

/// Marks that this process has reached `name`.
pub fn phase(name: &str) {
    if !enabled() {
        return;
    }
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the struct we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let micros = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000;
    // One write per line: lines from concurrent processes do not interleave.
    let line = format!("agentkernel-trace {micros} {name}\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
}
