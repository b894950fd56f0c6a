//! Upstream's `[[files]]` (host files copied in when the sandbox is created)
//! and `[build]` (the engine builds the image from a Dockerfile): what they
//! do on each backend, for one-shot runs and kept sandboxes, their one-line
//! errors, and the attacks — a destination that leads out of the sandbox
//! through a symlink, and a project's file naming a host file to copy in.

mod common;

use std::path::Path;

use common::*;

fn write(path: &Path, text: &str) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(path, text).unwrap();
}

/// A config file in the test's home (not the project) with `toml`.
fn config(env: &TestEnv, toml: &str) -> String {
    let file = env.home_dir().join("upstream.toml");
    write(&file, toml);
    file.to_string_lossy().into_owned()
}

fn sh(env: &TestEnv, file: &str, script: &str) -> std::process::Output {
    env.run_with().config(file).output(&["sh", "-c", script])
}

/// Fails unless the canary directory still holds exactly `secret`, unchanged.
fn assert_canary_untouched(canary: &Path) {
    assert_eq!(
        std::fs::read_to_string(canary.join("secret")).unwrap(),
        "host secret\n",
        "a copy into the sandbox wrote the host's file"
    );
    let entries: Vec<_> = std::fs::read_dir(canary)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        entries.len(),
        1,
        "a copy into the sandbox created {entries:?} on the host"
    );
}

#[test]
fn files_are_in_place_before_the_command_with_their_modes() {
    let env = TestEnv::new();
    write(&env.home_dir().join("app.env"), "A=1\n");
    write(
        &env.home_dir().join("tools/hello.sh"),
        "#!/bin/sh\necho hello from a copied script\n",
    );
    std::fs::write(env.project_dir().join("kept.txt"), "project\n").unwrap();
    let file = config(
        &env,
        "[sandbox]\nname = \"files\"\n\
         [[files]]\nsource = \"app.env\"\ndest = \"/app/config/.env\"\nmode = \"0600\"\n\
         [[files]]\nsource = \"tools/hello.sh\"\ndest = \"/usr/local/bin/hello\"\nmode = \"0755\"\n\
         [[files]]\nsource = \"app.env\"\ndest = \"/workspace/copied.env\"\n",
    );
    let out = sh(
        &env,
        &file,
        "stat -c '%a %u %n' /app/config/.env /usr/local/bin/hello /workspace/copied.env; \
         stat -c '%a' /app/config; cat /app/config/.env; hello",
    );
    assert_code(&out, 0);
    assert_eq!(
        stdout(&out),
        "600 0 /app/config/.env\n755 0 /usr/local/bin/hello\n644 0 /workspace/copied.env\n\
         755\nA=1\nhello from a copied script\n"
    );
    // The workspace is copy-on-write under moderate: the project is unchanged.
    assert!(!env.project_dir().join("copied.env").exists());
    let resolved = env.dry_run(&["-c", &file, "--", "true"]);
    assert_eq!(
        resolved["files"][0]["dest"], "/app/config/.env",
        "{resolved}"
    );
    assert_eq!(resolved["files"][0]["mode"], "0600", "{resolved}");
    assert_eq!(resolved["pool"], false, "a warm container has no [[files]]");
    assert!(env.leftover_runs().is_empty());
}

#[test]
fn kept_sandboxes_get_their_files_once_at_creation() {
    let env = TestEnv::new();
    write(&env.home_dir().join("app.env"), "A=1\n");
    let file = config(
        &env,
        "[[files]]\nsource = \"app.env\"\ndest = \"/app/.env\"\n",
    );
    let created = unique_name("files");
    let _guard = KeptGuard::new(&created);
    let out = env.run(&["sandbox", "create", &created, "-c", &file, "-i", BUSYBOX]);
    assert_code(&out, 0);
    assert_code(
        &env.exec(&created, &["sh", "-c", "echo B=2 >> /app/.env"]),
        0,
    );
    // Later commands see the sandbox's own copy: nothing copies it again.
    write(&env.home_dir().join("app.env"), "changed on the host\n");
    let out = env.exec(&created, &["cat", "/app/.env"]);
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "A=1\nB=2\n");

    let kept = unique_name("files-run");
    let _guard = KeptGuard::new(&kept);
    let out = env
        .run_with()
        .name(&kept)
        .config(&file)
        .output(&["cat", "/app/.env"]);
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "changed on the host\n");
    assert_code(&env.sandbox("remove", &kept), 0);
    assert_code(&env.sandbox("remove", &created), 0);
}

#[test]
fn bad_entries_are_one_line_and_leave_nothing() {
    let env = TestEnv::new();
    write(&env.home_dir().join("ok.env"), "A=1\n");
    std::fs::create_dir_all(env.home_dir().join("a-dir")).unwrap();
    let cases = [
        (
            "source = \"missing.env\"\ndest = \"/app/.env\"",
            "missing.env",
        ),
        (
            "source = \"a-dir\"\ndest = \"/app/.env\"",
            "not a regular file",
        ),
        ("source = \"ok.env\"\ndest = \"app/.env\"", "absolute"),
        ("source = \"ok.env\"\ndest = \"/app/../etc/passwd\"", ".."),
        (
            "source = \"ok.env\"\ndest = \"/x\"\nmode = \"4755\"",
            "files.mode",
        ),
        (
            "source = \"ok.env\"\ndest = \"/x\"\nowner = \"root\"",
            "files.owner",
        ),
    ];
    for (entry, needle) in cases {
        let file = config(&env, &format!("[[files]]\n{entry}\n"));
        let line = assert_one_line_error(&sh(&env, &file, "true"));
        assert!(line.contains(needle), "{entry}: {line}");
        let name = unique_name("badfiles");
        let line = assert_one_line_error(
            &env.run(&["sandbox", "create", &name, "-c", &file, "-i", BUSYBOX]),
        );
        assert!(line.contains(needle), "{entry}: {line}");
        assert_one_line_error(&env.sandbox("info", &name));
    }
    assert!(
        env.leftover_runs().is_empty(),
        "a refused run left a run behind"
    );
    assert!(
        std::fs::read_dir(env.state_dir().join("sandboxes"))
            .map(|d| d.count())
            .unwrap_or(0)
            == 0,
        "a refused create left a sandbox behind"
    );
}

/// The project (a repository someone else wrote) plants symlinks to a host
/// directory and file; `[[files]]` destinations through them must land in
/// the sandbox or be refused, never on the host — also under permissive,
/// whose workspace writes through to the project.
#[test]
fn destinations_never_reach_the_host_through_symlinks() {
    let canary = tempfile::Builder::new()
        .prefix("ak-canary")
        .tempdir()
        .unwrap();
    write(&canary.path().join("secret"), "host secret\n");
    for profile in ["moderate", "permissive"] {
        let env = TestEnv::new();
        let project = env.project_dir();
        std::os::unix::fs::symlink(canary.path(), project.join("dirlink")).unwrap();
        std::os::unix::fs::symlink(canary.path().join("secret"), project.join("filelink")).unwrap();
        std::os::unix::fs::symlink("/", project.join("rootlink")).unwrap();
        write(&env.home_dir().join("payload"), "from the config\n");
        let canary_dir = canary.path().display();
        for dest in [
            "/workspace/dirlink/new".to_string(),
            "/workspace/filelink".to_string(),
            format!("/workspace/rootlink{canary_dir}/new2"),
            format!("/workspace/rootlink{canary_dir}/secret"),
            format!("/proc/self/root{canary_dir}/secret"),
            format!("/proc/1/root{canary_dir}/new3"),
        ] {
            let file = config(
                &env,
                &format!("[[files]]\nsource = \"payload\"\ndest = \"{dest}\"\n"),
            );
            let out = env
                .run_with()
                .config(&file)
                .flags(&["--profile", profile])
                .output(&["true"]);
            assert!(
                matches!(code(&out), 0 | AK_ERROR),
                "{profile} {dest}: exit {:?} {}",
                out.status.code(),
                stderr(&out)
            );
            assert_canary_untouched(canary.path());
        }
    }
}

/// A project's `./agentkernel.toml` may copy in files of the project only:
/// a host file outside it (directly, by `..`, or through a symlink in the
/// project) needs `agentkernel trust`, and nothing of it reaches the sandbox.
#[test]
fn a_project_file_cannot_copy_host_files_in_without_trust() {
    let canary = tempfile::Builder::new()
        .prefix("ak-canary")
        .tempdir()
        .unwrap();
    let secret = canary.path().join("id_ed25519");
    write(&secret, "host secret\n");
    let relative = format!("../../../../../../../..{}", secret.display());
    for source in [secret.to_str().unwrap(), "innocent.txt", relative.as_str()] {
        let env = TestEnv::new();
        std::os::unix::fs::symlink(&secret, env.project_dir().join("innocent.txt")).unwrap();
        write(
            &env.project_dir().join("agentkernel.toml"),
            &format!("[[files]]\nsource = \"{source}\"\ndest = \"/tmp/key\"\n"),
        );
        let out = env.run_with().output(&["cat", "/tmp/key"]);
        assert!(
            !stdout(&out).contains("host secret"),
            "{source}: the host file reached the sandbox"
        );
        let line = assert_one_line_error(&out);
        assert!(
            line.contains("files.source") && line.contains("agentkernel trust"),
            "{source}: {line}"
        );
        // The user's consent: then it is theirs to copy.
        assert_code(&env.run(&["trust"]), 0);
        let out = env.run_with().output(&["cat", "/tmp/key"]);
        assert_code(&out, 0);
        assert_eq!(stdout(&out), "host secret\n");
    }
    // The project's own files need no trust.
    let env = TestEnv::new();
    write(&env.project_dir().join("conf/app.env"), "A=1\n");
    write(
        &env.project_dir().join("agentkernel.toml"),
        "[[files]]\nsource = \"conf/app.env\"\ndest = \"/app/.env\"\n",
    );
    let out = env.run_with().output(&["cat", "/app/.env"]);
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "A=1\n");
}

#[test]
fn templates_may_not_copy_files_or_build() {
    let env = TestEnv::new();
    for section in ["[[files]]\nsource = \"x\"\ndest = \"/x\"\n", "[build]\n"] {
        write(&env.project_dir().join("t.toml"), section);
        let line = assert_one_line_error(&env.run(&[
            "run",
            "--template",
            "./t.toml",
            "-i",
            BUSYBOX,
            "--",
            "true",
        ]));
        assert!(line.contains("not taken from a template"), "{line}");
    }
}

/// A project whose Dockerfile builds on the offline busybox test image;
/// returns its `build.toml` ([`BUILD_CONFIG`]).
fn build_project(env: &TestEnv) -> String {
    // The label makes every step after FROM this test's own. Tests run
    // side by side, and with identical steps the engine's build cache
    // shares their intermediate images. One test's `rmi -f` of its image
    // then removes them while another test's build still uses them
    // ("failed to get digest …: no such file" on a RUN step).
    let own = unique_name("build");
    write(
        &env.project_dir().join("docker/Dockerfile.dev"),
        &format!(
            "FROM {BUSYBOX} AS base\nLABEL agentkernel.test={own}\nARG GREETING=none\nRUN echo \"$GREETING\" > /built\n\
             FROM base AS dev\nCOPY conf/app.env /from-context.env\nCOPY conf/ /conf/\n\
             FROM base AS other\nRUN echo wrong-target > /built\n"
        ),
    );
    write(&env.project_dir().join("conf/app.env"), "A=1\n");
    // The context's .dockerignore is honoured, as `docker build` does.
    write(&env.project_dir().join("conf/local.secret"), "never sent\n");
    write(
        &env.project_dir().join(".dockerignore"),
        "# local only\n**/*.secret\n",
    );
    let file = env.project_dir().join("build.toml");
    write(&file, BUILD_CONFIG);
    file.to_string_lossy().into_owned()
}

const BUILD_CONFIG: &str =
    "[sandbox]\nname = \"Build_Test\"\nbase_image = \"ignored-when-built:1\"\n\
     [build]\ndockerfile = \"docker/Dockerfile.dev\"\ncontext = \".\"\ntarget = \"dev\"\n\
     [build.args]\nGREETING = \"hello\"\n";

mod engine_only {
    use super::*;

    /// The image a config builds, removed from the engine when the test ends.
    struct BuiltImage(String);

    impl BuiltImage {
        /// The tag `run -c FILE` builds (a dry run builds nothing).
        fn of(env: &TestEnv, file: &str) -> BuiltImage {
            let resolved = env.dry_run(&["-c", file, "--", "true"]);
            BuiltImage(resolved["image"].as_str().unwrap().to_string())
        }
    }

    impl Drop for BuiltImage {
        fn drop(&mut self) {
            let _ = engine(&["rmi", "-f", &self.0]);
        }
    }

    #[test]
    fn build_makes_the_image_the_sandbox_runs() {
        let env = TestEnv::new();
        let file = build_project(&env);
        let file = file.as_str();
        let built = BuiltImage::of(&env, file);
        let out = env.run_with().detected_image().config(file).output(&[
            "sh",
            "-c",
            "cat /built /from-context.env; ls /conf",
        ]);
        assert_code(&out, 0);
        assert_eq!(stdout(&out), "hello\nA=1\napp.env\n");
        let tag = &built.0;
        assert!(tag.starts_with("agentkernel-build/build-test:"), "{tag}");
        assert!(engine(&["image", "inspect", tag]).status.success());

        // A kept sandbox runs it too.
        let name = unique_name("built");
        let _guard = KeptGuard::new(&name);
        let out = env.run(&["sandbox", "create", &name, "-c", file]);
        assert_code(&out, 0);
        assert_eq!(stdout(&env.exec(&name, &["cat", "/built"])), "hello\n");
        assert_code(&env.sandbox("remove", &name), 0);

        // -i names the image: nothing is built, and a notice says so.
        let out = env.run_with().config(file).output(&[
            "sh",
            "-c",
            "cat /built 2>/dev/null || echo plain",
        ]);
        assert_code(&out, 0);
        assert_eq!(stdout(&out), "plain\n");
        assert!(stderr(&out).contains("[build] skipped"), "{}", stderr(&out));
        // So does a template's image (a layer above the files).
        write(
            &env.project_dir().join("t.toml"),
            &format!("[sandbox]\nbase_image = \"{BUSYBOX}\"\n"),
        );
        let resolved = env.dry_run(&["-c", file, "--template", "./t.toml", "--", "true"]);
        assert_eq!(resolved["image"], BUSYBOX, "{resolved}");
        assert_eq!(resolved["build"], serde_json::Value::Null, "{resolved}");
    }

    #[test]
    fn build_failures_and_missing_paths_are_125() {
        let env = TestEnv::new();
        build_project(&env);
        write(
            &env.project_dir().join("docker/Dockerfile.fail"),
            &format!("FROM {BUSYBOX}\nRUN exit 3\n"),
        );
        for (toml, needle) in [
            (
                "[build]\ndockerfile = \"nope/Dockerfile\"\n",
                "no such file",
            ),
            (
                "[build]\ndockerfile = \"docker/Dockerfile.dev\"\ncontext = \"nope\"\n",
                "no such directory",
            ),
            (
                "[build]\ndockerfile = \"docker/Dockerfile.dev\"\ntarget = \"absent\"\n",
                "[build] failed",
            ),
            (
                "[build]\ndockerfile = \"docker/Dockerfile.fail\"\n",
                "RUN exit 3",
            ),
        ] {
            let file = env.project_dir().join("b.toml");
            write(&file, toml);
            let out = env
                .run_with()
                .detected_image()
                .config(file.to_str().unwrap())
                .output(&["true"]);
            assert_code(&out, AK_ERROR);
            let last = stderr(&out).lines().last().unwrap_or_default().to_string();
            assert!(last.contains(needle), "{toml}: {last}");
        }
        assert!(env.leftover_runs().is_empty());
    }

    /// A project's `[build]` runs its Dockerfile on the host's engine (with
    /// the engine's network, not the profile's): only with the user's trust.
    #[test]
    fn a_project_build_needs_trust() {
        let env = TestEnv::new();
        build_project(&env);
        let project_file = env.project_dir().join("agentkernel.toml");
        write(&project_file, BUILD_CONFIG);
        // Naming the file with -c is consent: the dry run learns the tag.
        let _built = BuiltImage::of(&env, project_file.to_str().unwrap());
        let out = env.run_with().detected_image().output(&["cat", "/built"]);
        let line = assert_one_line_error(&out);
        assert!(
            line.contains("[build]") && line.contains("agentkernel trust"),
            "{line}"
        );
        assert!(!stderr(&out).contains("building"), "it built before asking");
        assert_code(&env.run(&["trust"]), 0);
        let out = env.run_with().detected_image().output(&["cat", "/built"]);
        assert_code(&out, 0);
        assert_eq!(stdout(&out), "hello\n");
    }
}

mod native_only {
    use super::*;

    #[test]
    fn build_is_refused_on_native() {
        let env = TestEnv::new();
        let file = build_project(&env);
        let line = assert_one_line_error(
            &env.run_with()
                .detected_image()
                .config(&file)
                .output(&["true"]),
        );
        assert!(
            line.contains("[build]") && line.contains("-B docker"),
            "{line}"
        );
        // With -i nothing is built: the run goes on.
        let out = env.run_with().config(&file).output(&["true"]);
        assert_code(&out, 0);
    }
}
