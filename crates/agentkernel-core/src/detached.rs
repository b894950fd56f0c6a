//! Background agentkernel processes that must outlive the command that
//! starts them (pool refills, the expiry of a stopped sandbox, native's
//! disk keeper).

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

/// Starts `agentkernel ARGS` in its own session, with no stdio and the same
/// state directory, and does not wait for it. Failure to start is ignored: a
/// later command's garbage collection does the same work.
pub fn spawn(state_dir: &Path, args: &[&str]) {
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .env("AGENTKERNEL_HOME", state_dir)
        .current_dir("/");
    let _ = spawn_command(&mut cmd);
}

/// Starts `cmd` in its own session with no stdio, so it survives our exit
/// and never gets the user's Ctrl-C; does not wait for it. It starts with
/// no signal blocked, as from a shell, whatever the caller blocks (a
/// native sandbox's holder takes its signals through a signalfd).
pub fn spawn_command(cmd: &mut Command) -> std::io::Result<std::process::Child> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setsid, sigemptyset and sigprocmask are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            Ok(())
        });
    }
    cmd.spawn()
}
