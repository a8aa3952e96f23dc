#!/usr/bin/env bash
# L4Q against LoRA followed by post-training quantization, on SmolLM2-135M (its f32 copy,
# bench/prepare_smollm2_f32.py) and chatterbot: the L4Q paper's claim is that training inside
# the quantizer beats quantizing after training. Both train STEPS (default 20) steps with the
# same records, order, targets (every linear of every block), rank 8, alpha 16 and learning
# rate; then
#   l4q:  ferrule merge --output l4q.gguf   (the learned codes, steps and offsets as Q4_1)
#   lora: ferrule export gguf --outtype q4_1 (the merged weights quantized by ggml's rule)
#   base: the untrained model as Q4_1 (ggml's rule), for reference
# and `ferrule eval` of each GGUF on chatterbot's test split. The embedding is Q4_1 by
# ggml's rule in all three files. Results: $OUT/summary.txt (default bench/results/l4q).
# Usage: bench/run_l4q.sh; FERRULE=path/to/ferrule (default target/release/ferrule).
set -euo pipefail
cd "$(dirname "$0")/.."
F=${FERRULE:-target/release/ferrule}
OUT=${OUT_DIR:-bench/results/l4q}
STEPS=${STEPS:-20}
LR=${LR:-1e-4}
M=assets/smollm2-f32
D=assets/data/chatterbot
mkdir -p "$OUT"
TARGETS=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
COMMON=(--model $M --data $D/train.jsonl --max-steps "$STEPS" --batch-size 8 --max-len 256
        --lr "$LR" --seed 42 --compute-dtype f32 --target-modules $TARGETS --lora-r 8
        --lora-alpha 16 --overwrite)
for method in l4q lora; do
  /usr/bin/time -v "$F" train --method $method "${COMMON[@]}" --output "$OUT/run-$method" \
    > "$OUT/train-$method.log" 2> "$OUT/train-$method.time"
done
"$F" merge --model $M --adapter "$OUT/run-l4q" --output "$OUT/l4q.gguf" > "$OUT/merge-l4q.json"
"$F" export gguf --model $M --adapter "$OUT/run-lora" --outtype q4_1 \
  --output "$OUT/lora.q4_1.gguf" --overwrite > "$OUT/export-lora.json"
"$F" export gguf --model $M --outtype q4_1 --output "$OUT/base.q4_1.gguf" --overwrite \
  > "$OUT/export-base.json"
: > "$OUT/summary.txt"
for g in l4q lora.q4_1 base.q4_1; do
  echo "$g: $("$F" eval --model "$OUT/$g.gguf" --data $D/test.jsonl --compute-dtype f32 2>/dev/null)" \
    | tee -a "$OUT/summary.txt"
done
for method in l4q lora; do
  echo "$method (unquantized adapter on f32): $("$F" eval --model $M --adapter "$OUT/run-$method" \
    --data $D/test.jsonl --compute-dtype f32 2>/dev/null)" | tee -a "$OUT/summary.txt"
done
