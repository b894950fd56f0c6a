#!/usr/bin/env python3
"""The warm pool (--fast) against `docker|podman run --rm` and agentkernel's
own normal path (--fast=false), per engine, in two blocks:

1. interleaved rounds (each command once per round, so the machine's drift
   lands on all alike): `ENGINE run --rm`, a pooled run, `--fast=false`. The
   pooled run here finds the pool warm (the other two give the refill time):
   the latency the pool promises.
2. an agent's loop: LOOP pooled runs back to back, no pause, after one
   warm-up run. The hit rate comes from what the pool recorded
   (`pool status --json`), not from timing.
3. the same loop again once the pool has grown to what the first loop
   taught it (each key's target follows its run rate and refill time,
   within `[pool] max_total`): what an agent that keeps looping sees.

  pool.py AGENTKERNEL ENGINE ROUNDS LOOP -- ENGINE_RUN_RM_ARGV...
"""
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import interleaved  # noqa: E402  (its `once`: one spawn, timed, stdio on /dev/null)

ak, engine, rounds, loop = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
engine_argv = sys.argv[sys.argv.index("--") + 1:]
image = "agentkernel-test/busybox:1"


def once(argv):
    return interleaved.once(argv) * 1000  # ms


def pct(t, q):
    t = sorted(t)
    return t[min(len(t) - 1, int(len(t) * q))]


def key_counts():
    out = subprocess.run([ak, "pool", "status", "--json"], capture_output=True, check=True)
    for e in json.loads(out.stdout)["engines"]:
        if e["backend"] == engine:
            return sum(k["hits"] for k in e["keys"]), sum(k["waits"] for k in e["keys"]), sum(
                k["misses"] for k in e["keys"]), sum(k["warm"] for k in e["keys"])
    return 0, 0, 0, 0


def wait_warm(n):
    for _ in range(600):
        if key_counts()[3] >= n:
            return
        time.sleep(0.1)


def key_target():
    out = subprocess.run([ak, "pool", "status", "--json"], capture_output=True, check=True)
    for e in json.loads(out.stdout)["engines"]:
        if e["backend"] == engine:
            return sum(k["target"] for k in e["keys"])
    return 0


def loop_once():
    before = key_counts()
    times = [once(pooled) for _ in range(loop)]
    after = key_counts()
    return times, tuple(after[i] - before[i] for i in range(3))


pooled = [ak, "run", "-B", engine, "--fast", "-i", image, "true"]
normal = [ak, "run", "-B", engine, "--fast=false", "-i", image, "true"]

# Block 1: interleaved.
subprocess.run([ak, "pool", "prune"], capture_output=True)
once(pooled)  # a miss: warms the key
wait_warm(2)
series = {"rm": [], "warm": [], "normal": []}
for r in range(rounds + 2):
    for name, argv in (("rm", engine_argv), ("warm", pooled), ("normal", normal)):
        t = once(argv)
        if r >= 2:
            series[name].append(t)

# Block 2: back to back, from a fresh key state.
subprocess.run([ak, "pool", "prune"], capture_output=True)
once(pooled)
wait_warm(2)
loop_times, (hits, waits, misses) = loop_once()

# Block 3: once the pool has refilled to the target the loop taught it
# (up to 3 minutes: each warm container is one create + start).
target = key_target()
deadline = time.time() + 180
while key_counts()[3] < target and time.time() < deadline:
    time.sleep(0.5)
warm_before = key_counts()[3]
steady_times, (s_hits, s_waits, s_misses) = loop_once()
subprocess.run([ak, "pool", "prune"], capture_output=True)

rm_med = statistics.median(series["rm"])
warm_med = statistics.median(series["warm"])
normal_med = statistics.median(series["normal"])
loop_med = statistics.median(loop_times)
print(f"== {engine}   (block 1: {rounds} interleaved rounds; block 2: {loop} back-to-back pooled runs)")
print(f"  {engine} run --rm            median {rm_med:7.1f} ms   p95 {pct(series['rm'], .95):7.1f}")
print(f"  agentkernel --fast=false     median {normal_med:7.1f} ms   p95 {pct(series['normal'], .95):7.1f}"
      f"   {normal_med / rm_med:.2f}x run --rm")
print(f"  pooled, pool warm            median {warm_med:7.1f} ms   p95 {pct(series['warm'], .95):7.1f}"
      f"   {warm_med / rm_med:.3f}x run --rm   {warm_med / normal_med:.3f}x --fast=false")
print(f"  pooled, back to back         median {loop_med:7.1f} ms   p90 {pct(loop_times, .90):7.1f}"
      f"   p95 {pct(loop_times, .95):7.1f}   mean {statistics.mean(loop_times):7.1f}"
      f"   {loop_med / rm_med:.3f}x run --rm"
      f"   p90/median {pct(loop_times, .90) / loop_med:.1f}")
print(f"  back-to-back hit rate        {hits}/{loop} ready ({100 * hits / loop:.0f}%),"
      f" {waits} waited for one a refill was finishing, {misses} missed (normal path)")
steady_med = statistics.median(steady_times)
print(f"  again, pool grown ({warm_before} warm, target {target})"
      f"   median {steady_med:7.1f} ms   p90 {pct(steady_times, .90):7.1f}"
      f"   p90/median {pct(steady_times, .90) / steady_med:.1f}")
print(f"  its hit rate                 {s_hits}/{loop} ready ({100 * s_hits / loop:.0f}%),"
      f" {s_waits} waited, {s_misses} missed")
