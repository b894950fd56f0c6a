#!/usr/bin/env bash
# The warm pool (--fast) beside `docker run --rm` / `podman run --rm` and
# agentkernel's own normal path (--fast=false), per engine (bench/pool.py):
# interleaved rounds of the three (the pooled run finds the pool warm), then
# LOOP pooled runs back to back (an agent's loop) with their hit rate, and
# the loop again once the pool has grown to what the first one taught it.
#   bench/pool.sh [ROUNDS] [LOOP] [docker|podman|both] [MAX_TOTAL]
#   (defaults: 20, 50, both, and `[pool] max_total`'s default; MAX_TOTAL is
#   written to a config file of the benchmark's own, XDG_CONFIG_HOME)
set -euo pipefail
rounds=${1:-20}
loop=${2:-50}
which=${3:-both}
max_total=${4:-}
root=$(cd "$(dirname "$0")/.." && pwd)
image=agentkernel-test/busybox:1
(cd "$root" && cargo build --release --quiet)   # from the root: .cargo/config.toml links statically
ak="$root/target/release/agentkernel"
home=$(mktemp -d)
export AGENTKERNEL_HOME="$home"
export XDG_CONFIG_HOME="$home/config"
if [ -n "$max_total" ]; then
  mkdir -p "$XDG_CONFIG_HOME/agentkernel"
  printf '[pool]\nmax_total = %s\n' "$max_total" > "$XDG_CONFIG_HOME/agentkernel/config.toml"
fi
cleanup() {
  AGENTKERNEL_HOME="$home" "$ak" pool prune >/dev/null 2>&1 || true
  rm -rf "$home"
}
trap cleanup EXIT
cd /   # no workspace mount, so every command does the same container work

if [ "$which" = docker ] || [ "$which" = both ]; then
  python3 "$root/bench/pool.py" "$ak" docker "$rounds" "$loop" -- docker run --rm "$image" true
fi
if [ "$which" = podman ] || [ "$which" = both ]; then
  # On hybrid-cgroup hosts without CAP_SYS_RESOURCE, podman's CLI needs runc and
  # rlimits within our own (agentkernel does the same through the API).
  nofile=$(ulimit -Hn); nproc=$(ulimit -Hu); [ "$nproc" = unlimited ] && nproc=32768
  [ "$nproc" -gt 32768 ] && nproc=32768
  python3 "$root/bench/pool.py" "$ak" podman "$rounds" "$loop" -- \
    podman --runtime runc run --rm --ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc" "$image" true
fi
