#!/usr/bin/env bash
# The native backend beside bwrap and `docker run --rm`:
#   1. RUNS runs each of bwrap, agentkernel -B native (default moderate
#      profile: network, copy-on-write workspace with its disk cap, cgroup
#      limits) and the same with --no-network, measured twice in one go
#      (bench/compare.py): sequentially (all runs of one command, then the
#      next) and in blocks of ten — medians, p95, p99, ratios to bwrap, and
#      CPU per run (user+sys from wait4, a run's leftover cleanup process
#      included), and `exec` in a kept native sandbox (joining a sandbox
#      built ahead: what an agent's loop of commands can use today, and
#      the floor a native warm pool would reach). Not alternated run by
#      run: that moves one sandbox's deferred kernel teardown onto the next
#      command's clock;
#   2. DOCKER_RUNS runs each of docker run --rm, agentkernel -B native and
#      bwrap, interleaved (bench/interleaved.py) — ratios to docker;
#   3. peak memory (max RSS) of the agentkernel process, beside bwrap and the
#      docker CLI;
#   4. 50 concurrent native runs: failures, and anything left behind;
#   5. rootless (as root: a throwaway uid via setpriv): bwrap beside
#      agentkernel -B native with slirp4netns and with --no-network.
# Needs the test registry (scripts/setup.sh) for the image. Measure on a
# quiet host: idle warm containers (`docker ps`) and builds skew everything.
#   bench/native.sh [RUNS] [DOCKER_RUNS]     (defaults: 200, 30)
set -euo pipefail
runs=${1:-200}
docker_runs=${2:-30}
root=$(cd "$(dirname "$0")/.." && pwd)
image=agentkernel-test/busybox:1
(cd "$root" && cargo build --release --quiet)   # from the root: .cargo/config.toml links statically
ak="$root/target/release/agentkernel"
home=$(mktemp -d)
project=$(mktemp -d)
out=$(mktemp -d)
export AGENTKERNEL_HOME="$home"
export AGENTKERNEL_REGISTRY_MIRRORS=${AGENTKERNEL_REGISTRY_MIRRORS:-http://127.0.0.1:5055}
rootless=$(mktemp -d)
# The workspace disks runs attached ahead (disk_pool.rs) go with the state dir.
kept=bench-kept-$$
# Each step may fail (the kept sandbox is normally removed already): under
# set -e a failing one would end the trap before the rest is cleaned up.
trap '"$ak" sandbox rm "$kept" >/dev/null 2>&1 || true; "$ak" pool prune >/dev/null 2>&1 || true
      rm -rf "$home" "$project" "$out" "$rootless"' EXIT
"$ak" image pull "$image" >/dev/null 2>&1   # cached: runs make no network request
cd "$project"   # a project dir: the workspace is mounted as it would be for a user
"$ak" sandbox create -B native -i "$image" "$kept" >/dev/null
bwrap_cmd="bwrap --ro-bind / / --dev /dev --proc /proc --unshare-all true"

echo "== native vs bwrap ($runs runs each, sequential and in blocks; load: $(cut -d' ' -f1-3 /proc/loadavg))"
# --between: the disk keeper a run starts exits there, its CPU charged.
"$root/bench/compare.py" --warmup 5 --runs "$runs" --block 10 --between "$ak pool prune" \
  -n "bwrap --unshare-all" "$bwrap_cmd" \
  -n "agentkernel -B native (moderate)" "$ak run -B native -i $image true" \
  -n "agentkernel -B native --no-network" "$ak run -B native --no-network -i $image true" \
  -n "agentkernel exec (kept native sandbox)" "$ak exec $kept -- true" \
  -n "/bin/true (the harness's own floor)" "/bin/true"
# Its veth and workspace disk must not count as left behind below.
"$ak" sandbox rm "$kept" >/dev/null

echo
echo "== native vs docker run --rm ($docker_runs runs each)"
"$root/bench/interleaved.py" --warmup 2 --runs "$docker_runs" --export-json "$out/docker.json" \
  -n "docker run --rm" "docker run --rm $image true" \
  -n "agentkernel -B native (moderate)" "$ak run -B native -i $image true" \
  -n "bwrap --unshare-all" "$bwrap_cmd" \
  >/dev/null
python3 "$root/bench/report.py" "$out/docker.json"

echo
echo "== peak memory (max RSS, median of 20)"
peak() {
  for _ in $(seq 1 20); do /usr/bin/time -f '%M' "$@" 2>&1 >/dev/null | tail -1; done \
    | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)] " KiB"}'
}
printf '%-44s %s\n' "agentkernel -B native (moderate)" "$(peak "$ak" run -B native -i "$image" true)"
printf '%-44s %s\n' "bwrap --unshare-all" "$(peak $bwrap_cmd)"
printf '%-44s %s\n' "docker run --rm (the CLI process)" "$(peak docker run --rm "$image" true)"

echo
echo "== 50 concurrent native runs"
count_cgroups() { find /sys/fs/cgroup -maxdepth 3 -path '*/agentkernel/run-*' -type d 2>/dev/null | wc -l; }
count_leases() { ls /run/agentkernel/net/leases 2>/dev/null | wc -l; }
cgroups_before=$(count_cgroups); leases_before=$(count_leases)
pids=()
start=$(date +%s.%N)
for i in $(seq 1 50); do
  "$ak" run -B native -i "$image" sh -c "echo run-$i > /dev/null; sleep 0.5" &
  pids+=($!)
done
failed=0
for p in "${pids[@]}"; do wait "$p" || failed=$((failed + 1)); done
end=$(date +%s.%N)
sleep 1   # the kernel deletes veths with their namespaces, and runs clean up, asynchronously
echo "failed runs: $failed / 50 (all done in $(python3 -c "print(f'{$end-$start:.2f}')")s)"
backed_under() {   # loop devices whose backing file is under $1
  cat /sys/block/loop*/loop/backing_file 2>/dev/null | grep -c "^$1" || true
}
ahead=$(backed_under "$home/disk-pool/")
echo "left behind: scratch dirs $(find "$home/runs" "$home/finished" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)," \
  "loop devices $(( $(backed_under "$home/") - ahead )) (+ $ahead attached ahead for the next runs, at most 2)," \
  "cgroups $(( $(count_cgroups) - cgroups_before ))," \
  "leases $(( $(count_leases) - leases_before ))," \
  "veths $(ip -o link 2>/dev/null | grep -c ': ak[0-9a-f]' || true)"

if [ "$(id -u)" = 0 ]; then
  echo
  echo "== rootless: uid 4242 via setpriv ($runs runs each)"
  chmod 755 "$rootless"; mkdir -p "$rootless/home" "$rootless/project"
  chown -R 4242:4242 "$rootless"
  as_user="setpriv --reuid 4242 --regid 4242 --clear-groups env HOME=$rootless/home AGENTKERNEL_HOME=$rootless/state"
  (cd "$rootless/project" && $as_user "$ak" image pull "$image" >/dev/null 2>&1)
  (cd "$rootless/project" && "$root/bench/compare.py" --warmup 5 --runs "$runs" --block 10 \
    -n "bwrap --unshare-all (unprivileged)" "$as_user $bwrap_cmd" \
    -n "agentkernel -B native rootless (slirp4netns)" "$as_user $ak run -B native -i $image true" \
    -n "agentkernel -B native rootless --no-network" "$as_user $ak run -B native --no-network -i $image true")
fi
