#!/usr/bin/env python3
"""Pause a benchmark while other work uses the CPU (shared, noisy 2-core machine).

  bench/yield_guard.py --root PID [--busy 0.3] [--calm-s 3] [--log FILE]

Every --interval s, sums the CPU use (in cores) of all processes outside the
process tree of --root. When that exceeds --busy cores, the tree's leaf
processes matching --match are sent SIGSTOP; they get SIGCONT after others stay
below --busy for --calm-s seconds. Exits (resuming everything) when --root is
gone. A step that straddles a pause is inflated, so use medians of step times,
never the wall time of a run paused this way. Pauses are logged as JSON lines.
"""
import argparse
import json
import os
import signal
import sys
import time

import psutil


def tree(root):
    try:
        p = psutil.Process(root)
        return [p] + p.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=int, required=True)
    ap.add_argument("--match", default="hf_train.py", help="only stop processes whose cmdline contains this")
    ap.add_argument("--busy", type=float, default=0.3, help="cores used by others that count as busy")
    ap.add_argument("--calm-s", type=float, default=3.0)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--log", default=None)
    ap.add_argument("--ignore", default="",
                    help="comma-separated process names (prefixes) whose CPU use does not count, e.g. "
                         "rustc,cargo,cc,ld (builds: run the benchmark under nice -n -10 instead)")
    a = ap.parse_args()
    me = os.getpid()
    ignore = tuple(x for x in a.ignore.split(",") if x)
    log = open(a.log, "a") if a.log else sys.stderr
    prev = {}
    stopped = []
    calm_since = None
    paused_at = None
    total_paused = 0.0
    while psutil.pid_exists(a.root):
        mine = {p.pid for p in tree(a.root)} | {me}
        now_t = {}
        for p in psutil.process_iter(["pid", "cpu_times"]):
            ct = p.info["cpu_times"]
            if ct is None:
                continue
            now_t[p.info["pid"]] = ct.user + ct.system
        time.sleep(a.interval)
        others = 0.0
        for p in psutil.process_iter(["pid", "cpu_times", "name"]):
            pid = p.info["pid"]
            ct = p.info["cpu_times"]
            if pid in mine or ct is None or pid not in now_t:
                continue
            if ignore and (p.info["name"] or "").startswith(ignore):
                continue
            others += max(0.0, (ct.user + ct.system - now_t[pid])) / a.interval
        t = time.time()
        if others > a.busy:
            calm_since = None
            cand = [] if stopped else [p for p in tree(a.root) if a.match in " ".join(p.cmdline() or [])]
            if cand:
                stopped = cand
                for p in stopped:
                    try:
                        p.send_signal(signal.SIGSTOP)
                    except psutil.NoSuchProcess:
                        pass
                paused_at = t
                print(json.dumps({"t": t, "event": "pause", "others_cores": round(others, 2),
                                  "pids": [p.pid for p in stopped]}), file=log, flush=True)
        else:
            calm_since = calm_since or t
            if stopped and t - calm_since >= a.calm_s:
                for p in stopped:
                    try:
                        p.send_signal(signal.SIGCONT)
                    except psutil.NoSuchProcess:
                        pass
                total_paused += t - paused_at
                print(json.dumps({"t": t, "event": "resume", "paused_s": round(t - paused_at, 1),
                                  "total_paused_s": round(total_paused, 1)}), file=log, flush=True)
                stopped = []
    for p in stopped:
        try:
            p.send_signal(signal.SIGCONT)
        except psutil.NoSuchProcess:
            pass


if __name__ == "__main__":
    main()
