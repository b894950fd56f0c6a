//! Podman as Debian installs it: `apt-get install podman` brings tini, not
//! catatonit, so Podman's default init (`/usr/libexec/podman/catatonit`) is
//! missing there. agentkernel's private `podman system service` is then given
//! the init the host has. These tests force the init the way that host's
//! would be chosen (`AGENTKERNEL_PODMAN_INIT`, same code path: a
//! containers.conf for a private service of their own, which they stop by
//! PID), without touching this machine's catatonit.

mod common;

mod podman_only {
    use std::path::{Path, PathBuf};
    use std::process::Output;

    use super::common::*;

    /// The private service started for one forced init; stopped by PID.
    struct ForcedService {
        init: PathBuf,
        _dir: tempfile::TempDir,
    }

    impl ForcedService {
        /// A tini binary at a path of this test's own, so its service is
        /// this test's alone (the service directory is keyed by the path).
        fn tini() -> ForcedService {
            let dir = tempfile::Builder::new()
                .prefix("ak-init")
                .tempdir()
                .unwrap();
            let tini = [
                "/usr/bin/tini-static",
                "/usr/bin/docker-init",
                "/usr/bin/tini",
            ]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("PREREQUISITE MISSING: tini (apt-get install tini; scripts/setup.sh does)");
            let init = dir.path().join("tini");
            std::fs::copy(tini, &init).unwrap();
            ForcedService { init, _dir: dir }
        }

        fn missing() -> ForcedService {
            let dir = tempfile::Builder::new()
                .prefix("ak-init")
                .tempdir()
                .unwrap();
            let init = dir.path().join("no-such-init");
            ForcedService { init, _dir: dir }
        }

        /// `agentkernel ARGS…` on Podman with this init.
        fn agentkernel(&self, env: &TestEnv, args: &[&str]) -> Output {
            env.cmd()
                .env("AGENTKERNEL_PODMAN_INIT", &self.init)
                .env("AGENTKERNEL_BACKEND", "podman")
                .args(args)
                .output()
                .unwrap()
        }

        fn run(&self, env: &TestEnv, args: &[&str]) -> Output {
            self.agentkernel(env, &[&["run"], args].concat())
        }

        /// The directory of the service started with this init.
        fn service_dir(&self) -> Option<PathBuf> {
            std::fs::read_dir("/run/agentkernel")
                .ok()?
                .flatten()
                .map(|e| e.path())
                .find(|d| {
                    std::fs::read_to_string(d.join("init"))
                        .is_ok_and(|i| i.lines().next() == self.init.to_str())
                })
        }
    }

    impl Drop for ForcedService {
        fn drop(&mut self) {
            let Some(dir) = self.service_dir() else {
                return;
            };
            if let Ok(pid) = std::fs::read_to_string(dir.join("service.pid")) {
                if let Ok(pid) = pid.trim().parse::<i32>() {
                    // SAFETY: a plain kill of the service this test started.
                    unsafe { libc::kill(pid, libc::SIGTERM) };
                }
            }
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    #[test]
    fn podman_sandboxes_run_under_tini_when_that_is_the_init_the_host_has() {
        let service = ForcedService::tini();
        let env = TestEnv::new();
        // The container's init is the tini we gave, not catatonit.
        let out = service.run(
            &env,
            &[
                "--fast=false",
                "--image",
                BUSYBOX,
                "--",
                "sh",
                "-c",
                "/run/podman-init --version; exit 3",
            ],
        );
        assert_code(&out, 3);
        let version = stdout(&out);
        assert!(
            version.contains("tini version 0.19") && !version.contains("catatonit"),
            "expected tini as the container's init: {version}\n{}",
            stderr(&out)
        );
        // Pooled runs (the warm container's shell starts `init -s -- ARGV`)
        // and a kept sandbox's execs: tini is not PID 1 there, and warns
        // unless told to be a subreaper.
        for _ in 0..3 {
            let out = service.run(
                &env,
                &["--image", BUSYBOX, "--", "sh", "-c", "echo ok; exit 4"],
            );
            assert_code(&out, 4);
            assert_eq!(stdout(&out), "ok\n");
            assert!(!stderr(&out).contains("tini"), "{}", stderr(&out));
        }
        let name = unique_name("tini");
        let out = service.run(&env, &["--name", &name, "--image", BUSYBOX, "--", "true"]);
        assert_code(&out, 0);
        let exec =
            |args: &[&str]| service.agentkernel(&env, &[&["exec", &name, "--"], args].concat());
        let out = exec(&["sh", "-c", "echo in; exit 5"]);
        assert_code(&out, 5);
        assert_eq!(stdout(&out), "in\n");
        assert!(!stderr(&out).contains("WARN"), "{}", stderr(&out));
        assert_code(&exec(&["no-such-command"]), 127);
        assert_code(&service.agentkernel(&env, &["sandbox", "remove", &name]), 0);
        assert_code(&service.agentkernel(&env, &["pool", "prune"]), 0);
    }

    #[test]
    fn a_configured_init_that_does_not_exist_is_one_line_naming_the_package() {
        let service = ForcedService::missing();
        let env = TestEnv::new();
        let out = service.run(&env, &["--fast=false", "--image", BUSYBOX, "--", "true"]);
        let err = assert_one_line_error(&out);
        assert!(
            err.contains(&format!("{} does not exist", service.init.display()))
                && err.contains("apt-get install catatonit"),
            "{err}"
        );
        assert!(env.leftover_runs().is_empty());
    }
}
