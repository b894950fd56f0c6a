#!/usr/bin/env bash
# Builds agentkernel and runs the main job once. Run as root (or via sudo) on a
# fresh Debian/Ubuntu machine: installs what the backends need and starts Docker
# if needed (it is left running for you, for -B docker), builds agentkernel, and
# runs `agentkernel run python3 -c "print('hello')"` in a native sandbox.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
cargo build --release --quiet --manifest-path "$root/Cargo.toml"
ak="$root/target/release/agentkernel"
echo "+ agentkernel run python3 -c \"print('hello')\"" >&2
# The default backend is native (as root): with registry access the
# auto-detected python:3.12-alpine is pulled into agentkernel's image store;
# offline, `--image host` runs this machine's own root filesystem, read-only,
# in the same isolation.
if "$ak" image pull python:3.12-alpine >/dev/null 2>&1; then
  exec "$ak" run python3 -c "print('hello')"
else
  echo "(no registry reachable: using --image host, this machine's own root read-only)" >&2
  exec "$ak" run --image host python3 -c "print('hello')"
fi
