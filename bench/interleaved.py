#!/usr/bin/env python3
"""Runs commands interleaved — round after round, each command once per
round — and writes hyperfine's JSON shape (for report.py). On a noisy VM the
machine's speed drifts over a benchmark; hyperfine runs all of one command,
then all of the next, so drift lands on one side of a ratio. Interleaved,
every command sees the same drift.

  interleaved.py --runs N [--warmup W] --export-json FILE -n NAME CMD [-n NAME CMD ...]

Each CMD is split like a shell would (no shell runs it); stdin, stdout and
stderr are /dev/null. A command that fails aborts the benchmark.
"""
import argparse
import json
import os
import shlex
import sys
import time

devnull = os.open(os.devnull, os.O_RDWR)
actions = [(os.POSIX_SPAWN_DUP2, devnull, fd) for fd in (0, 1, 2)]


def once(argv):
    """Runs argv once with stdio on /dev/null; its wall time in seconds."""
    start = time.perf_counter_ns()
    pid = os.posix_spawnp(argv[0], argv, os.environ, file_actions=actions)
    _, status = os.waitpid(pid, 0)
    elapsed = (time.perf_counter_ns() - start) / 1e9
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"interleaved: {' '.join(argv)} failed ({os.waitstatus_to_exitcode(status)})")
    return elapsed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--export-json", required=True)
    parser.add_argument("-n", nargs=2, action="append", metavar=("NAME", "CMD"), required=True)
    args = parser.parse_args()

    commands = [(name, shlex.split(cmd)) for name, cmd in args.n]
    times = [[] for _ in commands]
    for round_ in range(args.warmup + args.runs):
        for i, (_, argv) in enumerate(commands):
            t = once(argv)
            if round_ >= args.warmup:
                times[i].append(t)

    with open(args.export_json, "w") as f:
        json.dump({"results": [{"command": name, "times": t} for (name, _), t in zip(commands, times)]}, f)


if __name__ == "__main__":
    main()
