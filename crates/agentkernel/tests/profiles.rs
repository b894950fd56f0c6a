//! Security profiles (README, "Security profiles"; docs/security.md).

mod common;

use common::*;

/// Runs a shell script in the busybox image under `profile` (extra flags first).
fn sh(env: &TestEnv, profile: &str, extra: &[&str], script: &str) -> std::process::Output {
    let mut args = vec!["run", "-p", profile];
    args.extend_from_slice(extra);
    args.extend(["-i", BUSYBOX, "sh", "-c", script]);
    env.run(&args)
}

/// The CapEff mask of a process in the sandbox.
fn cap_eff(status: &str) -> u64 {
    let line = status
        .lines()
        .find(|l| l.starts_with("CapEff:"))
        .unwrap_or_else(|| panic!("no CapEff in {status}"));
    u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
}

fn no_new_privs(status: &str) -> String {
    status
        .lines()
        .find(|l| l.starts_with("NoNewPrivs:"))
        .unwrap_or_else(|| panic!("no NoNewPrivs in {status}"))
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string()
}

/// Interface names listed in /proc/net/dev.
fn interfaces(proc_net_dev: &str) -> Vec<String> {
    proc_net_dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

const CAP_NET_RAW: u64 = 1 << 13;
const CAP_SYS_CHROOT: u64 = 1 << 18;
const CAP_MKNOD: u64 = 1 << 27;
const CAP_AUDIT_WRITE: u64 = 1 << 29;

#[test]
fn moderate_workspace_is_copy_on_write() {
    let env = TestEnv::new();
    let host_file = env.project_dir().join("f.txt");
    std::fs::write(&host_file, "from-host\n").unwrap();
    let out = sh(
        &env,
        "moderate",
        &[],
        "cat /workspace/f.txt; echo changed > /workspace/f.txt; cat /workspace/f.txt; \
         echo new > /workspace/new.txt; rm -f /workspace/f.txt && echo removed; pwd",
    );
    assert_code(&out, 0);
    assert_eq!(
        stdout(&out),
        "from-host\nchanged\nremoved\n/workspace\n",
        "the sandbox should see the host file and be able to change its own copy"
    );
    assert_eq!(
        std::fs::read_to_string(&host_file).unwrap(),
        "from-host\n",
        "moderate changed the host copy"
    );
    assert!(
        !env.project_dir().join("new.txt").exists(),
        "a file created in the sandbox appeared on the host"
    );
    assert!(env.leftover_runs().is_empty(), "{:?}", env.leftover_runs());
}

#[test]
fn moderate_is_the_default_profile() {
    let env = TestEnv::new();
    let host_file = env.project_dir().join("f.txt");
    std::fs::write(&host_file, "from-host\n").unwrap();
    let out = env.run(&[
        "run",
        "-i",
        BUSYBOX,
        "sh",
        "-c",
        "echo changed > /workspace/f.txt; grep NoNewPrivs /proc/self/status",
    ]);
    assert_code(&out, 0);
    assert!(stdout(&out).contains("NoNewPrivs:\t1"), "{}", stdout(&out));
    assert_eq!(std::fs::read_to_string(&host_file).unwrap(), "from-host\n");
}

#[test]
fn permissive_workspace_writes_through() {
    let env = TestEnv::new();
    std::fs::write(env.project_dir().join("f.txt"), "from-host\n").unwrap();
    let out = sh(
        &env,
        "permissive",
        &[],
        "cat /workspace/f.txt; echo written > /workspace/g.txt; echo changed > /workspace/f.txt",
    );
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "from-host\n");
    assert_eq!(
        std::fs::read_to_string(env.project_dir().join("g.txt")).unwrap(),
        "written\n"
    );
    assert_eq!(
        std::fs::read_to_string(env.project_dir().join("f.txt")).unwrap(),
        "changed\n"
    );
}

#[test]
fn restrictive_filesystem() {
    let env = TestEnv::new();
    std::fs::write(env.project_dir().join("f.txt"), "from-host\n").unwrap();
    let out = sh(
        &env,
        "restrictive",
        &[],
        "cat /workspace/f.txt; \
         if touch /x 2>/dev/null; then echo root-writable; else echo root-ro; fi; \
         if touch /workspace/y 2>/dev/null; then echo ws-writable; else echo ws-ro; fi; \
         if echo hi > /tmp/z && cat /tmp/z; then echo tmp-ok; else echo tmp-fail; fi",
    );
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "from-host\nroot-ro\nws-ro\nhi\ntmp-ok\n");
    assert!(!env.project_dir().join("y").exists());
}

#[test]
fn restrictive_has_no_network() {
    let env = TestEnv::new();
    let out = sh(&env, "restrictive", &[], "cat /proc/net/dev");
    assert_code(&out, 0);
    assert_eq!(
        interfaces(&stdout(&out)),
        vec!["lo".to_string()],
        "{}",
        stdout(&out)
    );
}

#[test]
fn restrictive_privileges() {
    let env = TestEnv::new();
    let out = sh(
        &env,
        "restrictive",
        &[],
        "cat /proc/self/status; if unshare -U true 2>/dev/null; then echo UNSHARE-OK; else echo UNSHARE-FAILED; fi",
    );
    assert_code(&out, 0);
    let s = stdout(&out);
    assert_eq!(cap_eff(&s), 0, "restrictive should have no capabilities");
    assert_eq!(no_new_privs(&s), "1");
    assert!(
        s.contains("UNSHARE-FAILED"),
        "unshare -U should be denied under restrictive"
    );
}

#[test]
fn moderate_privileges() {
    let env = TestEnv::new();
    let out = sh(&env, "moderate", &[], "cat /proc/self/status");
    assert_code(&out, 0);
    let s = stdout(&out);
    let caps = cap_eff(&s);
    assert_eq!(no_new_privs(&s), "1");
    assert_eq!(caps & CAP_NET_RAW, 0, "moderate keeps NET_RAW: {caps:#x}");
    assert_eq!(caps & CAP_MKNOD, 0, "moderate keeps MKNOD: {caps:#x}");
    assert_eq!(
        caps & CAP_AUDIT_WRITE,
        0,
        "moderate keeps AUDIT_WRITE: {caps:#x}"
    );
    assert_eq!(
        caps & CAP_SYS_CHROOT,
        0,
        "moderate keeps SYS_CHROOT: {caps:#x}"
    );
    // The rest of the default set is there (CHOWN = bit 0).
    assert_ne!(caps & 1, 0, "moderate lost CHOWN: {caps:#x}");
}

#[test]
fn moderate_has_network_interfaces() {
    let env = TestEnv::new();
    let out = sh(&env, "moderate", &[], "cat /proc/net/dev");
    assert_code(&out, 0);
    let ifs = interfaces(&stdout(&out));
    assert!(
        ifs.iter().any(|i| i != "lo"),
        "moderate should have a network: {ifs:?}"
    );
}

#[test]
fn no_network_under_permissive_leaves_only_loopback() {
    let env = TestEnv::new();
    let out = sh(&env, "permissive", &["--no-network"], "cat /proc/net/dev");
    assert_code(&out, 0);
    assert_eq!(interfaces(&stdout(&out)), vec!["lo".to_string()]);
}

#[test]
fn permissive_mounts_home_read_only() {
    let env = TestEnv::new();
    let home = env.home_dir().canonicalize().unwrap();
    std::fs::write(home.join("marker"), "home-marker\n").unwrap();
    let h = home.to_str().unwrap();
    let out = sh(
        &env,
        "permissive",
        &[],
        &format!(
            "cat {h}/marker; if touch {h}/new 2>/dev/null; then echo HOME-WRITABLE; else echo home-ro; fi"
        ),
    );
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "home-marker\nhome-ro\n");
    assert!(!home.join("new").exists());
}

#[test]
fn moderate_does_not_show_home() {
    let env = TestEnv::new();
    let home = env.home_dir().canonicalize().unwrap();
    std::fs::write(home.join("marker"), "home-marker\n").unwrap();
    let out = sh(
        &env,
        "moderate",
        &[],
        &format!(
            "if [ -e {}/marker ]; then echo HOME-VISIBLE; else echo hidden; fi",
            home.display()
        ),
    );
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "hidden\n");
}

/// Reads a cgroup value under v1 or v2 naming.
const CGROUP_LIMITS: &str = "\
    cat /sys/fs/cgroup/pids/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids.max; \
    cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max; \
    cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us 2>/dev/null || cut -d' ' -f1 /sys/fs/cgroup/cpu.max";

#[test]
fn restrictive_limits() {
    let env = TestEnv::new();
    let out = sh(&env, "restrictive", &[], CGROUP_LIMITS);
    assert_code(&out, 0);
    let v: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    assert_eq!(v, ["512", &(512u64 << 20).to_string(), "100000"]);
}

#[test]
fn moderate_limits_and_overrides() {
    let env = TestEnv::new();
    let out = sh(&env, "moderate", &[], CGROUP_LIMITS);
    assert_code(&out, 0);
    let v: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    assert_eq!(v, ["4096", &(2u64 << 30).to_string(), "200000"]);

    let out = sh(
        &env,
        "restrictive",
        &["--memory", "64m", "--cpus", "0.5"],
        CGROUP_LIMITS,
    );
    assert_code(&out, 0);
    let v: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    assert_eq!(v, ["512", &(64u64 << 20).to_string(), "50000"]);
}

#[test]
fn restrictive_contains_a_fork_bomb() {
    let env = TestEnv::new();
    let (out, owner) = env.run_tracked(&[
        "run",
        "-p",
        "restrictive",
        "--timeout",
        "20s",
        "-i",
        BUSYBOX,
        "sh",
        "-c",
        FORK_BOMB,
    ]);
    assert_fork_bomb_contained(&out);
    assert!(containers_of_owner(&owner).is_empty());
}

#[test]
fn root_cwd_is_not_mounted() {
    let env = TestEnv::new();
    let out = env
        .cmd()
        .current_dir("/")
        .args([
            "run",
            "-i",
            BUSYBOX,
            "sh",
            "-c",
            "if grep -q ' /workspace ' /proc/mounts; then echo MOUNTED; else echo not-mounted; fi",
        ])
        .output()
        .unwrap();
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "not-mounted\n");
    let err = stderr(&out);
    assert!(
        err.contains("warning") && err.contains("not mounting"),
        "a warning should say / is not mounted: {err}"
    );
}

#[test]
fn home_cwd_is_not_mounted() {
    let env = TestEnv::new();
    std::fs::write(env.home_dir().join("secret.txt"), "s\n").unwrap();
    let out = env
        .cmd()
        .current_dir(env.home_dir())
        .args([
            "run",
            "-i",
            BUSYBOX,
            "sh",
            "-c",
            "if [ -e /workspace/secret.txt ]; then echo MOUNTED; else echo not-mounted; fi",
        ])
        .output()
        .unwrap();
    assert_code(&out, 0);
    assert_eq!(stdout(&out), "not-mounted\n");
    assert!(stderr(&out).contains("warning"), "{}", stderr(&out));
}

/// PTRACE_TRACEME needs no capability: only a seccomp filter refuses it.
const PTRACE_TRACEME: &str = "\
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
print('allowed' if libc.ptrace(0, 0, 0, 0) == 0 else 'denied')
";

#[test]
fn restrictive_seccomp_denies_ptrace_but_moderate_allows_it() {
    let env = TestEnv::new();
    let out = env.run(&[
        "run",
        "-p",
        "restrictive",
        "-i",
        PYTHON,
        "python3",
        "-c",
        PTRACE_TRACEME,
    ]);
    assert_code(&out, 0);
    assert_eq!(
        stdout(&out),
        "denied\n",
        "restrictive seccomp should deny ptrace"
    );
    let out = env.run(&[
        "run",
        "-p",
        "moderate",
        "-i",
        PYTHON,
        "python3",
        "-c",
        PTRACE_TRACEME,
    ]);
    assert_code(&out, 0);
    assert_eq!(
        stdout(&out),
        "allowed\n",
        "moderate's seccomp allows ptrace"
    );
}

/// io_uring_setup with valid parameters (it returns a ring fd when the
/// filter lets it through), AF_VSOCK, TIOCSTI with junk in the upper half of
/// the request, and AF_INET as the control that shows the probe works.
const SECCOMP_PROBE: &str = "\
import ctypes, socket
libc = ctypes.CDLL(None, use_errno=True)
params = ctypes.create_string_buffer(120)
r = libc.syscall(ctypes.c_long(425), ctypes.c_ulong(1), ctypes.c_ulong(ctypes.addressof(params)))
print('io_uring_setup', 'ok' if r >= 0 else ctypes.get_errno())
for family in (40, socket.AF_INET):
    try:
        socket.socket(family, socket.SOCK_STREAM).close()
        print('socket', family, 'ok')
    except OSError as e:
        print('socket', family, e.errno)
r = libc.syscall(ctypes.c_long(16), ctypes.c_ulong(0), ctypes.c_ulong((1 << 32) | 0x5412), ctypes.c_ulong(0))
print('tiocsti', 'ok' if r == 0 else ctypes.get_errno())
";

#[test]
fn io_uring_and_vsock_are_refused_under_every_profile() {
    let env = TestEnv::new();
    for profile in ["permissive", "moderate", "restrictive"] {
        let out = env.run(&[
            "run",
            "-p",
            profile,
            "-i",
            PYTHON,
            "python3",
            "-c",
            SECCOMP_PROBE,
        ]);
        assert_code(&out, 0);
        // EPERM (1) from the filter; TIOCSTI on a non-terminal stdin would be
        // ENOTTY (25) had it reached the kernel.
        assert_eq!(
            stdout(&out),
            "io_uring_setup 1\nsocket 40 1\nsocket 2 ok\ntiocsti 1\n",
            "-p {profile}"
        );
    }
}
