"""Prints medians, p95, p99 and ratios (to the first command) from a hyperfine JSON export."""
import json
import statistics
import sys

results = json.load(open(sys.argv[1]))["results"]


def pct(t, q):
    return t[min(len(t) - 1, int(len(t) * q))]


def stats(r):
    t = sorted(r["times"])
    return statistics.median(t), pct(t, 0.95), pct(t, 0.99)


base = stats(results[0])[0]
print(f"{'command':<44} {'median':>9} {'p95':>9} {'p99':>9} {'ratio':>8}")
for r in results:
    med, p95, p99 = stats(r)
    print(f"{r['command']:<44} {med*1000:8.1f}ms {p95*1000:8.1f}ms {p99*1000:8.1f}ms {med/base:7.3f}x")
