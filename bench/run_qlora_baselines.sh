#!/usr/bin/env bash
# Python (transformers + peft + bitsandbytes) QLoRA baselines on CPU; results in bench/results/python/.
# Workload b (SmolLM2-135M causal LM, chatterbot, LoRA r8 alpha16 on q,k,v,o_proj, 8 x 256 fixed,
# lr 2e-4, warmup 2, seed 42, 2 threads) with activation checkpointing, on the dense f32 copy
# made by bench/prepare_smollm2_f32.py (the common base of both tools' f32 and NF4 runs):
#   f32  plain f32 base                               -> qlora_f32_run0.json, qlora_f32_measure.json
#   nf4  bitsandbytes NF4 base + double quantization  -> qlora_nf4_run0.json, qlora_nf4_measure.json
# Usage: bench/run_isolated.sh bench/run_qlora_baselines.sh [f32|nf4 ...]   (default: f32 nf4)
#        STEPS (default 6; the step-time median is over steps 4..STEPS), REPEAT (default 1).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$(scripts/reference-venv.sh)}
OUT=bench/results/python
mkdir -p "$OUT"
M="$PY bench/measure.py --quiet"
A=assets
BASE=$A/smollm2-f32
[ -f $BASE/model.safetensors ] || "$PY" bench/prepare_smollm2_f32.py

run_variant() {  # $1 = name, rest = extra hf_train.py flags
  local name=$1; shift
  $M --repeat "${REPEAT:-1}" --label "smollm2-causal-qlora-$name-r8-b8x256-gc" \
     --result-json $OUT/qlora_${name}_run{run}.json \
     --result-keys tokens_per_s,median_step_s,final_loss,eval_loss,peak_rss_bytes,weight_bytes \
     --out $OUT/qlora_${name}_measure.json -- \
    $PY bench/hf_train.py --task causal-lm --model $BASE \
      --data $A/data/chatterbot/train.jsonl --eval-data $A/data/chatterbot/test.jsonl --eval-limit 64 \
      --r 8 --alpha 16 --targets q_proj,k_proj,v_proj,o_proj --batch-size 8 --max-len 256 --pad-to-max-len \
      --steps "${STEPS:-6}" --lr 2e-4 --warmup-steps 2 --weight-decay 0.0 --seed 42 --threads 2 \
      --gradient-checkpointing "$@" \
      --out $OUT/qlora_${name}_run{run}.json
}

run_f32() { run_variant f32; }
run_nf4() { run_variant nf4 --load-in-4bit --bnb-quant-type nf4 --double-quant; }

for w in "${@:-f32 nf4}"; do for x in $w; do "run_$x"; done; done
