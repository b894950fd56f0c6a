#!/usr/bin/env bash
# -B qemu beside native, in one go:
#   1. RUNS runs each of `agentkernel -B native --no-network true`,
#      `agentkernel -B qemu --fast=false --no-network true` (the VM boots
#      cold), `agentkernel -B qemu --no-network true` (a pooled run: each
#      waits until the pool has a warm VM ready, as a run that is not back
#      to back with the previous one finds it), and, as root, the same two
#      qemu runs with a network (a tap on agentkernel0), alternated; then RUNS
#      `agentkernel exec NAME -- true` in a kept VM, and `docker run --rm
#      --network none IMAGE true` when dockerd answers (the image pulled from
#      the test registry); min and median wall time;
#   2. the phase timeline of one cold VM run (AGENTKERNEL_TRACE_STARTUP=1):
#      QEMU started, QEMU connected to the agent's socket, agent ready (with
#      the guest kernel's own uptime then), command started, exit seen.
# The first qemu run (not counted) builds the image's disk and the
# initramfs, which are cached. Needs the test registry (scripts/setup.sh).
#   bench/qemu.sh [RUNS]            (default 5)
#   AK=path/to/agentkernel          (default: target/release, built if missing)
set -euo pipefail
runs=${1:-5}
root=$(cd "$(dirname "$0")/.." && pwd)
image=agentkernel-test/busybox:1
ak=${AK:-$root/target/release/agentkernel}
if [ -z "${AK:-}" ]; then
  (cd "$root" && cargo build --release --quiet -p agentkernel)   # from the root: .cargo/config.toml links statically
fi
home=$(mktemp -d)
project=$(mktemp -d)
# `pool prune` ends the warm VMs and detaches the workspace disks native
# runs attached ahead (an rm -rf alone left two loop devices attached to
# deleted files); removing the state directory ends any VM still booting.
trap '"$ak" pool prune >/dev/null 2>&1 || true; rm -rf "$home" "$project"' EXIT
export AGENTKERNEL_HOME="$home"
export AGENTKERNEL_REGISTRY_MIRRORS=${AGENTKERNEL_REGISTRY_MIRRORS:-http://127.0.0.1:5055}
"$ak" image pull "$image" >/dev/null 2>&1
cd "$project"

native=(-B native --no-network -i "$image" true)
qemu=(-B qemu --fast=false --no-network -i "$image" true)
pooled=(-B qemu --no-network -i "$image" true)
qemu_net=(-B qemu --fast=false -i "$image" true)
pooled_net=(-B qemu -i "$image" true)
net=$([ "$(id -u)" = 0 ] && echo 1 || echo 0)
"$ak" run "${qemu[@]}"   # builds and caches the disk and the initramfs
"$ak" run "${pooled[@]}" # warms the pool's key
[ "$net" = 1 ] && "$ak" run "${pooled_net[@]}" # and the networked one's
# Waits (up to 2 minutes) until every key of the pool has a VM that serves
# and no run claimed.
wait_warm() {
  local k d tries=600
  while [ $((tries -= 1)) -gt 0 ]; do
    local all=1
    for k in "$home"/vm-pool/*/; do
      local this=0
      for d in "$k"*/; do
        [ -e "$d/ready" ] && [ ! -e "$d/claimed" ] && this=1
      done
      [ "$this" = 1 ] || all=0
    done
    [ "$all" = 1 ] && return 0
    sleep 0.2
  done
  echo "bench/qemu.sh: no warm VM became ready in 2 minutes" >&2
  exit 1
}

ms() { echo $(( $(date +%s%N) / 1000000 )); }
declare -a native_ms qemu_ms pooled_ms exec_ms qemu_net_ms pooled_net_ms docker_ms
mirror=${AGENTKERNEL_REGISTRY_MIRRORS#http://}
docker_image="$mirror/$image"
docker=0
if docker info >/dev/null 2>&1 && docker pull -q "$docker_image" >/dev/null 2>&1; then
  docker=1
fi
for _ in $(seq 1 "$runs"); do
  wait_warm
  t=$(ms); "$ak" run "${pooled[@]}"; pooled_ms+=($(( $(ms) - t )))
  # The pooled run's refill boots a VM: let it finish before timing more.
  wait_warm
  if [ "$net" = 1 ]; then
    t=$(ms); "$ak" run "${pooled_net[@]}"; pooled_net_ms+=($(( $(ms) - t )))
    wait_warm
    t=$(ms); "$ak" run "${qemu_net[@]}"; qemu_net_ms+=($(( $(ms) - t )))
  fi
  t=$(ms); "$ak" run "${native[@]}"; native_ms+=($(( $(ms) - t )))
  t=$(ms); "$ak" run "${qemu[@]}"; qemu_ms+=($(( $(ms) - t )))
  if [ "$docker" = 1 ]; then
    t=$(ms); docker run --rm --network none "$docker_image" true; docker_ms+=($(( $(ms) - t )))
  fi
done
"$ak" sandbox create -B qemu --no-network -i "$image" bench-kept 2>/dev/null
for _ in $(seq 1 "$runs"); do
  t=$(ms); "$ak" exec bench-kept -- true; exec_ms+=($(( $(ms) - t )))
done
"$ak" sandbox rm bench-kept 2>/dev/null
median_of() { printf '%s\n' "$@" | sort -n | sed -n "$(( ($# + 1) / 2 ))p"; }
stats() { # NAME VALUES...: min and median
  local name=$1; shift
  min=$(printf '%s\n' "$@" | sort -n | head -1)
  median=$(median_of "$@")
  printf '%-34s min %6s ms   median %6s ms\n' "$name" "$min" "$median"
}
echo "== $runs runs each (load: $(cut -d' ' -f1-3 /proc/loadavg); accel: $(sed -n 2p "$home/images/vm/accel"))"
stats "native --no-network true" "${native_ms[@]}"
stats "qemu --fast=false --no-network true" "${qemu_ms[@]}"
stats "qemu --no-network true (pooled)" "${pooled_ms[@]}"
if [ "$net" = 1 ]; then
  stats "qemu --fast=false true (network)" "${qemu_net_ms[@]}"
  stats "qemu true (pooled, network)" "${pooled_net_ms[@]}"
fi
stats "exec in a kept qemu VM: true" "${exec_ms[@]}"
if [ "$docker" = 1 ]; then
  stats "docker run --rm --network none true" "${docker_ms[@]}"
  # Ratios of medians, taken in the same interleaved run (machines are noisy).
  docker_median=$(median_of "${docker_ms[@]}")
  ratio() { awk -v a="$2" -v b="$docker_median" -v n="$1" 'BEGIN { printf "%-34s %.2fx docker run --rm\n", n, a / b }'; }
  ratio "qemu cold (--fast=false)" "$(median_of "${qemu_ms[@]}")"
  ratio "qemu pooled" "$(median_of "${pooled_ms[@]}")"
  ratio "native" "$(median_of "${native_ms[@]}")"
fi

echo "== phase timeline of one cold VM run (ms since agentkernel started)"
AGENTKERNEL_TRACE_STARTUP=1 "$ak" run "${qemu[@]}" 2>&1 >/dev/null |
  awk '/^agentkernel-trace / {
         t = $2; $1 = ""; $2 = ""; sub(/^  /, "")
         if (start == "") start = t
         printf "%8.1f  %s\n", (t - start) / 1000, $0
       }'
