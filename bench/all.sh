#!/usr/bin/env bash
# Every start-up figure the project tracks, in one run, under the targets
# they are held to:
#   1. native beside bwrap and `docker run --rm` (bench/native.sh);
#   2. the warm pools of Docker and Podman beside `docker|podman run --rm`,
#      with fifty back-to-back pooled runs twice: from a fresh key, and once
#      the pool has grown to what the first loop taught it (bench/pool.sh);
#   3. with --qemu, the microVM backend cold and pooled (bench/qemu.sh).
# Measure on a quiet host (no builds, no idle warm containers of other
# keys). Needs the test registry and dockerd (scripts/setup.sh).
#   bench/all.sh [--qemu] [NATIVE_RUNS] [POOL_ROUNDS]   (defaults: 200, 20)
set -euo pipefail
qemu=no
if [ "${1:-}" = --qemu ]; then
  qemu=yes
  shift
fi
native_runs=${1:-200}
pool_rounds=${2:-20}
bench=$(cd "$(dirname "$0")" && pwd)

cat <<'EOF'
Targets (sequential figures, 2-core host):
  native, moderate profile       <= 1.5x bwrap --unshare-all   (--no-network <= 1.3x)
  native p99                     <= 2x its median;  CPU per run <= 3x bwrap's
  pooled run, pool warm          <= 0.15x docker|podman run --rm
  50 back-to-back pooled runs    >= 95% ready, p90 <= 2x median (the second loop:
                                  a fresh key starts at [pool] size and learns)
  qemu under TCG                 cold <= 1.5 s to the command, pooled <= 100 ms
EOF

echo
echo "=== 1. native (bench/native.sh $native_runs 30)"
bash "$bench/native.sh" "$native_runs" 30
echo
echo "=== 2. warm pools (bench/pool.sh $pool_rounds 50)"
bash "$bench/pool.sh" "$pool_rounds" 50
if [ "$qemu" = yes ]; then
  echo
  echo "=== 3. qemu (bench/qemu.sh 6)"
  bash "$bench/qemu.sh" 6
fi
