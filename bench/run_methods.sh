#!/usr/bin/env bash
# Every method on workload a (MiniLM seq-cls, 32 x 128 fixed, 20 steps, 2 threads), ferrule
# and transformers + peft alternated in the same run, REPEAT rounds (default 3). Methods: lora
# and dora (r 8, α 16, query,value; dora = lora with use_dora), ia3 and ln-tuning with peft's defaults for BERT (ia3: key, value,
# output.dense; LN tuning: LayerNorm, given explicitly since peft has no BERT default), prompt-tuning
# and prefix-tuning with 20 virtual tokens (prefix tuning: workload b only, peft cannot run it on
# BERT), randlora with r 8, randlora_alpha 16 on LoRA's targets; full: every parameter (ferrule
# --method full, transformers without peft); galore-layerwise: every parameter with
# transformers' optim galore_adamw_layerwise (rank 128, gap 200, scale 0.25, std) and
# recomputation on both sides (bench/hf_train.py --galore-layerwise builds HF's optimizer).
# STEPS=N changes the 20 optimizer steps.
# OLD=path/to/older/ferrule adds a LoRA round of that binary (the A/B of two builds).
# Results: bench/results/methods/<tool>_<method>_<round>.json and summary.json (medians);
# OUT_DIR=... writes them elsewhere.
# Usage: bench/run_methods.sh [lora dora ia3 ln-tuning]; needs `cargo build --release` and
# scripts/reference-venv.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
F=${FERRULE:-target/release/ferrule}
PY=${PY:-$(scripts/reference-venv.sh)}
OUT=${OUT_DIR:-bench/results/methods}
REPEAT=${REPEAT:-3}
STEPS=${STEPS:-20}
A=assets
METHODS=("$@")
[ ${#METHODS[@]} -gt 0 ] || METHODS=(lora dora ia3 ln-tuning)
# WORKLOAD=b: SmolLM2-135M causal LM on its f32 copy (bench/prepare_smollm2_f32.py), 8 x 256
# fixed, LoRA/DoRA on q,k,v,o; IA3 and LN tuning with peft's llama defaults.
WORKLOAD=${WORKLOAD:-a}
if [ "$WORKLOAD" = b ]; then
  OUT=${OUT_DIR:-bench/results/methods_b}
  TOKENS=$((8 * 256))
  COMMON=(--task causal-lm --model $A/smollm2-f32 --data $A/data/chatterbot/train.jsonl --batch-size 8 --max-len 256
          --pad-to-max-len --lr 2e-4 --warmup-steps 2 --weight-decay 0.0 --seed 42)
  LORA_TARGETS=q_proj,k_proj,v_proj,o_proj
elif [ "$WORKLOAD" = c ]; then
  # WORKLOAD=c: the random 1.07B Llama in f32 (bench/make_llama_1b.py), 4 x 64 fixed.
  OUT=${OUT_DIR:-bench/results/methods_c}
  TOKENS=$((4 * 64))
  COMMON=(--task causal-lm --model $A/llama-1b-random --data $A/data/chatterbot/train.jsonl --batch-size 4 --max-len 64
          --pad-to-max-len --lr 1e-5 --warmup-steps 0 --weight-decay 0.0 --seed 42)
  LORA_TARGETS=q_proj,k_proj,v_proj,o_proj
else
  TOKENS=$((32 * 128))
  COMMON=(--task seq-cls --model $A/minilm --data $A/data/rotten_tomatoes/train.jsonl --batch-size 32 --max-len 128
          --pad-to-max-len --lr 5e-4 --warmup-steps 2 --weight-decay 0.01 --seed 42)
  LORA_TARGETS=query,value
fi
GALORE=rank=128,update_proj_gap=200,scale=0.25,proj_type=std
mkdir -p "$OUT"

targets() {  # method -> target list for both tools
  case $1 in lora|dora|randlora) echo $LORA_TARGETS ;; ln-tuning) [ "$WORKLOAD" = a ] && echo LayerNorm ;; *) echo "" ;; esac
}

ferrule_run() {  # binary method round
  local bin=$1 m=$2 i=$3 tag=$4 dir; dir=$(mktemp -d)
  local t; t=$(targets "$m")
  local extra=(--method "$m"); [ -n "$t" ] && extra+=(--target-modules "$t")
  [ "$m" = lora ] && extra=(--lora-r 8 --lora-alpha 16 --target-modules $LORA_TARGETS)
  [ "$m" = dora ] && extra=(--lora-r 8 --lora-alpha 16 --target-modules $LORA_TARGETS --use-dora)
  [ "$m" = randlora ] && extra=(--method randlora --lora-r 8 --peft-option randlora_alpha=16 --target-modules $LORA_TARGETS)
  case $m in prompt-tuning|prefix-tuning) extra=(--method "$m" --num-virtual-tokens 20) ;; full) extra=(--method full) ;;
    galore-layerwise) extra=(--method full --optim galore_adamw_layerwise --optim-args "$GALORE" --recompute --max-grad-norm 0) ;; esac
  /usr/bin/time -f '{"wall_s": %e, "peak_rss_kb": %M}' -o "$dir/time.json" \
    "$bin" train --threads 2 -q --output "$dir/run" "${COMMON[@]}" --max-steps "$STEPS" "${extra[@]}" > /dev/null
  python3 - "$dir" "$OUT/${tag}_${m}_$i.json" <<'PY'
import json, sys, os
d, out = sys.argv[1:3]
s = json.load(open(os.path.join(d, "run", "train_summary.json"))); t = json.load(open(os.path.join(d, "time.json")))
r = {"median_step_s": s["median_step_seconds"], "peak_rss_bytes": t["peak_rss_kb"] * 1024, "final_loss": s["final_loss"],
     "trainable_params": s["trainable_params"], "load_avg": os.getloadavg()}
json.dump(r, open(out, "w"), indent=1); print(out, json.dumps(r))
PY
  rm -rf "$dir"
}

python_run() {  # method round
  local m=$1 i=$2 t; t=$(targets "$m")
  local how=(--method "$m"); [ "$m" = full ] && how=(--full-finetune)
  [ "$m" = galore-layerwise ] && how=(--full-finetune --galore-layerwise "$GALORE" --gradient-checkpointing)
  "$PY" bench/hf_train.py "${COMMON[@]}" --steps "$STEPS" --threads 2 "${how[@]}" --targets "$t" --r 8 --alpha 16 \
    --out "$OUT/python_${m}_$i.json" | tail -1
}

for i in $(seq 1 "$REPEAT"); do
  for m in "${METHODS[@]}"; do
    ferrule_run "$F" "$m" "$i" ferrule
    [ -n "${OLD:-}" ] && [ "$m" = lora ] && ferrule_run "$OLD" lora "$i" ferrule_old
    python_run "$m" "$i"
  done
done

python3 - "$OUT" "$TOKENS" <<'PY'
import json, sys, glob, os, statistics as st
out = sys.argv[1]; tokens = int(sys.argv[2]); rows = {}
for f in sorted(glob.glob(os.path.join(out, "*_*.json"))):
    name = os.path.basename(f)[:-5]
    if name == "summary": continue
    tool, method, _ = name.rsplit("_", 2) if name.count("_") >= 2 else (None, None, None)
    r = json.load(open(f)); rows.setdefault((tool, method), []).append(r)
summary = {}
for (tool, method), rs in sorted(rows.items()):
    summary[f"{tool}/{method}"] = {"runs": len(rs), "median_step_s": st.median(r["median_step_s"] for r in rs),
        "tokens_per_s": tokens / st.median(r["median_step_s"] for r in rs),
        "peak_rss_gb": st.median(r["peak_rss_bytes"] for r in rs) / 1e9,
        "trainable_params": rs[0].get("trainable_params") or rs[0].get("model", {}).get("params_trainable")}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
for k, v in summary.items(): print(f"{k:28s} {v}")
PY
