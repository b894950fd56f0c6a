#!/usr/bin/env bash
# The test command: sets up what the tests need (scripts/setup.sh), then runs
# every unit and integration test against the real Docker engine. Run as root.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
pidfile=${AGENTKERNEL_DOCKERD_PIDFILE:-/run/agentkernel-ci-dockerd.pid}
registry_pidfile=${AGENTKERNEL_REGISTRY_PIDFILE:-/run/agentkernel-ci-registry.pid}
rm -f "$pidfile" "$registry_pidfile"
"$root/scripts/setup.sh"
# Stop what we started, by PID and only that: the dockerd and the test
# registry setup.sh started,
# and the private `podman system service` agentkernel started for the tests.
podman_pidfile=/run/agentkernel/podman/service.pid
podman_before=$(cat "$podman_pidfile" 2>/dev/null || true)
stop_started() {
  for f in "$pidfile" "$registry_pidfile"; do
    if [ -s "$f" ]; then
      kill "$(cat "$f")" 2>/dev/null || true
      rm -f "$f"
    fi
  done
  podman_now=$(cat "$podman_pidfile" 2>/dev/null || true)
  if [ -n "$podman_now" ] && [ "$podman_now" != "$podman_before" ]; then
    kill "$podman_now" 2>/dev/null || true
  fi
}
trap stop_started EXIT
cd "$root"
# Tests that need Docker fail (never skip) when it is missing under CI=true.
export CI=true
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
threads=${AGENTKERNEL_TEST_THREADS:-4}
# Unit tests, the image store against a local registry, and the integration
# suite against Docker; then the same integration suite against Podman; then
# the backend-neutral files, kept sandboxes and the isolation attacks against
# native (the engine-only files — the warm pool, images via the engine — do
# not apply).
# (The rootless tests drive the native backend as other users whatever the
# backend under test: they run once, in the native pass.)
cargo test --workspace -- --test-threads "$threads" --skip rootless_
AGENTKERNEL_TEST_BACKEND=podman cargo test -p agentkernel --tests -- --test-threads "$threads" --skip rootless_
AGENTKERNEL_TEST_BACKEND=native cargo test -p agentkernel \
  --test exit_codes --test io --test profiles --test cli --test config --test ports \
  --test cleanup --test kept --test native --test rootless \
  -- --test-threads "$threads" --skip what_a_killed_pooled_run_left_is_collected
# Most users' hosts have cgroup v2, this one (and CI) v1: the v2 paths —
# clone3 into the cgroup, limits, OOM, fork bomb, freezer, cleanup — are
# tested in a QEMU VM booting Debian's kernel with pure cgroup v2.
"$root/scripts/cgroup2-vm.sh" "${CARGO_TARGET_DIR:-$root/target}/debug/agentkernel"
