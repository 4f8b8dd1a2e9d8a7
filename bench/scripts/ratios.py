#!/usr/bin/env python3
"""Ratios B/A of the runs bench/scripts/before-after.sh made: per figure, each round's ratio and
their median. Usage: ratios.py OUT_DIR ROUNDS"""
import json
import statistics
import sys

out, rounds = sys.argv[1], int(sys.argv[2])


def load(bench, side, r):
    with open(f"{out}/{bench}-{side}-{r}.json") as f:
        return json.load(f)


def figures(bench, doc):
    for e in doc["entries"]:
        if bench == "tcp":
            yield f"tcp {e['op']} dim {e['dim']} threads {e['threads']} rows/s", e["rows_per_s"]
        elif bench == "transport":
            yield f"transport {e['path']} dim {e['dim']} rows/s", e["rows_per_s"]
        else:
            yield (
                f"comm {e['clients']} client(s) {e['policy']} bound {e['pull_bound']} batches/s",
                e["batches_per_s"],
            )


print("| figure | A (median) | B (median) | B/A per round | median B/A |")
print("|---|---:|---:|---|---:|")
for bench in ["tcp", "transport", "comm"]:
    per = {}
    for r in range(1, rounds + 1):
        a = dict(figures(bench, load(bench, "A", r)))
        b = dict(figures(bench, load(bench, "B", r)))
        for k in a:
            per.setdefault(k, []).append((a[k], b[k]))
    for k, pairs in per.items():
        ratios = [b / a for a, b in pairs]
        print(
            f"| {k} | {statistics.median(a for a, _ in pairs):,.0f} "
            f"| {statistics.median(b for _, b in pairs):,.0f} "
            f"| {', '.join(f'{x:.2f}' for x in ratios)} | {statistics.median(ratios):.2f}x |"
        )
