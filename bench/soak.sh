#!/usr/bin/env bash
# Soak: N native runs (default 1000) of the default profile (network,
# copy-on-write workspace, cgroup), about a third of them killed with
# SIGKILL at a random instant of their life (0 to KILL_MS=20 ms after the
# spawn: a run takes ~15 ms, so before, during and after the sandbox's
# set-up; raise it for a slower build), then `agentkernel sandbox gc`, then
# a check that nothing of theirs is left: scratch directories (or their
# temporaries), cgroups, address leases, veths without a lease, mounts,
# processes.
#
# gc removes a cgroup without a scratch directory, and a scratch directory
# without an owner file (a remover killed halfway), only once it is a minute
# old: younger ones may belong to a run that is starting or ending right
# now. So gc runs twice: right after the soak (what it leaves then is
# printed) and 61 s later (which must leave nothing).
#
# Only the PIDs this script started are ever killed. Run as root, with the
# test registry up (scripts/setup.sh) for the image.
#   bench/soak.sh [N]        AK=path/to/agentkernel to skip the release build
set -euo pipefail
runs=${1:-1000}
kill_ms=${KILL_MS:-20}
root=$(cd "$(dirname "$0")/.." && pwd)
image=agentkernel-test/busybox:1
if [ -z "${AK:-}" ]; then
  (cd "$root" && cargo build --release --quiet)   # from the root: .cargo/config.toml links statically
  AK="$root/target/release/agentkernel"
fi
home=$(mktemp -d)
project=$(mktemp -d)
ids=$(mktemp)
# pool prune first: the workspace disks native runs attached ahead would
# stay attached to deleted files after an rm -rf of the state directory.
trap '"$AK" pool prune >/dev/null 2>&1 || true; rm -rf "$home" "$project" "$ids"' EXIT
export AGENTKERNEL_HOME="$home"
export AGENTKERNEL_REGISTRY_MIRRORS=${AGENTKERNEL_REGISTRY_MIRRORS:-http://127.0.0.1:5055}
"$AK" image pull "$image" >/dev/null 2>&1
cd "$project"
echo data > file.txt

# Run ids of this soak, from its scratch directories (runs are sequential,
# so whatever is in runs/ is this run's or a killed earlier one's).
note_ids() {
  ls -A "$home/runs" 2>/dev/null | sed -E 's/^\.new-//; s/\.[0-9]+\.[0-9]+$//' >>"$ids" || true
}

killed=0
failed=0
start=$(date +%s)
for i in $(seq 1 "$runs"); do
  "$AK" run -B native -i "$image" sh -c 'echo x > /workspace/out; cat file.txt' \
    >/dev/null 2>&1 </dev/null &
  pid=$!
  if [ $((RANDOM % 3)) -eq 0 ]; then
    sleep "$(printf '0.%03d' $((RANDOM % (kill_ms + 1))))"
    note_ids
    # A kill that comes after the run ended finds no process: not counted.
    kill -9 "$pid" 2>/dev/null && killed=$((killed + 1))
    wait "$pid" 2>/dev/null || true
    note_ids
  else
    note_ids
    wait "$pid" || failed=$((failed + 1))
  fi
done
echo "soak: $runs runs in $(($(date +%s) - start)) s, $killed killed with SIGKILL while running, $failed of the others failed"

# What is left of this soak: one line per leftover.
leftovers() {
  local id
  ls -A "$home/runs" 2>/dev/null | sed 's|^|scratch runs/|'
  sort -u "$ids" | while read -r id; do
    [ -n "$id" ] || continue
    for d in /sys/fs/cgroup/agentkernel/"$id" /sys/fs/cgroup/*/agentkernel/"$id"; do
      [ -d "$d" ] && echo "cgroup $d"
    done
    grep -ls "^sandbox=$id\." /run/agentkernel/net/leases/* 2>/dev/null | sed 's/^/lease /'
    grep -l "/agentkernel/$id\$" /proc/[0-9]*/cgroup 2>/dev/null | sed 's/^/process /'
  done
  # Every agentkernel veth on the bridge belongs to a live lease (any run's).
  ip -o link show master agentkernel0 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' |
    grep '^ak' | while read -r veth; do
      grep -qs "^veth=$veth\$" /run/agentkernel/net/leases/* || echo "veth $veth without a lease"
    done
  grep -F "$home" /proc/self/mountinfo | sed 's/^/mount /'
  true
}

"$AK" sandbox gc
echo "right after the soak, gc left $( (leftovers || true) | wc -l) thing(s) (young ones wait a minute):"
leftovers | sed 's/^/  /' || true
sleep 61
"$AK" sandbox gc
left=$(leftovers || true)
if [ -n "$left" ]; then
  echo "FAIL: left behind after gc:"
  echo "$left" | sed 's/^/  /'
  exit 1
fi
echo "ok: nothing left ($(sort -u "$ids" | grep -c . || true) run ids checked)"
