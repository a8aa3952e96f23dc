#!/usr/bin/env bash
# Runs ferrule on the same workloads as bench/run_baselines.sh (a: MiniLM seq-cls 32x128,
# b: SmolLM2-135M causal LM 8x256, c: MiniLM quality, 1 epoch) and bench/run_qlora_baselines.sh
# (SmolLM2 8x256 with recomputation on three bases: qf32 = the dense f32 copy, qnf4 = the same
# quantized to NF4 + double quant while loading, qgguf = the Q4_1 GGUF kept in its blocks).
# Results: bench/results/rust/.
# mf32/mnf4: MiniLM (real f32 weights) LoRA on an f32 vs an NF4 base, 100 steps.
# ra/rb: a and b with padding-free batches (real-token throughput, issue 12); pa/pb: the same
# with packed micro-batches of batch x max_len tokens (--packing).
# Usage: bench/run_ferrule.sh [a|b|c|ra|rb|pa|pb|qf32|qnf4|qgguf|mf32|mnf4 ...]  (default: a b c). Needs
# `cargo build --release`. STEPS_B / STEPS_Q set the step counts of b / the q runs; Q_BATCH
# the q runs' batch size (default 8; results then get a _b<N> suffix).
set -euo pipefail
cd "$(dirname "$0")/.."
F=${FERRULE:-target/release/ferrule}
OUT=bench/results/rust
mkdir -p "$OUT"
A=assets

# run NAME -- ferrule train args...: wall time and peak RSS (GNU time), plus the run summary.
# The base's weight bytes come from `ferrule inspect --json` with the model flags in $INSPECT.
run() {
  local name=$1; shift; shift
  local dir; dir=$(mktemp -d)
  if [ -n "${INSPECT:-}" ]; then
    # shellcheck disable=SC2086
    "$F" inspect --json $INSPECT > "$dir/inspect.json"
  else
    echo '{}' > "$dir/inspect.json"
  fi
  /usr/bin/time -f '{"wall_s": %e, "peak_rss_kb": %M}' -o "$dir/time.json" \
    "$F" train --threads 2 --output "$dir/run" -q "$@" > /dev/null
  python3 - "$dir" "$OUT/$name.json" "$*" <<'PY'
import json, sys, os
d, out, args = sys.argv[1:4]
s = json.load(open(os.path.join(d, "run", "train_summary.json")))
t = json.load(open(os.path.join(d, "time.json")))
w = json.load(open(os.path.join(d, "inspect.json"))).get("weights")
steps = [json.loads(l) for l in open(os.path.join(d, "run", "metrics.jsonl")) if '"loss"' in l]
r = {"tool": "ferrule", "args": args, "load_avg": os.getloadavg(), **t,
     "median_step_s": s["median_step_seconds"], "positions_per_s": s["positions_per_sec"], "tokens_per_s_nonpad": s["tokens_per_sec"],
     "final_loss": s["final_loss"], "losses": [x["loss"] for x in steps], "eval": s["eval"],
     "trainable_params": s["trainable_params"], "total_params": s["total_params"],
     "weight_bytes": w and w["bytes"], "weight_f32_bytes": w and w["f32_bytes"], "weight_formats": w and w["formats"]}
json.dump(r, open(out, "w"), indent=1)
print(json.dumps({k: r[k] for k in ("median_step_s", "positions_per_s", "peak_rss_kb", "final_loss", "eval", "weight_bytes")}))
PY
  rm -rf "$dir"
}

run_a() {
  run a_minilm_lora -- --task seq-cls --model $A/minilm \
    --data $A/data/rotten_tomatoes/train.jsonl --eval-data $A/data/rotten_tomatoes/test.jsonl --eval-limit 256 \
    --lora-r 8 --lora-alpha 16 --target-modules query,value --batch-size 32 --max-len 128 --pad-to-max-len \
    --max-steps 20 --lr 5e-4 --warmup-steps 2 --weight-decay 0.01 --seed 42
}
run_b() {
  # The f32 copy of the GGUF (bench/prepare_smollm2_f32.py): the same weights transformers
  # dequantizes the GGUF to, so both tools train an f32 base (the GGUF itself now loads 4-bit).
  run b_smollm2_lora -- --model $A/smollm2-f32 \
    --data $A/data/chatterbot/train.jsonl --eval-data $A/data/chatterbot/test.jsonl --eval-limit 64 \
    --lora-r 8 --lora-alpha 16 --target-modules q_proj,k_proj,v_proj,o_proj --batch-size 8 --max-len 256 --pad-to-max-len \
    --max-steps ${STEPS_B:-20} --lr 2e-4 --warmup-steps 2 --seed 42
}
run_c() {
  run c_minilm_quality -- --task seq-cls --model $A/minilm \
    --data $A/data/rotten_tomatoes/train.jsonl --eval-data $A/data/rotten_tomatoes/test.jsonl \
    --lora-r 8 --lora-alpha 16 --target-modules query,value --batch-size 32 --max-len 128 \
    --epochs 1 --lr 5e-4 --warmup-steps 30 --weight-decay 0.01 --seed 42 --eval-batch-size 64
}

# SmolLM2 QLoRA comparison: same data, steps and flags on three bases.
Q_ARGS=(--data $A/data/chatterbot/train.jsonl --eval-data $A/data/chatterbot/test.jsonl --eval-limit 64
  --lora-r 8 --lora-alpha 16 --target-modules q_proj,k_proj,v_proj,o_proj --batch-size ${Q_BATCH:-8} --max-len 256 --pad-to-max-len
  --max-steps ${STEPS_Q:-6} --lr 2e-4 --warmup-steps 2 --seed 42 --recompute)
QS=${Q_BATCH:+_b$Q_BATCH}  # result-name suffix when Q_BATCH is set
run_qf32() {
  INSPECT="--model $A/smollm2-f32" run q_smollm2_f32$QS -- --model $A/smollm2-f32 "${Q_ARGS[@]}"
}
run_qnf4() {
  INSPECT="--model $A/smollm2-f32 --quantize nf4 --double-quant" \
    run q_smollm2_nf4$QS -- --model $A/smollm2-f32 --quantize nf4 --double-quant "${Q_ARGS[@]}"
}
run_qgguf() {
  INSPECT="--model $A/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" \
    run q_smollm2_gguf_q4_1$QS -- --model $A/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "${Q_ARGS[@]}"
}

# Quantization on a model whose weights are really f32 (SmolLM2's only source is a 4-bit
# GGUF): MiniLM on Rotten Tomatoes, 100 steps, full test split.
M_ARGS=(--task seq-cls --model $A/minilm --data $A/data/rotten_tomatoes/train.jsonl
  --eval-data $A/data/rotten_tomatoes/test.jsonl --lora-r 8 --lora-alpha 16 --target-modules query,value
  --batch-size 32 --max-len 128 --max-steps 100 --lr 5e-4 --warmup-steps 10 --weight-decay 0.01 --seed 42 --eval-batch-size 64)
run_mf32() { INSPECT="--model $A/minilm" run q_minilm_f32 -- "${M_ARGS[@]}"; }
run_mnf4() { INSPECT="--model $A/minilm --quantize nf4 --double-quant" run q_minilm_nf4 -- "${M_ARGS[@]}" --quantize nf4 --double-quant; }

# Real-token throughput (issue 12): workloads a and b with padding-free batches (the default),
# against a and b themselves (--pad-to-max-len) and the Python runs ra/rb of run_baselines.sh.
# Compare tokens_per_s_nonpad (real tokens per second).
run_ra() {
  run ra_minilm_free -- --task seq-cls --model $A/minilm \
    --data $A/data/rotten_tomatoes/train.jsonl --eval-data $A/data/rotten_tomatoes/test.jsonl --eval-limit 256 \
    --lora-r 8 --lora-alpha 16 --target-modules query,value --batch-size 32 --max-len 128 --padding free \
    --max-steps 20 --lr 5e-4 --warmup-steps 2 --weight-decay 0.01 --seed 42
}
run_rb() {
  run rb_smollm2_free -- --model $A/smollm2-f32 \
    --data $A/data/chatterbot/train.jsonl --eval-data $A/data/chatterbot/test.jsonl --eval-limit 64 \
    --lora-r 8 --lora-alpha 16 --target-modules q_proj,k_proj,v_proj,o_proj --batch-size 8 --max-len 256 --padding free \
    --max-steps ${STEPS_B:-20} --lr 2e-4 --warmup-steps 2 --seed 42
}
# Packed micro-batches (--packing): bins of 32 x 128 and 8 x 256 tokens, so that each step
# computes as many real tokens as a padded step of a or b computes positions.
run_pa() {
  run pa_minilm_packed -- --task seq-cls --model $A/minilm \
    --data $A/data/rotten_tomatoes/train.jsonl --eval-data $A/data/rotten_tomatoes/test.jsonl --eval-limit 256 \
    --lora-r 8 --lora-alpha 16 --target-modules query,value --packing --batch-tokens 4096 --max-len 128 \
    --max-steps 20 --lr 5e-4 --warmup-steps 2 --weight-decay 0.01 --seed 42 --eval-batch-size 32
}
run_pb() {
  run pb_smollm2_packed -- --model $A/smollm2-f32 \
    --data $A/data/chatterbot/train.jsonl --eval-data $A/data/chatterbot/test.jsonl --eval-limit 64 \
    --lora-r 8 --lora-alpha 16 --target-modules q_proj,k_proj,v_proj,o_proj --packing --batch-tokens 2048 --max-len 256 \
    --max-steps ${STEPS_B:-20} --lr 2e-4 --warmup-steps 2 --seed 42 --eval-batch-size 8
}

for w in "${@:-a b c}"; do for x in $w; do "run_$x"; done; done
