#!/usr/bin/env bash
# agentkernel's overhead over `docker run --rm`, measured side by side in one
# hyperfine run (medians and ratios; this machine is noisy, so never trust a
# lone absolute time). Needs a running dockerd, hyperfine, and the test images
# (scripts/build-test-images.sh).
#   bench/docker-overhead.sh [RUNS]          (default 30 runs per command)
set -euo pipefail
runs=${1:-30}
root=$(cd "$(dirname "$0")/.." && pwd)
image=agentkernel-test/busybox:1
(cd "$root" && cargo build --release --quiet)   # from the root: .cargo/config.toml links statically
ak="$root/target/release/agentkernel"
docker image inspect "$image" >/dev/null 2>&1 || "$root/scripts/build-test-images.sh"
project=$(mktemp -d)
out=$(mktemp)
trap 'rm -rf "$project" "$out"' EXIT
echo "print('hi')" > "$project/main.py"

# 1. plain docker; 2. agentkernel from /, where no workspace is mounted, so both
# do the same container work; 3. agentkernel from a project directory (default
# moderate profile: copy-on-write overlay of the directory at /workspace).
cd /
hyperfine --warmup 3 --runs "$runs" --export-json "$out" --style basic \
  -n "docker run --rm" "docker run --rm $image true" \
  -n "agentkernel (no workspace)" "$ak run -B docker --fast=false -i $image true 2>/dev/null" \
  -n "agentkernel (cow workspace)" "cd $project && $ak run -B docker --fast=false -i $image true" \
  >/dev/null

python3 "$root/bench/report.py" "$out"
