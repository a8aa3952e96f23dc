#!/usr/bin/env bash
# ferrule merge --config against mergekit-yaml --lazy-unpickle on CPU (issue 26): three random
# 1.07B Llama models (bench/make_llama_1b.py with seeds 1, 2, 3; the first is the base) merged
# with TIES and DARE-TIES, wall time and peak RSS of each (bench/measure.py), one run each.
# Needs 4 × 4.3 GB of disk for the inputs plus
# 2 × 4.3 GB for the outputs, assets/smollm2-f32 for the tokenizer, a release build.
#
#   cargo build --release -p ferrule-cli && bench/run_merge_models.sh
# Results: bench/results/merge_models_{ties,dare_ties}_{ferrule,mergekit}.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$(scripts/reference-venv.sh)}
VENV_BIN=$(dirname "$PY")
FERRULE=${FERRULE:-target/release/ferrule}
WORK=${WORK:-assets/merge-bench}
mkdir -p "$WORK" bench/results
for s in 1 2 3; do
  "$PY" bench/make_llama_1b.py --seed $s --out "$WORK/llama-1b-$s"
done
for method in ties dare_ties; do
  cat > "$WORK/$method.yaml" <<YAML
merge_method: $method
base_model: $WORK/llama-1b-1
models:
  - model: $WORK/llama-1b-2
    parameters: {weight: 0.5, density: 0.5}
  - model: $WORK/llama-1b-3
    parameters: {weight: 0.5, density: 0.5}
dtype: float32
out_dtype: bfloat16
YAML
  rm -rf "$WORK/out-$method-ferrule" "$WORK/out-$method-mergekit"
  "$PY" bench/measure.py --repeat 1 --out "bench/results/merge_models_${method}_ferrule.json" -- \
    bash -c "rm -rf $WORK/out-$method-ferrule && $FERRULE merge --config $WORK/$method.yaml --output $WORK/out-$method-ferrule"
  "$PY" bench/measure.py --repeat 1 --out "bench/results/merge_models_${method}_mergekit.json" -- \
    bash -c "rm -rf $WORK/out-$method-mergekit && $VENV_BIN/mergekit-yaml --lazy-unpickle --copy-tokenizer $WORK/$method.yaml $WORK/out-$method-mergekit"
done
lscpu | grep -E "Model name|^CPU\(s\)" 
