#!/usr/bin/env bash
# Samples a command's memory while it runs, to find where its peak is (load, a step, saving):
# every INTERVAL seconds (default 0.5) one line "seconds RssAnon_kB RssFile_kB VmRSS_kB" from
# /proc/PID/status, to TRACE (default rss_trace.txt). The command's own stderr goes to
# TRACE.stderr, so its progress lines can be read beside the samples.
# Usage: TRACE=out.txt bench/rss_trace.sh ferrule train ...
set -euo pipefail
TRACE=${TRACE:-rss_trace.txt}
INTERVAL=${INTERVAL:-0.5}
"$@" 2> "$TRACE.stderr" &
pid=$!
start=$(date +%s.%N)
: > "$TRACE"
while kill -0 "$pid" 2> /dev/null; do
  awk -v t="$(echo "$(date +%s.%N) - $start" | bc)" \
    '/^RssAnon/ {a=$2} /^RssFile/ {f=$2} /^VmRSS/ {r=$2} END {if (r) print t, a, f, r}' \
    "/proc/$pid/status" >> "$TRACE" 2> /dev/null || true
  sleep "$INTERVAL"
done
wait "$pid"
