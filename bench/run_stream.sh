#!/usr/bin/env bash
# The frozen base streamed from disk (--stream-base, issue 27): the same LoRA run in memory and
# streamed, one after the other, on
#   smollm2:      SmolLM2-135M f32 copy (assets/smollm2-f32);
#   smollm2_nf4:  its NF4 folder (ferrule quantize --quantize nf4 --double-quant), made once in
#                 $WORK;
#   llama1b:      the random 1.07B Llama (bench/make_llama_1b.py, 4.3 GB in f32);
#   llama1b_nf4:  its NF4 folder;
#   llama7b_nf4, llama13b_nf4, llama30b_nf4: random 6.9B / 13.3B / 32.7B Llamas
#                 (bench/make_llama_large.py), made once in $WORK as NF4 folders: 7b through
#                 `ferrule quantize` of a bf16 folder (14 GB of disk meanwhile), the others
#                 written straight to NF4 (8 / 18 GB).
# Every run: chatterbot, 4 records x max 256 padding-free (the large models: 4 x 64, padded to
# 64), LoRA r 8 (alpha 16) on q,k,v,o,
# --recompute, STEPS steps (default 4), 2 threads, --compute-dtype $COMPUTE (default f32).
# Each run writes bench/results/stream/<workload>_<mode>.json: peak RSS from /usr/bin/time -v
# (the kernel's high-water mark, file-backed mapped pages included) and from the run's own
# report (VmHWM), median step, tokens/s, final loss, and the adapter's sha256 (equal in
# memory and streamed), and `ferrule plan`'s estimate for the same flags (total_bytes).
# Usage: bench/run_stream.sh [smollm2 smollm2_nf4 llama1b llama1b_nf4]
set -euo pipefail
cd "$(dirname "$0")/.."
F=${FERRULE:-target/release/ferrule}
OUT=bench/results/stream
WORK=${WORK:-$(mktemp -d)}
STEPS=${STEPS:-4}
COMPUTE=${COMPUTE:-f32}
MAXLEN=256 PADDING=free
mkdir -p "$OUT"
A=assets

nf4() {  # nf4 SRC: the NF4 folder of SRC, made once
  local dst=$WORK/$(basename "$1")-nf4
  [ -d "$dst" ] || "$F" quantize --model "$1" --output "$dst" --quantize nf4 --double-quant > /dev/null
  echo "$dst"
}

large() {  # large SIZE: the NF4 folder of a random Llama of SIZE, made once: 7b in bf16 then
           # `ferrule quantize` (the bf16 folder deleted after), 13b and 30b straight to NF4
  local dst=$WORK/llama-$1-nf4
  if [ ! -d "$dst" ]; then
    local PY; PY=$(scripts/reference-venv.sh)
    if [ "$1" = 7b ]; then
      "$PY" bench/make_llama_large.py --size 7b --out "$WORK/llama-7b" >&2
      "$F" quantize --model "$WORK/llama-7b" --output "$dst" --quantize nf4 --double-quant > /dev/null
      rm -rf "$WORK/llama-7b"
    else
      "$PY" bench/make_llama_large.py --size "$1" --nf4 --out "$dst" >&2
    fi
  fi
  echo "$dst"
}

run() {  # run NAME MODEL [--stream-base]
  local name=$1 model=$2; shift 2
  local dir; dir=$(mktemp -d)
  local shape=(--compute-dtype "$COMPUTE" --model "$model" --max-len "$MAXLEN" --batch-size 4
    --lora-r 8 --lora-alpha 16 --target-modules q_proj,k_proj,v_proj,o_proj --recompute "$@")
  "$F" plan --threads 2 "${shape[@]}" --json > "$dir/plan.json"
  /usr/bin/time -v -o "$dir/time.txt" "$F" train --threads 2 "${shape[@]}" \
    --data $A/data/chatterbot/train.jsonl --padding "$PADDING" \
    --lr 2e-4 --seed 42 --max-steps "$STEPS" --output "$dir/run" -q --json \
    > "$dir/summary.json"
  python3 - "$dir" "$OUT/$name.json" "$*" <<'PY'
import hashlib, json, re, sys
d, out, flags = sys.argv[1], sys.argv[2], sys.argv[3]
s = json.load(open(f"{d}/summary.json"))
plan = json.load(open(f"{d}/plan.json"))
t = open(f"{d}/time.txt").read()
kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1))
wall = float(re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (.*)", t).group(1).split(":")[-1])
adapter = hashlib.sha256(open(f"{d}/run/adapter_model.safetensors", "rb").read()).hexdigest()
r = {"mode": "streamed" if "--stream-base" in flags else "in memory",
     "peak_rss_time_v_bytes": kb * 1024, "peak_rss_report_bytes": max(s["peak_rss_bytes_per_rank"]),
     "median_step_s": s["median_step_seconds"], "tokens_per_s": s["tokens_per_sec"],
     "final_loss": s["final_loss"], "base_weight_bytes": s["base_weight_bytes"],
     "adapter_sha256": adapter, "compute_dtype": s["compute_dtype"],
     "plan_total_bytes": plan["total_bytes"], "plan_weights_bytes": plan["weights_bytes"]}
json.dump(r, open(out, "w"), indent=1)
print(out, json.dumps(r))
PY
  rm -rf "$dir"
}

both() {  # both WORKLOAD MODEL
  run "$1_memory" "$2"
  run "$1_streamed" "$2" --stream-base
}

for w in "${@:-smollm2 smollm2_nf4}"; do
  case $w in
    smollm2) both smollm2 $A/smollm2-f32 ;;
    smollm2_nf4) both smollm2_nf4 "$(nf4 $A/smollm2-f32)" ;;
    llama1b) both llama1b $A/llama-1b-random ;;
    llama1b_nf4) both llama1b_nf4 "$(nf4 $A/llama-1b-random)" ;;
    # Every step 4 x 64 tokens exactly, so that plan's activations are the run's.
    llama7b_nf4) MAXLEN=64 PADDING=max-len both llama7b_nf4 "$(large 7b)" ;;
    llama13b_nf4) MAXLEN=64 PADDING=max-len both llama13b_nf4 "$(large 13b)" ;;
    llama30b_nf4) MAXLEN=64 PADDING=max-len both llama30b_nf4 "$(large 30b)" ;;
    *) echo "unknown workload $w" >&2; exit 2 ;;
  esac
done
