//! `--template` and `agentkernel template …`: every resolution source (a
//! path, the two local directories, the built-ins, `github:` from a loopback
//! HTTPS server whose CA is given in config), precedence (config < template
//! < flags), built-ins running, `setup` once per kept sandbox, and bad
//! templates (exit 125, one line).

#[macro_use]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn user_config(env: &TestEnv) -> PathBuf {
    env.home_dir().join(".config/agentkernel/config.toml")
}

fn memory(resolved: &Value) -> u64 {
    resolved["policy"]["limits"]["memory_bytes"]
        .as_u64()
        .unwrap()
}

#[test]
fn precedence_is_config_then_template_then_flags() {
    let env = TestEnv::new();
    write(
        &user_config(&env),
        "[sandbox]\nimage = \"cfg-image:1\"\nttl = \"2h\"\nenv = { FROM_CONFIG = \"1\", SHARED = \"config\" }\n[resources]\nmemory = \"300m\"\n",
    );
    let tpl = env.project_dir().join("t.toml");
    write(
        &tpl,
        "[sandbox]\nimage = \"tpl-image:1\"\n[environment]\nSHARED = \"template\"\n[resources]\nmemory_mb = 400\n",
    );
    let tpl_arg = tpl.to_str().unwrap();

    // The config alone.
    let r = env.dry_run(&["--keep", "--", "true"]);
    assert_eq!(r["image"], "cfg-image:1");
    assert_eq!(memory(&r), 300 << 20);
    assert!(r["template"].is_null());

    // The template over it: its keys win, the config's other keys stay.
    let r = env.dry_run(&["--keep", "--template", tpl_arg, "--", "true"]);
    assert_eq!(r["image"], "tpl-image:1");
    assert_eq!(r["image_source"], "template");
    assert_eq!(memory(&r), 400 << 20);
    assert_eq!(r["keep"]["ttl_secs"], 7200, "the config's ttl stays");
    let names: Vec<&str> = r["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(names.contains(&"FROM_CONFIG") && names.contains(&"SHARED"));

    // Flags over both.
    let r = env.dry_run(&[
        "--template",
        tpl_arg,
        "--memory",
        "500m",
        "-i",
        BUSYBOX,
        "--",
        "true",
    ]);
    assert_eq!(r["image"], BUSYBOX);
    assert_eq!(r["image_source"], "flag");
    assert_eq!(memory(&r), 500 << 20);

    // The template's environment value really is the one set (not the config's).
    if is_native() {
        let out = env.run(&[
            "run",
            "--template",
            tpl_arg,
            "-i",
            BUSYBOX,
            "--",
            "sh",
            "-c",
            "echo $SHARED $FROM_CONFIG",
        ]);
        assert_code(&out, 0);
        assert_eq!(stdout(&out), "template 1\n");
    }
}

#[test]
fn paths_and_local_directories_resolve_in_upstreams_order() {
    let env = TestEnv::new();
    let config_dir = env.home_dir().join(".config/agentkernel/templates");
    let data_dir = env.home_dir().join(".local/share/agentkernel/templates");

    // A relative path (with `/`) and a bare `NAME.toml` in the current directory.
    write(
        &env.project_dir().join("sub/a.toml"),
        "[sandbox]\nimage = \"path-a:1\"\n",
    );
    write(
        &env.project_dir().join("b.toml"),
        "[sandbox]\nimage = \"path-b:1\"\n",
    );
    let resolves = |spec: &str, image: &str, source: &str| {
        let r = env.dry_run(&["--template", spec, "--", "true"]);
        assert_eq!(r["image"], image, "{spec}");
        assert_eq!(r["template"]["source"], source, "{spec}");
        r
    };
    let r = resolves("./sub/a.toml", "path-a:1", "file");
    assert_eq!(r["template"]["name"], "a");
    resolves("b.toml", "path-b:1", "file");

    // ~/.local/share/agentkernel/templates (upstream's directory), then
    // ~/.config/agentkernel/templates, which comes first.
    write(
        &data_dir.join("mine.toml"),
        "[sandbox]\nimage = \"data-dir:1\"\n",
    );
    resolves("mine", "data-dir:1", "local");
    let text = "[sandbox]\nimage = \"config-dir:1\"\n";
    write(&config_dir.join("mine.toml"), text);
    let r = resolves("mine", "config-dir:1", "local");
    assert_eq!(r["template"]["sha256"], sha256_hex(text.as_bytes()));

    // A local template hides the built-in of the same name.
    write(
        &config_dir.join("python.toml"),
        "[sandbox]\nimage = \"my-python:1\"\n",
    );
    resolves("python", "my-python:1", "local");
    std::fs::remove_file(config_dir.join("python.toml")).unwrap();
    resolves("python", "python:3.12-alpine", "built-in");

    // `template list` shows local and built-in ones, local first.
    let out = env.run(&["template", "list", "--json"]);
    assert_code(&out, 0);
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mine = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "mine")
        .unwrap();
    assert_eq!(mine["source"], "local");
    assert_eq!(mine["image"], "config-dir:1");
}

/// Upstream's built-ins with their meaning: image, profile, limits,
/// allow-lists, secret bindings (names and hosts only).
#[test]
fn builtins_set_what_upstreams_do() {
    let env = TestEnv::new();
    // The agent templates bind a key: a run without it is refused (125).
    set_agent_keys(&env);
    let cases: &[(&str, &str, &str, u64)] = &[
        ("python", "python:3.12-alpine", "moderate", 512),
        ("node", "node:22-alpine", "moderate", 512),
        ("go", "golang:1.23-alpine", "moderate", 512),
        ("ruby", "ruby:3.3-alpine", "moderate", 512),
        ("rust-ci", "rust:1.85-alpine", "moderate", 2048),
        ("secure", "alpine:3.20", "restrictive", 256),
        ("claude-sandbox", "node:22-alpine", "moderate", 1024),
        ("codex-sandbox", "node:22-alpine", "moderate", 1024),
    ];
    for (name, image, profile, memory_mb) in cases {
        let r = env.dry_run(&["--template", name, "--", "true"]);
        assert_eq!(r["image"], *image, "{name}");
        assert_eq!(r["profile"], *profile, "{name}");
        assert_eq!(memory(&r), memory_mb << 20, "{name}");
        assert_eq!(r["template"]["source"], "built-in", "{name}");
        let shown = env.run(&["template", "show", name]);
        assert_code(&shown, 0);
        let text = stdout(&shown);
        assert!(
            text.contains(r["template"]["sha256"].as_str().unwrap()),
            "{name}: show prints the digest"
        );
    }
    let secure = env.dry_run(&["--template", "secure", "--", "true"]);
    assert_eq!(secure["policy"]["network"], false);
    for (name, needle) in [
        ("python", "\"pypi.org\", \"files.pythonhosted.org\""),
        ("node", "\"registry.npmjs.org\""),
        (
            "rust-ci",
            "\"crates.io\", \"static.crates.io\", \"index.crates.io\"",
        ),
        (
            "claude-sandbox",
            "ANTHROPIC_API_KEY = \"api.anthropic.com\"",
        ),
        ("codex-sandbox", "OPENAI_API_KEY = \"api.openai.com\""),
    ] {
        let text = stdout(&env.run(&["template", "show", name]));
        assert!(text.contains(needle), "{name}: {text}");
    }
    // Their allow-lists are enforced (`allowlist_only`): the run's egress
    // allow-list is exactly the template's hosts.
    for (name, hosts) in [
        ("python", &["pypi.org", "files.pythonhosted.org"][..]),
        ("node", &["registry.npmjs.org"]),
        ("go", &["proxy.golang.org", "sum.golang.org"]),
        ("ruby", &["rubygems.org"]),
        (
            "rust-ci",
            &["crates.io", "static.crates.io", "index.crates.io"],
        ),
        ("claude-sandbox", &["api.anthropic.com", "sentry.io"]),
        ("codex-sandbox", &["api.openai.com"]),
    ] {
        let r = env.dry_run(&["--template", name, "--", "true"]);
        let allowed: Vec<&str> = r["egress"]["allow_hosts"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: no allow-list in {}", r["egress"]))
            .iter()
            .map(|h| h["host"].as_str().unwrap())
            .collect();
        for host in hosts {
            assert!(allowed.contains(host), "{name}: {host} not in {allowed:?}");
        }
    }
    // vcpus means "at most": rust-ci's 4 fit any host.
    let online = std::thread::available_parallelism().unwrap().get() as f64;
    let r = env.dry_run(&["--template", "rust-ci", "--", "true"]);
    assert!(r["policy"]["limits"]["cpus"].as_f64().unwrap() <= online.min(4.0));
}

/// The built-ins' images are not among the offline test images (busybox and
/// python only): python runs its own sample command in the python test
/// image; the others run in busybox (`-i`), and what they set besides the
/// image is checked inside the sandbox.
#[test]
fn every_builtin_runs_its_sample_command() {
    let env = TestEnv::new();
    let out = env.run(&[
        "run",
        "--template",
        "python",
        "-i",
        PYTHON,
        "--",
        "python3",
        "--version",
    ]);
    assert_code(&out, 0);
    assert!(stdout(&out).starts_with("Python 3"), "{}", stdout(&out));

    // The memory limit, the CPU quota over its period (v2 and v1), and upstream's sample command.
    let limits = "cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes; \
                  cat /sys/fs/cgroup/cpu.max 2>/dev/null || echo $(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/cpu/cpu.cfs_period_us)";
    let online = std::thread::available_parallelism().unwrap().get() as u64;
    for (name, memory_mb, cpus, sample) in [
        ("node", 512u64, 1u64, ""),
        ("go", 512, 2, ""),
        ("ruby", 512, 1, ""),
        ("rust-ci", 2048, 4, ""),
    ] {
        // The allow-list holds inside: no interface but loopback (the
        // proxy is the only way out) and the proxy variables set.
        let script = format!(
            "{limits}; {sample}tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; echo \"${{HTTPS_PROXY:+proxy}}\""
        );
        let out = env.run(&[
            "run",
            "--template",
            name,
            "-i",
            BUSYBOX,
            "--",
            "sh",
            "-c",
            &script,
        ]);
        assert_code(&out, 0);
        let mut expected = format!(
            "{}\n{} 100000\n",
            memory_mb << 20,
            cpus.min(online) * 100_000
        );
        if !sample.is_empty() {
            expected.push_str("listed\n");
        }
        expected.push_str("lo\nproxy\n");
        assert_eq!(stdout(&out), expected, "{name}");
    }

    // secure: read-only root, no network but loopback, its memory limit.
    let script = format!("{limits}; tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; touch /x 2>/dev/null && echo root-writable || echo root-read-only; ls -la /workspace >/dev/null && echo listed");
    let out = env.run(&[
        "run",
        "--template",
        "secure",
        "-i",
        BUSYBOX,
        "--",
        "sh",
        "-c",
        &script,
    ]);
    assert_code(&out, 0);
    assert_eq!(
        stdout(&out),
        format!(
            "{}\n100000 100000\nlo\nroot-read-only\nlisted\n",
            256u64 << 20
        )
    );
}

#[test]
fn bad_templates_are_125_naming_the_key_or_file() {
    let env = TestEnv::new();
    let cases = [
        (
            "[sandbox]\nimgae = \"x\"\n",
            "sandbox.imgae (did you mean sandbox.image?)",
        ),
        ("[resources]\nmemory = \"lots\"\n", "resources.memory"),
        ("[template]\nsetup = \"echo hi\"\n", "template.setup"),
        ("this is not toml", "bad.toml"),
    ];
    let path = env.project_dir().join("bad.toml");
    for (text, needle) in cases {
        write(&path, text);
        let out = env.run(&["run", "--template", "./bad.toml", "--", "true"]);
        let line = assert_one_line_error(&out);
        assert!(line.contains(needle) && line.contains("bad.toml"), "{line}");
    }
    for (spec, needle) in [
        ("./missing.toml", "missing.toml"),
        ("no-such-template", "template list"),
        ("github:only-owner", "github:OWNER/REPO/PATH"),
    ] {
        let out = env.run(&["run", "--template", spec, "--", "true"]);
        let line = assert_one_line_error(&out);
        assert!(line.contains(needle), "{spec}: {line}");
    }
    assert!(env.leftover_runs().is_empty());
}

#[test]
fn add_remove_and_save() {
    let env = TestEnv::new();
    write(
        &env.project_dir().join("x.toml"),
        "[sandbox]\nimage = \"added:1\"\n",
    );
    let out = env.run(&["template", "add", "./x.toml", "--name", "added"]);
    assert_code(&out, 0);
    let r = env.dry_run(&["--template", "added", "--", "true"]);
    assert_eq!(r["image"], "added:1");
    let again = env.run(&["template", "add", "./x.toml", "--name", "added"]);
    assert!(assert_one_line_error(&again).contains("already exists"));
    assert_code(&env.run(&["template", "remove", "added"]), 0);
    assert_one_line_error(&env.run(&["run", "--template", "added", "--", "true"]));
    assert!(
        assert_one_line_error(&env.run(&["template", "remove", "python"])).contains("built-in")
    );

    // save: from a kept sandbox's record; values only from -e.
    let name = unique_name("tsave");
    let _guard = KeptGuard::new(&name);
    let out = env.run(&[
        "run",
        "--name",
        &name,
        "--memory",
        "300m",
        "-p",
        "restrictive",
        "-e",
        "SECRET=hunter2",
        "-i",
        BUSYBOX,
        "--",
        "true",
    ]);
    assert_code(&out, 0);
    let out = env.run(&[
        "template", "save", "--from", &name, "-e", "MODE=ci", "saved",
    ]);
    assert_code(&out, 0);
    let text = std::fs::read_to_string(
        env.home_dir()
            .join(".config/agentkernel/templates/saved.toml"),
    )
    .unwrap();
    assert!(
        !text.contains("hunter2") && !text.contains("SECRET"),
        "{text}"
    );
    let r = env.dry_run(&["--template", "saved", "--", "true"]);
    assert_eq!(r["image"], BUSYBOX);
    assert_eq!(r["profile"], "restrictive");
    assert_eq!(memory(&r), 300 << 20);
    assert_eq!(r["env"], serde_json::json!(["MODE"]));
}

/// `setup` runs once when a kept sandbox is created, with its output on
/// stderr; `--branch` reusing the sandbox and `exec` do not run it again. A
/// failing setup removes the new sandbox and is exit 125.
#[test]
fn setup_runs_once_per_kept_sandbox() {
    let env = TestEnv::new();
    let repo = env.project_dir().join("tplrepo");
    std::fs::create_dir(&repo).unwrap();
    let git = Command::new("git")
        .args(["init", "-q", "-b", "setup"])
        .current_dir(&repo)
        .output()
        .expect("git is needed for the --branch tests");
    assert!(git.status.success());
    let name = "tplrepo-setup";
    let guard = KeptGuard::new(name);
    guard.remove_leftover();
    write(
        &repo.join("s.toml"),
        "[sandbox]\ninit_script = \"echo from-init-script\"\n[template]\nsetup = [\"echo setup-output\", \"echo ran >> /tmp/setup-count\"]\n",
    );
    let run = || {
        env.cmd()
            .current_dir(&repo)
            .args([
                "run",
                "--branch",
                "--template",
                "./s.toml",
                "-i",
                BUSYBOX,
                "--",
                "cat",
                "/tmp/setup-count",
            ])
            .output()
            .unwrap()
    };
    let out = run();
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "ran\n", "setup's own output goes to stderr");
    assert!(
        stderr(&out).contains("from-init-script\nsetup-output\n"),
        "{}",
        stderr(&out)
    );
    let out = run();
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "ran\n", "reuse must not run setup again");
    assert!(!stderr(&out).contains("setup-output"), "{}", stderr(&out));
    let out = env.run(&["exec", name, "--", "cat", "/tmp/setup-count"]);
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "ran\n");

    // A one-shot run skips setup, and says so.
    let out = env
        .cmd()
        .current_dir(&repo)
        .args(["run", "--template", "./s.toml", "-i", BUSYBOX, "--", "true"])
        .output()
        .unwrap();
    assert_code(&out, 0);
    assert!(
        stderr(&out).contains("one-shot run skips it"),
        "{}",
        stderr(&out)
    );

    // Failing setup: 125, the sandbox is gone.
    let bad = unique_name("tplbad");
    let _bad_guard = KeptGuard::new(&bad);
    write(
        &repo.join("f.toml"),
        "[template]\nsetup = [\"false\", \"echo never\"]\n",
    );
    let out = env
        .cmd()
        .current_dir(&repo)
        .args([
            "run",
            "--name",
            &bad,
            "--template",
            "./f.toml",
            "-i",
            BUSYBOX,
            "--",
            "echo",
            "command-ran",
        ])
        .output()
        .unwrap();
    assert!(!stdout(&out).contains("command-ran") && !stderr(&out).contains("never"));
    assert_setup_failed_and_gone(&env, &out, &bad);
}

/// `sandbox create --template`: the template is applied as for `run`, and
/// its setup runs once in the new sandbox, though no first command runs; a
/// failing setup is exit 125 and leaves no sandbox.
#[test]
fn sandbox_create_runs_the_template_setup_once() {
    let env = TestEnv::new();
    let create = |name: &str, template: &str, text: &str| {
        write(&env.project_dir().join(template), text);
        let template = format!("./{template}");
        env.run(&[
            "sandbox",
            "create",
            name,
            "--template",
            &template,
            "-i",
            BUSYBOX,
        ])
    };
    let name = unique_name("tplcreate");
    let _guard = KeptGuard::new(&name);
    let out = create(
        &name,
        "s.toml",
        "[template]\nsetup = [\"echo setup-output\", \"echo ran >> /tmp/setup-count\"]\n",
    );
    assert_code(&out, 0);
    assert!(stderr(&out).contains("setup-output"), "{}", stderr(&out));
    let out = env.run(&["exec", &name, "--", "cat", "/tmp/setup-count"]);
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "ran\n", "setup runs once at creation");

    let bad = unique_name("tplcreatebad");
    let _bad_guard = KeptGuard::new(&bad);
    let out = create(&bad, "f.toml", "[template]\nsetup = [\"false\"]\n");
    assert_setup_failed_and_gone(&env, &out, &bad);
}

/// A setup that exited 1: exit 125, said so, and the sandbox `name` is gone.
fn assert_setup_failed_and_gone(env: &TestEnv, out: &std::process::Output, name: &str) {
    assert_code(out, AK_ERROR);
    assert!(
        stderr(out).contains("setup failed (exit 1)"),
        "{}",
        stderr(out)
    );
    let list = env.run(&["sandbox", "list", "--json"]);
    assert!(!stdout(&list).contains(name), "{}", stdout(&list));
    if !is_native() {
        assert!(!container_exists(&kept_object(name)));
    }
}

/// A loopback HTTPS server (Python's http.server with ssl) serving `root`
/// with a certificate from a CA made for the test. Killed by PID on drop.
struct HttpsServer {
    child: Child,
    port: u16,
    root: PathBuf,
    ca: PathBuf,
    _dir: tempfile::TempDir,
}

impl HttpsServer {
    fn start() -> HttpsServer {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // Arguments are one string split at spaces (none has a space inside).
        let openssl = |args: &str| {
            let args: Vec<&str> = args.split_whitespace().collect();
            let out = Command::new("openssl")
                .args(&args)
                .current_dir(d)
                .output()
                .expect("openssl is needed for the github: template tests");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let new_key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        openssl(&format!(
            "req -x509 {new_key} -keyout ca.key -out ca.pem -days 2 -subj /CN=agentkernel-test-CA \
             -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign"
        ));
        openssl(&format!(
            "req {new_key} -keyout srv.key -out srv.csr -subj /CN=127.0.0.1"
        ));
        write(
            &d.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        );
        openssl(
            "x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out srv.pem -days 2 -extfile ext.cnf",
        );
        let root = d.join("www");
        std::fs::create_dir(&root).unwrap();
        write(
            &d.join("serve.py"),
            r#"import functools, http.server, ssl, sys
root, cert, key, port_file = sys.argv[1:5]
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=root)
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
with open(port_file + ".tmp", "w") as f:
    f.write(str(server.server_address[1]))
import os
os.rename(port_file + ".tmp", port_file)
server.serve_forever()
"#,
        );
        let port_file = d.join("port");
        let child = Command::new("python3")
            .arg(d.join("serve.py"))
            .args([&root, &d.join("srv.pem"), &d.join("srv.key"), &port_file])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 is needed for the github: template tests");
        let start = Instant::now();
        let port = loop {
            if let Ok(p) = std::fs::read_to_string(&port_file) {
                break p.trim().parse().unwrap();
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the HTTPS test server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        HttpsServer {
            child,
            port,
            root,
            ca: d.join("ca.pem"),
            _dir: dir,
        }
    }

    fn publish(&self, path: &str, text: &str) {
        write(&self.root.join(path), text);
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn github_templates_are_fetched_once_pinned_and_updated() {
    let env = TestEnv::new();
    let mut server = HttpsServer::start();
    write(
        &user_config(&env),
        &format!(
            "[templates]\ngithub_base = \"https://127.0.0.1:{}\"\nca_file = \"{}\"\n",
            server.port,
            server.ca.display()
        ),
    );
    let v1 = "[sandbox]\nimage = \"gh-image:1\"\n[resources]\nmemory = \"300m\"\n";
    server.publish("acme/tpls/main/py.toml", v1);
    let r = env.dry_run(&["--template", "github:acme/tpls/py", "--", "true"]);
    assert_eq!(r["image"], "gh-image:1");
    assert_eq!(r["template"]["source"], "github");
    assert_eq!(r["template"]["location"], "github:acme/tpls/py.toml");
    assert_eq!(r["template"]["sha256"], sha256_hex(v1.as_bytes()));

    // The upstream file moves on: runs keep the pinned copy.
    let v2 = "[sandbox]\nimage = \"gh-image:2\"\n[network]\nenabled = false\n";
    server.publish("acme/tpls/main/py.toml", v2);
    let r = env.dry_run(&["--template", "github:acme/tpls/py", "--", "true"]);
    assert_eq!(r["image"], "gh-image:1");

    // A commit REF is recorded as such.
    let sha = "0123456789abcdef0123456789abcdef01234567";
    server.publish(&format!("acme/tpls/{sha}/py.toml"), v1);
    let r = env.dry_run(&[
        "--template",
        &format!("github:acme/tpls/py@{sha}"),
        "--",
        "true",
    ]);
    assert_eq!(r["template"]["commit"], sha);

    // Errors: 404, not TOML, bad keys, too big: 125 naming the spec.
    server.publish(
        "acme/tpls/main/page.toml",
        "<html><body>Not a template</body></html>",
    );
    server.publish("acme/tpls/main/keys.toml", "[sandbox]\nimgae = \"x\"\n");
    for (spec, needle) in [
        ("github:acme/tpls/absent", "404"),
        ("github:acme/tpls/page", "not TOML"),
        ("github:acme/tpls/keys", "sandbox.imgae"),
    ] {
        let line = assert_one_line_error(&env.run(&["run", "--template", spec, "--", "true"]));
        assert!(line.contains(spec) && line.contains(needle), "{line}");
    }

    // Without the test CA the server is not trusted.
    let other = TestEnv::new();
    write(
        &user_config(&other),
        &format!(
            "[templates]\ngithub_base = \"https://127.0.0.1:{}\"\n",
            server.port
        ),
    );
    let line = assert_one_line_error(&other.run(&[
        "run",
        "--template",
        "github:acme/tpls/py",
        "--",
        "true",
    ]));
    assert!(line.contains("cannot fetch"), "{line}");

    // `template add` keeps a local copy that `update` can refresh.
    assert_code(
        &env.run(&[
            "template",
            "add",
            "github:acme/tpls/py",
            "--name",
            "gh-local",
        ]),
        0,
    );
    // It copies the pinned version, not what the server has now.
    assert_eq!(
        env.dry_run(&["--template", "gh-local", "--", "true"])["image"],
        "gh-image:1"
    );
    let list = stdout(&env.run(&["template", "list"]));
    assert!(
        list.contains("github:acme/tpls/py.toml") && list.contains("gh-local"),
        "{list}"
    );

    // update: shows the changed keys, then runs use the new copy.
    let out = env.run(&["template", "update", "github:acme/tpls/py"]);
    assert_code(&out, 0);
    let shown = stdout(&out);
    for line in [
        "~ sandbox.image: \"gh-image:1\" -> \"gh-image:2\"",
        "- resources.memory = \"300m\"",
        "+ network.enabled = false",
    ] {
        assert!(shown.contains(line), "{line} not in {shown}");
    }
    assert!(shown.contains(&sha256_hex(v2.as_bytes())), "{shown}");
    let r = env.dry_run(&["--template", "github:acme/tpls/py", "--", "true"]);
    assert_eq!(r["image"], "gh-image:2");
    assert_eq!(r["policy"]["network"], false);
    let out = env.run(&["template", "update", "gh-local"]);
    assert_code(&out, 0);
    assert!(stdout(&out).contains("changed"), "{}", stdout(&out));
    assert_eq!(
        env.dry_run(&["--template", "gh-local", "--", "true"])["image"],
        "gh-image:2"
    );
    let out = env.run(&["template", "update", "gh-local"]);
    assert!(stdout(&out).contains("unchanged"), "{}", stdout(&out));

    // Offline: the pinned copies still serve; an unfetched one is 125.
    server.stop();
    let r = env.dry_run(&["--template", "github:acme/tpls/py", "--", "true"]);
    assert_eq!(r["image"], "gh-image:2");
    let line = assert_one_line_error(&env.run(&[
        "run",
        "--template",
        "github:acme/tpls/other",
        "--",
        "true",
    ]));
    assert!(line.contains("cannot fetch"), "{line}");
    let line = assert_one_line_error(&env.run(&["template", "update", "gh-local"]));
    assert!(line.contains("cannot fetch"), "{line}");

    // A tampered cache is refused, not used.
    let cached = env
        .state_dir()
        .join("templates/github/acme/tpls/main/py.toml");
    std::fs::write(&cached, "[sandbox]\nimage = \"evil:1\"\n").unwrap();
    let line = assert_one_line_error(&env.run(&[
        "run",
        "--template",
        "github:acme/tpls/py",
        "--",
        "true",
    ]));
    assert!(line.contains("no longer matches its pin"), "{line}");

    // remove forgets the cached copy.
    assert_code(&env.run(&["template", "remove", "github:acme/tpls/py"]), 0);
    assert!(!cached.exists());
}

/// Exit 125 with one error line after the template's notices; that line.
fn error_after_notices(out: &std::process::Output) -> String {
    assert_code(out, 125);
    let err = stderr(out);
    let errors: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("agentkernel: notice: "))
        .collect();
    assert_eq!(errors.len(), 1, "one error line expected:\n{err}");
    errors[0].to_string()
}

/// The keys the agent templates bind, in the test's own vault.
fn set_agent_keys(env: &TestEnv) {
    for key in ["ANTHROPIC_API_KEY", "OPENAI_API_KEY"] {
        assert_code(&env.run(&["secret", "set", key, "test-value-not-real"]), 0);
    }
}

/// The agent templates' sample command, with their limits; their key's
/// variable holds a placeholder, never the value.
fn run_agent_builtin(env: &TestEnv, name: &str, key: &str) -> std::process::Output {
    let script = format!(
        "cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes; \
         echo \"${key}\" | cut -c1-23; ls -la /workspace >/dev/null && echo listed"
    );
    env.run(&[
        "run",
        "--template",
        name,
        "-i",
        BUSYBOX,
        "--",
        "sh",
        "-c",
        &script,
    ])
}

/// claude-sandbox and codex-sandbox run where the egress proxy does: their
/// key goes through it, the sandbox sees a placeholder.
fn agent_builtins_run_with_a_placeholder_for_their_key() {
    let env = TestEnv::new();
    set_agent_keys(&env);
    for (name, key) in [
        ("claude-sandbox", "ANTHROPIC_API_KEY"),
        ("codex-sandbox", "OPENAI_API_KEY"),
    ] {
        let out = run_agent_builtin(&env, name, key);
        assert_code(&out, 0);
        assert_eq!(
            stdout(&out),
            format!("{}\nAGENTKERNEL_PLACEHOLDER\nlisted\n", 1024u64 << 20),
            "{name}"
        );
    }
}

/// Without the key, the run is refused naming it: never a run without it.
fn agent_builtin_without_its_key_is_125_naming_it() {
    let env = TestEnv::new();
    let out = run_agent_builtin(&env, "claude-sandbox", "ANTHROPIC_API_KEY");
    let line = error_after_notices(&out);
    assert!(
        line.contains("ANTHROPIC_API_KEY") && line.contains("secret set"),
        "{line}"
    );
}

on_every_proxy_backend!(
    agent_builtins_native_only, agent_builtins_engine_only:
    agent_builtins_run_with_a_placeholder_for_their_key,
    agent_builtin_without_its_key_is_125_naming_it,
);

mod native_only {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;

    /// A template's limits are a preset's, like a profile's: a rootless
    /// native sandbox (no cgroups) drops them with a notice instead of
    /// refusing every built-in; `--memory` as a flag is still refused.
    #[test]
    fn rootless_template_limits_are_presets_not_demands() {
        assert_backend_in_scope();
        ensure_prerequisites();
        let uid = 4391;
        let dir = tempfile::Builder::new()
            .prefix("ak-tpl-rootless-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        for sub in ["home", "state", "project"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        let chown = Command::new("chown")
            .arg("-R")
            .arg(format!("{uid}:{uid}"))
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(chown.success());
        let run = |extra: &[&str]| {
            Command::new(binary())
                .uid(uid)
                .gid(uid)
                .env("HOME", dir.path().join("home"))
                .env("AGENTKERNEL_HOME", dir.path().join("state"))
                .env("AGENTKERNEL_BACKEND", "native")
                .env("AGENTKERNEL_REGISTRY_MIRRORS", TEST_REGISTRY)
                .env_remove("XDG_CONFIG_HOME")
                .env_remove("XDG_DATA_HOME")
                .current_dir(dir.path().join("project"))
                .stdin(Stdio::null())
                .args(["run", "--template", "secure", "-i", BUSYBOX])
                .args(extra)
                .args(["--", "echo", "ran"])
                .output()
                .unwrap()
        };
        let out = run(&[]);
        assert_code(&out, 0);
        assert_eq!(stdout(&out), "ran\n");
        assert!(stderr(&out).contains("not enforced"), "{}", stderr(&out));
        let line = assert_one_line_error(&run(&["--memory", "256m"]));
        assert!(
            line.contains("rootless") && line.contains("memory"),
            "{line}"
        );
    }
}
