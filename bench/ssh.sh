#!/usr/bin/env bash
# An SSH exec round trip beside `agentkernel exec`, into the same kept
# sandbox: `agentkernel ssh NAME -- true` (the system's OpenSSH client over
# the shared connection `agentkernel ssh` keeps, the host-side server
# running `exec` for the session) and plain `ssh` with the `ssh-config`
# block (a full handshake every time), against `agentkernel exec NAME --
# true`. In blocks of ten, so the host's
# drift lands on both alike (bench/compare.py): medians, p95, p99 and the
# ratio to exec (target: ssh at most 2x exec).
#   bench/ssh.sh [RUNS] [BACKEND]     (defaults: 200, native)
# Needs the test registry (scripts/setup.sh) for the image.
set -euo pipefail
runs=${1:-200}
backend=${2:-native}
root=$(cd "$(dirname "$0")/.." && pwd)
image=agentkernel-test/busybox:1
(cd "$root" && cargo build --release --quiet)   # from the root: .cargo/config.toml links statically
ak="$root/target/release/agentkernel"
home=$(mktemp -d)
project=$(mktemp -d)
export AGENTKERNEL_HOME="$home"
export AGENTKERNEL_BACKEND="$backend"
export AGENTKERNEL_REGISTRY_MIRRORS=${AGENTKERNEL_REGISTRY_MIRRORS:-http://127.0.0.1:5055}
name=bench-ssh-$$
cleanup() {
  "$ak" sandbox remove "$name" >/dev/null 2>&1 || true
  rm -rf "$home" "$project"
}
trap cleanup EXIT
cd "$project"
"$ak" run --ssh --name "$name" -i "$image" true 2>/dev/null
"$ak" ssh-config "$name" > "$home/ssh-config"
# Open the shared connection here: its background ssh must not become a
# leftover of a measured run (compare.py, a subreaper, would wait for it).
"$ak" ssh "$name" -- true
echo "== ssh exec vs agentkernel exec, backend $backend ($runs runs each, in blocks of 10; load: $(cut -d' ' -f1-3 /proc/loadavg))"
"$root/bench/compare.py" --warmup 5 --runs "$runs" --block 10 \
  -n "agentkernel exec NAME -- true" "$ak exec $name -- true" \
  -n "agentkernel ssh NAME -- true" "$ak ssh $name -- true" \
  -n "ssh -F ssh-config NAME true (new connection)" "ssh -F $home/ssh-config $name true"
