#!/usr/bin/env python3
"""Times commands run one at a time with a pause between runs, as an agent
runs them (a command, then thinking): all runs of one command, then the
next, each run followed by GAP seconds of idleness. Prints the median and
p90 wall time and the ratio to the first command.

  spaced.py GAP RUNS CMD [CMD ...]

A warm pool rebuilds in the pause; back-to-back figures (bench/compare.py)
charge that rebuild to the next runs instead. Each CMD is split like a
shell would; its stdio is /dev/null; a failing run aborts.
"""
import shlex
import statistics
import subprocess
import sys
import time

gap, runs, commands = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
base = None
for command in commands:
    argv = shlex.split(command)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - start)
        time.sleep(gap)
    times.sort()
    median = statistics.median(times)
    base = base or median
    print(f"{median*1e3:7.2f} ms  p90 {times[int(runs*.9)]*1e3:7.2f} ms  {median/base:5.2f}x  {command}",
          flush=True)
