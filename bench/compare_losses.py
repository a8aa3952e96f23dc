#!/usr/bin/env python3
"""Compare two runs' loss curves (metrics.jsonl): per-step and 10-step-mean differences.

  bench/compare_losses.py RUN_A RUN_B
"""
import json
import statistics
import sys


def losses(run):
    return [json.loads(l)["loss"] for l in open(f"{run}/metrics.jsonl") if '"loss"' in l and '"eval_loss"' not in l]


a, b = losses(sys.argv[1]), losses(sys.argv[2])
n = min(len(a), len(b))
d = [abs(x - y) for x, y in zip(a[:n], b[:n])]
w = 10
means = [abs(statistics.mean(a[i:i + w]) - statistics.mean(b[i:i + w])) for i in range(0, n - w + 1, w)]
rel = [abs(x - y) / abs(y) for x, y in zip(a[:n], b[:n])]
print(json.dumps({"steps": n, "max_abs_step_diff": max(d), "median_abs_step_diff": statistics.median(d),
                  "max_rel_step_diff": max(rel), "max_abs_diff_of_10_step_means": max(means),
                  "first": [a[0], b[0]], "last": [a[n - 1], b[n - 1]]}))
