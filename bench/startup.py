#!/usr/bin/env python3
"""Where a native run's start-up time goes: runs agentkernel RUNS times with
AGENTKERNEL_TRACE_STARTUP=1 and prints the median time of each phase from
the moment the CLI process was spawned (CLOCK_MONOTONIC, which Python's
time.monotonic and agentkernel's trace both read), and the step from the
previous phase. The last line is the process's exit as seen here.

  bench/startup.py [RUNS] [agentkernel arguments...]
  (default: 40 runs of `run -B native -i agentkernel-test/busybox:1 true`;
   the binary is $AGENTKERNEL_BIN or target/release/agentkernel)
"""
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
binary = os.environ.get("AGENTKERNEL_BIN", os.path.join(root, "target/release/agentkernel"))
runs = int(sys.argv[1]) if len(sys.argv) > 1 else 40
args = sys.argv[2:] or ["run", "-B", "native", "-i", "agentkernel-test/busybox:1", "true"]
env = dict(os.environ, AGENTKERNEL_TRACE_STARTUP="1")

def children():
    """This process's children (the cleanup processes reparented to it)."""
    pids = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return pids


def is_disk_keeper(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"hold-disks" in f.read()
    except OSError:
        return False


phases = {}  # name -> [ms since spawn]
order = []
# A child subreaper: the cleanup process a run leaves behind is reparented
# here, so we can wait for its last trace line (and see when cleanup ends).
if ctypes.CDLL(None).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    sys.exit("startup.py: prctl(PR_SET_CHILD_SUBREAPER) failed")
for _ in range(runs):
    with tempfile.TemporaryFile("w+") as err:
        spawned = time.monotonic_ns() // 1000
        child = subprocess.Popen([binary] + args, env=env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=err)
        returncode = child.wait()
        exited = time.monotonic_ns() // 1000
        # The cleanup process, if the run left one; not the disk keeper it
        # may start, which lives on (idle for a minute) and would be waited
        # for here otherwise.
        while True:
            waitable = [p for p in children() if not is_disk_keeper(p)]
            if not waitable:
                break
            for pid in waitable:
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
        err.seek(0)
        stderr = err.read()
    if returncode != 0:
        sys.exit(f"agentkernel failed ({returncode}): {stderr.strip()}")
    seen = []
    for line in stderr.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[0] == "agentkernel-trace":
            seen.append((int(parts[1]), parts[2]))
    seen.append((exited, "exited (seen by the caller)"))
    for micros, name in seen:
        phases.setdefault(name, []).append((micros - spawned) / 1000)
        if name not in order:
            order.append(name)

print(f"{'phase':40} {'median':>8} {'step':>7}   ({runs} runs: {' '.join(args)})")
previous = 0.0
for name in sorted(order, key=lambda n: statistics.median(phases[n])):
    median = statistics.median(phases[name])
    print(f"{name:40} {median:7.2f}ms {median - previous:+6.2f}")
    previous = median
