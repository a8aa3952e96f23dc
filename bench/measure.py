#!/usr/bin/env python3
"""Run a command N times; record wall time and peak RSS of each run; print/save medians as JSON.

Usage:
  bench/measure.py --repeat 3 --out bench/results/x.json -- CMD ARG...
  bench/measure.py --repeat 3 --result-json /tmp/r.json --result-keys tokens_per_s,final_loss -- CMD ...

Peak RSS per run comes from os.wait4() on the child: the kernel's ru_maxrss for
that child (which, on Linux, also covers its waited-for descendants, taking
the max, not the sum). Standard only (no psutil needed). When psutil is
available, RSS of the whole process tree (child + descendants, summed) is also
polled every --poll-interval seconds, which catches tools that fork workers.
Note getrusage(RUSAGE_CHILDREN).ru_maxrss is a max over all children ever
reaped, so per-run deltas of it are not meaningful; wait4 avoids that.

Each run also records the 1/5/15-minute load average and /proc/pressure/cpu
before and after, and the child's user+sys CPU seconds (cpu_utilisation =
cpu / wall; about the thread count on an idle machine, lower when other
processes compete for the cores).

"{run}" in CMD or --result-json is replaced by the run index (0-based, warm-up
runs included); the child also gets it as $MEASURE_RUN.

--result-json PATH: after each run, read that JSON file (written by the child,
e.g. hf_train.py --out PATH or the Rust binary's results file), keep the listed
numeric --result-keys per run, and report their medians too.
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time


def loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def cpu_pressure():
    try:
        with open("/proc/pressure/cpu") as f:
            first = f.readline().split()
        kv = dict(x.split("=") for x in first[1:])
        return {"some_avg10": float(kv["avg10"]), "some_avg60": float(kv["avg60"])}
    except Exception:
        return None


class TreePoller:
    def __init__(self, pid, interval):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        try:
            import psutil
            self.psutil = psutil
            self.proc = psutil.Process(pid)
        except Exception:
            self.psutil = None
            return
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _sample(self):
        total = 0
        try:
            procs = [self.proc] + self.proc.children(recursive=True)
        except Exception:
            return
        for p in procs:
            try:
                total += p.memory_info().rss
            except Exception:
                pass
        self.peak = max(self.peak, total)

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def stop(self):
        if self.psutil is None:
            return None
        self._stop.set()
        self._t.join()
        return self.peak or None


def run_once(cmd, args, i):
    sub = lambda x: x.replace("{run}", str(i))
    cmd = sub(cmd) if isinstance(cmd, str) else [sub(c) for c in cmd]
    result_json = sub(args.result_json) if args.result_json else None
    rec = {"run": i, "loadavg_before": loadavg(), "cpu_pressure_before": cpu_pressure()}
    if result_json and os.path.exists(result_json):
        os.remove(result_json)
    env = dict(os.environ, MEASURE_RUN=str(i))
    stdout = subprocess.DEVNULL if args.quiet else None
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=stdout, cwd=args.cwd, shell=args.shell, env=env)
    poller = TreePoller(proc.pid, args.poll_interval) if not args.no_poll else None
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    rec.update({
        "wall_s": wall,
        "exit_code": proc.returncode,
        "peak_rss_bytes": ru.ru_maxrss * 1024,  # Linux: KiB
        "peak_rss_bytes_psutil_tree": poller.stop() if poller else None,
        "user_s": ru.ru_utime,
        "sys_s": ru.ru_stime,
        "cpu_utilisation": (ru.ru_utime + ru.ru_stime) / wall if wall > 0 else None,
        "loadavg_after": loadavg(),
        "cpu_pressure_after": cpu_pressure(),
    })
    if result_json:
        rec["result_json"] = result_json
        try:
            with open(result_json) as f:
                child = json.load(f)
            keys = [k for k in args.result_keys.split(",") if k] if args.result_keys else \
                [k for k, v in child.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
            rec["result"] = {k: child.get(k) for k in keys}
        except Exception as e:  # keep going; record why
            rec["result_error"] = repr(e)
    return rec


def med(vals):
    vals = [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return statistics.median(vals) if vals else None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--warmup-runs", type=int, default=0, help="runs made first and left out of the medians")
    p.add_argument("--out", help="write the JSON summary here (also printed)")
    p.add_argument("--label", default=None)
    p.add_argument("--cwd", default=None)
    p.add_argument("--shell", action="store_true", help="run CMD through /bin/sh -c (give it as one string)")
    p.add_argument("--quiet", action="store_true", help="discard the child's stdout (stderr is kept)")
    p.add_argument("--poll-interval", type=float, default=0.25)
    p.add_argument("--no-poll", action="store_true", help="skip psutil tree polling")
    p.add_argument("--result-json", help="JSON file the child writes; numeric keys are collected per run")
    p.add_argument("--result-keys", default="", help="comma-separated keys of --result-json (default: all numeric top-level)")
    p.add_argument("--allow-fail", action="store_true", help="keep going when a run exits non-zero")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    args = p.parse_args()
    cmd = args.cmd[1:] if args.cmd and args.cmd[0] == "--" else args.cmd
    if not cmd:
        p.error("no command given (put it after --)")
    if args.shell:
        cmd = " ".join(cmd)

    runs = []
    for i in range(args.warmup_runs + args.repeat):
        warm = i < args.warmup_runs
        rec = run_once(cmd, args, i)
        rec["warmup"] = warm
        runs.append(rec)
        print(f"[measure] run {i + 1}/{args.warmup_runs + args.repeat}{' (warm-up)' if warm else ''}: "
              f"wall {rec['wall_s']:.2f}s peak_rss {rec['peak_rss_bytes'] / 2**20:.0f} MiB "
              f"cpu {rec['cpu_utilisation']:.2f} load {rec['loadavg_before']} exit {rec['exit_code']}",
              file=sys.stderr, flush=True)
        if rec["exit_code"] != 0 and not args.allow_fail:
            print("[measure] command failed; stopping (use --allow-fail to continue)", file=sys.stderr)
            break

    kept = [r for r in runs if not r["warmup"] and r["exit_code"] == 0]
    summary = {
        "label": args.label,
        # Recorded relative to the repository (results are committed; no paths of this machine).
        "command": (cmd if isinstance(cmd, str) else " ".join(shlex.quote(c) for c in cmd)).replace(sys.executable, "python"),
        "cwd": os.path.relpath(os.path.abspath(args.cwd or "."), os.getcwd()),
        "repeat": args.repeat,
        "ok_runs": len(kept),
        "median": {
            "wall_s": med([r["wall_s"] for r in kept]),
            "peak_rss_bytes": med([r["peak_rss_bytes"] for r in kept]),
            "peak_rss_bytes_psutil_tree": med([r["peak_rss_bytes_psutil_tree"] for r in kept]),
            "cpu_utilisation": med([r["cpu_utilisation"] for r in kept]),
        },
        "min_wall_s": min((r["wall_s"] for r in kept), default=None),
        "max_peak_rss_bytes": max((r["peak_rss_bytes"] for r in kept), default=None),
        "runs": runs,
    }
    res_keys = sorted({k for r in kept for k in r.get("result", {})})
    if res_keys:
        summary["median"]["result"] = {k: med([r.get("result", {}).get(k) for r in kept]) for k in res_keys}
    text = json.dumps(summary, indent=1)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0 if len(kept) == args.repeat else 1


if __name__ == "__main__":
    sys.exit(main())
