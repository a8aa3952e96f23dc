#!/usr/bin/env python3
"""Medians of bench/run_bf16.sh's results per workload and tool, with ferrule bf16's ratios."""
import collections
import glob
import json
import os
import statistics
import sys

root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "results/bf16")
runs = collections.defaultdict(lambda: collections.defaultdict(list))
for path in sorted(glob.glob(os.path.join(root, "*_r*.json"))):
    if path.endswith(".raw.json"):
        continue
    workload, tool, _ = os.path.basename(path)[:-5].rsplit("_", 2)
    runs[workload][tool].append(json.load(open(path)))
print("| workload | tool | runs | real tokens/s | peak RSS MB | ferrule bf16 speed-up |")
print("|---|---|---|---|---|---|")
for workload, tools in runs.items():
    med = {t: statistics.median(r["tokens_per_s"] for r in rs) for t, rs in tools.items()}
    for tool, rs in tools.items():
        rss = statistics.median(r["peak_rss_bytes"] for r in rs) / 1e6
        ratio = med.get("ferrule-bf16", float("nan")) / med[tool]
        print(f"| {workload} | {tool} | {len(rs)} | {med[tool]:.0f} | {rss:.0f} | {ratio:.2f}x |")
