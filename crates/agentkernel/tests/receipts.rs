//! Signed execution receipts (docs/receipts.md): `--receipt` on run and exec,
//! `receipt key | verify | replay`, on every backend.

#[macro_use]
mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use common::*;
use ed25519_dalek::{Signer, SigningKey};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("no receipt at {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// `run --receipt FILE ARGS…` in the test's project dir; returns the output and FILE.
fn run_with_receipt(env: &TestEnv, file: &str, args: &[&str]) -> (Output, PathBuf) {
    let path = env.project_dir().join(file);
    let mut full = vec!["run", "--receipt", path.to_str().unwrap()];
    full.extend_from_slice(args);
    (env.run(&full), path)
}

fn verify(env: &TestEnv, file: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["receipt", "verify", file.to_str().unwrap()];
    args.extend_from_slice(extra);
    env.run(&args)
}

fn fresh_key() -> SigningKey {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).unwrap();
    SigningKey::from_bytes(&seed)
}

fn key_id(key: &SigningKey) -> String {
    sha256_hex(key.verifying_key().as_bytes())[..16].to_string()
}

/// Re-signs a (changed) version 2 receipt the way agentkernel signs: ed25519
/// over the JCS bytes of everything but the hash and the signature.
fn resign(receipt: &Value, key: &SigningKey) -> Value {
    let mut payload = receipt.clone();
    let map = payload.as_object_mut().unwrap();
    map.remove("payload_hash_sha256");
    map.remove("signature");
    let bytes = serde_jcs::to_vec(&payload).unwrap();
    let mut out = payload;
    out["payload_hash_sha256"] = json!(sha256_hex(&bytes));
    out["signature"] = json!({
        "algorithm": "ed25519",
        "canonicalization": "RFC8785",
        "key_id": key_id(key),
        "public_key": BASE64.encode(key.verifying_key().as_bytes()),
        "signature": BASE64.encode(key.sign(&bytes).to_bytes()),
    });
    out
}

fn write_pub(dir: &Path, key: &SigningKey) -> PathBuf {
    let path = dir.join(format!("{}.pub", key_id(key)));
    std::fs::write(&path, BASE64.encode(key.verifying_key().as_bytes())).unwrap();
    path
}

#[test]
fn receipt_records_the_run_and_verifies() {
    let env = TestEnv::new();
    let (out, file) = run_with_receipt(
        &env,
        "r.json",
        &[
            "-e",
            "TOKEN=s3cret",
            "-i",
            BUSYBOX,
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ],
    );
    assert_code(&out, 3);
    assert_eq!(stdout(&out), "out\n");
    let r = read_json(&file);
    assert_eq!(r["version"], 2);
    // No secrets, no allow-list: no proxy ran, nothing to summarise.
    assert!(
        r["sandbox"]["egress"].is_null(),
        "{}",
        r["sandbox"]["egress"]
    );
    assert_eq!(r["invocation"]["mode"], "run");
    assert_eq!(r["invocation"]["input"]["backend"], backend());
    let o = &r["outcome"];
    assert_eq!(
        (o["exit_code"].clone(), o["ending"].clone()),
        (json!(3), json!("exited"))
    );
    assert_eq!(o["success"], false);
    assert_eq!(o["stdout"]["sha256"], sha256_hex(b"out\n"));
    assert_eq!(o["stdout"]["bytes"], 4);
    assert_eq!(o["stderr"]["sha256"], sha256_hex(b"err\n"));
    assert_eq!(o["output_bytes"], 8);
    assert!(o["error"].is_null());
    let s = &r["sandbox"];
    let digest = s["image"]["digest"].as_str().unwrap_or_default();
    assert!(digest.contains("sha256:"), "no image digest: {s}");
    assert_eq!(
        s["argv"],
        json!(["sh", "-c", "echo out; echo err >&2; exit 3"])
    );
    assert_eq!(s["env"][0]["name"], "TOKEN");
    assert_eq!(s["env"][0]["sha256"], sha256_hex(b"s3cret"));
    assert!(!std::fs::read_to_string(&file).unwrap().contains("s3cret"));
    assert_eq!(s["policy_sha256"].as_str().unwrap().len(), 64);

    let out = verify(&env, &file, &[]);
    assert_code(&out, 0);
    let key = env.run(&["receipt", "key", "--json"]);
    let key: Value = serde_json::from_slice(&key.stdout).unwrap();
    assert!(stdout(&out).contains(&format!(
        "version 2, signer {}",
        key["key_id"].as_str().unwrap()
    )));
    let json_out = verify(&env, &file, &["--json"]);
    let v: Value = serde_json::from_slice(&json_out.stdout).unwrap();
    assert_eq!(
        v["checks"],
        json!({"hash": true, "signature": true, "signer": true})
    );
    // The key is private to its owner.
    let key_file = env
        .home_dir()
        .join(".config/agentkernel/receipt-signing.key");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn a_changed_byte_in_each_section_fails_naming_the_check() {
    let env = TestEnv::new();
    let (out, file) = run_with_receipt(&env, "r.json", &["-i", BUSYBOX, "echo", "hello"]);
    assert_code(&out, 0);
    let text = std::fs::read_to_string(&file).unwrap();
    let r: Value = serde_json::from_str(&text).unwrap();
    let sig = r["signature"]["signature"].as_str().unwrap();
    let flipped_sig = {
        let mut bytes = BASE64.decode(sig).unwrap();
        bytes[10] ^= 1;
        BASE64.encode(bytes)
    };
    let hash = r["payload_hash_sha256"].as_str().unwrap();
    let flipped_hash = format!(
        "{}{}",
        if hash.starts_with('0') { "1" } else { "0" },
        &hash[1..]
    );
    let cases = [
        ("invocation", "\"echo\"", "\"ecHo\"", "hash check failed"),
        ("outcome", "\"exited\"", "\"exiteD\"", "hash check failed"),
        ("sandbox", "\"hello\"", "\"hellO\"", "hash check failed"),
        (
            "recorded_at",
            "\"recorded_at\": \"2",
            "\"recorded_at\": \"3",
            "hash check failed",
        ),
        (
            "payload_hash_sha256",
            hash,
            flipped_hash.as_str(),
            "hash check failed",
        ),
        (
            "signature",
            sig,
            flipped_sig.as_str(),
            "signature check failed",
        ),
    ];
    for (section, from, to, check) in cases {
        assert!(text.contains(from), "{section}: {from} not in the receipt");
        let changed = env.project_dir().join(format!("changed-{section}.json"));
        std::fs::write(&changed, text.replacen(from, to, 1)).unwrap();
        let out = verify(&env, &changed, &[]);
        assert_code(&out, 1);
        assert!(stderr(&out).contains(check), "{section}: {}", stderr(&out));
    }
    // Swapping in another public key breaks the signature too.
    let other = BASE64.encode(fresh_key().verifying_key().as_bytes());
    let pk = r["signature"]["public_key"].as_str().unwrap();
    let changed = env.project_dir().join("changed-key.json");
    std::fs::write(&changed, text.replacen(pk, &other, 1)).unwrap();
    let out = verify(&env, &changed, &[]);
    assert_code(&out, 1);
    assert!(
        stderr(&out).contains("signature check failed"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_receipt_re_signed_by_another_key_is_valid_but_not_trusted() {
    let env = TestEnv::new();
    let (out, file) = run_with_receipt(&env, "r.json", &["-i", BUSYBOX, "sh", "-c", "exit 1"]);
    assert_code(&out, 1);
    let mut r = read_json(&file);
    // The forger claims success and signs with their own key.
    r["outcome"]["exit_code"] = json!(0);
    r["outcome"]["success"] = json!(true);
    let forger = fresh_key();
    let forged = env.project_dir().join("forged.json");
    std::fs::write(
        &forged,
        serde_json::to_vec_pretty(&resign(&r, &forger)).unwrap(),
    )
    .unwrap();

    let out = verify(&env, &forged, &[]);
    assert_code(&out, 1);
    let expected = format!(
        "signature valid but key {} is not trusted; add it with",
        key_id(&forger)
    );
    assert!(stderr(&out).contains(&expected), "{}", stderr(&out));

    // A project's agentkernel.toml cannot vouch for it…
    let pub_file = write_pub(env.home_dir(), &forger);
    std::fs::write(
        env.project_dir().join("agentkernel.toml"),
        format!(
            "[receipts]\ntrusted_keys = [{:?}]\n",
            pub_file.to_str().unwrap()
        ),
    )
    .unwrap();
    let out = verify(&env, &forged, &[]);
    assert_code(&out, 1);
    std::fs::remove_file(env.project_dir().join("agentkernel.toml")).unwrap();

    // …the user's --key and config can.
    let out = verify(&env, &forged, &["--key", pub_file.to_str().unwrap()]);
    assert_code(&out, 0);
    let config_dir = env.home_dir().join(".config/agentkernel");
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::write(
        config_dir.join("config.toml"),
        format!(
            "[receipts]\ntrusted_keys = [{:?}]\n",
            BASE64.encode(forger.verifying_key().as_bytes())
        ),
    )
    .unwrap();
    let out = verify(&env, &forged, &[]);
    assert_code(&out, 0);
}

/// Upstream's receipt: serde_json of its structs, pretty-printed; the
/// signed payload is the compact form of the first five fields.
#[test]
fn an_upstream_version_1_receipt_verifies_as_version_1() {
    let env = TestEnv::new();
    let key = fresh_key();
    let fields = [
        ("version", "1".to_string()),
        ("receipt_id", "\"0190b6a2-7c2e-7000-8000-000000000001\"".to_string()),
        ("recorded_at", "\"2026-01-02T03:04:05.678901+00:00\"".to_string()),
        (
            "invocation",
            r#"{"mode":"run","input":{"command":["echo","hi"],"image":"alpine:3.20","backend":"docker","profile":"moderate","no_network":false,"fast":true,"keep":false}}"#.to_string(),
        ),
        (
            "outcome",
            format!(
                r#"{{"exit_code":0,"success":true,"output_sha256":"{}","output_bytes":3,"error":null}}"#,
                sha256_hex(b"hi\n")
            ),
        ),
    ];
    let payload = format!(
        "{{{}}}",
        fields
            .iter()
            .map(|(k, v)| format!("\"{k}\":{v}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let signature = json!({
        "algorithm": "ed25519",
        "key_id": key_id(&key),
        "public_key": BASE64.encode(key.verifying_key().as_bytes()),
        "signature": BASE64.encode(key.sign(payload.as_bytes()).to_bytes()),
    });
    // Laid out over lines as upstream's pretty printer does, field order
    // kept (serde_json's Value here would sort the keys).
    let pretty_fields: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("  \"{k}\": {}", v.replace(",\"", ",\n    \"")))
        .chain([
            format!(
                "  \"payload_hash_sha256\": \"{}\"",
                sha256_hex(payload.as_bytes())
            ),
            format!("  \"signature\": {signature}"),
        ])
        .collect();
    let text = format!("{{\n{}\n}}", pretty_fields.join(",\n"));
    let file = env.project_dir().join("v1.json");
    std::fs::write(&file, &text).unwrap();
    let pub_file = write_pub(env.project_dir(), &key);

    let out = verify(&env, &file, &["--key", pub_file.to_str().unwrap()]);
    assert_code(&out, 0);
    assert!(
        stdout(&out).contains(&format!("version 1 (upstream), signer {}", key_id(&key))),
        "{}",
        stdout(&out)
    );
    // Unknown signer, then a changed byte.
    assert_code(&verify(&env, &file, &[]), 1);
    std::fs::write(&file, text.replacen("\"echo\"", "\"ecHo\"", 1)).unwrap();
    let out = verify(&env, &file, &["--key", pub_file.to_str().unwrap()]);
    assert_code(&out, 1);
    assert!(
        stderr(&out).contains("hash check failed"),
        "{}",
        stderr(&out)
    );
}

/// PyPI's securesystemslib (installed by scripts/setup.sh) verifies the DSSE envelope.
#[test]
fn dsse_envelope_verifies_with_securesystemslib() {
    const PYTHON: &str = "/opt/agentkernel-pytools/bin/python";
    assert!(
        Path::new(PYTHON).exists(),
        "PREREQUISITE MISSING: {PYTHON} (run scripts/setup.sh)"
    );
    let env = TestEnv::new();
    let (out, file) = run_with_receipt(
        &env,
        "r.json",
        &["--receipt-format", "dsse", "-i", BUSYBOX, "echo", "hi"],
    );
    assert_code(&out, 0);
    let envelope = PathBuf::from(format!("{}.dsse.json", file.display()));
    assert_code(&verify(&env, &envelope, &[]), 0);
    let key: Value =
        serde_json::from_slice(&env.run(&["receipt", "key", "--json"]).stdout).unwrap();
    let script = r#"
import base64, json, sys
from securesystemslib.dsse import Envelope
from securesystemslib.signer import SSlibKey
envelope = Envelope.from_dict(json.load(open(sys.argv[1])))
key = SSlibKey(sys.argv[3], "ed25519", "ed25519", {"public": base64.b64decode(sys.argv[2]).hex()})
envelope.verify([key], 1)
statement = json.loads(envelope.payload)
assert statement["_type"] == "https://in-toto.io/Statement/v1"
print(statement["subject"][0]["name"], statement["subject"][0]["digest"]["sha256"])
"#;
    let python = |path: &Path| {
        std::process::Command::new(PYTHON)
            .args(["-c", script])
            .arg(path)
            .arg(key["public_key"].as_str().unwrap())
            .arg(key["key_id"].as_str().unwrap())
            .output()
            .unwrap()
    };
    let out = python(&envelope);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("stdout {}\n", sha256_hex(b"hi\n")));
    // A changed payload byte fails there too: a digit of the stdout digest,
    // so the payload stays well-formed JSON and only the signature can tell.
    let mut e = read_json(&envelope);
    let mut body = BASE64.decode(e["payload"].as_str().unwrap()).unwrap();
    let digest = sha256_hex(b"hi\n");
    let at = body
        .windows(digest.len())
        .position(|w| w == digest.as_bytes())
        .expect("the statement names the stdout digest");
    body[at] = if body[at] == b'0' { b'1' } else { b'0' };
    e["payload"] = json!(BASE64.encode(body));
    std::fs::write(&envelope, serde_json::to_vec(&e).unwrap()).unwrap();
    assert!(!python(&envelope).status.success());
    assert_code(&verify(&env, &envelope, &[]), 1);
}

#[test]
fn receipts_record_timeout_signal_and_agentkernel_errors() {
    let env = TestEnv::new();
    // (receipt, run arguments, exit code, ending, signal)
    type Case<'a> = (&'a str, Vec<&'a str>, i32, &'a str, Option<i32>);
    let cases: [Case; 3] = [
        (
            "timeout",
            vec!["--timeout", "1s", "-i", BUSYBOX, "sleep", "30"],
            124,
            "timeout",
            None,
        ),
        (
            "signal",
            vec!["-i", BUSYBOX, "sh", "-c", "kill -TERM $$"],
            143,
            "signal",
            Some(15),
        ),
        (
            "error",
            vec![
                "--pull",
                "never",
                "-i",
                "agentkernel-test/not-here:1",
                "true",
            ],
            125,
            "error",
            None,
        ),
    ];
    for (name, args, code_expected, ending, signal) in cases {
        let (out, file) = run_with_receipt(&env, &format!("{name}.json"), &args);
        assert_code(&out, code_expected);
        let r = read_json(&file);
        assert_eq!(r["outcome"]["ending"], ending, "{name}: {}", r["outcome"]);
        assert_eq!(r["outcome"]["signal"], json!(signal), "{name}");
        if ending == "error" {
            assert!(r["outcome"]["exit_code"].is_null());
            let error = r["outcome"]["error"].as_str().unwrap_or_default();
            assert!(error.contains("not-here"), "{error}");
        } else {
            assert_eq!(r["outcome"]["exit_code"], code_expected, "{name}");
        }
        assert_code(&verify(&env, &file, &[]), 0);
    }
}

#[test]
fn receipt_records_an_oom_kill() {
    let env = TestEnv::new();
    let (out, file) = run_with_receipt(
        &env,
        "oom.json",
        &[
            "--memory",
            "16m",
            "--timeout",
            "60s",
            "-i",
            BUSYBOX,
            "sh",
            "-c",
            "x=a; while :; do x=$x$x; done",
        ],
    );
    assert_code(&out, 137);
    let r = read_json(&file);
    assert_eq!(r["outcome"]["exit_code"], 137);
    assert_eq!(r["outcome"]["signal"], 9);
    // Podman's unpooled path cannot tell an OOM kill from a SIGKILL (see exit_codes.rs).
    let want: &[&str] = if backend() == "podman" {
        &["oom", "signal"]
    } else {
        &["oom"]
    };
    assert!(
        want.contains(&r["outcome"]["ending"].as_str().unwrap()),
        "{}",
        r["outcome"]
    );
    assert_code(&verify(&env, &file, &[]), 0);
}

fn replay(env: &TestEnv, file: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["receipt", "replay", file.to_str().unwrap()];
    args.extend_from_slice(extra);
    env.run(&args)
}

/// `[[files]]` are inputs of the run: recorded by digest, and a replay
/// whose copies differ says so.
#[test]
fn files_are_recorded_by_digest_and_replay_compares_them() {
    let env = TestEnv::new();
    let project = env.project_dir();
    std::fs::write(project.join("app.env"), "A=1\n").unwrap();
    std::fs::write(
        project.join("agentkernel.toml"),
        "[[files]]\nsource = \"app.env\"\ndest = \"/app/.env\"\nmode = \"0600\"\n",
    )
    .unwrap();
    let (out, file) = run_with_receipt(&env, "files.json", &["-i", BUSYBOX, "cat", "/app/.env"]);
    assert_code(&out, 0);
    assert_eq!(
        read_json(&file)["sandbox"]["files"],
        json!([{"dest": "/app/.env", "mode": "0600", "sha256": sha256_hex(b"A=1\n")}])
    );
    let out = replay(&env, &file, &[]);
    assert_code(&out, 0);
    assert!(
        stderr(&out).contains("replay: [[files]]: match"),
        "{}",
        stderr(&out)
    );
    std::fs::write(project.join("app.env"), "A=2\n").unwrap();
    let out = replay(&env, &file, &[]);
    assert_code(&out, 1);
    assert!(
        stderr(&out).contains("replay: [[files]]: mismatch"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn replay_matches_a_deterministic_command_and_reports_what_differs() {
    let env = TestEnv::new();
    let (out, file) = run_with_receipt(
        &env,
        "same.json",
        &[
            "-e",
            "GREETING=hi",
            "-i",
            BUSYBOX,
            "sh",
            "-c",
            "echo $GREETING; exit 2",
        ],
    );
    assert_code(&out, 2);
    let out = replay(&env, &file, &["-e", "GREETING=hi"]);
    assert_code(&out, 0);
    let err = stderr(&out);
    for item in [
        "image",
        "policy",
        "env GREETING",
        "exit status",
        "stdout",
        "stderr",
        "output",
    ] {
        assert!(
            err.contains(&format!("replay: {item}: match")),
            "{item}: {err}"
        );
    }
    assert_eq!(stdout(&out), "hi\n");

    // Another value: the env mismatch is reported before the command runs,
    // and the output differs.
    let out = replay(&env, &file, &["-e", "GREETING=bye"]);
    assert_code(&out, 1);
    let err = stderr(&out);
    assert!(err.contains("replay: env GREETING: mismatch"), "{err}");
    assert!(err.contains("replay: stdout: mismatch"), "{err}");
    assert!(err.contains("replay: exit status: match"), "{err}");

    // A command whose output changes every time.
    let (_, file) = run_with_receipt(
        &env,
        "random.json",
        &["-i", BUSYBOX, "cat", "/proc/sys/kernel/random/uuid"],
    );
    let out = replay(&env, &file, &[]);
    assert_code(&out, 1);
    assert!(
        stderr(&out).contains("replay: stdout: mismatch"),
        "{}",
        stderr(&out)
    );

    // A receipt that does not verify is not replayed.
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replacen("\"cat\"", "\"caT\"", 1);
    let changed = env.project_dir().join("changed.json");
    std::fs::write(&changed, text).unwrap();
    let out = replay(&env, &changed, &[]);
    assert_code(&out, 125);
    assert_one_line_error(&out);
}

#[test]
fn exec_in_a_kept_sandbox_writes_one_receipt_per_command() {
    let env = TestEnv::new();
    let name = unique_name("receipt");
    let _guard = KeptGuard::new(&name);
    let created = env.project_dir().join("created.json");
    let out = env.run_kept(&name, &["--receipt", created.to_str().unwrap()], &["true"]);
    assert_code(&out, 0);
    let created = read_json(&created);
    assert_eq!(created["invocation"]["input"]["keep"], true);
    for (i, cmd) in [["sh", "-c", "echo one"], ["sh", "-c", "exit 5"]]
        .iter()
        .enumerate()
    {
        let file = env.project_dir().join(format!("exec-{i}.json"));
        let mut args = vec!["exec", "--receipt", file.to_str().unwrap(), &name, "--"];
        args.extend_from_slice(cmd);
        let out = env.run(&args);
        assert_code(&out, [0, 5][i]);
        let r = read_json(&file);
        assert_eq!(r["invocation"]["mode"], "exec");
        assert_eq!(r["invocation"]["input"]["name"], name.as_str());
        assert_eq!(r["outcome"]["exit_code"], [0, 5][i]);
        // The sandbox's facts are the ones recorded when it was created.
        assert_eq!(
            r["sandbox"]["image"]["digest"],
            created["sandbox"]["image"]["digest"]
        );
        assert_eq!(
            r["sandbox"]["policy_sha256"],
            created["sandbox"]["policy_sha256"]
        );
        assert_code(&verify(&env, &file, &[]), 0);
    }
}

/// With --receipt the native helper is agentkernel's child, not agentkernel
/// itself: a SIGTERM to agentkernel must still reach the command.
#[test]
fn a_signal_to_agentkernel_reaches_the_command_of_a_receipted_run() {
    use std::io::BufRead;
    let env = TestEnv::new();
    let file = env.project_dir().join("term.json");
    let mut run = env.spawn(&[
        "run",
        "--receipt",
        file.to_str().unwrap(),
        "-i",
        BUSYBOX,
        "sh",
        "-c",
        "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 1; done",
    ]);
    let mut stdout = std::io::BufReader::new(run.child().stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    run.signal(libc::SIGTERM);
    let out = run.wait_output(std::time::Duration::from_secs(30));
    assert_code(&out, 7);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert_eq!(rest, "got-term\n");
    let r = read_json(&file);
    assert_eq!(r["outcome"]["exit_code"], 7);
    assert_eq!(
        r["outcome"]["stdout"]["sha256"],
        sha256_hex(b"ready\ngot-term\n")
    );
}

use common::upstream::{start_upstream, API};

/// Through the egress proxy: two requests that get the secret, one
/// with a spoofed Host (421) and one to an unlisted host (403).
const EGRESS: &str = r#"
import sys, urllib.request, urllib.error
for i in range(int(sys.argv[1])):
    print("ok", urllib.request.urlopen("https://api.example.test/r%d" % i, timeout=10).read())
if sys.argv[2] == "refused":
    r = urllib.request.Request("https://api.example.test/spoof", headers={"Host": "other.example.test"})
    try:
        urllib.request.urlopen(r, timeout=10)
    except urllib.error.HTTPError as e:
        print("spoofed", e.code)
    try:
        urllib.request.urlopen("http://evil.example.test/", timeout=10)
    except urllib.error.HTTPError as e:
        print("unlisted", e.code)
"#;

/// With the egress proxy the receipt's `sandbox.egress` counts each
/// host's connections, requests, bytes and refusals and names the secrets
/// injected (never their values), and still verifies; in a kept sandbox
/// an `exec --receipt` counts its own command's traffic only.
fn a_proxied_run_records_its_egress_summary() {
    const VALUE: &str = "sk-receipt-7a1c93e5";
    let env = TestEnv::new();
    let upstream = start_upstream();
    let config = upstream.config(&env, "");
    let binding = format!("API_KEY={VALUE}:{API}");
    let proxied = |receipt: &str, name: Option<&str>, requests: &str, refused: &str| {
        let mut args = vec!["-c", config.to_str().unwrap(), "-i", PYTHON];
        if let Some(name) = name {
            args.extend(["--name", name]);
        }
        args.extend(["-S", &binding, "--allow-host", API]);
        args.extend(["--", "python3", "-c", EGRESS, requests, refused]);
        run_with_receipt(&env, receipt, &args)
    };
    let (out, file) = proxied("one-shot.json", None, "2", "refused");
    assert_code(&out, 0);
    let text = stdout(&out);
    assert!(
        text.contains("spoofed 421") && text.contains("unlisted 403"),
        "{text}"
    );
    let r = read_json(&file);
    let egress = &r["sandbox"]["egress"];
    let api = &egress["hosts"][API];
    assert_eq!(api["connections"], 3, "{egress}");
    assert_eq!(api["requests"], 3, "{egress}");
    assert_eq!(api["refused"], 1, "{egress}");
    assert_eq!(api["injected"], json!({"API_KEY": 2}), "{egress}");
    assert!(api["bytes_up"].as_u64().unwrap() > 0, "{egress}");
    assert!(api["bytes_down"].as_u64().unwrap() > 0, "{egress}");
    let evil = &egress["hosts"]["evil.example.test"];
    assert_eq!(
        (evil["requests"].clone(), evil["refused"].clone()),
        (json!(1), json!(1))
    );
    assert_eq!(egress["totals"]["requests"], 4, "{egress}");
    assert_eq!(egress["totals"]["refused"], 2, "{egress}");
    assert_eq!(egress["complete"], true, "{egress}");
    assert!(!std::fs::read_to_string(&file).unwrap().contains(VALUE));
    assert_code(&verify(&env, &file, &[]), 0);

    // A kept sandbox: the first command's traffic, then an exec's own.
    let kept = unique_name("egress-kept");
    let _guard = KeptGuard::new(&kept);
    let (out, file) = proxied("kept.json", Some(kept.as_str()), "1", "refused");
    assert_code(&out, 0);
    let egress = &read_json(&file)["sandbox"]["egress"];
    assert_eq!(egress["hosts"][API]["requests"], 2, "{egress}");
    assert_eq!(egress["totals"]["refused"], 2, "{egress}");
    let exec = env.project_dir().join("exec.json");
    let out = env.run(&[
        "exec",
        "--receipt",
        exec.to_str().unwrap(),
        &kept,
        "--",
        "python3",
        "-c",
        EGRESS,
        "1",
        "none",
    ]);
    assert_code(&out, 0);
    let egress = &read_json(&exec)["sandbox"]["egress"];
    let hosts: Vec<&String> = egress["hosts"].as_object().unwrap().keys().collect();
    assert_eq!(hosts, [API], "{egress}");
    assert_eq!(egress["hosts"][API]["requests"], 1, "{egress}");
    assert_eq!(
        egress["hosts"][API]["injected"],
        json!({"API_KEY": 1}),
        "{egress}"
    );
    assert_eq!(egress["totals"]["refused"], 0, "{egress}");
    assert_code(&verify(&env, &exec, &[]), 0);
    assert_code(&env.run(&["sandbox", "rm", &kept]), 0);
}

on_every_proxy_backend!(
    egress_native_only, egress_engine_only:
    a_proxied_run_records_its_egress_summary,
);

/// A VM's proxy reports as native's does (one-shot and kept).
mod egress_qemu_only {
    #[test]
    fn a_proxied_run_records_its_egress_summary() {
        super::a_proxied_run_records_its_egress_summary()
    }
}

mod native_only {
    use super::*;

    /// `--image host` has no image digest; the receipt says so and replays.
    #[test]
    fn host_image_receipt_has_no_digest_and_replays() {
        let env = TestEnv::new();
        let (out, file) =
            run_with_receipt(&env, "host.json", &["--image", "host", "echo", "on-host"]);
        assert_code(&out, 0);
        let r = read_json(&file);
        assert_eq!(r["sandbox"]["image"]["reference"], "host");
        assert!(r["sandbox"]["image"]["digest"].is_null());
        assert_code(&verify(&env, &file, &[]), 0);
        let out = replay(&env, &file, &[]);
        assert_code(&out, 0);
        assert!(
            stderr(&out).contains("replay: stdout: match"),
            "{}",
            stderr(&out)
        );
    }
}

#[test]
fn receipt_names_the_template_and_its_digest() {
    let env = TestEnv::new();
    let template = env.project_dir().join("team.toml");
    let text = "[sandbox]\nname = \"team\"\n[environment]\nTEAM = \"yes\"\n[template]\ndescription = \"ours\"\n";
    std::fs::write(&template, text).unwrap();
    let (out, file) = run_with_receipt(
        &env,
        "t.json",
        &[
            "--template",
            template.to_str().unwrap(),
            "-i",
            BUSYBOX,
            "sh",
            "-c",
            "test \"$TEAM\" = yes",
        ],
    );
    assert_code(&out, 0);
    let t = &read_json(&file)["sandbox"]["template"];
    assert_eq!(t["sha256"], sha256_hex(text.as_bytes()), "{t}");
    assert!(
        t["location"]
            .as_str()
            .unwrap_or_default()
            .ends_with("team.toml"),
        "{t}"
    );
    assert_code(&verify(&env, &file, &[]), 0);
}
