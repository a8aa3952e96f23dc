#!/usr/bin/env bash
# DARE against DAREx-q on real adapters (issue: merging, item 3): two SmolLM2-135M LoRA adapters
# trained by ferrule on the two halves of chatterbot (r 16, all linear layers, 150 steps each),
# merged into the f32 base by `merge --combination dare_linear_dense` at keep rates 0.1 and 0.01
# (p = 0.9, 0.99), with q = 1 − p (DARE) or chosen on a 16-record batch of training data by
# output change (DAREx-q), then evaluated on chatterbot's test split.
# Usage: bench/darex.sh [WORK_DIR]   (needs target/release/ferrule, assets/smollm2-f32, the ref venv)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=${1:-$ROOT/runs/darex}
F=$ROOT/target/release/ferrule
M=$ROOT/assets/smollm2-f32
D=$ROOT/assets/data/chatterbot
PY=$("$ROOT/scripts/reference-venv.sh")
SEEDS=${SEEDS:-"0 1"}
mkdir -p "$W" && cd "$W"
head -n 911 "$D/train.jsonl" > half_a.jsonl
tail -n +912 "$D/train.jsonl" > half_b.jsonl
for h in a b; do
  [ -f run_$h/adapter_model.safetensors ] || $F train --model "$M" --data half_$h.jsonl --output run_$h \
    --target-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --lora-r 16 --lora-alpha 32 \
    --batch-size 8 --max-len 256 --max-steps 150 --lr 1e-3 --warmup-steps 10 --seed 1 > train_$h.log 2>&1
done
"$PY" "$ROOT/bench/make_calibration_batch.py" "$M" calib.safetensors 8 half_a.jsonl half_b.jsonl
ev() { $F eval --model "$1" --data "$D/test.jsonl" --compute-dtype f32 2>/dev/null | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["eval_loss"])'; }
echo "rule density seed q eval_loss" > results.txt
m() { rm -rf merged; $F merge --model "$M" --adapter run_a --adapter run_b --combination dare_linear_dense "$@" --output merged > merge.json 2>merge.err; }
m --density 1; echo "none 1 - 1 $(ev merged)" >> results.txt
for d in 0.1 0.01; do
  for s in $SEEDS; do
    m --density $d --seed $s; echo "dare $d $s $d $(ev merged)" >> results.txt
    m --density $d --seed $s --choose-q calib.safetensors
    q=$("$PY" -c 'import json; print(round(json.load(open("merge.json"))["q"], 4))')
    echo "darex $d $s $q $(ev merged)" >> results.txt
  done
done
rm -rf merged
cat results.txt
