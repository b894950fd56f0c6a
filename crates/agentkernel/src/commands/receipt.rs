//! `agentkernel receipt key | verify | replay`.

use std::path::Path;

use agentkernel_core::config::Config;
use agentkernel_core::{parse, paths, Error, Result};
use ed25519_dalek::VerifyingKey;
use serde_json::{json, Value};

use crate::cli::ReceiptCommand;
use crate::receipt::{self, keys, verify};

/// `receipt verify`'s exit code when a check fails (125 stays agentkernel's own errors).
const EXIT_CHECK_FAILED: i32 = 1;

pub async fn receipt(cmd: ReceiptCommand) -> Result<i32> {
    match cmd {
        ReceiptCommand::Key { json } => key(json),
        ReceiptCommand::Verify { file, key, json } => verify_file(&file, &key, json),
        ReceiptCommand::Replay { file, env, key } => replay(&file, &env, &key),
    }
}

fn key(json: bool) -> Result<i32> {
    let public = keys::signing_key()?.verifying_key();
    let (encoded, id) = (keys::encode_public(&public), keys::key_id(&public));
    let text = if json {
        format!(
            "{:#}\n",
            json!({"algorithm": "ed25519", "public_key": encoded, "key_id": id})
        )
    } else {
        format!("{encoded} {id}\n")
    };
    super::print_stdout(text.as_bytes())?;
    Ok(0)
}

/// The signers `verify` accepts: this machine's key, `[receipts]
/// trusted_keys` of the user's and the system's config files (never a
/// project's: a cloned repository must not vouch for receipts), `--key`.
fn trusted_keys(flags: &[String]) -> Result<Vec<VerifyingKey>> {
    let mut trusted: Vec<VerifyingKey> = keys::local_public()?.into_iter().collect();
    let cwd = std::env::current_dir().unwrap_or_else(|_| "/".into());
    let config = Config::load(&cwd, None)?;
    let user_files = paths::user_config_files();
    for (source, spec) in &config.receipt_trusted_keys {
        if user_files.contains(source) {
            let dir = source.parent().unwrap_or(Path::new("/"));
            trusted.push(keys::parse_trusted(spec, dir)?);
        } else {
            eprintln!(
                "agentkernel: notice: {}: [receipts] trusted_keys is ignored in a project's file; put it in {}",
                source.display(),
                user_files.last().map(|f| f.display().to_string()).unwrap_or_default()
            );
        }
    }
    for spec in flags {
        trusted.push(keys::parse_trusted(spec, &cwd)?);
    }
    Ok(trusted)
}

fn read(file: &Path) -> Result<String> {
    std::fs::read_to_string(file).map_err(|e| {
        Error::invalid(
            "receipt",
            file.to_string_lossy(),
            format!("cannot read it ({e}); give the file --receipt wrote"),
        )
    })
}

fn verify_file(file: &Path, flags: &[String], as_json: bool) -> Result<i32> {
    let trusted = trusted_keys(flags)?;
    let report = verify::verify(&read(file)?, &trusted)?;
    let signer = report.key_id.clone().unwrap_or_else(|| "unknown".into());
    if as_json {
        let checks: serde_json::Map<String, Value> = report
            .checks
            .iter()
            .map(|(name, ok)| (name.to_string(), json!(ok)))
            .collect();
        let out = json!({
            "ok": report.ok(),
            "format": report.format.describe(),
            "version": report.receipt["version"],
            "key_id": report.key_id,
            "checks": checks,
            "error": report.failed,
        });
        super::print_stdout(format!("{out:#}\n").as_bytes())?;
    } else if report.ok() {
        super::print_stdout(
            format!(
                "{}: {}, signer {signer}: hash, signature and signer good\n",
                file.display(),
                report.format.describe()
            )
            .as_bytes(),
        )?;
    }
    match &report.failed {
        None => Ok(0),
        Some(why) => {
            if !as_json {
                eprintln!("agentkernel: {}: {why}", file.display());
            }
            Ok(EXIT_CHECK_FAILED)
        }
    }
}

/// Runs the receipt's command again with its image pinned by digest and
/// compares what the receipts say, item by item.
fn replay(file: &Path, env_flags: &[String], key_flags: &[String]) -> Result<i32> {
    let cannot =
        |why: String| Error::not_supported_hint(format!("replaying {}", file.display()), why);
    let trusted = trusted_keys(key_flags)?;
    let report = verify::verify(&read(file)?, &trusted)?;
    if let Some(failed) = report.failed {
        return Err(cannot(format!(
            "the receipt does not verify ({failed}); check it with `agentkernel receipt verify`"
        )));
    }
    if report.format == verify::Format::Upstream {
        return Err(cannot(
            "a version 1 (upstream) receipt names its image by tag, not digest; only receipts written by --receipt here replay".into(),
        ));
    }
    let old = report.receipt;
    let sandbox = &old["sandbox"];
    let reference = sandbox["image"]["reference"].as_str().unwrap_or_default();
    let image = match sandbox["image"]["digest"].as_str() {
        Some(d) if d.contains('@') || d.starts_with("sha256:") => d.to_string(),
        _ if reference == agentkernel_native::prepare::HOST_IMAGE => reference.to_string(),
        _ => return Err(cannot(
            "the receipt records no image digest to pin (agentkernel failed before resolving it)"
                .into(),
        )),
    };
    let backend = sandbox["backend"].as_str().unwrap_or_default();
    let argv: Vec<String> = serde_json::from_value(sandbox["argv"].clone()).unwrap_or_default();
    if argv.is_empty() {
        return Err(cannot("the receipt records no command".into()));
    }

    let mut given = std::collections::BTreeMap::new();
    for e in env_flags {
        let (k, v) = parse::env_pair(e)?;
        given.insert(k, v);
    }
    let mut mismatches = 0;
    let mut line = |item: String, matched: bool, detail: String| {
        if !matched {
            mismatches += 1;
        }
        eprintln!(
            "replay: {item}: {}{detail}",
            if matched { "match" } else { "mismatch" }
        );
    };
    let mut env_args = Vec::new();
    for var in sandbox["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().unwrap_or_default().to_string();
        let value = given
            .get(&name)
            .cloned()
            .or_else(|| std::env::var(&name).ok());
        match value {
            Some(v) => {
                let same =
                    receipt::sha256_hex(v.as_bytes()) == var["sha256"].as_str().unwrap_or_default();
                line(
                    format!("env {name}"),
                    same,
                    if same {
                        String::new()
                    } else {
                        " (the value's sha256 differs from the recorded one)".into()
                    },
                );
                env_args.push(format!("{name}={v}"));
            }
            None => line(
                format!("env {name}"),
                false,
                " (not set here; give it with -e)".into(),
            ),
        }
    }

    let dir = tempfile_dir()?;
    let new_file = dir.join("replay-receipt.json");
    let mut cmd = std::process::Command::new("/proc/self/exe");
    cmd.args([
        "run",
        "-B",
        backend,
        "--image",
        &image,
        "--fast=false",
        "--receipt",
    ])
    .arg(&new_file);
    if let Some(profile) = sandbox["profile"].as_str() {
        cmd.args(["--profile", profile]);
    }
    if sandbox["network"]["enabled"] == false {
        cmd.arg("--no-network");
    }
    if let Some(w) = sandbox["workdir"].as_str() {
        cmd.args(["-w", w]);
    }
    if let Some(t) = sandbox["timeout_secs"].as_f64() {
        cmd.arg("--timeout")
            .arg(format!("{}ms", (t * 1000.0).round() as u64));
    }
    for e in &env_args {
        cmd.args(["-e", e]);
    }
    cmd.arg("--").args(&argv);
    // The recorded project directory, when it is still here: the command
    // sees the same workspace path.
    if let Some(host) = sandbox["workspace"]["host"]
        .as_str()
        .filter(|h| Path::new(h).is_dir())
    {
        cmd.current_dir(host);
    }
    let status = cmd
        .status()
        .map_err(|e| Error::Conflict(format!("cannot start the replay: {e}")))?;
    let new: Value = std::fs::read(&new_file)
        .ok()
        .and_then(|d| serde_json::from_slice(&d).ok())
        .ok_or_else(|| cannot(format!("the replay wrote no receipt (it exited {status})")))?;
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(error) = new["outcome"]["error"].as_str() {
        return Err(cannot(format!("the replay failed: {error}")));
    }

    let mut compare = |item: &str, old: &Value, new: &Value| {
        let same = old == new;
        let detail = if same {
            format!(" ({old})")
        } else {
            format!(" (recorded {old}, now {new})")
        };
        line(item.to_string(), same, detail);
    };
    compare(
        "image",
        &sandbox["image"]["digest"],
        &new["sandbox"]["image"]["digest"],
    );
    compare(
        "policy",
        &sandbox["policy_sha256"],
        &new["sandbox"]["policy_sha256"],
    );
    // Copied in from the config the replay finds (the project's, in the
    // recorded directory): the same bytes at the same paths, or a mismatch.
    if sandbox["files"].as_array().is_some_and(|f| !f.is_empty()) {
        compare("[[files]]", &sandbox["files"], &new["sandbox"]["files"]);
    }
    compare(
        "ending",
        &old["outcome"]["ending"],
        &new["outcome"]["ending"],
    );
    compare(
        "exit status",
        &old["outcome"]["exit_code"],
        &new["outcome"]["exit_code"],
    );
    for stream in ["stdout", "stderr"] {
        compare(stream, &old["outcome"][stream], &new["outcome"][stream]);
    }
    compare(
        "output",
        &json!([
            old["outcome"]["output_sha256"],
            old["outcome"]["output_bytes"]
        ]),
        &json!([
            new["outcome"]["output_sha256"],
            new["outcome"]["output_bytes"]
        ]),
    );
    Ok(if mismatches == 0 {
        0
    } else {
        EXIT_CHECK_FAILED
    })
}

/// A private directory for the replay's own receipt.
fn tempfile_dir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "agentkernel-replay-{}-{}",
        std::process::id(),
        agentkernel_core::state::now_unix()
    ));
    std::fs::create_dir(&dir).map_err(|e| {
        Error::Conflict(format!(
            "cannot create {}: {e}; check TMPDIR",
            dir.display()
        ))
    })?;
    Ok(dir)
}
