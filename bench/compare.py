#!/usr/bin/env python3
"""Compares commands' start-up two ways in one run, and prints wall time
(median, p95, p99, ratio to the first command) and CPU per run for each:

  sequential  all runs of one command, then all of the next — what a user
              running one of them back to back sees. The targets hold here.
  blocks      BLOCK runs of each command in turn, repeated until RUNS — the
              host's drift in speed lands on every command alike, while
              each command still pays for the kernel work its own previous
              run deferred (namespace and mount teardown), not another's.

Single runs strictly alternated are deliberately not offered: a sandbox's
namespace teardown finishes in the kernel after its process is reaped, so
alternating moves one command's teardown onto the next command's clock.

CPU per run is user+sys from wait4's rusage: the process and every child it
reaped (a native run's init and command). This process is a child subreaper,
so anything a run leaves running after its exit (a detached cleanup) is
reparented here, reaped, and its CPU is charged to the run that left it;
between commands the harness waits for such stragglers. (bwrap leaves one
on every run: its sandbox's PID 1 outlives bwrap's own process and tears
the namespaces down after it — most of bwrap's CPU, which wait4 on bwrap
alone, or /usr/bin/time, never sees.) Kernel work done
in kernel threads (deferred namespace teardown) is in no one's rusage: the
sequential wall times carry it.

  compare.py --runs N [--block B] [--warmup W] [--between CMD] -n NAME CMD [-n NAME CMD ...]

--between CMD runs (untimed) whenever the harness switches away from a
command and at the end, before it waits for that command's stragglers: give
it `agentkernel pool prune` so that a process a command keeps between runs
(native's disk keeper) exits there, and its CPU is charged to that command.
Without it the harness would wait for the keeper to exit on its own.

Each CMD is split like a shell would (no shell runs it); stdin, stdout and
stderr are /dev/null. A command that fails aborts the benchmark.
"""
import argparse
import ctypes
import os
import shlex
import statistics
import sys
import time

PR_SET_CHILD_SUBREAPER = 36

parser = argparse.ArgumentParser()
parser.add_argument("--runs", type=int, required=True)
parser.add_argument("--block", type=int, default=10)
parser.add_argument("--warmup", type=int, default=5)
parser.add_argument("--between", default=None)
parser.add_argument("-n", nargs=2, action="append", metavar=("NAME", "CMD"), required=True)
args = parser.parse_args()

libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
    sys.exit("compare: prctl(PR_SET_CHILD_SUBREAPER) failed")

commands = [(name, shlex.split(cmd)) for name, cmd in args.n]
devnull = os.open(os.devnull, os.O_RDWR)
actions = [(os.POSIX_SPAWN_DUP2, devnull, fd) for fd in (0, 1, 2)]


def cpu(rusage):
    return rusage.ru_utime + rusage.ru_stime


def reap_stragglers(block):
    """CPU of reparented leftovers of earlier runs; waits for them if `block`."""
    total = 0.0
    while True:
        try:
            pid, _, rusage = os.wait4(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return total
        if pid == 0:
            return total
        total += cpu(rusage)


def once(argv):
    start = time.perf_counter_ns()
    pid = os.posix_spawnp(argv[0], argv, os.environ, file_actions=actions)
    _, status, rusage = os.wait4(pid, 0)
    elapsed = (time.perf_counter_ns() - start) / 1e9
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"compare: {' '.join(argv)} failed ({os.waitstatus_to_exitcode(status)})")
    return elapsed, cpu(rusage) + reap_stragglers(False)


def settle(index):
    """After the runs of command `index`: the --between command (its CPU
    and that of what it stops are the command's), then its stragglers."""
    used = 0.0
    if args.between:
        argv = shlex.split(args.between)
        pid = os.posix_spawnp(argv[0], argv, os.environ, file_actions=actions)
        _, _, rusage = os.wait4(pid, 0)
        used += cpu(rusage)
    return used + reap_stragglers(True)


def measure(order):
    """Runs `order` (command indexes, one per run); returns per command its
    wall times and total CPU."""
    times = [[] for _ in commands]
    cpu_total = [0.0 for _ in commands]
    previous = None
    for i in order:
        if previous is not None and previous != i:
            cpu_total[previous] += settle(previous)
        elapsed, used = once(commands[i][1])
        times[i].append(elapsed)
        cpu_total[i] += used
        previous = i
    if previous is not None:
        cpu_total[previous] += settle(previous)
    return times, cpu_total


def pct(t, q):
    t = sorted(t)
    return t[min(len(t) - 1, int(len(t) * q))]


def report(title, times, cpu_total):
    print(f"-- {title}")
    print(f"{'command':<44} {'median':>9} {'p95':>9} {'p99':>9} {'ratio':>7} {'CPU/run':>9} {'ratio':>7}")
    base = statistics.median(times[0])
    base_cpu = cpu_total[0] / len(times[0])
    for (name, _), t, c in zip(commands, times, cpu_total):
        med = statistics.median(t)
        per_run = c / len(t)
        print(
            f"{name:<44} {med*1e3:7.2f}ms {pct(t, .95)*1e3:7.2f}ms {pct(t, .99)*1e3:7.2f}ms"
            f" {med/base:6.2f}x {per_run*1e3:7.2f}ms {per_run/base_cpu if base_cpu else 0:6.2f}x"
        )


n = len(commands)
load_before = os.getloadavg()
# Warm-up: page cache, image store, templates.
measure([i for i in range(n) for _ in range(args.warmup)])
sequential = measure([i for i in range(n) for _ in range(args.runs)])
blocks = []
done = 0
while done < args.runs:
    size = min(args.block, args.runs - done)
    blocks += [i for i in range(n) for _ in range(size)]
    done += size
blocked = measure(blocks)
print(f"load average: {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after (1 min);"
      f" {args.runs} runs per command and mode")
report("sequential (all of one, then the next)", *sequential)
report(f"blocks of {args.block}", *blocked)
