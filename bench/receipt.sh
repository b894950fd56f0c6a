#!/usr/bin/env bash
# What --receipt costs a command that writes a lot: a native run writing
# 100 MB (default) to stdout, with and without --receipt, in blocks so the
# host's drift lands on both alike (bench/compare.py). stdout is a file in
# both (as when an agent captures it); with --receipt the output also passes
# through agentkernel's tee and is hashed (sha256) on the way. Target: at
# most 5% more wall time.
#
#   bench/receipt.sh [RUNS] [MB]        (as root; the image from the test registry)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
runs=${1:-10}
mb=${2:-100}
bin=${AGENTKERNEL_BIN:-$root/target/release/agentkernel}
[ -x "$bin" ] || { echo "bench/receipt.sh: build first: cargo build --release -p agentkernel" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
export AGENTKERNEL_REGISTRY_MIRRORS=${AGENTKERNEL_REGISTRY_MIRRORS:-http://127.0.0.1:5055}
image=${IMAGE:-agentkernel-test/busybox:1}
cmd="head -c ${mb}000000 /dev/zero"
"$bin" run -B native -i "$image" -- true >/dev/null
python3 "$root/bench/compare.py" --runs "$runs" --block 2 --warmup 1 --between "$bin pool prune" \
  -n plain "sh -c '$bin run -B native -i $image -- $cmd > $work/out'" \
  -n receipt "sh -c '$bin run -B native -i $image --receipt $work/r.json -- $cmd > $work/out'"
echo "last receipt: $(python3 -c "import json; o=json.load(open('$work/r.json'))['outcome']; print(o['stdout'])")"
