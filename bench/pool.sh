#!/usr/bin/env bash
# The warm pool (--fast) beside `docker run --rm` / `podman run --rm` and
# agentkernel's own non-pooled path, side by side in one hyperfine session per
# engine. Prints medians, p95 and ratios. Each pooled run is preceded (outside
# the timing) by a pause so the detached refill has re-warmed the pool: this
# measures a run that finds the pool warm, which is what the pool promises.
#   bench/pool.sh [RUNS] [docker|podman|both]     (defaults: 20, both)
set -euo pipefail
runs=${1:-20}
which=${2:-both}
root=$(cd "$(dirname "$0")/.." && pwd)
image=agentkernel-test/busybox:1
cargo build --release --quiet --manifest-path "$root/Cargo.toml"
ak="$root/target/release/agentkernel"
home=$(mktemp -d)
out=$(mktemp -d)
export AGENTKERNEL_HOME="$home"
cleanup() {
  AGENTKERNEL_HOME="$home" "$ak" pool prune >/dev/null 2>&1 || true
  rm -rf "$home" "$out"
}
trap cleanup EXIT
cd /   # no workspace mount, so every command does the same container work

report() {
  python3 "$root/bench/report.py" "$1"
}

bench_engine() {
  local engine=$1 native_cmd=$2
  "$ak" run -B "$engine" -i "$image" true 2>/dev/null   # warms the key
  sleep 3
  hyperfine --warmup 2 --runs "$runs" --export-json "$out/$engine.json" --style basic \
    --prepare 'true' --prepare 'sleep 1.5' --prepare 'true' \
    -n "$engine run --rm" "$native_cmd" \
    -n "agentkernel --fast (pool warm)" "$ak run -B $engine --fast -i $image true 2>/dev/null" \
    -n "agentkernel --fast=false" "$ak run -B $engine --fast=false -i $image true 2>/dev/null" \
    >/dev/null
  echo "== $engine"
  report "$out/$engine.json"
}

if [ "$which" = docker ] || [ "$which" = both ]; then
  bench_engine docker "docker run --rm $image true"
fi
if [ "$which" = podman ] || [ "$which" = both ]; then
  # On hybrid-cgroup hosts without CAP_SYS_RESOURCE, podman's CLI needs runc and
  # rlimits within our own (agentkernel does the same through the API).
  nofile=$(ulimit -Hn); nproc=$(ulimit -Hu); [ "$nproc" = unlimited ] && nproc=32768
  [ "$nproc" -gt 32768 ] && nproc=32768
  bench_engine podman "podman --runtime runc run --rm --ulimit nofile=$nofile:$nofile --ulimit nproc=$nproc:$nproc $image true"
fi
