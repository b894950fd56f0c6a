//! Rootless native sandboxes: agentkernel run by an ordinary user (the tests
//! run as root and drop to a uid of their own per test, so "nothing left
//! behind" can be checked as "no live process of that uid"). Each attack
//! is attempted and must fail. Every test name starts with `rootless_`, so
//! the engine-backed runs of the suite can skip them (scripts/test.sh).
//!
//! Needs: unprivileged user namespaces, slirp4netns and a world-accessible
//! /dev/net/tun (scripts/setup.sh sees to the last two), and the test
//! registry for the images (each user pulls into its own store).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::netprobe::{host_listener, RAW_SYN_PROBE};
use common::upstream::{listening_on, start_upstream, API, FIND_NEEDLE};
use common::user::User;
use common::{
    assert_code, assert_fork_bomb_contained, assert_one_line_error, stderr, stdout, wait_until,
    BUSYBOX, FORK_BOMB, NOBODY, PYTHON,
};

/// What only a native kept sandbox records.
trait NativeHolder {
    fn held(&self, name: &str) -> serde_json::Value;
    fn holder(&self, name: &str) -> i32;
}

impl NativeHolder for User {
    /// What the holder of the kept sandbox `name` recorded.
    fn held(&self, name: &str) -> serde_json::Value {
        let path = self
            .state()
            .join("sandboxes")
            .join(name)
            .join("native.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    /// The PID of the kept sandbox `name`'s holder.
    fn holder(&self, name: &str) -> i32 {
        self.held(name)["holder"]
            .as_str()
            .and_then(|h| h.split(':').nth(1))
            .and_then(|p| p.parse().ok())
            .unwrap()
    }
}

fn ok(out: &Output) -> String {
    assert_code(out, 0);
    stdout(out)
}

#[test]
fn rootless_run_maps_only_the_caller_to_root() {
    let user = User::new(4301);
    let out = user.run(&[
        "run",
        "--no-network",
        "-i",
        BUSYBOX,
        "sh",
        "-c",
        "id -u; cat /proc/self/uid_map; echo err >&2; exit 7",
    ]);
    assert_code(&out, 7);
    let text = stdout(&out);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("0"), "{text}");
    let map: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
    assert_eq!(map, ["0", "4301", "1"], "only the caller is mapped: {text}");
    let err = stderr(&out);
    assert!(err.contains("err"), "{err}");
    assert!(
        err.contains("rootless") && err.contains("not enforced"),
        "the unenforced profile limits must be said: {err}"
    );
    assert!(user.runs_left().is_empty(), "{:?}", user.runs_left());
    user.assert_no_processes();
}

#[test]
fn rootless_root_inside_is_not_root_outside() {
    let user = User::new(4302);
    // Root's files, bound into the sandbox read-write: the sandbox's root
    // is the caller outside and may not change or read them.
    let data = tempfile::tempdir().unwrap();
    std::fs::set_permissions(data.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(data.path().join("secret"), "s3cret").unwrap();
    std::fs::set_permissions(
        data.path().join("secret"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let volume = format!("{}:/data", data.path().display());
    let out = user.run(&[
        "run",
        "--no-network",
        "-v",
        &volume,
        "-i",
        BUSYBOX,
        "sh",
        "-c",
        "touch /data/planted && echo PLANTED; cat /data/secret && echo READ; \
         chown 0:0 /data && echo CHOWNED; echo done",
    ]);
    let text = ok(&out);
    assert!(!text.contains("PLANTED"), "{text}");
    assert!(!text.contains("READ"), "{text}");
    assert!(!text.contains("CHOWNED"), "{text}");
    assert!(text.contains("done"), "{text}");
    assert!(!data.path().join("planted").exists());
}

#[test]
fn rootless_sandbox_cannot_see_host_processes() {
    let user = User::new(4303);
    let mut marker = Command::new("sleep").arg("61.4303").spawn().unwrap();
    let out = user.run(&[
        "run",
        "--no-network",
        "-i",
        BUSYBOX,
        "sh",
        "-c",
        "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '; echo; ls -d /proc/[0-9]* | wc -l",
    ]);
    let _ = marker.kill();
    let _ = marker.wait();
    let text = ok(&out);
    assert!(
        !text.contains("61.4303"),
        "a host process is visible: {text}"
    );
    let count: usize = text.lines().last().unwrap_or("").trim().parse().unwrap();
    assert!(count <= 4, "more than the sandbox's own processes: {text}");
}

#[test]
fn rootless_fork_bomb_stops_at_the_pids_limit() {
    let user = User::new(4304);
    let out = user.run(&[
        "run",
        "-p",
        "restrictive",
        "--timeout",
        "30s",
        "-i",
        BUSYBOX,
        "sh",
        "-c",
        FORK_BOMB,
    ]);
    assert_fork_bomb_contained(&out);
    user.assert_no_processes();
}

#[test]
fn rootless_what_it_cannot_enforce_is_refused() {
    let user = User::new(4305);
    // (flags, image): limits it cannot enforce, ports it cannot publish, and
    // an image user that does not exist in a one-user namespace.
    // The last field is what the one line must name.
    let refused: [(&[&str], &str, &str); 6] = [
        (&["--no-network", "--memory", "256m"], BUSYBOX, "memory"),
        // Equal to moderate's own default, but asked for: still refused.
        (&["--no-network", "--memory", "2g"], BUSYBOX, "memory"),
        // The copy-on-write workspace's cap needs a loop mount.
        (&["--no-network", "--disk", "64m"], BUSYBOX, "--disk"),
        (&["--no-network", "--cpus", "0.5"], BUSYBOX, "cpu"),
        (&["-P", "127.0.0.1:18080:8080"], BUSYBOX, "-P"),
        (&["--no-network"], NOBODY, "user nobody"),
    ];
    for (flags, image, named) in refused {
        if image == NOBODY {
            // Its refusal needs the image's config: pulled first (a pull
            // prints its own "pulling"/"pulled" lines), so the run's one line
            // is the refusal alone.
            assert_code(&user.run(&["image", "pull", NOBODY]), 0);
        }
        let mut args = vec!["run"];
        args.extend_from_slice(flags);
        args.extend(["-i", image, "true"]);
        let out = user.run(&args);
        let err = assert_one_line_error(&out);
        assert!(err.contains("rootless") && err.contains("root"), "{err}");
        assert!(
            err.to_lowercase().contains(&named.to_lowercase()),
            "should name {named}: {err}"
        );
        assert!(user.runs_left().is_empty(), "{:?}", user.runs_left());
        // Refused before the image is looked up: nothing was downloaded
        // for a run that could not happen (the image's user needs the image).
        if image == BUSYBOX {
            let blobs = user.state().join("images/blobs/sha256");
            let pulled = std::fs::read_dir(&blobs).map_or(0, |d| d.count());
            assert_eq!(pulled, 0, "{flags:?}: pulled {pulled} blobs first");
        }
    }
    user.assert_no_processes();
}

#[test]
fn rootless_network_without_slirp4netns_is_refused_and_no_network_works() {
    let user = User::new(4312);
    // agentkernel finds slirp4netns on the caller's PATH: here, nowhere.
    let empty = user.dir.path().join("empty-path");
    std::fs::create_dir(&empty).unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["run"];
        args.extend_from_slice(extra);
        args.extend(["-i", BUSYBOX, "echo", "ran"]);
        user.cmd().env("PATH", &empty).args(&args).output().unwrap()
    };
    let err = assert_one_line_error(&run(&[]));
    assert!(
        err.contains("slirp4netns is not installed") && err.contains("--no-network"),
        "{err}"
    );
    assert!(user.runs_left().is_empty(), "{:?}", user.runs_left());
    assert_eq!(ok(&run(&["--no-network"])).trim(), "ran");
    assert!(user.runs_left().is_empty(), "{:?}", user.runs_left());
    user.assert_no_processes();
}

#[test]
fn rootless_network_reaches_the_host_but_not_its_loopback() {
    let user = User::new(4306);
    let loopback = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let open = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let host_ip = primary_address();
    let script = format!(
        "import socket\n\
         def reach(addr):\n\
         \x20   try:\n\
         \x20       socket.create_connection(addr, 3).close(); return 'yes'\n\
         \x20   except OSError:\n\
         \x20       return 'no'\n\
         print('loopback', reach(('10.0.2.2', {})))\n\
         print('host', reach(('{host_ip}', {})))\n\
         print(open('/etc/resolv.conf').read().strip())\n",
        loopback.local_addr().unwrap().port(),
        open.local_addr().unwrap().port(),
    );
    let out = user.run(&["run", "-i", PYTHON, "python3", "-c", &script]);
    let text = ok(&out);
    assert!(
        text.contains("loopback no"),
        "host loopback reachable: {text}"
    );
    assert!(
        text.contains("host yes"),
        "the network does not work: {text}"
    );
    assert!(text.contains("nameserver 10.0.2.3"), "{text}");
    user.assert_no_processes();
}

/// slirp4netns opens a host socket to whatever a packet is for: with
/// CAP_NET_RAW the command could hand-make a SYN for 127.0.0.1 and send it
/// to the gateway's MAC, and the host's loopback would answer (it did,
/// before permissive lost the capability here). Under permissive, the
/// profile that keeps CAP_NET_RAW elsewhere, the attempt fails for want of
/// a raw socket and nothing reaches the host's loopback listener.
#[test]
fn rootless_raw_packets_never_reach_the_host_loopback() {
    let user = User::new(4317);
    let secret = host_listener(std::net::Ipv4Addr::LOCALHOST);
    let target = format!("127.0.0.1:{}", secret.port);
    let out = user.run(&[
        "run",
        "-p",
        "permissive",
        "-i",
        PYTHON,
        "--",
        "python3",
        "-c",
        RAW_SYN_PROBE,
        &target,
    ]);
    let (text, err) = (stdout(&out), stderr(&out));
    assert!(!text.contains("synack"), "host loopback answered: {text}");
    assert!(
        err.contains("PermissionError") && err.contains("Operation not permitted"),
        "the raw socket was not refused: {err}"
    );
    assert_eq!(secret.accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
    user.assert_no_processes();
}

/// One of the host's own non-loopback IPv4 addresses (any will do: slirp4netns
/// connects from the host's network namespace). Read from the interfaces, not
/// from a route to the internet, so the test does not depend on one existing.
fn primary_address() -> String {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        if w == "inet" {
            let cidr = words.next().unwrap();
            return cidr.split('/').next().unwrap().to_string();
        }
    }
    panic!("PREREQUISITE MISSING: the host has no global IPv4 address: {text}");
}

#[test]
fn rootless_kept_sandbox_exec_cp_stop_pause_refused_remove() {
    let user = User::new(4307);
    let out = user.run(&[
        "run",
        "--keep",
        "--name",
        "rl",
        "-i",
        BUSYBOX,
        "sh",
        "-c",
        "echo kept > /tmp/state",
    ]);
    assert_code(&out, 0);
    let out = user.run(&["exec", "rl", "--", "sh", "-c", "cat /tmp/state; exit 5"]);
    assert_code(&out, 5);
    assert_eq!(stdout(&out), "kept\n");
    // cp both ways, through the namespace anchor (init is non-dumpable).
    let project = user.project();
    std::fs::write(project.join("in.txt"), "in\n").unwrap();
    user.chown_all();
    let host_in = project.join("in.txt");
    assert_code(
        &user.run(&["sandbox", "cp", host_in.to_str().unwrap(), "rl:/tmp/in.txt"]),
        0,
    );
    let host_out = project.join("out.txt");
    assert_code(
        &user.run(&["sandbox", "cp", "rl:/tmp/state", host_out.to_str().unwrap()]),
        0,
    );
    assert_eq!(std::fs::read_to_string(&host_out).unwrap(), "kept\n");
    let out = user.run(&["exec", "rl", "--", "cat", "/tmp/in.txt"]);
    assert_eq!(ok(&out), "in\n");
    // stop ends its processes (found by pid namespace: no cgroup), files stay.
    assert_code(
        &user.run(&["exec", "--detach", "rl", "--", "sleep", "300"]),
        0,
    );
    let sleepers = || {
        ok(&user.run(&[
            "exec",
            "rl",
            "--",
            "sh",
            "-c",
            "ps | grep -c '[s]leep 300' || true",
        ]))
    };
    let start = std::time::Instant::now();
    while sleepers() != "1\n" {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "the detached sleep never ran"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_code(&user.run(&["sandbox", "stop", "rl"]), 0);
    assert_one_line_error(&user.run(&["exec", "rl", "--", "true"]));
    assert_code(&user.run(&["sandbox", "start", "rl"]), 0);
    assert_eq!(sleepers(), "0\n", "the detached sleep survived stop");
    let out = user.run(&["exec", "rl", "--", "cat", "/tmp/state"]);
    assert_eq!(ok(&out), "kept\n");
    // Freezing needs a freezer cgroup, which only root can create here.
    let out = user.run(&["sandbox", "pause", "rl"]);
    assert_code(&out, 125);
    assert!(stderr(&out).contains("rootless"), "{}", stderr(&out));
    let listed = ok(&user.run(&["sandbox", "list"]));
    assert!(
        listed.contains("rl") && listed.contains("running"),
        "{listed}"
    );
    assert_code(&user.run(&["sandbox", "remove", "rl"]), 0);
    user.assert_no_processes();
    assert!(!user.state().join("sandboxes/rl").exists());
}

#[test]
fn rootless_kill_9_leaves_nothing_after_gc() {
    let user = User::new(4308);
    let mut child = user
        .cmd()
        .args(["run", "-i", BUSYBOX, "sleep", "60"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !user
        .processes()
        .iter()
        .any(|(_, cmd)| cmd.starts_with("sleep 60"))
    {
        assert!(start.elapsed() < Duration::from_secs(20), "never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // The sandbox's processes (and slirp4netns) die with the helper.
    user.assert_no_processes();
    assert_code(&user.run(&["sandbox", "gc"]), 0);
    assert!(user.runs_left().is_empty(), "{:?}", user.runs_left());
}

#[test]
fn rootless_host_image_is_private_and_hides_state() {
    let user = User::new(4309);
    let state = user.state();
    let script = format!(
        "cat /etc/shadow >/dev/null 2>&1 && echo SHADOW; \
         echo x > /usr/planted-4309 && echo wrote-usr; \
         ls -A {} | wc -l",
        state.display()
    );
    let out = user.run(&[
        "run",
        "--no-network",
        "--image",
        "host",
        "sh",
        "-c",
        &script,
    ]);
    let text = ok(&out);
    assert!(!text.contains("SHADOW"), "{text}");
    assert!(
        text.contains("wrote-usr"),
        "the root should be writable (privately): {text}"
    );
    assert_eq!(
        text.lines().last(),
        Some("0"),
        "the state dir is visible: {text}"
    );
    assert!(
        !Path::new("/usr/planted-4309").exists(),
        "the host's /usr changed"
    );
    user.assert_no_processes();
}

#[test]
fn rootless_doctor_says_what_it_enforces() {
    let user = User::new(4310);
    let text = ok(&user.run(&["doctor"]));
    let native = text
        .lines()
        .find(|l| l.starts_with("native"))
        .unwrap_or_default();
    assert!(
        native.contains("ready") && native.contains("rootless") && native.contains("pids"),
        "{text}"
    );
}

#[test]
fn rootless_kill_9_of_a_kept_holder_takes_the_sandbox_with_it() {
    let user = User::new(4311);
    assert_code(
        &user.run(&["run", "--keep", "--name", "held", "-i", BUSYBOX, "true"]),
        0,
    );
    let held = user.held("held");
    let holder = user.holder("held");
    assert!(held["anchor_pid"].as_i64().is_some(), "{held}");
    // SAFETY: signalling the holder this test created, by PID.
    assert_eq!(unsafe { libc::kill(holder, libc::SIGKILL) }, 0);
    // Init, the namespace anchor and slirp4netns die with it.
    user.assert_no_processes();
    assert_code(&user.run(&["sandbox", "gc"]), 0);
    assert!(!user.state().join("sandboxes/held").exists());
    let out = user.run(&["exec", "held", "--", "true"]);
    assert_code(&out, 125);
}

/// A user's vault is theirs (under their own state directory, 0600), and
/// `--secret-file` works rootless: a tmpfs in the sandbox, the file owned
/// by the sandbox's root (the user outside).
#[test]
fn rootless_secret_files_and_a_private_vault() {
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;
    let user = User::new(4313);
    let mut set = user
        .cmd()
        .args(["secret", "set", "TOKEN"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    set.stdin
        .take()
        .unwrap()
        .write_all(b"rootless-secret-1f\n")
        .unwrap();
    assert_code(&set.wait_with_output().unwrap(), 0);
    let vault = user.state().join("secrets/vault");
    let meta = std::fs::metadata(&vault).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (4313, 0o600));

    let out = user.run(&[
        "run",
        "--no-network",
        "-i",
        BUSYBOX,
        "--secret-file",
        "TOKEN",
        "--",
        "sh",
        "-c",
        "stat -c '%a %u' /run/agentkernel/secrets/TOKEN; \
         awk '$2 == \"/run/agentkernel/secrets\" {print $3}' /proc/mounts; \
         cat /run/agentkernel/secrets/TOKEN",
    ]);
    assert_eq!(ok(&out), "400 0\ntmpfs\nrootless-secret-1f");

    // Another user cannot read it, even pointed at it.
    let other = User::new(4314);
    let out = other
        .cmd()
        .env("AGENTKERNEL_HOME", user.state())
        .args(["secret", "list"])
        .output()
        .unwrap();
    let line = assert_one_line_error(&out);
    assert!(line.contains("permission denied"), "{line}");
    user.assert_no_processes();
}

/// `[[files]]` on a rootless sandbox: written from inside it as its root
/// (the caller outside), with their mode; a destination through a symlink
/// the project planted toward the caller's own files lands in the sandbox.
#[test]
fn rootless_files_are_copied_in_and_stay_in_the_sandbox() {
    let user = User::new(4320);
    let project = user.project();
    let outside = user.dir.path().join("home");
    std::fs::write(outside.join("secret"), "user's file\n").unwrap();
    std::os::unix::fs::symlink(&outside, project.join("homelink")).unwrap();
    std::fs::write(project.join("app.env"), "A=1\n").unwrap();
    std::fs::write(
        project.join("f.toml"),
        "[[files]]\nsource = \"app.env\"\ndest = \"/app/.env\"\nmode = \"0600\"\n",
    )
    .unwrap();
    std::fs::write(
        project.join("attack.toml"),
        "[[files]]\nsource = \"app.env\"\ndest = \"/workspace/homelink/secret\"\n",
    )
    .unwrap();
    user.chown_all();
    let out = user.run(&[
        "run",
        "--no-network",
        "-c",
        "f.toml",
        "-i",
        BUSYBOX,
        "stat",
        "-c",
        "%a %u %n",
        "/app/.env",
    ]);
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "600 0 /app/.env\n");
    // Inside the sandbox the link leads nowhere: refused, the file untouched.
    let out = user.run(&[
        "run",
        "--no-network",
        "-c",
        "attack.toml",
        "-i",
        BUSYBOX,
        "true",
    ]);
    assert_code(&out, 125);
    assert!(stderr(&out).contains("[[files]]"), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(outside.join("secret")).unwrap(),
        "user's file\n"
    );
    assert!(user.runs_left().is_empty(), "{:?}", user.runs_left());
    user.assert_no_processes();
}

/// This user's egress proxy processes.
fn proxies(user: &User) -> Vec<u32> {
    user.processes()
        .into_iter()
        .filter(|(_, cmdline)| cmdline.contains("__egress-proxy"))
        .map(|(pid, _)| pid)
        .collect()
}

/// `-S` rootless: the bound host gets the real value (from agentkernel's
/// environment), the sandbox only a placeholder and nothing it can read —
/// files, every process's environment and command line — holds the value.
/// The proxy runs as the user, outside the sandbox, non-dumpable (its /proc
/// files are root's), and its summary lands in the receipt.
#[test]
fn rootless_egress_injects_a_secret_the_sandbox_never_sees() {
    use std::os::unix::fs::MetadataExt;
    let user = User::new(4315);
    let upstream = start_upstream();
    let config = upstream.config_in(user.dir.path(), "");
    let (head, tail) = ("sk-rootless-", "9d2e71");
    let script = format!(
        r#"
import os, urllib.request
key = os.environ["API_KEY"]
print("env", key.startswith("AGENTKERNEL_PLACEHOLDER_"))
req = urllib.request.Request("https://{API}/bound", headers={{"Authorization": "Bearer " + key}})
print("bound", urllib.request.urlopen(req, timeout=10).read())
pids = [p for p in os.listdir("/proc") if p.isdigit()]
proxy = b"__egress" + b"-proxy"
print("proxy visible" if any(proxy in open("/proc/%s/cmdline" % p, "rb").read() for p in pids) else "proxy not visible")
needle = b"{head}" + b"{tail}"
{FIND_NEEDLE}
import sys, time; sys.stdout.flush()
for _ in range(300):
    if os.path.exists("/sig/go"):
        break
    time.sleep(0.1)
"#
    );
    let receipt = user.project().join("r.json");
    // The sandbox waits for /sig/go while the test looks at the proxy.
    let signal = user.dir.path().join("sig");
    std::fs::create_dir(&signal).unwrap();
    user.chown_all();
    let mut child = user
        .cmd()
        .env("API_KEY", format!("{head}{tail}"))
        .args(["run", "-c", config.to_str().unwrap(), "-i", PYTHON])
        .args(["-S", &format!("API_KEY:{API}"), "--placeholder-secrets"])
        .args(["--receipt", receipt.to_str().unwrap()])
        .args(["-v", &format!("{}:/sig", signal.display())])
        .args(["--", "python3", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // While the sandbox waits on its stdin: the proxy as the host sees it.
    let mut reader = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut text = String::new();
    while !text.contains("found") {
        let mut line = String::new();
        if std::io::BufRead::read_line(&mut reader, &mut line).unwrap() == 0 {
            break;
        }
        text.push_str(&line);
    }
    let proxy = proxies(&user);
    assert_eq!(proxy.len(), 1, "{:?}", user.processes());
    let environ = std::fs::metadata(format!("/proc/{}/environ", proxy[0])).unwrap();
    assert_eq!(environ.uid(), 0, "the proxy is dumpable");
    std::fs::write(signal.join("go"), "").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_code(&out, 0);
    for line in [
        "env True",
        "bound b'ok\\n'",
        "proxy not visible",
        "found []",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
    }
    let seen = upstream.seen().to_ascii_lowercase();
    assert!(
        seen.contains(&format!("authorization: bearer {head}{tail}")),
        "{seen}"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&receipt).unwrap()).unwrap();
    let egress = &r["sandbox"]["egress"];
    assert_eq!(egress["hosts"][API]["requests"], 1, "{egress}");
    assert_eq!(egress["hosts"][API]["injected"]["API_KEY"], 1, "{egress}");
    // The value itself (the script names it only in two halves).
    assert!(!std::fs::read_to_string(&receipt)
        .unwrap()
        .contains(&format!("{head}{tail}")));
    assert_code(
        &user.run(&["receipt", "verify", receipt.to_str().unwrap()]),
        0,
    );
    user.assert_no_processes();
}

/// With an allow-list a rootless sandbox has loopback only: the listed host
/// through the proxy, nothing direct, no DNS. Another sandbox of the same
/// user (with slirp4netns's network) and the host find no proxy; a one-shot
/// sandbox's proxy ends on `kill -9` of its run, a kept sandbox's serves its
/// later commands and ends with it, on `rm` and on `kill -9` of the holder.
#[test]
fn rootless_egress_allow_list_is_the_only_way_out_and_private() {
    let user = User::new(4316);
    let upstream = start_upstream();
    let config = upstream.config_in(user.dir.path(), "");
    let (_listener, direct) = listening_on(&primary_address());
    let script = format!(
        r#"
import socket, ssl, urllib.request, urllib.error
ctx = ssl.create_default_context(cafile="/upstream-ca.pem")
print("listed", urllib.request.urlopen("https://{API}/listed", context=ctx, timeout=10).read())
try:
    urllib.request.urlopen("http://evil.example.test/", timeout=10)
except urllib.error.HTTPError as e:
    print("unlisted", e.code)
h, p = "{direct}".rsplit(":", 1)
try:
    socket.create_connection((h, int(p)), timeout=3)
    print("direct CONNECTED")
except OSError:
    print("direct failed")
try:
    socket.getaddrinfo("example.com", 443)
    print("dns RESOLVED")
except OSError:
    print("dns failed")
print("routes", len(open("/proc/net/route").read().splitlines()) - 1)
"#
    );
    // A one-shot sandbox whose proxy answers, while another sandbox of this
    // user (with a network) and the host look for it.
    let mut first = user
        .cmd()
        .args(["run", "-c", config.to_str().unwrap(), "-i", PYTHON])
        .args(["--allow-host", API, "--", "python3", "-c"])
        .arg(
            "import socket, time\n\
             socket.create_connection(('127.0.0.1', 3128), 2)\n\
             print('proxy-here', flush=True)\n\
             time.sleep(30)",
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(first.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "proxy-here");
    assert_eq!(proxies(&user).len(), 1);
    let probe = "import socket
for host in ['127.0.0.1', '10.0.2.2']:
    try:
        socket.create_connection((host, 3128), 2)
        print('reached', host)
    except OSError:
        print('refused', host)";
    let text = ok(&user.run(&["run", "-i", PYTHON, "python3", "-c", probe]));
    assert_eq!(text.matches("refused").count(), 2, "{text}");
    assert!(std::net::TcpStream::connect("127.0.0.1:3128").is_err());
    // SAFETY: kill(2) of the run this test started.
    assert_eq!(unsafe { libc::kill(first.id() as i32, libc::SIGKILL) }, 0);
    let _ = first.wait();
    user.assert_no_processes();

    let ca = format!("{}:/upstream-ca.pem:ro", upstream.ca().display());
    let kept = |name: &str| {
        user.run(&[
            "run",
            "-c",
            config.to_str().unwrap(),
            "--name",
            name,
            "-i",
            PYTHON,
            "--allow-host",
            API,
            "-v",
            &ca,
            "--",
            "python3",
            "-c",
            &script,
        ])
    };
    for name in ["egress-rm", "egress-kill"] {
        let text = ok(&kept(name));
        for line in [
            "listed b'ok\\n'",
            "unlisted 403",
            "direct failed",
            "dns failed",
            "routes 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
        }
        // A later command goes through the same proxy.
        let text = ok(&user.run(&["exec", name, "--", "python3", "-c", &script]));
        assert!(text.contains("unlisted 403"), "{text}");
        assert_eq!(proxies(&user).len(), 1);
        if name == "egress-rm" {
            assert_code(&user.run(&["sandbox", "rm", name]), 0);
        } else {
            let holder = user.holder(name);
            // SAFETY: signalling the holder this test created, by PID.
            assert_eq!(unsafe { libc::kill(holder, libc::SIGKILL) }, 0);
        }
        assert!(
            wait_until(Duration::from_secs(10), || proxies(&user).is_empty()),
            "{name}: the proxy outlived its sandbox"
        );
    }
    assert!(upstream.seen().contains("GET /listed"));
    assert!(!upstream.seen().contains("evil"));
    assert_code(&user.run(&["sandbox", "gc"]), 0);
    user.assert_no_processes();
}
