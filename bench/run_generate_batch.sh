#!/usr/bin/env bash
# Batched generation (`ferrule generate --prompts`): the first $N user turns of the chatterbot
# test split, greedy, $TOKENS new tokens each, on the SmolLM2-135M Q4_1 GGUF, at batch size 1
# (one prompt at a time) and $BATCH, alternated $REPEAT times; wall time and peak RSS from
# /usr/bin/time, then whether both wrote the same completions.
#
#   cargo build --release -p ferrule-cli && bench/run_generate_batch.sh
# Results: bench/results/generate_batch.tsv (batch, run, wall s, peak RSS KiB).
set -euo pipefail
cd "$(dirname "$0")/.."
FERRULE=${FERRULE:-target/release/ferrule}
MODEL=${MODEL:-assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
N=${N:-16} TOKENS=${TOKENS:-32} BATCH=${BATCH:-8} REPEAT=${REPEAT:-3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
OUT=bench/results/generate_batch.tsv
mkdir -p bench/results
python3 - "$N" > "$WORK/prompts.jsonl" <<'PY'
import json, sys
n = int(sys.argv[1])
with open("assets/data/chatterbot/test.jsonl") as f:
    for line in f:
        if n == 0:
            break
        user = next(m["content"] for m in json.loads(line)["messages"] if m["role"] == "user")
        print(json.dumps({"prompt": user}))
        n -= 1
PY
printf "batch\trun\twall_s\tpeak_rss_kib\n" > "$OUT"
for run in $(seq "$REPEAT"); do
  for b in 1 "$BATCH"; do
    /usr/bin/time -f "$b\t$run\t%e\t%M" -a -o "$OUT" "$FERRULE" generate --threads 2 --model "$MODEL" \
      --prompts "$WORK/prompts.jsonl" --batch-size "$b" --max-new-tokens "$TOKENS" --greedy \
      --output "$WORK/out-$b.jsonl" 2>/dev/null
  done
done
cmp -s "$WORK/out-1.jsonl" "$WORK/out-$BATCH.jsonl" && echo "same completions at batch 1 and $BATCH" \
  || echo "completions differ between batch 1 and $BATCH"
python3 - "$OUT" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
for b in sorted({r["batch"] for r in rows}, key=int):
    w = [float(r["wall_s"]) for r in rows if r["batch"] == b]
    m = [int(r["peak_rss_kib"]) for r in rows if r["batch"] == b]
    print(f"batch {b}: median wall {statistics.median(w):.2f} s, peak RSS {statistics.median(m) / 1024:.0f} MiB")
PY
