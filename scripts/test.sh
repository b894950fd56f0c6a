#!/usr/bin/env bash
# The test command: sets up what the tests need (scripts/setup.sh), then runs
# every unit and integration test against the real Docker engine. Run as root.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
pidfile=${AGENTKERNEL_DOCKERD_PIDFILE:-/run/agentkernel-ci-dockerd.pid}
rm -f "$pidfile"
"$root/scripts/setup.sh"
# Stop what we started, by PID and only that: the dockerd setup.sh started,
# and the private `podman system service` agentkernel started for the tests.
podman_pidfile=/run/agentkernel/podman/service.pid
podman_before=$(cat "$podman_pidfile" 2>/dev/null || true)
stop_started() {
  if [ -s "$pidfile" ]; then
    kill "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
  fi
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
# suite against Docker; then the same integration suite against Podman.
cargo test --workspace -- --test-threads "$threads"
AGENTKERNEL_TEST_BACKEND=podman cargo test -p agentkernel --tests -- --test-threads "$threads"
