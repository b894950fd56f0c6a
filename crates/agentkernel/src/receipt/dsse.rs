//! `--receipt-format dsse`: the receipt's facts as an in-toto Statement v1
//! in a DSSE envelope, signed with the same key, so standard tooling
//! (in-toto, securesystemslib, sigstore) verifies it.

use std::path::{Path, PathBuf};

use agentkernel_core::{Error, Result};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::Signer;
use serde_json::{json, Value};

pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
pub const PREDICATE_TYPE: &str = "https://agentkernel.dev/receipt/v2";

/// Where the envelope goes: beside the receipt.
pub fn path_for(receipt: &Path) -> PathBuf {
    let mut name = receipt.as_os_str().to_owned();
    name.push(".dsse.json");
    PathBuf::from(name)
}

/// DSSE's pre-authentication encoding: what is actually signed.
pub fn pae(payload_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {payload_type} {} ",
        payload_type.len(),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// The statement: the command's output streams are its subjects; the
/// predicate is the signed receipt itself.
pub fn statement(receipt: &Value) -> Value {
    let outcome = &receipt["outcome"];
    let subject = |name: &str, digest: &Value| json!({"name": name, "digest": {"sha256": digest}});
    json!({
        "_type": STATEMENT_TYPE,
        "subject": [
            subject("stdout", &outcome["stdout"]["sha256"]),
            subject("stderr", &outcome["stderr"]["sha256"]),
            subject("output", &outcome["output_sha256"]),
        ],
        "predicateType": PREDICATE_TYPE,
        "predicate": receipt,
    })
}

pub fn envelope(receipt: &Value, key: &ed25519_dalek::SigningKey) -> Result<Value> {
    let body = super::canonical(&statement(receipt))?;
    let signature = key.sign(&pae(PAYLOAD_TYPE, &body));
    Ok(json!({
        "payloadType": PAYLOAD_TYPE,
        "payload": BASE64.encode(&body),
        "signatures": [{
            "keyid": super::keys::key_id(&key.verifying_key()),
            "sig": BASE64.encode(signature.to_bytes()),
        }],
    }))
}

/// The envelope's payload bytes and its one signature, for `receipt verify`.
pub fn open(envelope: &Value) -> Result<(Vec<u8>, String, Vec<u8>)> {
    let bad = |why: &str| Error::Conflict(format!("not a DSSE envelope this verifies: {why}"));
    if envelope["payloadType"] != PAYLOAD_TYPE {
        return Err(bad("payloadType is not in-toto"));
    }
    let body = envelope["payload"]
        .as_str()
        .and_then(|p| BASE64.decode(p).ok())
        .ok_or_else(|| bad("payload is not base64"))?;
    let signature = &envelope["signatures"][0];
    let keyid = signature["keyid"].as_str().unwrap_or_default().to_string();
    let sig = signature["sig"]
        .as_str()
        .and_then(|s| BASE64.decode(s).ok())
        .ok_or_else(|| bad("signature is not base64"))?;
    Ok((body, keyid, sig))
}
