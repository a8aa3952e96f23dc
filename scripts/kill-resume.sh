#!/usr/bin/env bash
# The kill -9 check: train the tiny fixture model once uninterrupted, then N times killed with
# SIGKILL at a random moment (during a step, a checkpoint save or the final adapter write) and
# resumed with --resume until it completes (killed again at random on each try, up to KILLS
# times per trial); every trial's adapter must equal the uninterrupted one byte for byte.
#
#   scripts/kill-resume.sh [N]        (default N=20; scripts/test.sh runs N=3)
#   OPTIM=paged_adamw_8bit scripts/kill-resume.sh [N]   (the same with another --optim: a kill
#                                     may then land in a write of the paged state file)
#
# FERRULE picks the binary (default: the newer of target/release/ferrule and target/debug/ferrule).
# Prints one line per trial and a summary; exits 1 on any difference or failure.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-20}
KILLS=${KILLS:-3}
BIN=${FERRULE:-}
if [ -z "$BIN" ]; then # the newer of the two builds
  for b in target/release/ferrule target/debug/ferrule; do
    [ -x "$b" ] && { [ -z "$BIN" ] || [ "$b" -nt "$BIN" ]; } && BIN=$b
  done
fi
[ -n "$BIN" ] && [ -x "$BIN" ] || { echo "kill-resume: no ferrule binary (cargo build -p ferrule-cli, or set FERRULE)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
args=(train --model tests/fixtures/models/llama --data tests/fixtures/data/chat.jsonl
  --max-steps 300 --batch-size 2 --save-every 7 --keep-checkpoints 2 --threads 1 -q
  --optim "${OPTIM:-adamw}")

start=$(date +%s.%N)
"$BIN" "${args[@]}" --output "$work/reference" >/dev/null
span=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.3f", b - a }')
want=$(sha256sum <"$work/reference/adapter_model.safetensors")

kills=0 failures=0
for trial in $(seq 1 "$N"); do
  out="$work/trial-$trial"
  tries=0 killed=0 resume=()
  while :; do
    tries=$((tries + 1))
    "$BIN" "${args[@]}" --output "$out" "${resume[@]}" >/dev/null 2>"$work/err" &
    pid=$!
    if [ "$tries" -le "$KILLS" ]; then
      # A random moment within one uninterrupted run's duration.
      sleep "$(awk -v s="$span" -v r=$((RANDOM % 1000)) 'BEGIN { printf "%.3f", s * r / 1000 }')"
      kill -9 "$pid" 2>/dev/null || true # it may have finished already
    fi
    status=0
    wait "$pid" 2>/dev/null || status=$?
    [ "$status" = 0 ] && break
    if [ "$status" != 137 ]; then
      echo "trial $trial: ferrule exited with $status:" >&2
      cat "$work/err" >&2
      failures=$((failures + 1))
      continue 2
    fi
    killed=$((killed + 1)) kills=$((kills + 1))
    resume=(--resume)
  done
  if compgen -G "$out/ferrule-optimizer-state-*" >/dev/null; then
    echo "trial $trial: a killed run left an optimizer state file in $out" >&2
    failures=$((failures + 1))
  fi
  got=$(sha256sum <"$out/adapter_model.safetensors")
  if [ "$got" = "$want" ]; then
    echo "trial $trial: identical after $killed kill(s)"
  else
    echo "trial $trial: adapter DIFFERS after $killed kill(s)" >&2
    failures=$((failures + 1))
  fi
done
echo "kill-resume: ${OPTIM:-adamw}, $N trials, $kills kills, $failures failures (uninterrupted run: ${span}s)"
[ "$failures" = 0 ]
