//! Secrets: the vault (`agentkernel secret`), `-S` bindings and `[secrets]`,
//! `--secret-file`, and where a value must never appear (dry-run JSON, the
//! sandbox's environment and files, the engine's container config, the
//! state directory).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;

use common::*;

/// `agentkernel secret set KEY` with the value on stdin.
fn set_secret(env: &TestEnv, key: &str, value: &str) {
    let out = env
        .cmd()
        .args(["secret", "set", key])
        .write_stdin(value)
        .output()
        .unwrap();
    assert_code(&out, 0);
    assert!(
        !stdout(&out).contains(value.trim_end()) && !stderr(&out).contains(value.trim_end()),
        "secret set echoed the value"
    );
}

fn vault_dir(env: &TestEnv) -> std::path::PathBuf {
    env.state_dir().join("secrets")
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &std::path::Path, needle: &str) -> Vec<String> {
    let out = std::process::Command::new("grep")
        .args(["-rlF", needle])
        .arg(dir)
        .output()
        .unwrap();
    stdout(&out).lines().map(str::to_string).collect()
}

#[test]
fn vault_round_trip_is_encrypted_private_and_never_prints_values() {
    let env = TestEnv::new();
    let value = "sk-roundtrip-7f3a9c";
    set_secret(&env, "OPENAI_API_KEY", &format!("{value}\n"));
    let out = env.run(&["secret", "set", "GH_TOKEN", "ghp-inline-arg"]);
    assert_code(&out, 0);

    let dir = vault_dir(&env);
    assert_eq!(mode(env.state_dir()), 0o700);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("vault")), 0o600);
    assert_eq!(mode(&dir.join("vault.key")), 0o600);
    assert!(
        files_containing(env.state_dir(), value).is_empty()
            && files_containing(env.state_dir(), "ghp-inline-arg").is_empty(),
        "a value is stored in clear"
    );

    let out = env.run(&["secret", "list"]);
    assert_code(&out, 0);
    let listed = stdout(&out);
    assert!(listed.contains("OPENAI_API_KEY") && listed.contains("GH_TOKEN"));
    assert!(!listed.contains(value) && !listed.contains("ghp-inline-arg"));
    let out = env.run(&["secret", "list", "--json"]);
    assert_code(&out, 0);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["GH_TOKEN", "OPENAI_API_KEY"]);
    assert!(!stdout(&out).contains(value));

    // The stored value has no trailing newline: the file holds exactly it.
    let out = env.run(&[
        "run",
        "-i",
        BUSYBOX,
        "--secret-file",
        "OPENAI_API_KEY",
        "--",
        "sh",
        "-c",
        "cat /run/agentkernel/secrets/OPENAI_API_KEY",
    ]);
    assert_code(&out, 0);
    assert_eq!(stdout(&out), value);

    let out = env.run(&["secret", "rm", "OPENAI_API_KEY"]);
    assert_code(&out, 0);
    let out = env.run(&["secret", "list"]);
    assert!(!stdout(&out).contains("OPENAI_API_KEY"));
    let line = assert_one_line_error(&env.run(&["secret", "rm", "OPENAI_API_KEY"]));
    assert!(line.contains("no such secret"), "{line}");
    let line = assert_one_line_error(&env.run(&["secret", "get", "GH_TOKEN"]));
    assert!(!line.contains("ghp-inline-arg"), "{line}");
}

#[test]
fn twenty_concurrent_sets_all_survive() {
    let env = TestEnv::new();
    let children: Vec<_> = (0..20)
        .map(|i| {
            env.std_cmd()
                .args(["secret", "set", &format!("KEY_{i}"), &format!("value-{i}")])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let out = env.run(&["secret", "list", "--json"]);
    assert_code(&out, 0);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 20, "{rows}");
}

#[test]
fn a_corrupt_vault_is_125_naming_the_file() {
    let env = TestEnv::new();
    set_secret(&env, "K", "v-corrupt-test");
    let vault = vault_dir(&env).join("vault");
    let mut bytes = std::fs::read(&vault).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&vault, &bytes).unwrap();
    for args in [
        vec!["secret", "list"],
        vec!["secret", "set", "OTHER", "x"],
        vec!["run", "--secret-file", "K", "-i", BUSYBOX, "true"],
    ] {
        let line = assert_one_line_error(&env.run(&args));
        assert!(
            line.contains(&vault.display().to_string()) && line.contains("secret set"),
            "{args:?}: {line}"
        );
    }
    // A set did not replace the vault it could not read.
    assert_eq!(std::fs::read(&vault).unwrap(), bytes);
}

#[test]
fn every_bad_binding_is_125_in_one_line() {
    let env = TestEnv::new();
    set_secret(&env, "K", "v");
    for binding in [
        "K",
        ":api.example.com",
        "K:",
        "1K:api.example.com",
        "K-1:api.example.com",
        "K:api.example.com:",
        "K:api.example.com:x-key:extra",
        "K:*.example.com",
        "K:https://api.example.com",
        "K:api.example.com:Host",
        "K:api.example.com:bad header",
        "K=:api.example.com",
        "K=value-without-host",
    ] {
        let out = env.run(&["run", "--dry-run", "-S", binding, "-i", BUSYBOX, "true"]);
        let line = assert_one_line_error(&out);
        assert!(line.contains("--secret"), "{binding}: {line}");
    }
    for bad in ["--secret-file=1K", "--secret-file=A/B"] {
        assert_one_line_error(&env.run(&["run", "--dry-run", bad, "-i", BUSYBOX, "true"]));
    }
    // Two keys on one header of one host would overwrite each other.
    let line = assert_one_line_error(&env.run(&[
        "run",
        "--dry-run",
        "-S",
        "K:h.example",
        "-S",
        "L=x:h.example",
        "-i",
        BUSYBOX,
        "true",
    ]));
    assert!(line.contains("h.example"), "{line}");
    // A placeholder file whose key has no host could be sent anywhere.
    let line = assert_one_line_error(&env.run(&[
        "run",
        "--dry-run",
        "--secret-file",
        "K",
        "--placeholder-secrets",
        "-i",
        BUSYBOX,
        "true",
    ]));
    assert!(line.contains("bound to no host"), "{line}");
    // -e of a secret's name would put the value in the sandbox.
    let out = env
        .cmd()
        .env("K", "from-env")
        .args([
            "run",
            "--dry-run",
            "-S",
            "K:h.example",
            "-e",
            "K",
            "-i",
            BUSYBOX,
            "true",
        ])
        .output()
        .unwrap();
    let line = assert_one_line_error(&out);
    assert!(line.contains("K"), "{line}");
    // A value that cannot be an HTTP header value could never be sent.
    set_secret(&env, "MULTILINE", "line one\nline two");
    let line = assert_one_line_error(&env.run(&[
        "run",
        "--dry-run",
        "-S",
        "MULTILINE:h.example",
        "-i",
        BUSYBOX,
        "true",
    ]));
    assert!(
        line.contains("MULTILINE") && !line.contains("line one"),
        "{line}"
    );
    // Under --no-network a binding could never be used.
    assert_one_line_error(&env.run(&[
        "run",
        "--dry-run",
        "--no-network",
        "-S",
        "K:h.example",
        "-i",
        BUSYBOX,
        "true",
    ]));

    let config = env.home_dir().join("bad-secrets.toml");
    for toml in [
        "[secrets]\nK = 1\n",
        "[secrets]\nK = { hosts = [] }\n",
        "[secrets]\nK = { hosts = [\"h.example\"], header = \"Content-Length\" }\n",
        "[secrets]\n\"9K\" = \"h.example\"\n",
    ] {
        std::fs::write(&config, toml).unwrap();
        let line = assert_one_line_error(&env.run(&[
            "run",
            "--dry-run",
            "-c",
            config.to_str().unwrap(),
            "-i",
            BUSYBOX,
            "true",
        ]));
        assert!(line.contains("secrets."), "{toml}: {line}");
    }
}

#[test]
fn a_missing_key_is_125_naming_it_and_leaves_nothing() {
    let env = TestEnv::new();
    for args in [
        vec![
            "run",
            "--secret-file",
            "AK_TEST_NOWHERE",
            "-i",
            BUSYBOX,
            "true",
        ],
        vec![
            "run",
            "--name",
            "missing-secret",
            "--secret-file",
            "AK_TEST_NOWHERE",
            "-i",
            BUSYBOX,
            "true",
        ],
        vec![
            "run",
            "--dry-run",
            "-S",
            "AK_TEST_NOWHERE:h.example",
            "-i",
            BUSYBOX,
            "true",
        ],
    ] {
        let (out, owner) = env.run_tracked(&args);
        let line = assert_one_line_error(&out);
        assert!(
            line.contains("AK_TEST_NOWHERE") && line.contains("secret set"),
            "{line}"
        );
        assert!(
            containers_of_owner(&owner).is_empty(),
            "{args:?} left a container"
        );
    }
    assert!(env.leftover_runs().is_empty(), "{:?}", env.leftover_runs());
    assert!(env.labelled_containers(None).is_empty());
    let out = env.run(&["sandbox", "list"]);
    assert!(!stdout(&out).contains("missing-secret"));
}

#[test]
fn dry_run_shows_bindings_and_names_never_values() {
    let env = TestEnv::new();
    set_secret(&env, "STORED_KEY", "vault-value-4c1d");
    let out = env
        .cmd()
        .env("ENV_KEY", "env-value-9e2b")
        .args([
            "run",
            "--dry-run",
            "-S",
            "STORED_KEY:API.Example.com",
            "-S",
            "ENV_KEY:other.example:x-api-key",
            "-S",
            "INLINE_KEY=inline:value-77:third.example",
            "--secret-file",
            "STORED_KEY",
            "-i",
            BUSYBOX,
            "true",
        ])
        .output()
        .unwrap();
    assert_code(&out, 0);
    let text = stdout(&out);
    for value in ["vault-value-4c1d", "env-value-9e2b", "inline:value-77"] {
        assert!(!text.contains(value), "--dry-run shows {value}");
    }
    let resolved: serde_json::Value = serde_json::from_str(&text).unwrap();
    let egress = &resolved["egress"];
    assert_eq!(egress["bindings"][0]["host"], "api.example.com");
    assert_eq!(egress["bindings"][1]["header"], "x-api-key");
    assert_eq!(egress["bindings"][2]["key"], "INLINE_KEY");
    assert_eq!(egress["secret_files"][0], "STORED_KEY");
    let env_names = resolved["env"].as_array().unwrap();
    for name in [
        "STORED_KEY",
        "ENV_KEY",
        "INLINE_KEY",
        "AGENTKERNEL_SECRETS_PATH",
    ] {
        assert!(
            env_names.iter().any(|n| n == name),
            "{name} not in {env_names:?}"
        );
    }
    // The inline value was never written to the vault.
    let out = env.run(&["secret", "list"]);
    assert!(!stdout(&out).contains("INLINE_KEY"));
    // A plain run starts no egress at all.
    assert!(env.dry_run(&["-i", BUSYBOX, "true"])["egress"].is_null());
}

#[test]
fn a_project_file_cannot_bind_secrets_without_trust() {
    let env = TestEnv::new();
    set_secret(&env, "GH_TOKEN", "ghp-project-test");
    std::fs::write(
        env.project_dir().join("agentkernel.toml"),
        "[secrets]\nGH_TOKEN = \"collector.evil.example\"\n",
    )
    .unwrap();
    let line = assert_one_line_error(&env.run(&["run", "--dry-run", "-i", BUSYBOX, "true"]));
    assert!(
        line.contains("secrets.GH_TOKEN") && line.contains("agentkernel trust"),
        "{line}"
    );
    assert_code(&env.run(&["trust"]), 0);
    let resolved = env.dry_run(&["-i", BUSYBOX, "true"]);
    assert_eq!(
        resolved["egress"]["bindings"][0]["host"],
        "collector.evil.example"
    );
    // `secret list` shows where config binds it.
    let out = env.run(&["secret", "list"]);
    assert!(stdout(&out).contains("collector.evil.example"));
}

#[test]
fn secret_files_are_the_users_read_only_tmpfs_files() {
    let env = TestEnv::new();
    let value = "file-secret-b8e0 with spaces\nand a second line";
    set_secret(&env, "DB_PASSWORD", value);
    set_secret(&env, "OTHER", "other-secret-31aa");
    // Restrictive: read-only root and no capabilities to chown with.
    for profile in ["moderate", "restrictive"] {
        let out = env.run(&[
            "run",
            "-p",
            profile,
            "-i",
            NOBODY,
            "--secret-file",
            "DB_PASSWORD",
            "--secret-file",
            "OTHER",
            "--",
            "sh",
            "-c",
            "d=$AGENTKERNEL_SECRETS_PATH; id -un; stat -c '%a %U' $d/DB_PASSWORD $d/OTHER; \
             awk '$2 == \"/run/agentkernel/secrets\" {print $3}' /proc/mounts; \
             echo x > $d/DB_PASSWORD 2>/dev/null && echo WRITABLE; \
             echo ---; cat $d/DB_PASSWORD",
        ]);
        assert_code(&out, 0);
        assert_eq!(
            stdout(&out),
            format!("nobody\n400 nobody\n400 nobody\ntmpfs\n---\n{value}"),
            "{profile}"
        );
    }
}

/// Without placeholders the value is in its file, and nowhere else the
/// sandbox can read: not its environment, not another file, not /proc.
#[test]
fn a_secret_files_value_is_nowhere_else_in_the_sandbox() {
    let env = TestEnv::new();
    let value = "nowhere-else-5d7f02";
    set_secret(&env, "API_TOKEN", value);
    let out = env.run(&[
        "run",
        "-i",
        BUSYBOX,
        "--secret-file",
        "API_TOKEN",
        "--",
        "sh",
        "-c",
        &format!(
            "for d in /*; do case $d in /proc|/sys|/dev) ;; *) grep -rlF {value} $d 2>/dev/null;; esac; done; \
             for f in /proc/[0-9]*/environ /proc/[0-9]*/cmdline; do grep -lF {value} $f 2>/dev/null; done; \
             env | grep -F {value}; echo done"
        ),
    ]);
    assert_code(&out, 0);
    assert_eq!(
        stdout(&out),
        "/run/agentkernel/secrets/API_TOKEN\ndone\n",
        "{}",
        stderr(&out)
    );
    // Nor is it anywhere in the state directory on the host.
    assert!(files_containing(env.state_dir(), value).is_empty());
}

#[test]
fn a_kept_sandboxs_secret_files_serve_later_commands_and_are_not_stored() {
    let env = TestEnv::new();
    let value = "kept-secret-a1c9";
    set_secret(&env, "KEPT_KEY", value);
    let name = unique_name("secret-kept");
    let guard = KeptGuard::new(&name);
    let out = env.run_kept(
        &name,
        &["--secret-file", "KEPT_KEY"],
        &["cat", "/run/agentkernel/secrets/KEPT_KEY"],
    );
    assert_code(&out, 0);
    assert_eq!(stdout(&out), value);
    let out = env.run(&[
        "exec",
        &name,
        "--",
        "cat",
        "/run/agentkernel/secrets/KEPT_KEY",
    ]);
    assert_code(&out, 0);
    assert_eq!(stdout(&out), value);
    // Its stored plan and record hold the name only.
    assert!(
        files_containing(env.state_dir(), value).is_empty(),
        "the value is stored on the host"
    );
    drop(guard);
}

mod engine_only {
    use super::*;

    /// The engine's view of the container — config, env, labels, mounts —
    /// never holds the value.
    #[test]
    fn docker_inspect_never_shows_a_secret_files_value() {
        let env = TestEnv::new();
        let value = "inspect-secret-e4b2";
        set_secret(&env, "INSPECTED", value);
        let name = unique_name("secret-inspect");
        let guard = KeptGuard::new(&name);
        let out = env.run_kept(&name, &["--secret-file", "INSPECTED"], &["true"]);
        assert_code(&out, 0);
        let inspected = engine_ok(&["inspect", &guard.container()]);
        assert!(inspected.contains("/run/agentkernel/secrets"));
        assert!(!inspected.contains(value), "docker inspect shows the value");
        drop(guard);
    }
}

/// On the engines a run with secret files execs its command once they are
/// written: stdin, exit codes and timeouts behave as in any run.
#[test]
fn a_run_with_secret_files_keeps_stdin_exit_codes_and_timeouts() {
    let env = TestEnv::new();
    set_secret(&env, "K", "v");
    let out = env
        .cmd()
        .args([
            "run",
            "--secret-file",
            "K",
            "-i",
            BUSYBOX,
            "--",
            "sh",
            "-c",
            "cat; exit 3",
        ])
        .write_stdin("from stdin\n")
        .output()
        .unwrap();
    assert_code(&out, 3);
    assert_eq!(stdout(&out), "from stdin\n");
    let (out, owner) = env.run_tracked(&[
        "run",
        "--secret-file",
        "K",
        "--timeout",
        "1s",
        "-i",
        BUSYBOX,
        "sleep",
        "30",
    ]);
    assert_code(&out, 124);
    assert!(containers_of_owner(&owner).is_empty());
}

/// On a terminal `secret set` prompts and turns echo off: what is typed is
/// stored, and never shows in the terminal's output.
#[test]
fn secret_set_on_a_terminal_does_not_echo() {
    use std::io::{Read, Write};
    let env = TestEnv::new();
    let inner = format!("{} secret set TYPED", binary().display());
    let mut cmd = std::process::Command::new("script");
    env.configure(&mut cmd);
    cmd.args(["-qec", &inner, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("(not shown)") {
        let chunk = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no prompt: {:?}", String::from_utf8_lossy(&seen)));
        seen.extend(chunk);
    }
    stdin.write_all(b"typed-secret-0c4e\r").unwrap();
    assert!(wait_child(&mut child, std::time::Duration::from_secs(30)).success());
    while let Ok(chunk) = rx.recv_timeout(std::time::Duration::from_secs(1)) {
        seen.extend(chunk);
    }
    let transcript = String::from_utf8_lossy(&seen);
    assert!(
        !transcript.contains("typed-secret"),
        "echoed: {transcript:?}"
    );
    drop(stdin);
    let out = env.run(&[
        "run",
        "--secret-file",
        "TYPED",
        "-i",
        BUSYBOX,
        "cat",
        "/run/agentkernel/secrets/TYPED",
    ]);
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "typed-secret-0c4e");
}
