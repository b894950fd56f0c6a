//! Signed execution receipts (`--receipt FILE`): what ran, where, on which
//! image (by digest), under which policy, how it ended and what it wrote,
//! signed with ed25519 over the RFC 8785 (JCS) form of the payload. See
//! docs/receipts.md for every field.

pub mod dsse;
pub mod keys;
pub mod verify;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use agentkernel_core::observe::{self, Observed};
use agentkernel_core::spec::{Outcome, SandboxSpec};
use agentkernel_core::{Error, Result};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::Signer;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// This format's `version`; upstream's receipts are version 1.
pub const VERSION: u64 = 2;
/// Fields of the file that are not the signed payload.
pub const UNSIGNED_FIELDS: [&str; 2] = ["payload_hash_sha256", "signature"];

/// `--receipt FILE [--receipt-format dsse]`.
#[derive(Debug, Clone)]
pub struct Request {
    pub path: PathBuf,
    pub dsse: bool,
}

/// The facts known before the command runs: what was asked for.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// "run" or "exec".
    pub mode: &'static str,
    pub backend: String,
    /// The kept sandbox's name, if any.
    pub name: Option<String>,
    pub fast: bool,
    /// The sandbox's own facts (image, policy, mounts of the spec…), the
    /// same for every command in a kept sandbox.
    pub sandbox: Value,
    pub argv: Vec<String>,
    pub workdir: Option<String>,
    pub env: Vec<(String, String)>,
    pub timeout_secs: Option<f64>,
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The RFC 8785 canonical bytes of a JSON value.
pub fn canonical(value: &Value) -> Result<Vec<u8>> {
    serde_jcs::to_vec(value).map_err(|e| Error::Conflict(format!("cannot canonicalise JSON: {e}")))
}

/// The part of a receipt that is the same for every command run in one
/// sandbox: image, profile and policy, mounts, ports, network, secrets.
pub fn sandbox_facts(spec: &SandboxSpec, backend: &str) -> Result<Value> {
    let policy = serde_json::to_value(&spec.policy)
        .map_err(|e| Error::Conflict(format!("cannot encode the policy: {e}")))?;
    let egress = spec.egress.clone().unwrap_or_default();
    Ok(json!({
        "backend": backend,
        "image": {"reference": spec.image, "digest": Value::Null},
        "profile": spec.policy.profile.as_str(),
        "policy_sha256": sha256_hex(&canonical(&policy)?),
        "policy": policy,
        "network": {
            "enabled": spec.policy.network,
            "allow_hosts": egress.allow_hosts.iter().map(|h| match h.port {
                Some(p) => format!("{}:{p}", h.host),
                None => h.host.clone(),
            }).collect::<Vec<_>>(),
        },
        "secrets": egress.bindings.iter().map(|b| json!({"name": b.key, "host": b.host})).collect::<Vec<_>>(),
        "template": match &spec.template {
            Some(t) => json!({"name": t.name, "location": t.location, "sha256": t.sha256, "commit": t.commit}),
            None => json!({"name": Value::Null, "sha256": Value::Null}),
        },
        "ports": spec.ports.iter().map(|p| json!({
            "host_ip": p.host_ip, "host_port": p.host_port,
            "container_port": p.container_port, "protocol": p.protocol.as_str(),
        })).collect::<Vec<_>>(),
        "workspace": spec.workspace.as_ref().map(|w| json!({
            "host": w.host, "path": w.path_in_sandbox, "mode": spec.policy.workspace,
        })),
        "volumes": spec.volumes.iter().map(|v| json!({
            "host": v.host, "path": v.container, "read_only": v.read_only,
        })).collect::<Vec<_>>(),
        "keep": spec.keep.as_ref().map(|k| json!({"name": k.name, "ttl_secs": k.ttl.as_secs()})),
        "egress": Value::Null,
    }))
}

/// `[[files]]` copied into the sandbox: `[{dest, mode, sha256}]` (the
/// content only as its digest, like env values).
pub fn files_facts(files: &[agentkernel_core::files::InjectedFile]) -> Value {
    files
        .iter()
        .map(|f| json!({"dest": f.dest, "mode": format!("{:04o}", f.mode), "sha256": sha256_hex(&f.content)}))
        .collect()
}

impl Invocation {
    pub fn for_run(spec: &SandboxSpec, backend: &str, fast: bool) -> Result<Invocation> {
        Ok(Invocation {
            mode: "run",
            backend: backend.to_string(),
            name: spec.keep.as_ref().map(|k| k.name.clone()),
            fast,
            sandbox: sandbox_facts(spec, backend)?,
            argv: spec.exec.argv.clone(),
            workdir: spec.exec.workdir.clone(),
            env: spec.exec.env.clone(),
            timeout_secs: spec.exec.timeout.map(|t| t.as_secs_f64()),
        })
    }
}

/// When the sandbox was requested; collects what backends observe.
pub struct Recording {
    request: Request,
    invocation: Invocation,
    started_at: SystemTime,
}

impl Recording {
    pub fn start(request: Request, invocation: Invocation) -> Recording {
        observe::enable();
        Recording {
            request,
            invocation,
            started_at: SystemTime::now(),
        }
    }

    /// Writes the receipt for how the run went (`result` is the run's own
    /// result, passed through). A receipt that cannot be written is an
    /// error of its own, after the command's.
    pub fn finish(self, result: Result<i32>) -> Result<i32> {
        let ended_at = SystemTime::now();
        let observed = observe::take().unwrap_or_default();
        let error = result.as_ref().err().map(|e| e.to_string());
        match self.write(observed, ended_at, error) {
            Ok(()) => result,
            Err(e) => {
                if let Err(run) = &result {
                    eprintln!("agentkernel: {run}");
                }
                Err(e)
            }
        }
    }

    fn write(self, observed: Observed, ended_at: SystemTime, error: Option<String>) -> Result<()> {
        let key = keys::signing_key()?;
        let payload = self.payload(observed, ended_at, error)?;
        if let (Some(name), "run") = (&self.invocation.name, self.invocation.mode) {
            // A kept sandbox: later `exec --receipt`s sign the same facts
            // (but each its own command's egress).
            let store = agentkernel_core::state::Store::open_default();
            if store.sandbox_dir(name).is_dir() {
                let mut facts = payload["sandbox"].clone();
                facts["egress"] = Value::Null;
                let _ = write_atomically(&facts_file(&store, name), &pretty(&facts)?);
            }
        }
        let receipt = sign(payload, &key)?;
        write_atomically(&self.request.path, &pretty(&receipt)?)?;
        if self.request.dsse {
            let envelope = dsse::envelope(&receipt, &key)?;
            write_atomically(&dsse::path_for(&self.request.path), &pretty(&envelope)?)?;
        }
        Ok(())
    }

    fn payload(
        &self,
        observed: Observed,
        ended_at: SystemTime,
        error: Option<String>,
    ) -> Result<Value> {
        let inv = &self.invocation;
        let image_digest = observed.image_digest.clone();
        let egress = observed.egress.clone().unwrap_or(Value::Null);
        let outcome = if error.is_some() {
            None
        } else {
            observed.outcome
        };
        let output = observed.digests();
        let stream = |d: &agentkernel_core::spec::StreamDigest| json!({"sha256": d.sha256, "bytes": d.bytes});
        let (ending, exit_code) = match outcome {
            None => ("error", None),
            Some(Outcome::TimedOut) => ("timeout", Some(124)),
            Some(Outcome::OutOfMemory) => ("oom", Some(137)),
            Some(o) if o.signal().is_some() => ("signal", Some(o.exit_code())),
            Some(o) => ("exited", Some(o.exit_code())),
        };
        let duration = ended_at.duration_since(self.started_at).unwrap_or_default();
        let mut sandbox = inv.sandbox.clone();
        if image_digest.is_some() {
            sandbox["image"]["digest"] = json!(image_digest);
        }
        sandbox["agentkernel_version"] = json!(env!("CARGO_PKG_VERSION"));
        sandbox["argv"] = json!(inv.argv);
        sandbox["workdir"] = json!(inv.workdir);
        sandbox["env"] = json!(inv
            .env
            .iter()
            .map(|(k, v)| json!({"name": k, "sha256": sha256_hex(v.as_bytes())}))
            .collect::<Vec<_>>());
        sandbox["timeout_secs"] = json!(inv.timeout_secs);
        sandbox["egress"] = egress;
        let no_network = !sandbox["network"]["enabled"].as_bool().unwrap_or(false);
        Ok(json!({
            "version": VERSION,
            "receipt_id": uuid::Uuid::now_v7().to_string(),
            "recorded_at": rfc3339(ended_at),
            "invocation": {
                "mode": inv.mode,
                "input": {
                    "command": inv.argv,
                    "image": sandbox["image"]["reference"],
                    "backend": inv.backend,
                    "profile": sandbox["profile"],
                    "no_network": no_network,
                    "fast": inv.fast,
                    "keep": inv.name.is_some(),
                    "name": inv.name,
                    "env": inv.env.iter().map(|(k, _)| k).collect::<Vec<_>>(),
                    "workdir": inv.workdir,
                },
            },
            "outcome": {
                "exit_code": exit_code,
                "success": exit_code == Some(0),
                "output_sha256": output.combined.sha256,
                "output_bytes": output.combined.bytes,
                "error": error,
                "ending": ending,
                "signal": outcome.and_then(Outcome::signal),
                "stdout": stream(&output.stdout),
                "stderr": stream(&output.stderr),
                "started_at": rfc3339(self.started_at),
                "ended_at": rfc3339(ended_at),
                "duration_ms": duration.as_millis() as u64,
            },
            "sandbox": sandbox,
        }))
    }
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Adds the payload's hash and the signature over its canonical bytes.
pub fn sign(payload: Value, key: &ed25519_dalek::SigningKey) -> Result<Value> {
    let bytes = canonical(&payload)?;
    let signature = key.sign(&bytes);
    let public = key.verifying_key();
    let mut receipt = payload;
    receipt["payload_hash_sha256"] = json!(sha256_hex(&bytes));
    receipt["signature"] = json!({
        "algorithm": "ed25519",
        "canonicalization": "RFC8785",
        "key_id": keys::key_id(&public),
        "public_key": keys::encode_public(&public),
        "signature": BASE64.encode(signature.to_bytes()),
    });
    Ok(receipt)
}

fn pretty(value: &Value) -> Result<Vec<u8>> {
    let mut text = serde_json::to_vec_pretty(value)
        .map_err(|e| Error::Conflict(format!("cannot encode the receipt: {e}")))?;
    text.push(b'\n');
    Ok(text)
}

/// Never half a file: a private temporary file beside it, then a rename.
pub fn write_atomically(path: &Path, data: &[u8]) -> Result<()> {
    let fail = |e: std::io::Error| {
        Error::invalid(
            "--receipt",
            path.to_string_lossy(),
            format!("cannot write it ({e}); choose a writable place"),
        )
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = std::fs::File::create(&temp)
        .and_then(|mut f| {
            f.write_all(data)?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&temp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result.map_err(fail)
}

/// Where a kept sandbox's facts are kept for the receipts of later `exec`s.
fn facts_file(store: &agentkernel_core::state::Store, name: &str) -> PathBuf {
    store.sandbox_dir(name).join("receipt-sandbox.json")
}

impl Invocation {
    /// `exec NAME`: the sandbox's facts as recorded when `run --receipt`
    /// created it; else what its record says (no policy digest: the
    /// resolved policy was not kept).
    pub fn for_exec(
        store: &agentkernel_core::state::Store,
        record: &agentkernel_core::state::SandboxRecord,
        request: &agentkernel_core::spec::ExecRequest,
    ) -> Invocation {
        let sandbox = std::fs::read(facts_file(store, &record.name))
            .ok()
            .and_then(|data| serde_json::from_slice(&data).ok())
            .unwrap_or_else(|| {
                json!({
                    "backend": record.backend,
                    "image": {"reference": record.image, "digest": Value::Null},
                    "profile": record.profile,
                    "policy_sha256": Value::Null,
                    "policy": Value::Null,
                    "network": Value::Null,
                    "secrets": [],
                    "template": {"name": Value::Null, "sha256": Value::Null},
                    "ports": [],
                    "workspace": record.workspace.as_ref().map(|w| json!({"host": w})),
                    "volumes": [],
                    "keep": {"name": record.name, "ttl_secs": record.ttl_secs},
                    "egress": Value::Null,
                })
            });
        Invocation {
            mode: "exec",
            backend: record.backend.to_string(),
            name: Some(record.name.clone()),
            fast: false,
            sandbox,
            argv: request.argv.clone(),
            workdir: request.workdir.clone(),
            env: request.env.clone(),
            timeout_secs: request.timeout.map(|t| t.as_secs_f64()),
        }
    }
}
