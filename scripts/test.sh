#!/usr/bin/env bash
# The test command: sets up what the tests need (scripts/setup.sh), then runs
# every unit and integration test against the real Docker engine. Run as root.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
pidfile=${AGENTKERNEL_DOCKERD_PIDFILE:-/run/agentkernel-ci-dockerd.pid}
rm -f "$pidfile"
"$root/scripts/setup.sh"
# Stop the dockerd we started (by its PID), and only that one.
stop_dockerd() {
  if [ -s "$pidfile" ]; then
    kill "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
  fi
}
trap stop_dockerd EXIT
cd "$root"
# Tests that need Docker fail (never skip) when it is missing under CI=true.
export CI=true
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace -- --test-threads "${AGENTKERNEL_TEST_THREADS:-4}"
