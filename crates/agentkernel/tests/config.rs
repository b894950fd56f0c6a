//! Config files (docs/config.md): `./agentkernel.toml` < `--config FILE` < flags.

mod common;

use common::*;

/// Prints which test image the command ran in.
const WHICH_IMAGE: &str = "if [ -e /usr/bin/python3 ]; then echo python; else echo busybox; fi";

fn image_config(image: &str) -> String {
    format!("[sandbox]\nimage = \"{image}\"\npull = \"never\"\n")
}

fn which_image(env: &TestEnv, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["run"];
    args.extend_from_slice(extra);
    args.extend(["sh", "-c", WHICH_IMAGE]);
    env.run(&args)
}

/// The one-line error of a run under this `./agentkernel.toml`.
fn project_config_error(toml: &str) -> String {
    let env = TestEnv::new();
    std::fs::write(env.project_dir().join("agentkernel.toml"), toml).unwrap();
    assert_one_line_error(&env.run_with().output(&["true"]))
}

#[test]
fn project_config_sets_the_image() {
    let env = TestEnv::new();
    std::fs::write(
        env.project_dir().join("agentkernel.toml"),
        image_config(PYTHON),
    )
    .unwrap();
    let out = which_image(&env, &[]);
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "python\n");

    std::fs::write(
        env.project_dir().join("agentkernel.toml"),
        image_config(BUSYBOX),
    )
    .unwrap();
    let out = which_image(&env, &[]);
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "busybox\n");
}

#[test]
fn config_flag_overrides_project_config() {
    let env = TestEnv::new();
    std::fs::write(
        env.project_dir().join("agentkernel.toml"),
        image_config(BUSYBOX),
    )
    .unwrap();
    let other = env.home_dir().join("other.toml");
    std::fs::write(&other, image_config(PYTHON)).unwrap();
    let out = which_image(&env, &["-c", other.to_str().unwrap()]);
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "python\n");
    let out = which_image(&env, &["--config", other.to_str().unwrap()]);
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "python\n");
}

#[test]
fn flags_override_both_config_files() {
    let env = TestEnv::new();
    std::fs::write(
        env.project_dir().join("agentkernel.toml"),
        image_config(PYTHON),
    )
    .unwrap();
    let other = env.home_dir().join("other.toml");
    std::fs::write(&other, image_config(PYTHON)).unwrap();
    let out = which_image(&env, &["-c", other.to_str().unwrap(), "-i", BUSYBOX]);
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "busybox\n");
}

#[test]
fn user_config_is_below_project_config() {
    let env = TestEnv::new();
    let user_dir = env.home_dir().join(".config/agentkernel");
    std::fs::create_dir_all(&user_dir).unwrap();
    std::fs::write(user_dir.join("config.toml"), image_config(PYTHON)).unwrap();
    let out = which_image(&env, &[]);
    assert_code(&out, 0);
    assert_eq!(
        stdout(&out),
        "python\n",
        "~/.config/agentkernel/config.toml is read"
    );

    std::fs::write(
        env.project_dir().join("agentkernel.toml"),
        image_config(BUSYBOX),
    )
    .unwrap();
    let out = which_image(&env, &[]);
    assert_code(&out, 0);
    assert_eq!(
        stdout(&out),
        "busybox\n",
        "./agentkernel.toml wins over the user's"
    );
}

#[test]
fn config_sets_env_and_profile_and_flags_win() {
    let env = TestEnv::new();
    std::fs::write(
        env.project_dir().join("agentkernel.toml"),
        format!(
            "[sandbox]\nimage = \"{BUSYBOX}\"\nprofile = \"restrictive\"\nenv = {{ GREETING = \"from-config\" }}\n"
        ),
    )
    .unwrap();
    let script = "echo \"$GREETING\"; cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '";
    let out = env
        .run_with()
        .detected_image()
        .output(&["sh", "-c", script]);
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "from-config\nlo\n");

    let out = env
        .run_with()
        .env("GREETING=from-flag")
        .detected_image()
        .output(&["sh", "-c", "echo \"$GREETING\""]);
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "from-flag\n");
}

#[test]
fn unknown_key_is_125_naming_the_key() {
    let line = project_config_error("[sandbox]\nimgae = \"x\"\n");
    assert!(line.contains("imgae"), "{line}");
}

#[test]
fn unknown_section_is_125_naming_it() {
    let line = project_config_error("[sandbx]\nimage = \"x\"\n");
    assert!(line.contains("sandbx"), "{line}");
}

#[test]
fn bad_value_is_125_naming_the_key() {
    let line = project_config_error("[sandbox]\nttl = \"forever\"\n");
    assert!(line.contains("sandbox.ttl"), "{line}");
}

#[test]
fn bad_value_in_config_flag_file_is_125() {
    let env = TestEnv::new();
    let file = env.home_dir().join("bad.toml");
    std::fs::write(&file, "[resources]\nmemory = \"lots\"\n").unwrap();
    let out = env.run_with().config(&file).output(&["true"]);
    let line = assert_one_line_error(&out);
    assert!(line.contains("resources.memory"), "{line}");
}

#[test]
fn missing_config_file_is_125() {
    let env = TestEnv::new();
    let out = env.run_with().config("missing.toml").output(&["true"]);
    let line = assert_one_line_error(&out);
    assert!(line.contains("missing.toml"), "{line}");
}

#[test]
fn malformed_toml_is_125() {
    let line = project_config_error("[sandbox\nimage = \n");
    assert!(line.contains("agentkernel.toml"), "{line}");
}

/// The image a run would use, and why (`run --dry-run`, so the answer does
/// not depend on which images this machine holds).
fn resolved_image(env: &TestEnv, args: &[&str]) -> (String, String) {
    let spec = env.dry_run(args);
    (
        spec["image"].as_str().unwrap().to_string(),
        spec["image_source"].as_str().unwrap().to_string(),
    )
}

#[test]
fn image_is_detected_from_the_command() {
    let env = TestEnv::new();
    for (command, image) in [
        ("python3", "python:3.12-alpine"),
        ("npm", "node:22-alpine"),
        ("cargo", "rust:1.85-alpine"),
        ("go", "golang:1.23-alpine"),
        ("bundle", "ruby:3.3-alpine"),
    ] {
        assert_eq!(
            resolved_image(&env, &[command, "--version"]),
            (image.to_string(), "command".to_string()),
            "{command}"
        );
    }
}

#[test]
fn image_is_detected_from_project_files() {
    let env = TestEnv::new();
    std::fs::write(env.project_dir().join("package.json"), "{}\n").unwrap();
    assert_eq!(
        resolved_image(&env, &["sh", "-c", "true"]),
        ("node:22-alpine".to_string(), "project-file".to_string())
    );
    // The command's first word wins over project files.
    assert_eq!(
        resolved_image(&env, &["python3", "-V"]).0,
        "python:3.12-alpine"
    );
}

#[test]
fn image_defaults_to_alpine() {
    let env = TestEnv::new();
    assert_eq!(
        resolved_image(&env, &["sh", "-c", "true"]),
        ("alpine:3.20".to_string(), "default".to_string())
    );
}

#[test]
fn image_flag_wins_over_config_and_command() {
    let env = TestEnv::new();
    std::fs::write(
        env.project_dir().join("agentkernel.toml"),
        image_config(PYTHON),
    )
    .unwrap();
    assert_eq!(
        resolved_image(&env, &["python3", "-V"]),
        (PYTHON.to_string(), "config".to_string())
    );
    assert_eq!(
        resolved_image(&env, &["-i", BUSYBOX, "python3", "-V"]),
        (BUSYBOX.to_string(), "flag".to_string())
    );
}

#[test]
fn dry_run_shows_the_resolved_sandbox_and_creates_nothing() {
    let env = TestEnv::new();
    let name = unique_name("dry");
    let spec = env.dry_run(&[
        "--name",
        &name,
        "--profile",
        "restrictive",
        "--memory",
        "64m",
        "-e",
        "TOKEN=s3cret",
        "--pull",
        "always",
        "-i",
        "agentkernel-test/nope:1",
        "sh",
        "-c",
        "true",
    ]);
    assert_eq!(spec["backend"], backend());
    assert_eq!(spec["profile"], "restrictive");
    assert_eq!(spec["policy"]["network"], false);
    assert_eq!(spec["policy"]["limits"]["memory_bytes"], 64 << 20);
    assert_eq!(spec["env"], serde_json::json!(["TOKEN"]));
    assert!(
        !spec.to_string().contains("s3cret"),
        "an env value leaked: {spec}"
    );
    assert_eq!(spec["keep"]["name"], name.as_str());
    assert_eq!(spec["mounts"][0]["kind"], "workspace");
    assert_eq!(spec["mounts"][0]["mode"], "read-only");
    // Not pulled (the image does not exist anywhere), not created, not recorded.
    assert!(!container_exists(&kept_object(&name)));
    let list = env.run(&["sandbox", "list"]);
    assert_code(&list, 0);
    assert!(!stdout(&list).contains(&name), "{}", stdout(&list));
    assert!(env.leftover_runs().is_empty());
    // Invalid input is still refused, as without --dry-run.
    let out = env
        .run_with()
        .flags(&["--dry-run", "--memory", "lots"])
        .detected_image()
        .output(&["true"]);
    assert_one_line_error(&out);
}

/// A cloned repository's `./agentkernel.toml` asking for a permissive
/// profile, a host directory outside the project, a published port and env.
fn write_hostile_project_config(env: &TestEnv, outside: &std::path::Path) {
    std::fs::write(
        env.project_dir().join("agentkernel.toml"),
        format!(
            "[sandbox]\nimage = \"{BUSYBOX}\"\nprofile = \"permissive\"\nvolumes = [\"{}:/hostroot\"]\nenv = {{ FROM_PROJECT = \"1\" }}\n[network]\nports = [\"8080\"]\n",
            outside.display()
        ),
    )
    .unwrap();
}

const WRITE_TO_HOST: [&str; 4] = ["run", "--fast=false", "touch", "/hostroot/written"];

#[test]
fn untrusted_project_config_cannot_loosen_the_sandbox() {
    let env = TestEnv::new();
    let outside = env.home_dir().join("outside");
    std::fs::create_dir(&outside).unwrap();
    write_hostile_project_config(&env, &outside);
    let written = outside.join("written");

    let out = env.run(&WRITE_TO_HOST);
    let line = assert_one_line_error(&out);
    for named in [
        "sandbox.profile = permissive",
        "sandbox.volumes",
        "network.ports",
        "agentkernel trust",
    ] {
        assert!(line.contains(named), "{named} not named: {line}");
    }
    assert!(!written.exists(), "the untrusted file reached the host");
    assert!(env.leftover_runs().is_empty(), "{:?}", env.leftover_runs());

    let out = env.run(&["trust"]);
    assert_code(&out, 0);
    assert!(stderr(&out).contains("trusted"), "{}", stderr(&out));
    let out = env.run(&WRITE_TO_HOST);
    assert_code(&out, 0);
    assert!(
        written.exists(),
        "the trusted file's volume was not mounted"
    );
    std::fs::remove_file(&written).unwrap();

    // A changed file is a different file: trust again.
    let file = env.project_dir().join("agentkernel.toml");
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str("# edited after trust\n");
    std::fs::write(&file, text).unwrap();
    let out = env.run(&WRITE_TO_HOST);
    let line = assert_one_line_error(&out);
    assert!(line.contains("agentkernel trust"), "{line}");
    assert!(!written.exists(), "the edited file reached the host");

    let out = env.run(&["trust", "--list"]);
    assert_code(&out, 0);
    assert!(stdout(&out).contains("changed since"), "{}", stdout(&out));
}

#[test]
fn naming_the_project_config_with_config_flag_is_consent() {
    let env = TestEnv::new();
    let outside = env.home_dir().join("outside");
    std::fs::create_dir(&outside).unwrap();
    write_hostile_project_config(&env, &outside);
    let out = env
        .run_with()
        .config("./agentkernel.toml")
        .flags(&["--fast=false"])
        .detected_image()
        .output(&["touch", "/hostroot/written"]);
    assert_code(&out, 0);
    assert!(outside.join("written").exists());
}

#[test]
fn the_same_settings_as_flags_are_consent() {
    let env = TestEnv::new();
    let outside = env.home_dir().join("outside");
    std::fs::create_dir(&outside).unwrap();
    write_hostile_project_config(&env, &outside);
    let volume = format!("{}:/hostroot", outside.display());
    let mut args = vec![
        "run",
        "--fast=false",
        "-p",
        "permissive",
        "-v",
        &volume,
        "touch",
        "/hostroot/written",
    ];
    // Profile and volume given again: only the port is left to consent to.
    let out = env.run(&args);
    let line = assert_one_line_error(&out);
    assert!(
        line.contains("network.ports")
            && !line.contains("sandbox.volumes")
            && !line.contains("sandbox.profile"),
        "{line}"
    );
    assert!(!outside.join("written").exists());
    args.splice(2..2, ["-P", "8080"]);
    let out = env.run(&args);
    assert_code(&out, 0);
    assert!(outside.join("written").exists());
}

#[test]
fn tightening_project_config_applies_without_trust() {
    let env = TestEnv::new();
    std::fs::write(
        env.project_dir().join("agentkernel.toml"),
        format!(
            "[sandbox]\nimage = \"{BUSYBOX}\"\nprofile = \"restrictive\"\n[network]\nenabled = false\n[resources]\nmemory = \"256m\"\n"
        ),
    )
    .unwrap();
    let script = "cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '; \
                  if touch /rootfs-write 2>/dev/null; then echo root-writable; else echo root-read-only; fi";
    let out = env
        .run_with()
        .detected_image()
        .output(&["sh", "-c", script]);
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "lo\nroot-read-only\n");
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
}

// ---- thrashr888/agentkernel's schema (v0.18): its documented keys and the
// keys its built-in templates use, in files written here. ----

/// A loopback port nothing listens on right now, for `[ports]` cases.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `agentkernel run -c FILE -i BUSYBOX -- SCRIPT` with `toml` in FILE.
fn run_with_config_file(env: &TestEnv, toml: &str, script: &str) -> std::process::Output {
    let file = env.home_dir().join("upstream.toml");
    std::fs::write(&file, toml).unwrap();
    env.run_with()
        .config(&file)
        .output(&["--", "sh", "-c", script])
}

#[test]
fn upstream_config_files_run() {
    let (port_a, port_b, port_c) = (free_port(), free_port(), free_port());
    let cases: Vec<(&str, String, &[&str])> = vec![
        ("minimal", "[sandbox]\nname = \"my-project\"\n".into(), &[]),
        (
            "readme example",
            "[sandbox]\nname = \"my-project\"\nbase_image = \"python:3.12-alpine\"\n\
             [agent]\npreferred = \"claude\"\n[resources]\nvcpus = 1\nmemory_mb = 1024\n\
             [security]\nprofile = \"restrictive\"\nnetwork = false\n"
                .into(),
            &["agent.preferred"],
        ),
        (
            "agent template",
            "[sandbox]\nname = \"claude-sandbox\"\nbase_image = \"node:22-alpine\"\n\
             init_script = \"\"\"\nset -e\nnpm install -g x\n\"\"\"\n\
             [agent]\npreferred = \"claude\"\ncompatibility_mode = \"claude\"\n\
             [resources]\nvcpus = 1\nmemory_mb = 1024\n\
             [security]\nprofile = \"moderate\"\n[security.domains]\nallow = [\"api.anthropic.com\"]\n\
             [template]\ndescription = \"d\"\ncategory = \"Agent Sandboxes\"\nhelp_text = \"h\"\n"
                .into(),
            &[
                "sandbox.init_script",
                "agent.compatibility_mode",
                "security.domains.allow",
                "template.help_text",
            ],
        ),
        (
            "datastore template",
            format!(
                "[sandbox]\nname = \"postgres\"\nbase_image = \"postgres:17-alpine\"\n\
                 [security]\nprofile = \"moderate\"\nnetwork = true\n[ports]\n{port_a} = 80\n\
                 [environment]\nPGDATA = \"/tmp/pg\"\n\
                 [template]\nsecret_files = [\"POSTGRES_PASSWORD\"]\n"
            ),
            &["template.secret_files"],
        ),
        (
            "every other section",
            format!(
                "[sandbox]\nname = \"full\"\nruntime = \"python\"\n\
                 [build]\ndockerfile = \"Dockerfile.dev\"\ncontext = \".\"\ntarget = \"dev\"\nno_cache = true\n\
                 [build.args]\nNODE_VERSION = \"22\"\n\
                 [network]\nvsock_cid = 3\nports = [\"{port_b}:80\"]\n\
                 [security]\nprofile = \"moderate\"\nmount_cwd = true\nmount_home = false\npass_env = false\nseccomp = \"default\"\n\
                 [security.commands]\nallow = [\"python3\"]\n\
                 [security.transport]\nssh = true\ncert_ttl = \"1h\"\n\
                 [ssh]\nenabled = true\nport = 22\nuser = \"sandbox\"\n\
                 [[files]]\nsource = \".env\"\ndest = \"/app/.env\"\n\
                 [orchestrator]\nprovider = \"kubernetes\"\nnamespace = \"agentkernel\"\n\
                 [enterprise]\nenabled = false\npolicy_server = \"https://policy.example\"\n\
                 [api]\nallow_sudo_exec = false\n[api.tls]\nenabled = false\n\
                 [[proxy.hooks]]\nname = \"audit\"\nevent = \"on_request\"\n[proxy.hooks.target]\ntype = \"audit\"\n\
                 [llm_keys]\n\"api.openai.com\" = \"OPENAI_API_KEY\"\n"
            ),
            &[
                "sandbox.runtime",
                "[build] skipped: -i names the image",
                "network.vsock_cid",
                "security.commands.allow",
                "security.transport.ssh",
                "ssh.enabled",
                "orchestrator.provider",
                "enterprise.policy_server",
                "api.tls",
                "proxy.hooks",
                "llm_keys.api.openai.com",
            ],
        ),
        (
            "the documented full example",
            format!(
                "[sandbox]\nname = \"my-fullstack-app\"\n\
                 [build]\ndockerfile = \"Dockerfile.dev\"\ncontext = \".\"\n[build.args]\nNODE_VERSION = \"22\"\n\
                 [agent]\npreferred = \"claude\"\n[resources]\nvcpus = 4\nmemory_mb = 2048\n\
                 [security]\nprofile = \"moderate\"\nnetwork = true\nmount_cwd = true\n\
                 [network]\nports = [\"{port_c}:3000\"]\n[ssh]\nenabled = true\ncert_ttl = \"1h\"\n\
                 [[files]]\nsource = \".env\"\ndest = \"/app/.env\"\nmode = \"0600\"\n"
            ),
            &["[build] skipped: -i names the image", "ssh.enabled"],
        ),
        (
            "domain rules without a network",
            "[sandbox]\nname = \"secure\"\n[security]\nprofile = \"restrictive\"\n\
             [security.domains]\nallow = [\"pypi.org\"]\nallowlist_only = true\nblock = [\"169.254.169.254\"]\n"
                .into(),
            &["security.domains.block has no effect", "egress allow-list"],
        ),
    ];
    for (case, toml, notices) in cases {
        let env = TestEnv::new();
        // `[[files]]` sources are relative to the config file (in home).
        std::fs::write(env.home_dir().join(".env"), "A=1\n").unwrap();
        let out = run_with_config_file(&env, &toml, "true");
        assert_code(&out, 0);
        let err = stderr(&out);
        for key in notices {
            assert!(
                err.lines()
                    .any(|l| l.starts_with("agentkernel: notice: ") && l.contains(key)),
                "{case}: no notice naming {key} in:\n{err}"
            );
        }
    }
}

#[test]
fn upstream_keys_we_cannot_honour_safely_are_refused() {
    let cases = [
        (
            "[security.domains]\nallowlist_only = true\n",
            "security.domains.allowlist_only",
        ),
        (
            "[security.domains]\nblock = [\"169.254.169.254\"]\n",
            "security.domains.block",
        ),
        (
            "[security]\nseccomp = \"restrictive\"\n",
            "security.seccomp",
        ),
        ("[security]\nseccomp = \"ai-agent\"\n", "security.seccomp"),
        ("[security]\nseccomp = \"moderate\"\n", "security.seccomp"),
        (
            "[security.commands]\nblock = [\"rm\"]\n",
            "security.commands",
        ),
        ("[security]\nread_only = true\n", "security.read_only"),
        ("[enterprise]\nenabled = true\n", "enterprise.enabled"),
        (
            "[security.transport]\nrequire_encrypted = true\n[network]\nports = [\"8080:80\"]\n",
            "require_encrypted",
        ),
        (
            "[security]\nprofile = \"restrictive\"\nnetwork = true\n",
            "security.network",
        ),
    ];
    for (body, key) in cases {
        let env = TestEnv::new();
        let toml = format!("[sandbox]\nname = \"refused\"\n{body}");
        let out = run_with_config_file(&env, &toml, "true");
        let line = assert_one_line_error(&out);
        assert!(line.contains(key), "{body}: {line}");
        assert!(env.leftover_runs().is_empty(), "{body}: left a run behind");
    }
    // The restrictive profile's filter denies ptrace too: upstream's "moderate" holds there.
    let env = TestEnv::new();
    let out = run_with_config_file(
        &env,
        "[security]\nprofile = \"restrictive\"\nseccomp = \"moderate\"\n",
        "true",
    );
    assert_code(&out, 0);
}

#[test]
fn several_unknown_keys_are_listed_in_one_line_with_suggestions() {
    let line = project_config_error(
        "[sandbox]\nnmae = \"x\"\nbase_imgae = \"y\"\n[resources]\nmemory_gb = 1\n[securty]\nprofile = \"moderate\"\n",
    );
    for part in [
        "sandbox.nmae (did you mean sandbox.name?)",
        "sandbox.base_imgae (did you mean sandbox.base_image?)",
        "resources.memory_gb (did you mean resources.memory_mb?)",
        "securty (did you mean security?)",
    ] {
        assert!(line.contains(part), "{part} not in {line}");
    }
}

#[test]
fn security_profile_restrictive_is_enforced() {
    let env = TestEnv::new();
    let script = "cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '; \
                  if touch /rootfs-write 2>/dev/null; then echo root-writable; else echo root-read-only; fi";
    let out = run_with_config_file(
        &env,
        "[sandbox]\nname = \"secure\"\n[security]\nprofile = \"restrictive\"\n",
        script,
    );
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "lo\nroot-read-only\n");
}

#[test]
fn environment_section_reaches_the_command() {
    let env = TestEnv::new();
    let out = run_with_config_file(
        &env,
        "[sandbox]\nname = \"gitea\"\n[environment]\nGITEA__security__INSTALL_LOCK = \"true\"\nPASSWORD = \"\"\n",
        "echo \"$GITEA__security__INSTALL_LOCK\"; env | grep -c '^PASSWORD=$'",
    );
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "true\n1\n");
}

#[test]
fn mount_cwd_false_leaves_the_project_out() {
    let env = TestEnv::new();
    std::fs::write(env.project_dir().join("marker"), "x").unwrap();
    let script = "if [ -e /workspace/marker ]; then echo project; else echo none; fi";
    let out = run_with_config_file(&env, "[security]\nmount_cwd = false\n", script);
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "none\n");
    let out = run_with_config_file(&env, "[security]\nmount_cwd = true\n", script);
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "project\n");
}

#[test]
fn sandbox_name_names_the_kept_sandbox() {
    let env = TestEnv::new();
    let name = unique_name("cfg");
    let file = env.home_dir().join("named.toml");
    std::fs::write(&file, format!("[sandbox]\nname = \"{name}\"\n")).unwrap();
    let out = env.run_with().keep().config(&file).output(&["true"]);
    assert_code(&out, 0);
    assert!(
        env.state_dir().join("sandboxes").join(&name).is_dir(),
        "no kept sandbox named {name}"
    );
}

#[test]
fn untrusted_project_file_cannot_loosen_through_upstream_keys() {
    for (body, key) in [
        ("[security]\nprofile = \"permissive\"\n", "sandbox.profile"),
        ("[ports]\n18080 = 80\n", "network.ports"),
    ] {
        let line = project_config_error(body);
        assert!(
            line.contains(key) && line.contains("agentkernel trust"),
            "{body}: {line}"
        );
    }
}

#[test]
fn untrusted_project_file_cannot_choose_the_guest_kernel() {
    let line = project_config_error(
        "[qemu]\nkernel = \"/srv/other/vmlinux\"\nmodules = \"/srv/other/modules\"\n",
    );
    for named in [
        "qemu.kernel = /srv/other/vmlinux",
        "qemu.modules = /srv/other/modules",
        "agentkernel trust",
    ] {
        assert!(line.contains(named), "{named} not named: {line}");
    }
}

#[test]
fn qemu_initrd_is_refused_with_the_way_out() {
    let line = project_config_error("[qemu]\nkernel = \"/k\"\ninitrd = \"/i\"\n");
    assert!(
        line.contains("qemu.initrd") && line.contains("qemu.modules"),
        "{line}"
    );
    let line = project_config_error("[qemu]\nmodules = \"/lib/modules/6.1\"\n");
    assert!(line.contains("qemu.kernel"), "{line}");
}

#[test]
fn project_file_cannot_switch_the_users_network_back_on() {
    let env = TestEnv::new();
    let user_dir = env.home_dir().join(".config/agentkernel");
    std::fs::create_dir_all(&user_dir).unwrap();
    std::fs::write(user_dir.join("config.toml"), "[network]\nenabled = false\n").unwrap();
    for body in [
        "[network]\nenabled = true\n",
        "[security]\nnetwork = true\n",
    ] {
        std::fs::write(env.project_dir().join("agentkernel.toml"), body).unwrap();
        let line = assert_one_line_error(&env.run_with().output(&["true"]));
        assert!(
            line.contains("network.enabled = true") && line.contains("agentkernel trust"),
            "{body}: {line}"
        );
        // --no-network keeps the user's promise whatever the file says.
        assert_code(
            &env.run_with().flags(&["--no-network"]).output(&["true"]),
            0,
        );
    }
}

#[test]
fn sandbox_name_outside_the_rules_is_125_when_kept() {
    let env = TestEnv::new();
    let file = env.home_dir().join("named.toml");
    // A name no sandbox may have (a path, not one component): fine while unused.
    std::fs::write(&file, "[sandbox]\nname = \"../My_Project\"\n").unwrap();
    let config = file.to_str().unwrap();
    assert_code(&env.run_with().config(config).output(&["true"]), 0);
    let line = assert_one_line_error(&env.run_with().keep().config(config).output(&["true"]));
    assert!(
        line.contains("[sandbox] name") && line.contains("--name"),
        "{line}"
    );
}
