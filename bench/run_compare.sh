#!/usr/bin/env bash
# `ferrule compare` over every method ferrule has (issue 28's comparison under one budget).
#   WORKLOAD=a (default): all-MiniLM-L6-v2 sequence classification on Rotten Tomatoes, one
#     epoch (the budget is the epoch's tokens, as `ferrule data` counts them) of packed
#     4096-token micro-batches, eval on the test split.
#   WORKLOAD=b: SmolLM2-135M-Instruct (its f32 copy, bench/prepare_smollm2_f32.py) on
#     chatterbot, 300 steps of 8 x 256, eval on 64 test records.
# LR_SWEEP=1 adds --lr-sweep (the default grid, 5 rates per method: 5x the time).
# METHODS=m1,m2,... replaces the method list. The table, JSON and plot go to
# bench/results/compare_<workload>/; the runs (adapters, logs) to runs/bench-compare-<workload>/
# (not committed). peft's step time and peak RSS for the methods peft has come from
# bench/run_methods.sh on the same workload; BENCHMARKS.md puts them side by side.
# Usage: bench/run_compare.sh; needs `cargo build --release` and scripts/fetch-assets.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
F=${FERRULE:-target/release/ferrule}
A=assets
WORKLOAD=${WORKLOAD:-a}
RUNS=runs/bench-compare-$WORKLOAD
OUT=bench/results/compare_$WORKLOAD
SWEEP=(); [ "${LR_SWEEP:-0}" = 1 ] && SWEEP=(--lr-sweep)
if [ "$WORKLOAD" = b ]; then
  # BitFit is left out: SmolLM2 (a Llama) has no biases, which BitFit refuses by name.
  METHODS=${METHODS:-lora,dora,ia3,ln-tuning,prompt-tuning,prefix-tuning,randlora,bottleneck,difffit,full,dylora,svfit,pst,pela,ist,l4q,dept}
  COMMON=(--task causal-lm --model $A/smollm2-f32 --data $A/data/chatterbot/train.jsonl
          --eval-data $A/data/chatterbot/test.jsonl --eval-limit 64 --batch-size 8 --max-len 256
          --lr 2e-4 --warmup-steps 10 --seed 42 --budget steps=300)
else
  # Prefix tuning is left out: BERT's attention takes no key/value prefix (refused by name).
  METHODS=${METHODS:-lora,dora,ia3,ln-tuning,prompt-tuning,randlora,bottleneck,bitfit,difffit,full,dylora,svfit,pst,pela,ist,l4q,dept}
  TRAIN=$A/data/rotten_tomatoes/train.jsonl
  EPOCH_TOKENS=$("$F" data --model $A/minilm --task seq-cls --data $TRAIN --max-len 128 --json \
    | python3 -c "import json,sys; print(json.load(sys.stdin)['tokens'])")
  COMMON=(--task seq-cls --model $A/minilm --data $TRAIN --eval-data $A/data/rotten_tomatoes/test.jsonl
          --packing --batch-tokens 4096 --max-len 128 --lr 5e-4 --warmup-steps 2 --seed 42
          --budget "tokens=$EPOCH_TOKENS")
fi
# Prompt methods (DePT too) need their number of virtual tokens (20, as bench/run_methods.sh). Bottleneck
# adapters have no BERT defaults in LLM-Adapters: parallel ones on LoRA's targets there.
OPTS=()
has() { [[ ",$METHODS," == *",$1,"* ]]; }
for m in prompt-tuning prefix-tuning dept; do
  if has $m; then OPTS+=(--method-option "$m:num_virtual_tokens=20"); fi
done
# LN tuning has no BERT default in peft either: its LayerNorms, as bench/run_methods.sh.
if [ "$WORKLOAD" = a ] && has ln-tuning; then
  OPTS+=(--method-option 'ln-tuning:target_modules=["LayerNorm"]')
fi
if [ "$WORKLOAD" = a ] && has bottleneck; then
  OPTS+=(--method-option 'bottleneck:target_modules=["query","value"]'
         --method-option bottleneck:use_parallel_adapter=true)
fi
"$F" compare "${COMMON[@]}" --methods "$METHODS" "${OPTS[@]}" "${SWEEP[@]}" --output "$RUNS"
mkdir -p "$OUT"
cp "$RUNS"/compare.md "$RUNS"/compare.json "$RUNS"/compare.svg "$OUT"/
echo "table: $OUT/compare.md"
