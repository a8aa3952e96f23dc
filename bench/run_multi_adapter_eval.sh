#!/usr/bin/env bash
# Inference with several adapters: `ferrule eval` of 64 chatterbot test records on the SmolLM2
# GGUF (Q4_1) base, with no adapter, each of two adapters alone (--active-adapter), and their
# weighted sum (--adapter-weights), REPEAT rounds (default 3), wall time and peak RSS by
# /usr/bin/time. The two adapters are trained first (20 steps each, LoRA with the default
# targets and RandLoRA r 32) unless RUNS already holds them.
# Results: bench/results/multi_adapter/<variant>_<round>.txt and summary.json (medians).
# Usage: bench/run_multi_adapter_eval.sh; needs `cargo build --release -p ferrule-cli` and the assets.
set -euo pipefail
cd "$(dirname "$0")/.."
F=${FERRULE:-target/release/ferrule}
OUT=${OUT_DIR:-bench/results/multi_adapter}
RUNS=${RUNS:-$OUT/runs}
REPEAT=${REPEAT:-3}
G=assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$OUT" "$RUNS"
if [ ! -f "$RUNS/chat/adapter_model.safetensors" ]; then
  $F train --model $G --data assets/data/chatterbot/train.jsonl --output "$RUNS/chat" --max-steps 20 --lr 3e-3
fi
if [ ! -f "$RUNS/chat-randlora/adapter_model.safetensors" ]; then
  $F train --model $G --method randlora --lora-r 32 --data assets/data/chatterbot/train.jsonl --output "$RUNS/chat-randlora" --max-steps 20 --lr 3e-3
fi
declare -A SEL=(
  [none]=""
  [lora]="--adapter $RUNS/chat"
  [randlora]="--adapter $RUNS/chat-randlora"
  [weighted]="--adapter $RUNS/chat --adapter $RUNS/chat-randlora --adapter-weights chat=0.7,chat-randlora=0.3"
)
VARIANTS=(none lora randlora weighted)
for r in $(seq 1 "$REPEAT"); do
  for v in "${VARIANTS[@]}"; do
    # shellcheck disable=SC2086
    /usr/bin/time -f "%e %M" -o "$OUT/${v}_$r.time" $F eval --model $G ${SEL[$v]} --data assets/data/chatterbot/test.jsonl --limit 64 > "$OUT/${v}_$r.txt"
    echo "round $r $v: $(cat "$OUT/${v}_$r.time") (s, KB)"
  done
done
python3 - "$OUT" "$REPEAT" "${VARIANTS[@]}" <<'EOF'
import json, statistics, sys
out, repeat, variants = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
summary = {}
for v in variants:
    t, m = [], []
    for r in range(1, repeat + 1):
        s, kb = open(f"{out}/{v}_{r}.time").read().split()[-2:]
        t.append(float(s)); m.append(int(kb))
    loss = json.loads(open(f"{out}/{v}_1.txt").read())["eval_loss"]
    summary[v] = {"median_s": statistics.median(t), "median_rss_mb": statistics.median(m) / 1024, "eval_loss": loss, "rounds_s": t}
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
print(json.dumps(summary, indent=2))
EOF
