"""Prints medians, p95 and ratios (to the first command) from a hyperfine JSON export."""
import json
import statistics
import sys

results = json.load(open(sys.argv[1]))["results"]


def stats(r):
    t = sorted(r["times"])
    return statistics.median(t), t[min(len(t) - 1, int(len(t) * 0.95))]


base, _ = stats(results[0])
print(f"{'command':<34} {'median':>9} {'p95':>9} {'ratio':>8}")
for r in results:
    med, p95 = stats(r)
    print(f"{r['command']:<34} {med*1000:8.1f}ms {p95*1000:8.1f}ms {med/base:7.3f}x")
