#!/usr/bin/env bash
# Merging a LoRA adapter into its base (issue 26): `ferrule merge` against peft's
# merge_and_unload + save_pretrained (bench/peft_merge.py) on the random 1.07B Llama in f32
# (assets/llama-1b-random, bench/make_llama_1b.py), a random r 16 LoRA on every linear layer
# (bench/make_random_lora.py); wall time and peak RSS from /usr/bin/time -v, alternated, medians
# over $REPEAT runs; then the two outputs' tensors are compared.
#
#   cargo build --release -p ferrule-cli && REPEAT=3 bench/run_merge_adapter.sh
# Results: bench/results/merge_adapter.tsv (tool, run, wall s, peak RSS KiB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$(scripts/reference-venv.sh)}
FERRULE=${FERRULE:-target/release/ferrule}
MODEL=${MODEL:-assets/llama-1b-random}
WORK=${WORK:-assets/merge-adapter-bench}
REPEAT=${REPEAT:-3}
OUT=bench/results/merge_adapter.tsv
mkdir -p "$WORK" bench/results
[ -f "$WORK/lora/adapter_config.json" ] || "$PY" bench/make_random_lora.py --model "$MODEL" --out "$WORK/lora"
measure() {
  local tool=$1 run=$2; shift 2
  rm -rf "$WORK/out-$tool"
  /usr/bin/time -v -o "$WORK/time.txt" "$@" > "$WORK/log.txt" 2>&1 || { cat "$WORK/log.txt"; exit 1; }
  awk -v t="$tool" -v r="$run" -F': ' '
    /Elapsed \(wall clock\)/ { n = split($2, a, ":"); w = 0; for (i = 1; i <= n; i++) w = w * 60 + a[i] }
    /Maximum resident set size/ { rss = $2 }
    END { printf "%s\t%s\t%.1f\t%d\n", t, r, w, rss }' "$WORK/time.txt" | tee -a "$OUT"
}
printf "tool\trun\twall_s\tpeak_rss_kib\n" > "$OUT"
for run in $(seq "$REPEAT"); do
  measure ferrule "$run" "$FERRULE" merge --model "$MODEL" --adapter "$WORK/lora" --output "$WORK/out-ferrule"
  measure peft "$run" "$PY" bench/peft_merge.py --model "$MODEL" --adapter "$WORK/lora" --out "$WORK/out-peft"
done
"$PY" - "$WORK/out-ferrule" "$WORK/out-peft" <<'PY'
import sys
from safetensors import safe_open
import glob
def tensors(d):
    out = {}
    for f in sorted(glob.glob(d + "/*.safetensors")):
        with safe_open(f, "pt") as s:
            for k in s.keys():
                out[k] = s.get_tensor(k)
    return out
a, b = tensors(sys.argv[1]), tensors(sys.argv[2])
b.pop("lm_head.weight", None) if "lm_head.weight" not in a else None
assert a.keys() == b.keys(), (sorted(a.keys() ^ b.keys()))
worst = max(((a[k] - b[k]).abs().max().item(), k) for k in a)
print(f"{len(a)} tensors; largest |ferrule - peft| {worst[0]:.3e} ({worst[1]})")
PY
awk -F'\t' 'NR > 1 { w[$1] = w[$1] " " $3; r[$1] = r[$1] " " $4 }
  END { for (t in w) print t, "wall s:" w[t], " peak RSS KiB:" r[t] }' "$OUT"
