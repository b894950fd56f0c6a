//! The command line (cli.rs): pass-through of CMD, help, usage errors,
//! not-yet-supported options and bad values.

mod common;

use common::*;

#[test]
fn command_passes_through_untouched_without_double_dash() {
    let env = TestEnv::new();
    let out = env.run(&["run", "-i", BUSYBOX, "sh", "-c", r#"echo "$0" "a b""#, "x"]);
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "x a b\n");
}

#[test]
fn command_passes_through_untouched_with_double_dash() {
    let env = TestEnv::new();
    let out = env.run(&[
        "run",
        "-i",
        BUSYBOX,
        "--",
        "sh",
        "-c",
        r#"echo "$0" "a b""#,
        "x",
    ]);
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "x a b\n");
}

#[test]
fn arguments_with_quotes_spaces_and_newlines_are_byte_exact() {
    let env = TestEnv::new();
    let tricky = "it's \"quoted\"\t$HOME *  \\n\nline2";
    let out = env.run(&["run", "-i", BUSYBOX, "printf", "%s|", tricky, "", "--"]);
    assert_code(&out, 0);
    assert_eq!(stdout(&out), format!("{tricky}||--|"));
}

#[test]
fn options_after_cmd_belong_to_cmd() {
    let env = TestEnv::new();
    let out = env.run(&[
        "run",
        "-i",
        BUSYBOX,
        "echo",
        "-i",
        "nope",
        "--keep",
        "--timeout",
        "1s",
        "-p",
        "x",
        "--help",
    ]);
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "-i nope --keep --timeout 1s -p x --help\n");
    // --keep after CMD must not have kept anything.
    assert!(
        !stderr(&out).contains("kept"),
        "--keep after CMD was taken as agentkernel's: {}",
        stderr(&out)
    );
    assert!(
        !env.state_dir().join("sandboxes").exists()
            || std::fs::read_dir(env.state_dir().join("sandboxes"))
                .unwrap()
                .next()
                .is_none(),
        "a sandbox was recorded"
    );
}

#[test]
fn run_help_lists_every_option() {
    let env = TestEnv::new();
    let out = env.run(&["run", "--help"]);
    assert_code(&out, 0);
    let help = stdout(&out);
    for opt in [
        "-i, --image",
        "-p, --profile",
        "-k, --keep",
        "-F, --fast",
        "-c, --config",
        "-B, --backend",
        "--template",
        "--ttl",
        "--branch",
        "--no-network",
        "-P, --publish",
        "--ssh",
        "-S, --secret",
        "--secret-file",
        "--placeholder-secrets",
        "--receipt",
        "-e, --env",
        "-w, --workdir",
        "-v, --volume",
        "--memory",
        "--cpus",
        "--timeout",
        "--pull",
    ] {
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with(opt) && !l.contains(&format!("{opt}-"))),
            "`run --help` does not list {opt}:\n{help}"
        );
    }
}

#[test]
fn unknown_flag_is_125_with_one_line() {
    let env = TestEnv::new();
    let out = env.run(&["run", "--bogus-flag", "-i", BUSYBOX, "true"]);
    let line = assert_one_line_error(&out);
    assert!(line.contains("--bogus-flag"), "{line}");
}

#[test]
fn unknown_top_level_flag_is_125_with_one_line() {
    let env = TestEnv::new();
    let out = env.run(&["--bogus-flag"]);
    assert_one_line_error(&out);
}

#[test]
fn fast_false_is_accepted() {
    let env = TestEnv::new();
    let out = env.run(&["run", "--fast=false", "-i", BUSYBOX, "echo", "ok"]);
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "ok\n");
}

#[test]
fn explicit_fast_is_accepted() {
    // `--fast` was "not supported yet" until the warm pool landed.
    let env = TestEnv::new();
    for args in [
        &["run", "--fast", "-i", BUSYBOX, "echo", "ok"][..],
        &["run", "-F", "-i", BUSYBOX, "echo", "ok"][..],
        &["run", "--fast=true", "-i", BUSYBOX, "echo", "ok"][..],
    ] {
        let out = env.run(args);
        assert_code(&out, 0);
        assert_eq!(stdout(&out), "ok\n", "{args:?}");
    }
}

#[test]
fn fast_with_a_kept_sandbox_is_125() {
    let env = TestEnv::new();
    for opts in [
        &["--keep"][..],
        &["--ttl", "1m"][..],
        &["--name", "fast-kept"][..],
    ] {
        let mut args = vec!["run", "--fast"];
        args.extend_from_slice(opts);
        args.extend(["-i", BUSYBOX, "true"]);
        let out = env.run(&args);
        let line = assert_one_line_error(&out);
        assert!(line.contains("--fast"), "{args:?}: {line}");
    }
    assert!(!container_exists("agentkernel-fast-kept"));
}

#[test]
fn publish_with_fast_mentions_fast_false() {
    let env = TestEnv::new();
    let out = env.run(&["run", "-P", "8080:80", "--fast", "-i", BUSYBOX, "true"]);
    let line = assert_one_line_error(&out);
    assert!(line.contains("--fast=false"), "{line}");
}

#[test]
fn unbuilt_backends_are_not_supported_yet() {
    let env = TestEnv::new();
    // podman and native were on this list until their backends landed.
    for backend in ["firecracker", "apple"] {
        let out = env.run(&["run", "-B", backend, "-i", BUSYBOX, "true"]);
        let line = assert_one_line_error(&out);
        assert!(
            line.contains("not supported yet") && line.contains(backend),
            "-B {backend}: {line}"
        );
    }
}

#[test]
fn unknown_backend_is_125() {
    let env = TestEnv::new();
    let out = env.run(&["run", "-B", "lxc", "-i", BUSYBOX, "true"]);
    let line = assert_one_line_error(&out);
    assert!(line.contains("lxc"), "{line}");
}

#[test]
fn bad_values_are_125_with_one_line() {
    let env = TestEnv::new();
    let cases: &[(&str, &str, &str)] = &[
        ("--ttl", "forever", "--ttl"),
        ("--ttl", "10x", "--ttl"),
        ("--memory", "lots", "--memory"),
        ("--memory", "0", "--memory"),
        ("--cpus", "abc", "--cpus"),
        ("--cpus", "0", "--cpus"),
        ("--timeout", "10", "--timeout"),
        ("--timeout", "soon", "--timeout"),
        ("-e", "1BAD=x", "--env"),
        ("-e", "A-B=x", "--env"),
        ("-v", "nocolon", "--volume"),
        ("-v", "/tmp:relative", "--volume"),
        ("-P", "notaport", "--publish"),
        ("-P", "70000:80", "--publish"),
        ("--profile", "strict", "--profile"),
        ("--pull", "sometimes", "--pull"),
        ("-w", "relative/dir", "--workdir"),
    ];
    for (flag, value, named) in cases {
        let out = env.run(&["run", flag, value, "-i", BUSYBOX, "true"]);
        let line = assert_one_line_error(&out);
        assert!(
            line.contains(named) && line.contains(value),
            "{flag} {value}: the message should name {named} and the value: {line}"
        );
    }
}

#[test]
fn missing_command_is_125() {
    let env = TestEnv::new();
    let out = env.run(&["run", "-i", BUSYBOX]);
    let line = assert_one_line_error(&out);
    assert!(
        line.contains("<CMD>"),
        "the missing argument is not named: {line}"
    );
}

#[test]
fn a_bad_choice_lists_the_allowed_values() {
    let env = TestEnv::new();
    for (flag, value, allowed) in [
        ("--profile", "strict", "permissive, moderate, restrictive"),
        ("--pull", "sometimes", "missing, always, never"),
    ] {
        let out = env.run(&["run", flag, value, "true"]);
        let line = assert_one_line_error(&out);
        assert!(line.contains(allowed), "{flag} {value}: {line}");
    }
}

#[test]
fn usage_errors_point_to_the_subcommands_help() {
    let env = TestEnv::new();
    for (args, help) in [
        (&["run"][..], "`agentkernel run --help`"),
        (&["run", "--bogus-flag", "true"], "`agentkernel run --help`"),
        (
            &["run", "--profile", "strict", "true"],
            "`agentkernel run --help`",
        ),
        (&["sandbox", "info"], "`agentkernel sandbox info --help`"),
        (&["image", "pull"], "`agentkernel image pull --help`"),
        (&["sandbox", "bogus"], "`agentkernel sandbox --help`"),
        (&["--bogus-flag"], "`agentkernel --help`"),
    ] {
        let out = env.run(args);
        let line = assert_one_line_error(&out);
        assert!(line.contains(help), "{args:?}: {line}");
    }
    // Arguments need not be UTF-8 (commands pass through byte for byte).
    use std::os::unix::ffi::OsStrExt;
    let not_utf8 = std::ffi::OsStr::from_bytes(b"\xff");
    let out = env
        .cmd()
        .args(["run".as_ref(), "--bogus-flag".as_ref(), not_utf8])
        .output()
        .unwrap();
    let line = assert_one_line_error(&out);
    assert!(line.contains("`agentkernel run --help`"), "{line}");
    let out = env.cmd().arg(not_utf8).output().unwrap();
    assert_one_line_error(&out);
}

#[test]
fn dash_p_with_a_port_suggests_dash_capital_p() {
    let env = TestEnv::new();
    let out = env.run(&["run", "-p", "8080:80", "-i", BUSYBOX, "true"]);
    let line = assert_one_line_error(&out);
    assert!(line.contains("did you mean `-P 8080:80`"), "{line}");
}

#[test]
fn profile_pull_and_backend_match_in_any_case() {
    let env = TestEnv::new();
    let upper = backend().to_uppercase();
    let spec = env.dry_run(&[
        "-B",
        &upper,
        "-p",
        "Restrictive",
        "--pull",
        "NEVER",
        "-i",
        BUSYBOX,
        "true",
    ]);
    assert_eq!(spec["backend"], backend());
    assert_eq!(spec["profile"], "restrictive");
    assert_eq!(spec["pull"], "never");
}

#[test]
fn completions_into_a_closed_pipe_exit_quietly() {
    let env = TestEnv::new();
    // `completions bash | head -1`: the reader is gone before the write.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = env
        .std_cmd()
        .args(["completions", "bash"])
        .stdout(writer)
        .output()
        .unwrap();
    assert_code(&out, 0);
    assert!(out.stderr.is_empty(), "{}", stderr(&out));
}

#[test]
fn every_argument_and_option_has_help_text() {
    let env = TestEnv::new();
    for command in [
        "sandbox list",
        "sandbox info",
        "sandbox stop",
        "sandbox start",
        "sandbox remove",
        "image pull",
        "image list",
        "image rm",
        "exec",
        "completions",
    ] {
        let mut args: Vec<&str> = command.split(' ').collect();
        args.push("--help");
        let out = env.run(&args);
        assert_code(&out, 0);
        let help = stdout(&out);
        // Entries of the Arguments/Options lists: `  <NAME>  text`, `      --json  text`.
        for entry in help.lines().filter(|l| {
            let t = l.trim_start();
            l.starts_with("  ") && (t.starts_with('<') || t.starts_with('-'))
        }) {
            let text = entry.trim().split_once("  ").map(|(_, t)| t.trim());
            assert!(
                text.is_some_and(|t| !t.is_empty()),
                "`agentkernel {command} --help`: no help text for {:?}\n{help}",
                entry.trim()
            );
        }
    }
}

#[test]
fn version_goes_to_stdout() {
    let env = TestEnv::new();
    let out = env.run(&["--version"]);
    assert_code(&out, 0);
    assert!(stdout(&out).starts_with("agentkernel "), "{}", stdout(&out));
}

#[test]
fn env_workdir_and_volume_options_apply() {
    let env = TestEnv::new();
    let data = env.home_dir().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("in.txt"), "mounted\n").unwrap();
    let vol_ro = format!("{}:/data:ro", data.display());
    let out = env
        .cmd()
        .env("FROM_HOST", "copied")
        .args([
            "run",
            "-e",
            "A=1 2",
            "-e",
            "FROM_HOST",
            "-w",
            "/data",
            "-v",
            &vol_ro,
            "-i",
            BUSYBOX,
            "sh",
            "-c",
            r#"echo "$A|$FROM_HOST|$(pwd)|$(cat in.txt)"; if touch /data/new 2>/dev/null; then echo RW; else echo ro; fi"#,
        ])
        .output()
        .unwrap();
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "1 2|copied|/data|mounted\nro\n");

    let vol_rw = format!("{}:/data", data.display());
    let out = env.run(&[
        "run",
        "-v",
        &vol_rw,
        "-i",
        BUSYBOX,
        "sh",
        "-c",
        "echo out > /data/out.txt",
    ]);
    assert_code(&out, 0);
    assert_eq!(
        std::fs::read_to_string(data.join("out.txt")).unwrap(),
        "out\n"
    );
}

/// A volume under /tmp stays visible when the root is read-only (restrictive):
/// the sandbox's own /tmp tmpfs goes under the volumes, never over them.
#[test]
fn a_volume_under_tmp_is_visible_with_a_read_only_root() {
    let env = TestEnv::new();
    let data = env.home_dir().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("in.txt"), "mounted\n").unwrap();
    let volume = format!("{}:/tmp/data", data.display());
    let out = env.run(&[
        "run",
        "--profile",
        "restrictive",
        "-v",
        &volume,
        "-i",
        BUSYBOX,
        "cat",
        "/tmp/data/in.txt",
    ]);
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "mounted\n");
}

/// Backends whose root agentkernel assembles itself (native; the qemu guest).
/// Docker and podman make empty mount points for their own /etc/hosts and
/// /etc/resolv.conf in a directory mounted at /etc (their runtime's doing).
mod own_root_only {
    use super::*;

    /// The sandbox's /etc/hostname, /etc/hosts and /etc/resolv.conf go into
    /// its own root layer, under the volumes: a host directory mounted at
    /// /etc is neither written nor added to.
    #[test]
    fn a_volume_at_etc_is_not_written_by_the_sandbox_set_up() {
        let env = TestEnv::new();
        let etc = env.home_dir().join("etc");
        std::fs::create_dir(&etc).unwrap();
        std::fs::write(etc.join("hostname"), "the host's\n").unwrap();
        let volume = format!("{}:/etc", etc.display());
        let out = env.run(&["run", "-v", &volume, "-i", BUSYBOX, "cat", "/etc/hostname"]);
        assert_code(&out, 0);
        assert_eq!(stdout(&out), "the host's\n");
        let names: Vec<String> = std::fs::read_dir(&etc)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            ["hostname"],
            "files were added to the host's directory"
        );
        assert_eq!(
            std::fs::read_to_string(etc.join("hostname")).unwrap(),
            "the host's\n"
        );
    }
}

#[test]
fn pull_never_uses_a_local_image() {
    let env = TestEnv::new();
    let out = env.run(&["run", "--pull", "never", "-i", BUSYBOX, "echo", "local"]);
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "local\n");
}

/// `-B docker` itself: the Docker engine is there only when Docker is under test.
mod docker_only {
    use super::*;

    #[test]
    fn explicit_docker_backend_works() {
        let env = TestEnv::new();
        let out = env.run(&["run", "-B", "docker", "-i", BUSYBOX, "echo", "ok"]);
        assert_code(&out, 0);
        assert_eq!(stdout(&out), "ok\n");
    }
}

/// Each case: the flags, and what the one-line refusal must say.
fn assert_refused(env: &TestEnv, cases: &[(Vec<&str>, &str)]) {
    for (flags, named) in cases {
        let mut args = vec!["run"];
        args.extend(flags.iter().copied());
        args.extend(["-i", BUSYBOX, "true"]);
        let out = env.run(&args);
        let line = assert_one_line_error(&out);
        assert!(
            line.contains(named),
            "{flags:?}: should say {named:?}: {line}"
        );
    }
    assert!(env.leftover_runs().is_empty(), "{:?}", env.leftover_runs());
}

fn host_figures() -> (u64, u64) {
    // SAFETY: sysconf has no preconditions.
    let (pages, page, cpus) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
            libc::sysconf(libc::_SC_NPROCESSORS_ONLN),
        )
    };
    (pages as u64 * page as u64, cpus as u64)
}

#[test]
fn limits_beyond_this_machine_are_125_naming_the_figure() {
    let env = TestEnv::new();
    let (memory, cpus) = host_figures();
    let too_much_memory = format!("{}m", (memory >> 20) + 1024);
    let too_many_cpus = (cpus + 1).to_string();
    let cpus_said = format!("this machine has {cpus} CPU");
    assert_refused(
        &env,
        &[
            // Both used to saturate into "no limit".
            (vec!["--memory", "1e20"], "--memory"),
            (vec!["--memory", "99999999999g"], "too large"),
            (vec!["--memory", &too_much_memory], "this machine has"),
            (vec!["--cpus", &too_many_cpus], &cpus_said),
            (vec!["--cpus", "0.001"], "at least 0.01"),
        ],
    );
}

#[test]
fn a_port_published_twice_is_125() {
    let env = TestEnv::new();
    assert_refused(
        &env,
        &[
            (vec!["--fast=false", "-P", "8080", "-P", "8080"], "twice"),
            (
                vec!["--fast=false", "-P", "18080:80", "-P", "18080:81"],
                "host port 18080",
            ),
        ],
    );
}

#[test]
fn a_newline_in_a_value_stays_on_one_line() {
    let env = TestEnv::new();
    assert_refused(&env, &[(vec!["-e", "A\nB=x"], "A\\nB")]);
}

#[test]
fn volumes_over_the_sandboxes_own_mounts_are_125() {
    let env = TestEnv::new();
    let host = env.home_dir().to_str().unwrap().to_string();
    let targets = [
        "/",
        "//",
        "/proc",
        "/proc/sys",
        "/sys",
        "/sys/fs/cgroup",
        "/dev",
        "/dev/shm",
        "/x/../proc",
    ];
    let volumes: Vec<String> = targets.iter().map(|t| format!("{host}:{t}")).collect();
    let cases: Vec<(Vec<&str>, &str)> = volumes
        .iter()
        .map(|v| (vec!["-v", v.as_str()], "--volume"))
        .collect();
    assert_refused(&env, &cases);
}

#[test]
fn top_level_help_lists_trust() {
    let env = TestEnv::new();
    let out = env.run(&["--help"]);
    assert_code(&out, 0);
    assert!(
        stdout(&out)
            .lines()
            .any(|l| l.trim_start().starts_with("trust ")),
        "{}",
        stdout(&out)
    );
}
