#!/usr/bin/env bash
# The main job: fetch the offline assets, build ferrule, and fine-tune SmolLM2-135M-Instruct
# with LoRA on the chatterbot conversation data, printing a generation before and after. The
# base is the Q4_1 GGUF, trained through its 4-bit blocks (QLoRA on the file people download).
# About 7 minutes on 2 cores including the first release build (60 steps at about 2.4 s each).
# Usage: [STEPS=60] scripts/finetune-demo.sh [OUTPUT_DIR] [extra `ferrule train` flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/smollm2-chatterbot}
shift || true
scripts/install-deps.sh
scripts/fetch-assets.sh
cargo build --release -p ferrule-cli
FERRULE=${CARGO_TARGET_DIR:-target}/release/ferrule
MODEL=assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
PROMPT="What is AI?"

echo "== before fine-tuning: $PROMPT"
$FERRULE generate --model "$MODEL" --prompt "$PROMPT" --max-new-tokens 48

RESUME=()
[ -d "$OUT" ] && RESUME=(--resume)
$FERRULE train --model "$MODEL" \
  --data assets/data/chatterbot/train.jsonl --eval-data assets/data/chatterbot/test.jsonl \
  --output "$OUT" --target-modules q_proj,k_proj,v_proj,o_proj --lora-r 8 --lora-alpha 16 \
  --max-len 256 --batch-size 8 --max-steps ${STEPS:-60} --lr 1e-3 --warmup-steps 5 --save-every 20 \
  --eval-limit 64 "${RESUME[@]}" "$@"

echo "== after fine-tuning: $PROMPT"
$FERRULE generate --model "$MODEL" --adapter "$OUT" --prompt "$PROMPT" --max-new-tokens 48
