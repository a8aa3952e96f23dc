#!/usr/bin/env bash
# Runs the Python (transformers + peft) baselines; results land in bench/results/python/.
# ra/rb: real-token throughput at each model's best setting (issue 12).
# Usage: bench/run_baselines.sh [a|b|c|ra|rb ...]   (default: a b c)   REPEAT=3 by default for a, 1 for b.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$(scripts/reference-venv.sh)}
OUT=bench/results/python
mkdir -p "$OUT"
M="$PY bench/measure.py --quiet"
A=assets

run_a() {  # MiniLM seq-cls, LoRA r8 query,value, 32 x 128 fixed, 20 steps, 2 threads
  $M --repeat "${REPEAT_A:-3}" --label minilm-seqcls-lora-r8-b32x128 \
     --result-json $OUT/a_minilm_lora_run{run}.json \
     --result-keys tokens_per_s,median_step_s,final_loss,eval_loss,eval_accuracy,peak_rss_bytes \
     --out $OUT/a_minilm_lora_measure.json -- \
    $PY bench/hf_train.py --task seq-cls --model $A/minilm \
      --data $A/data/rotten_tomatoes/train.jsonl --eval-data $A/data/rotten_tomatoes/test.jsonl --eval-limit 256 \
      --r 8 --alpha 16 --targets query,value --batch-size 32 --max-len 128 --pad-to-max-len \
      --steps 20 --lr 5e-4 --warmup-steps 2 --weight-decay 0.01 --seed 42 --threads 2 \
      --out $OUT/a_minilm_lora_run{run}.json
}

run_b() {  # SmolLM2-135M causal LM, LoRA r8 q,k,v,o, 8 x 256 fixed, 20 steps, 2 threads
  $M --repeat "${REPEAT_B:-1}" --label smollm2-causal-lora-r8-b8x256 \
     --result-json $OUT/b_smollm2_lora_run{run}.json \
     --result-keys tokens_per_s,median_step_s,final_loss,eval_loss,peak_rss_bytes \
     --out $OUT/b_smollm2_lora_measure.json -- \
    $PY bench/hf_train.py --task causal-lm --model $A/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
      --data $A/data/chatterbot/train.jsonl --eval-data $A/data/chatterbot/test.jsonl --eval-limit 64 \
      --r 8 --alpha 16 --targets q_proj,k_proj,v_proj,o_proj --batch-size 8 --max-len 256 --pad-to-max-len \
      --steps 20 --lr 2e-4 --warmup-steps 2 --weight-decay 0.0 --seed 42 --threads 2 \
      --out $OUT/b_smollm2_lora_run{run}.json
}

run_c() {  # quality: MiniLM LoRA r8 query,value + classifier, 1 epoch, dynamic padding, full test split
  $M --repeat 1 --label minilm-seqcls-lora-r8-quality-1epoch \
     --result-json $OUT/c_minilm_quality.json \
     --result-keys tokens_per_s,final_loss_mean_last10,eval_loss,eval_accuracy,peak_rss_bytes,train_s \
     --out $OUT/c_minilm_quality_measure.json -- \
    $PY bench/hf_train.py --task seq-cls --model $A/minilm \
      --data $A/data/rotten_tomatoes/train.jsonl --eval-data $A/data/rotten_tomatoes/test.jsonl \
      --r 8 --alpha 16 --targets query,value --batch-size 32 --max-len 128 \
      --steps 0 --epochs 1 --lr 5e-4 --warmup-steps 30 --weight-decay 0.01 --seed 42 --threads 2 \
      --log-every 25 --out $OUT/c_minilm_quality.json
}

# Real-token throughput (issue 12), each at its best documented setting. MiniLM: BERT takes no
# flattened rows in transformers (absolute positions, no mask from position ids), so its best
# is dynamic padding with Trainer's group_by_length order. SmolLM2: DataCollatorWithFlattening.
run_ra() {
  $M --repeat "${REPEAT_A:-1}" --label minilm-seqcls-lora-r8-b32-grouped \
     --result-json $OUT/ra_minilm_grouped_run{run}.json \
     --result-keys tokens_per_s_nonpad,median_step_s,final_loss,peak_rss_bytes \
     --out $OUT/ra_minilm_grouped_measure.json -- \
    $PY bench/hf_train.py --task seq-cls --model $A/minilm \
      --data $A/data/rotten_tomatoes/train.jsonl --eval-data $A/data/rotten_tomatoes/test.jsonl --eval-limit 256 \
      --r 8 --alpha 16 --targets query,value --batch-size 32 --max-len 128 --group-by-length \
      --steps 20 --lr 5e-4 --warmup-steps 2 --weight-decay 0.01 --seed 42 --threads 2 \
      --out $OUT/ra_minilm_grouped_run{run}.json
}
run_rb() {
  $M --repeat "${REPEAT_B:-1}" --label smollm2-causal-lora-r8-b8-flattened \
     --result-json $OUT/rb_smollm2_flat_run{run}.json \
     --result-keys tokens_per_s_nonpad,median_step_s,final_loss,peak_rss_bytes \
     --out $OUT/rb_smollm2_flat_measure.json -- \
    $PY bench/hf_train.py --task causal-lm --model $A/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
      --data $A/data/chatterbot/train.jsonl --eval-data $A/data/chatterbot/test.jsonl --eval-limit 64 \
      --r 8 --alpha 16 --targets q_proj,k_proj,v_proj,o_proj --batch-size 8 --max-len 256 --padding-free \
      --steps 20 --lr 2e-4 --warmup-steps 2 --weight-decay 0.0 --seed 42 --threads 2 \
      --out $OUT/rb_smollm2_flat_run{run}.json
}

for w in "${@:-a b c}"; do for x in $w; do "run_$x"; done; done
