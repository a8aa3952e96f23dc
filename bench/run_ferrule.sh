#!/usr/bin/env bash
# Runs ferrule on the same workloads as bench/run_baselines.sh (a: MiniLM seq-cls 32x128,
# b: SmolLM2-135M causal LM 8x256, c: MiniLM quality, 1 epoch). Results: bench/results/rust/.
# Usage: bench/run_ferrule.sh [a|b|c ...]  (default: a b c). Needs `cargo build --release`.
set -euo pipefail
cd "$(dirname "$0")/.."
F=${FERRULE:-target/release/ferrule}
OUT=bench/results/rust
mkdir -p "$OUT"
A=assets

# run NAME -- ferrule train args...: wall time and peak RSS (GNU time), plus the run summary.
run() {
  local name=$1; shift; shift
  local dir; dir=$(mktemp -d)
  /usr/bin/time -f '{"wall_s": %e, "peak_rss_kb": %M}' -o "$dir/time.json" \
    "$F" train --threads 2 --output "$dir/run" -q "$@" > "$dir/summary.json"
  python3 - "$dir" "$OUT/$name.json" "$*" <<'PY'
import json, sys, os
d, out, args = sys.argv[1:4]
s = json.load(open(os.path.join(d, "summary.json")))
t = json.load(open(os.path.join(d, "time.json")))
steps = [json.loads(l) for l in open(os.path.join(d, "run", "metrics.jsonl")) if '"loss"' in l]
r = {"tool": "ferrule", "args": args, "load_avg": os.getloadavg(), **t,
     "median_step_s": s["median_step_seconds"], "positions_per_s": s["positions_per_sec"], "tokens_per_s_nonpad": s["tokens_per_sec"],
     "final_loss": s["final_loss"], "losses": [x["loss"] for x in steps], "eval": s["eval"],
     "trainable_params": s["trainable_params"], "total_params": s["total_params"]}
json.dump(r, open(out, "w"), indent=1)
print(json.dumps({k: r[k] for k in ("median_step_s", "positions_per_s", "peak_rss_kb", "final_loss", "eval")}))
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
  run b_smollm2_lora -- --model $A/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
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

for w in "${@:-a b c}"; do for x in $w; do "run_$x"; done; done
