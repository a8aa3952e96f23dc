#!/usr/bin/env bash
# Data parallelism on this machine: 1 rank x 2 threads against 2 ranks x 1 thread (mpirun) at
# ZeRO stages 0-3, the same global batch, on workload a (MiniLM seq-cls, 32 x 128 fixed, LoRA
# r 8 on query,value) and b (SmolLM2-135M f32, 8 x 256 fixed, LoRA r 8 on q,k,v,o; 16 records
# per rank x 2 = 32 / 4 per rank x 2 = 8). STEPS steps (default 10 for a, 6 for b), REPEAT rounds
# (default 3) with the configurations alternated in each. Each run's train_summary.json gives
# the median step time, tokens/s (summed over ranks), every rank's peak RSS (VmHWM) and what a
# rank sent in the collectives of a step. Configs 2x1-zS-sb add --shard-base (the frozen base
# sharded over the ranks), e.g. CONFIGS="1x2 2x1-z0 2x1-z0-sb 2x1-z3-sb".
# Results: bench/results/scaleout_<workload>/<config>_<round>.json and summary.json (medians).
# Usage: WORKLOAD=a|b bench/run_scaleout.sh; needs `cargo build --release -p ferrule-cli`,
# scripts/install-deps.sh (Open MPI) and, for b, bench/prepare_smollm2_f32.py.
set -euo pipefail
cd "$(dirname "$0")/.."
F=${FERRULE:-target/release/ferrule}
REPEAT=${REPEAT:-3}
WORKLOAD=${WORKLOAD:-a}
A=assets
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
if [ "$WORKLOAD" = b ]; then
  STEPS=${STEPS:-6}; GLOBAL=8
  COMMON=(--task causal-lm --model $A/smollm2-f32 --data $A/data/chatterbot/train.jsonl --max-len 256
          --pad-to-max-len --lr 2e-4 --warmup-steps 2 --seed 42 --lora-r 8 --lora-alpha 16 --target-modules q_proj,k_proj,v_proj,o_proj)
else
  STEPS=${STEPS:-10}; GLOBAL=32
  COMMON=(--task seq-cls --model $A/minilm --data $A/data/rotten_tomatoes/train.jsonl --max-len 128
          --pad-to-max-len --lr 5e-4 --warmup-steps 2 --seed 42 --lora-r 8 --lora-alpha 16 --target-modules query,value)
fi
OUT=${OUT_DIR:-bench/results/scaleout_$WORKLOAD}
mkdir -p "$OUT"
CONFIGS=${CONFIGS:-"1x2 2x1-z0 2x1-z1 2x1-z2 2x1-z3"}

run_one() {  # config round
  local c=$1 i=$2 dir; dir=$(mktemp -d)
  case $c in
    1x2) "$F" train --threads 2 -q --output "$dir/run" "${COMMON[@]}" --batch-size $GLOBAL --max-steps "$STEPS" > /dev/null ;;
    2x1-z*-sb) mpirun -np 2 --bind-to none "$F" train --threads 1 -q --output "$dir/run" "${COMMON[@]}" \
              --batch-size $((GLOBAL / 2)) --max-steps "$STEPS" --zero-stage "${c:5:1}" --shard-base > /dev/null ;;
    2x1-z*) mpirun -np 2 --bind-to none "$F" train --threads 1 -q --output "$dir/run" "${COMMON[@]}" \
              --batch-size $((GLOBAL / 2)) --max-steps "$STEPS" --zero-stage "${c#2x1-z}" > /dev/null ;;
  esac
  python3 - "$dir/run/train_summary.json" "$OUT/${c}_$i.json" <<'PY'
import json, sys, os
s = json.load(open(sys.argv[1]))
r = {k: s[k] for k in ("median_step_seconds", "tokens_per_sec", "positions_per_sec", "peak_rss_bytes_per_rank",
                       "comm_per_step", "final_loss", "trainable_params", "world_size", "zero_stage")}
r["load_avg"] = os.getloadavg()
json.dump(r, open(sys.argv[2], "w"), indent=1); print(sys.argv[2], r["median_step_seconds"], r["peak_rss_bytes_per_rank"])
PY
  rm -rf "$dir"
}

for i in $(seq 1 "$REPEAT"); do
  for c in $CONFIGS; do run_one "$c" "$i"; done
done

python3 - "$OUT" <<'PY'
import json, sys, glob, os, statistics as st
out = sys.argv[1]; rows = {}
for f in sorted(glob.glob(os.path.join(out, "*_*.json"))):
    if f.endswith("summary.json"): continue
    c = os.path.basename(f).rsplit("_", 1)[0]; rows.setdefault(c, []).append(json.load(open(f)))
summary = {}
base = st.median(r["positions_per_sec"] for r in rows["1x2"]) if "1x2" in rows else None
for c, rs in rows.items():
    pos = st.median(r["positions_per_sec"] for r in rs)
    summary[c] = {
        "runs": len(rs),
        "median_step_s": st.median(r["median_step_seconds"] for r in rs),
        "positions_per_sec": pos,
        "vs_1x2": pos / base if base else None,
        "peak_rss_mb_per_rank": [st.median(r["peak_rss_bytes_per_rank"][k] for r in rs) / 1e6 for k in range(len(rs[0]["peak_rss_bytes_per_rank"]))],
        "comm_bytes_per_step": (rs[0]["comm_per_step"] or {}),
        "final_loss": [r["final_loss"] for r in rs],
    }
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(json.dumps(summary, indent=1))
PY
