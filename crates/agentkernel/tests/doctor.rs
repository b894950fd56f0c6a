//! `agentkernel doctor`: it proves what it reports by starting a real
//! sandbox on each backend, checks registry access, and its fixes name what
//! to do for that backend.

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use common::*;

fn doctor_json(env: &TestEnv, extra_env: &[(&str, &str)]) -> serde_json::Value {
    let mut cmd = env.cmd();
    cmd.env_remove("AGENTKERNEL_BACKEND")
        .args(["doctor", "--json"]);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert_code(&out, 0);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor --json is not JSON ({e}): {}", stdout(&out)))
}

fn backend<'a>(doc: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    doc["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {doc:#}"))
}

#[test]
fn doctor_runs_a_real_sandbox_on_native_docker_and_podman() {
    let env = TestEnv::new();
    let doc = doctor_json(&env, &[]);
    for name in ["native", "docker", "podman"] {
        let b = backend(&doc, name);
        assert_eq!(b["status"], "ready", "{b:#}");
        assert_eq!(b["ready"], true, "{b:#}");
        let run = &b["run"];
        assert_eq!(run["exit_code"], 0, "{b:#}");
        assert_eq!(run["command"], serde_json::json!(["true"]), "{b:#}");
        assert!(run["millis"].as_u64().is_some_and(|ms| ms > 0), "{b:#}");
        assert!(!run["image"].as_str().unwrap().is_empty(), "{b:#}");
    }
    assert_eq!(backend(&doc, "native")["run"]["image"], "host");
    assert_eq!(doc["default_backend"], "native");
    // Backends this build does not have: nothing to install, and no
    // advice to switch that pretends native is not there.
    for name in ["firecracker", "apple"] {
        let b = backend(&doc, name);
        assert_eq!(b["status"], "not built", "{b:#}");
        assert!(b["run"].is_null(), "{b:#}");
        assert!(!b["fix"].as_str().unwrap().contains("-B docker"), "{b:#}");
    }
    // Docker Hub is always asked; this machine has no route to it.
    let hub = doc["registries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["role"] == "docker hub")
        .expect("Docker Hub is probed");
    assert_eq!(hub["url"], "https://registry-1.docker.io");
    assert!(hub["millis"].as_u64().is_some());
}

#[test]
fn doctor_checks_each_mirror_with_a_short_timeout() {
    let env = TestEnv::new();
    let dead = "http://127.0.0.1:9";
    let doc = doctor_json(
        &env,
        &[(
            "AGENTKERNEL_REGISTRY_MIRRORS",
            &format!("{TEST_REGISTRY},{dead}"),
        )],
    );
    let registries = doc["registries"].as_array().unwrap();
    let mirror = |url: &str| {
        registries
            .iter()
            .find(|r| r["url"].as_str().unwrap().starts_with(url))
            .unwrap_or_else(|| panic!("{url} not probed: {doc:#}"))
    };
    let live = mirror(TEST_REGISTRY);
    assert_eq!(live["reachable"], true, "{live:#}");
    assert_eq!(live["http_status"], 200, "{live:#}");
    assert_eq!(live["source"], "AGENTKERNEL_REGISTRY_MIRRORS");
    let gone = mirror(dead);
    assert_eq!(gone["reachable"], false, "{gone:#}");
    assert!(
        gone["error"].as_str().unwrap().contains("refused"),
        "{gone:#}"
    );
    assert_eq!(doc["can_pull"], true);
}

#[test]
fn doctor_text_says_how_long_each_trial_run_took_and_in_which_image() {
    let env = TestEnv::new();
    let out = env.run_unchosen(&["doctor"]);
    assert_code(&out, 0);
    let text = stdout(&out);
    let native = text.lines().find(|l| l.starts_with("native")).unwrap();
    assert!(
        native.contains("ready") && native.contains("ran `true` in --image host in "),
        "{text}"
    );
    assert!(text.lines().any(|l| l.starts_with("registry")), "{text}");
}

/// A user without access to the Docker socket is told about the group, not
/// to start a Docker that is running.
#[test]
fn a_user_without_the_docker_socket_is_told_about_the_group() {
    let home = tempfile::tempdir().unwrap();
    let status = Command::new("chown")
        .args(["-R", "4340:4340"])
        .arg(home.path())
        .status()
        .unwrap();
    assert!(status.success());
    let project = home.path().join("project");
    std::fs::create_dir(&project).unwrap();
    let status = Command::new("chown")
        .arg("4340:4340")
        .arg(&project)
        .status()
        .unwrap();
    assert!(status.success());
    let out = Command::new(binary())
        .uid(4340)
        .gid(4340)
        .env("HOME", home.path())
        .env("AGENTKERNEL_HOME", home.path().join("state"))
        .env_remove("DOCKER_HOST")
        .current_dir(&project)
        .stdin(Stdio::null())
        .args(["run", "-B", "docker", "--", "true"])
        .output()
        .unwrap();
    let err = assert_one_line_error(&out);
    assert!(
        err.contains("permission denied") && err.contains("usermod -aG docker"),
        "{err}"
    );
    assert!(!err.contains("systemctl start docker"), "{err}");
}
