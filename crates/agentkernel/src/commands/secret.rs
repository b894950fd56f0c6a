//! `agentkernel secret set | list | rm`: the vault (core `vault.rs`). No
//! command prints a value.

use std::io::Read;

use agentkernel_core::config::Config;
use agentkernel_core::egress::{EgressSpec, SecretValues};
use agentkernel_core::secrets;
use agentkernel_core::vault::{validate_key_name, Vault};
use agentkernel_core::{terminal, Error, Result};
use zeroize::Zeroizing;

use crate::cli::SecretCommand;

pub fn secret(cmd: SecretCommand) -> Result<i32> {
    // Creates the state root private, or closes one left readable, as
    // every command does.
    agentkernel_core::state::Store::open_default();
    let vault = Vault::open_default();
    match cmd {
        SecretCommand::Set { key, value } => {
            validate_key_name("secret name", &key)?;
            let value = match value {
                Some(v) => Zeroizing::new(v),
                None => read_value(&key)?,
            };
            if value.is_empty() {
                return Err(Error::invalid(
                    "secret value",
                    "",
                    "it is empty; give the value as an argument or on stdin",
                ));
            }
            vault.set(&key, &value)?;
            eprintln!("agentkernel: secret {key} set");
            Ok(0)
        }
        SecretCommand::Get { .. } => Err(Error::Conflict(
            "agentkernel never prints a secret's value; use it in a sandbox with -S KEY:HOST or --secret-file KEY".into(),
        )),
        SecretCommand::List { json } => list(&vault, json),
        SecretCommand::Rm { key } => {
            validate_key_name("secret name", &key)?;
            if !vault.remove(&key)? {
                return Err(Error::invalid(
                    "secret name",
                    key,
                    "no such secret in the vault; `agentkernel secret list` shows them",
                ));
            }
            eprintln!("agentkernel: secret {key} removed");
            Ok(0)
        }
    }
}

/// The value from stdin, every trailing newline dropped (`echo` and heredocs
/// add one). On a terminal, echo is off while it is typed.
fn read_value(key: &str) -> Result<Zeroizing<String>> {
    let mut value = Zeroizing::new(String::new());
    let read_err = |e: std::io::Error| {
        Error::Conflict(format!(
            "cannot read the value of {key} from stdin: {e}; give it as text on stdin or as an argument"
        ))
    };
    if terminal::is_tty(0) {
        // Echo goes off before the prompt appears: input typed (or pasted)
        // the moment the prompt shows must not be echoed.
        let _quiet = NoEcho::new(0);
        eprint!("Value for {key} (not shown): ");
        std::io::stdin().read_line(&mut value).map_err(read_err)?;
        eprintln!();
    } else {
        std::io::stdin()
            .read_to_string(&mut value)
            .map_err(read_err)?;
    }
    let kept = value.trim_end_matches(['\n', '\r']).len();
    value.truncate(kept);
    Ok(value)
}

/// Terminal echo off until dropped.
struct NoEcho {
    fd: i32,
    saved: Option<libc::termios>,
}

impl NoEcho {
    fn new(fd: i32) -> NoEcho {
        // SAFETY: termios is plain data; tcgetattr fills it or fails.
        let saved = unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            (libc::tcgetattr(fd, &mut t) == 0).then_some(t)
        };
        if let Some(mut quiet) = saved {
            quiet.c_lflag &= !libc::ECHO;
            // SAFETY: a termios tcgetattr returned, with one flag cleared.
            unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) };
        }
        NoEcho { fd, saved }
    }
}

impl Drop for NoEcho {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            // SAFETY: restores what tcgetattr returned.
            unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, saved) };
        }
    }
}

/// Names, when set, and the hosts the config files bind each to; keys the
/// config binds that the vault lacks are listed as not set.
fn list(vault: &Vault, json: bool) -> Result<i32> {
    let entries = vault.entries()?;
    let cwd = std::env::current_dir().unwrap_or_else(|_| "/".into());
    let config = Config::load(&cwd, None)?;
    let hosts = |key: &str| -> Vec<String> {
        config
            .secret_bindings
            .iter()
            .filter(|b| b.key == key)
            .map(|b| b.host.clone())
            .collect()
    };
    let mut names: Vec<&str> = entries.keys().map(String::as_str).collect();
    for b in &config.secret_bindings {
        if !names.contains(&b.key.as_str()) {
            names.push(&b.key);
        }
    }
    if json {
        let rows: Vec<serde_json::Value> = names
            .iter()
            .map(|name| {
                serde_json::json!({
                    "name": name,
                    "stored": entries.contains_key(*name),
                    "set_unix": entries.get(*name).map(|e| e.set_unix),
                    "hosts": hosts(name),
                })
            })
            .collect();
        super::print_stdout(format!("{:#}\n", serde_json::Value::from(rows)).as_bytes())?;
        return Ok(0);
    }
    let mut out = String::from("NAME\tSET\tHOSTS\n");
    for name in names {
        let set = match entries.get(name) {
            Some(e) => format!(
                "{} ago",
                agentkernel_core::parse::format_duration(std::time::Duration::from_secs(
                    agentkernel_core::state::now_unix().saturating_sub(e.set_unix)
                ))
            ),
            None => "not in the vault".into(),
        };
        let hosts = hosts(name);
        let hosts = if hosts.is_empty() {
            "-".to_string()
        } else {
            hosts.join(",")
        };
        out.push_str(&format!("{name}\t{set}\t{hosts}\n"));
    }
    super::print_stdout(out.as_bytes())?;
    Ok(0)
}

/// `run`'s `-S`, `--secret-file`, `--placeholder-secrets` and `[secrets]`:
/// the egress plan for the spec (`None`: nothing to start) and the values
/// for the run path. Bound keys' variables in `env` get their placeholders.
pub(crate) fn for_run(
    request: &secrets::Request,
    env: &mut Vec<(String, String)>,
) -> Result<(Option<EgressSpec>, SecretValues)> {
    Ok(
        match secrets::resolve(request, &Vault::open_default(), env)? {
            Some((egress, values)) => (Some(egress), values),
            None => (None, SecretValues::default()),
        },
    )
}
