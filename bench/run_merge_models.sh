#!/usr/bin/env bash
# ferrule merge --config against mergekit-yaml --lazy-unpickle on CPU (issue 26): a base and
# three random 1.07B Llama models (bench/make_llama_1b.py, seeds 1 (base), 2, 3, 4; stored in
# $DISK_DTYPE, bfloat16 by default: 2.1 GB each) merged with TIES and DARE-TIES in f32 and
# written in bf16; wall time and peak RSS of each run from /usr/bin/time -v, medians over
# $REPEAT runs. Needs 4 × 2.1 GB of disk for the inputs plus 2.1 GB per output (one at a
# time), assets/smollm2-f32 for the tokenizer, and a release build:
#
#   cargo build --release -p ferrule-cli && REPEAT=1 bench/run_merge_models.sh
# Results: bench/results/merge_models.tsv (method, tool, run, wall s, peak RSS KiB); the
# generated models are deleted at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$(scripts/reference-venv.sh)}
VENV_BIN=$(dirname "$PY")
FERRULE=${FERRULE:-target/release/ferrule}
WORK=${WORK:-assets/merge-bench}
DISK_DTYPE=${DISK_DTYPE:-bfloat16}
REPEAT=${REPEAT:-1}
OUT=bench/results/merge_models.tsv
mkdir -p "$WORK" bench/results
for s in 1 2 3 4; do
  "$PY" bench/make_llama_1b.py --seed $s --dtype "$DISK_DTYPE" --out "$WORK/llama-1b-$s"
done
# One run under /usr/bin/time -v: a TSV row of wall seconds and peak RSS (KiB).
measure() {
  local method=$1 tool=$2 run=$3; shift 3
  /usr/bin/time -v -o "$WORK/time.txt" "$@" > "$WORK/log.txt" 2>&1 || { cat "$WORK/log.txt"; exit 1; }
  awk -v m="$method" -v t="$tool" -v r="$run" -F': ' '
    /Elapsed \(wall clock\)/ { n = split($2, a, ":"); w = 0; for (i = 1; i <= n; i++) w = w * 60 + a[i] }
    /Maximum resident set size/ { rss = $2 }
    END { printf "%s\t%s\t%s\t%.1f\t%d\n", m, t, r, w, rss }' "$WORK/time.txt" | tee -a "$OUT"
}
printf "method\ttool\trun\twall_s\tpeak_rss_kib\n" > "$OUT"
for method in ties dare_ties; do
  cat > "$WORK/$method.yaml" <<YAML
merge_method: $method
base_model: $WORK/llama-1b-1
models:
  - model: $WORK/llama-1b-2
    parameters: {weight: 0.4, density: 0.5}
  - model: $WORK/llama-1b-3
    parameters: {weight: 0.3, density: 0.5}
  - model: $WORK/llama-1b-4
    parameters: {weight: 0.3, density: 0.5}
dtype: float32
out_dtype: bfloat16
YAML
  for run in $(seq "$REPEAT"); do
    rm -rf "$WORK/out"
    measure $method ferrule "$run" "$FERRULE" merge --config "$WORK/$method.yaml" --output "$WORK/out"
    rm -rf "$WORK/out"
    measure $method mergekit "$run" "$VENV_BIN/mergekit-yaml" --lazy-unpickle --copy-tokenizer "$WORK/$method.yaml" "$WORK/out"
  done
done
rm -rf "$WORK/out"
lscpu | grep -E "Model name|^CPU\(s\)"
# Medians per method and tool.
awk -F'\t' 'NR > 1 { k = $1 "\t" $2; w[k] = w[k] " " $4; r[k] = r[k] " " $5 }
  function med(s,   a, n, i, j, t) { n = split(s, a, " "); for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }; return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
  END { for (k in w) printf "%s\tmedian wall %.1f s\tmedian peak RSS %.0f MiB\n", k, med(w[k]), med(r[k]) / 1024 }' "$OUT" | sort
if [ "${KEEP_MODELS:-0}" != 1 ]; then rm -rf "$WORK"; fi
