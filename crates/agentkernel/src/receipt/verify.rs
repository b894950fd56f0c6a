//! `receipt verify`: the payload's hash, the signature, and whether the
//! signer is one we trust — three checks, each named when it fails.

use agentkernel_core::{Error, Result};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::{Signature, VerifyingKey};
use serde_json::Value;

use super::{canonical, dsse, keys, sha256_hex, UNSIGNED_FIELDS};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Ours, version 2.
    Current,
    /// Upstream's version 1.
    Upstream,
    /// A DSSE envelope (`--receipt-format dsse`).
    Dsse,
}

impl Format {
    pub fn describe(self) -> &'static str {
        match self {
            Format::Current => "version 2",
            Format::Upstream => "version 1 (upstream)",
            Format::Dsse => "DSSE envelope (in-toto Statement v1)",
        }
    }
}

/// What verification found. `failed` names the first check that failed.
#[derive(Debug)]
pub struct Report {
    pub format: Format,
    pub key_id: Option<String>,
    pub checks: Vec<(&'static str, bool)>,
    pub failed: Option<String>,
    /// The receipt (the predicate of a DSSE statement).
    pub receipt: Value,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.failed.is_none()
    }
}

/// Verifies `text` against the trusted keys.
pub fn verify(text: &str, trusted: &[VerifyingKey]) -> Result<Report> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        Error::Conflict(format!(
            "the file is not JSON ({e}); give a receipt written by --receipt"
        ))
    })?;
    if value.get("payloadType").is_some() {
        return verify_dsse(value, trusted);
    }
    let format = match value["version"].as_u64() {
        Some(1) => Format::Upstream,
        Some(super::VERSION) => Format::Current,
        _ => {
            return Err(Error::Conflict(
                "the file is not a receipt this verifies (version 1 or 2, or a DSSE envelope); give a receipt written by --receipt".into(),
            ))
        }
    };
    let payload = match format {
        Format::Upstream => upstream_payload(text)?,
        _ => {
            let mut payload = value.clone();
            if let Some(map) = payload.as_object_mut() {
                for field in UNSIGNED_FIELDS {
                    map.remove(field);
                }
            }
            canonical(&payload)?
        }
    };
    let mut report = Report {
        format,
        key_id: value["signature"]["key_id"].as_str().map(str::to_string),
        checks: Vec::new(),
        failed: None,
        receipt: value.clone(),
    };
    let hash_ok = value["payload_hash_sha256"].as_str() == Some(sha256_hex(&payload).as_str());
    if !report.check(
        "hash",
        hash_ok,
        "the payload's sha256 is not payload_hash_sha256: the receipt was changed",
    ) {
        return Ok(report);
    }
    let sig = &value["signature"];
    let public = sig["public_key"].as_str().and_then(keys::decode_public);
    let signature = sig["signature"].as_str().and_then(decode_signature);
    let algorithm_ok = sig["algorithm"] == "ed25519";
    let (Some(public), Some(signature), true) = (public, signature, algorithm_ok) else {
        report.check(
            "signature",
            false,
            "the signature block is missing or malformed",
        );
        return Ok(report);
    };
    let id_ok = report.key_id.as_deref() == Some(keys::key_id(&public).as_str());
    let valid = id_ok && public.verify_strict(&payload, &signature).is_ok();
    if !report.check(
        "signature",
        valid,
        "the ed25519 signature does not match the payload and key",
    ) {
        return Ok(report);
    }
    signer_check(&mut report, &public, trusted);
    Ok(report)
}

impl Report {
    fn check(&mut self, name: &'static str, ok: bool, why: &str) -> bool {
        self.checks.push((name, ok));
        if !ok && self.failed.is_none() {
            self.failed = Some(format!("{name} check failed: {why}"));
        }
        ok
    }
}

fn decode_signature(text: &str) -> Option<Signature> {
    let bytes: [u8; 64] = BASE64.decode(text).ok()?.try_into().ok()?;
    Some(Signature::from_bytes(&bytes))
}

fn signer_check(report: &mut Report, public: &VerifyingKey, trusted: &[VerifyingKey]) {
    let id = keys::key_id(public);
    let why = format!(
        "signature valid but key {id} is not trusted; add it with `--key FILE` or to [receipts] trusted_keys in your config (public key {})",
        keys::encode_public(public)
    );
    if !report.check("signer", trusted.contains(public), &why) {
        report.failed = Some(why);
    }
}

fn verify_dsse(envelope: Value, trusted: &[VerifyingKey]) -> Result<Report> {
    let (body, keyid, sig) = dsse::open(&envelope)?;
    let statement: Value = serde_json::from_slice(&body)
        .map_err(|e| Error::Conflict(format!("the DSSE payload is not JSON: {e}")))?;
    let receipt = statement["predicate"].clone();
    let mut report = Report {
        format: Format::Dsse,
        key_id: Some(keyid.clone()),
        checks: Vec::new(),
        failed: None,
        receipt: receipt.clone(),
    };
    // The envelope signs the statement; the statement carries the signed
    // receipt, whose own hash and signature must hold too.
    let inner = verify(&receipt.to_string(), trusted)?;
    if inner.checks.iter().take(2).any(|(_, ok)| !ok) || inner.checks.len() < 2 {
        report.failed = Some(format!(
            "in the statement's receipt: {}",
            inner.failed.unwrap_or_default()
        ));
        report.checks = inner.checks;
        return Ok(report);
    }
    report.checks.push(("hash", true));
    let public = receipt["signature"]["public_key"]
        .as_str()
        .and_then(keys::decode_public);
    let signature = <[u8; 64]>::try_from(sig.as_slice())
        .ok()
        .map(|b| Signature::from_bytes(&b));
    let valid = match (public, signature) {
        (Some(public), Some(signature)) => {
            keys::key_id(&public) == keyid
                && public
                    .verify_strict(&dsse::pae(dsse::PAYLOAD_TYPE, &body), &signature)
                    .is_ok()
        }
        _ => false,
    };
    if !report.check(
        "signature",
        valid,
        "the envelope's ed25519 signature does not match its payload and key",
    ) {
        return Ok(report);
    }
    if let Some(public) = public {
        signer_check(&mut report, &public, trusted);
    }
    Ok(report)
}

/// Upstream's payload bytes: `serde_json` (compact) of the file's first five
/// fields in file order. The file was written by serde_json, so dropping the
/// whitespace outside strings gives back exactly those bytes.
pub fn upstream_payload(text: &str) -> Result<Vec<u8>> {
    let compact = minify(text);
    let members = top_level_members(&compact).ok_or_else(|| {
        Error::Conflict("the receipt is not a JSON object; give a receipt file".into())
    })?;
    if members.len() < 5 {
        return Err(Error::Conflict(
            "a version 1 receipt has at least five fields; the file is cut short".into(),
        ));
    }
    Ok(format!("{{{}}}", members[..5].join(",")).into_bytes())
}

fn minify(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in text.chars() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if !c.is_whitespace() {
            if c == '"' {
                in_string = true;
            }
            out.push(c);
        }
    }
    out
}

/// `"key":value` texts of a compact JSON object's own members.
fn top_level_members(compact: &str) -> Option<Vec<&str>> {
    let inner = compact.strip_prefix('{')?.strip_suffix('}')?;
    let mut members = Vec::new();
    let (mut depth, mut in_string, mut escaped, mut start) = (0i32, false, false, 0);
    for (i, c) in inner.char_indices() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' | '[' => depth += 1,
            '}' | ']' => depth -= 1,
            ',' if depth == 0 => {
                members.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if !inner.is_empty() {
        members.push(&inner[start..]);
    }
    Some(members)
}

#[cfg(test)]
mod tests {
    #[test]
    fn upstream_payload_is_the_first_five_fields_compact() {
        let text = "{\n  \"version\": 1,\n  \"a\": \"x y\\\" ,}\",\n  \"b\": [1, {\"c\": 2}],\n  \"d\": null,\n  \"e\": {\"f\": true},\n  \"payload_hash_sha256\": \"h\"\n}";
        let bytes = super::upstream_payload(text).unwrap();
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            r#"{"version":1,"a":"x y\" ,}","b":[1,{"c":2}],"d":null,"e":{"f":true}}"#
        );
    }
}
