#!/usr/bin/env bash
# bf16 compute (issue 24): ferrule bf16, ferrule f32, transformers + peft f32 and the same under
# torch.autocast("cpu", bfloat16), alternated in that order for ROUNDS rounds (default 2), on
#   minilm:  MiniLM seq-cls, Rotten Tomatoes, 32 records x max 128 (ferrule padding-free,
#            torch dynamic padding with group_by_length, its best), 20 steps;
#   smollm2: SmolLM2-135M f32 copy, chatterbot, 8 records x max 256 (both padding-free), 20 steps;
#   llama1b: the random 1.07B Llama (bench/make_llama_1b.py), chatterbot, about 1024 real
#            tokens a step (ferrule packed bins of 1024 tokens, torch 16 flattened records),
#            5 steps (the first not timed);
#   *_packed: minilm and smollm2 with ferrule's packed bins of 4096 / 2048 tokens.
# Each run writes bench/results/bf16/<workload>_<tool>_r<round>.json: real tokens/s, peak RSS,
# median step. bench/bf16_table.py prints the medians and ratios. 2 threads everywhere.
# Usage: bench/run_bf16.sh [minilm smollm2 llama1b minilm_packed smollm2_packed]
set -euo pipefail
cd "$(dirname "$0")/.."
F=${FERRULE:-target/release/ferrule}
PY=${PY:-$(scripts/reference-venv.sh)}
OUT=bench/results/bf16
mkdir -p "$OUT"
A=assets

# ferrule NAME DTYPE -- train flags: the run's summary, reduced to the compared figures.
ferrule() {
  local name=$1 dtype=$2; shift 3
  local dir; dir=$(mktemp -d)
  "$F" train --threads 2 --compute-dtype "$dtype" --output "$dir/run" -q --json "$@" > "$dir/summary.json"
  python3 - "$dir/summary.json" "$OUT/$name.json" "$dtype" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
r = {"tool": f"ferrule {sys.argv[3]}", "tokens_per_s": s["tokens_per_sec"], "median_step_s": s["median_step_seconds"],
     "peak_rss_bytes": max(s["peak_rss_bytes_per_rank"]), "final_loss": s["final_loss"],
     "compute_dtype": s["compute_dtype"], "base_weight_bytes": s["base_weight_bytes"]}
json.dump(r, open(sys.argv[2], "w"), indent=1)
print(json.dumps(r))
PY
  rm -rf "$dir"
}

# torch NAME MODE -- hf_train.py flags (MODE: f32 or autocast).
torch_run() {
  local name=$1 mode=$2; shift 3
  local extra=(); [ "$mode" = autocast ] && extra=(--autocast-bf16)
  "$PY" bench/hf_train.py --threads 2 --log-every 0 "${extra[@]}" --out "$OUT/$name.raw.json" "$@" 2> /dev/null
  python3 - "$OUT/$name.raw.json" "$OUT/$name.json" "$mode" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
r = {"tool": f"torch {sys.argv[3]}", "tokens_per_s": s["tokens_per_s_nonpad"], "median_step_s": s["median_step_s"],
     "peak_rss_bytes": s["peak_rss_bytes"], "final_loss": s["final_loss"]}
json.dump(r, open(sys.argv[2], "w"), indent=1)
print(json.dumps(r))
PY
}

four() {  # four WORKLOAD ROUND "ferrule flags" "torch flags"
  local w=$1 r=$2
  read -r -a fa <<< "$3"; read -r -a ta <<< "$4"
  ferrule "${w}_ferrule-bf16_r$r" bf16 -- "${fa[@]}"
  ferrule "${w}_ferrule-f32_r$r" f32 -- "${fa[@]}"
  torch_run "${w}_torch-f32_r$r" f32 -- "${ta[@]}"
  torch_run "${w}_torch-autocast_r$r" autocast -- "${ta[@]}"
}

MINILM_COMMON="--model $A/minilm --data $A/data/rotten_tomatoes/train.jsonl --max-len 128 --lr 5e-4 --warmup-steps 2 --weight-decay 0.01 --seed 42"
SMOL_COMMON="--data $A/data/chatterbot/train.jsonl --max-len 256 --lr 2e-4 --warmup-steps 2 --seed 42"
run_minilm() {
  four minilm "$1" "--task seq-cls $MINILM_COMMON --lora-r 8 --lora-alpha 16 --target-modules query,value --batch-size 32 --padding free --max-steps 20" \
    "--task seq-cls $MINILM_COMMON --r 8 --alpha 16 --targets query,value --batch-size 32 --group-by-length --steps 20"
}
run_minilm_packed() {
  four minilm_packed "$1" "--task seq-cls $MINILM_COMMON --lora-r 8 --lora-alpha 16 --target-modules query,value --packing --batch-tokens 4096 --max-steps 20" \
    "--task seq-cls $MINILM_COMMON --r 8 --alpha 16 --targets query,value --batch-size 32 --group-by-length --steps 20"
}
run_smollm2() {
  four smollm2 "$1" "--model $A/smollm2-f32 $SMOL_COMMON --lora-r 8 --lora-alpha 16 --target-modules q_proj,k_proj,v_proj,o_proj --batch-size 8 --padding free --max-steps 20" \
    "--task causal-lm --model $A/smollm2-f32 $SMOL_COMMON --r 8 --alpha 16 --targets q_proj,k_proj,v_proj,o_proj --batch-size 8 --padding-free --steps 20"
}
run_smollm2_packed() {
  four smollm2_packed "$1" "--model $A/smollm2-f32 $SMOL_COMMON --lora-r 8 --lora-alpha 16 --target-modules q_proj,k_proj,v_proj,o_proj --packing --batch-tokens 2048 --max-steps 20" \
    "--task causal-lm --model $A/smollm2-f32 $SMOL_COMMON --r 8 --alpha 16 --targets q_proj,k_proj,v_proj,o_proj --batch-size 8 --padding-free --steps 20"
}
run_llama1b() {
  four llama1b "$1" "--model $A/llama-1b-random $SMOL_COMMON --lora-r 8 --lora-alpha 16 --target-modules q_proj,k_proj,v_proj,o_proj --packing --batch-tokens 1024 --max-steps 5" \
    "--task causal-lm --model $A/llama-1b-random $SMOL_COMMON --r 8 --alpha 16 --targets q_proj,k_proj,v_proj,o_proj --batch-size 16 --padding-free --steps 5 --timing-warmup 1"
}

for round in $(seq 1 "${ROUNDS:-2}"); do
  for w in "${@:-minilm smollm2 llama1b}"; do for x in $w; do "run_$x" "$round"; done; done
done
