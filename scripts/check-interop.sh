#!/usr/bin/env bash
# Do transformers and peft load what today's ferrule writes? Trains a LoRA adapter on the tiny
# fixture model, merges it, quantizes the base to NF4, and checks with the Python reference
# stack (scripts/reference-venv.sh: created if missing, which needs PyPI) that peft's logits for
# the adapter (and for a DyLoRA adapter exported at a rank as LoRA, and an IST run's DoRA), and transformers' for the merged (LoRA, and DiffFit with the biases it adds), the fully fine-tuned, the quantized and the QLoRA-merged NF4 folder, equal ferrule's own
# (1e-4, f32), that peft loads an adapter trained with tokens added to the tokenizer (resized
# embeddings, trainable_token_indices) on a base it resizes itself, and that the tensorboard package reads the event files of --report-to tensorboard
# with metrics.jsonl's values. Fails, never skips, when the reference stack cannot be installed.
#
#   scripts/check-interop.sh          (scripts/test.sh runs it)
#
# FERRULE picks the binary (default: the newer of target/release/ferrule and target/debug/ferrule).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${FERRULE:-}
if [ -z "$BIN" ]; then
  for b in target/release/ferrule target/debug/ferrule; do
    [ -x "$b" ] && { [ -z "$BIN" ] || [ "$b" -nt "$BIN" ]; } && BIN=$b
  done
fi
[ -n "$BIN" ] && [ -x "$BIN" ] || { echo "check-interop: no ferrule binary (cargo build -p ferrule-cli, or set FERRULE)" >&2; exit 1; }
if ! PY=$(scripts/reference-venv.sh); then
  echo "check-interop: FAILED: the Python reference stack (torch, transformers, peft, bitsandbytes) could not be installed; is PyPI reachable?" >&2
  exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
M=tests/fixtures/models/llama
IN=tests/fixtures/inputs/decoder.safetensors
"$BIN" train -q --threads 2 --model $M --data tests/fixtures/data/chat.jsonl --max-steps 3 --lr 0.05 \
  --target-modules all-linear --output "$work/adapter" >/dev/null
"$BIN" logits --threads 2 --model $M --adapter "$work/adapter" --inputs $IN --out "$work/adapter.logits"
"$PY" tests/fixtures/make_fixtures.py --check-roundtrip "$work/adapter" --model $M --inputs $IN --expected "$work/adapter.logits"

# DyLoRA at rank 2, exported as the plain LoRA peft loads.
"$BIN" train -q --threads 2 --model $M --data tests/fixtures/data/chat.jsonl --max-steps 3 --lr 0.05 \
  --method dylora --lora-r 4 --target-modules q_proj,v_proj --output "$work/dylora" >/dev/null
"$BIN" export lora --threads 2 --model $M --adapter "$work/dylora" --rank 2 --output "$work/dylora-r2" >/dev/null
"$BIN" logits --threads 2 --model $M --adapter "$work/dylora" --rank 2 --inputs $IN --out "$work/dylora.logits"
"$PY" tests/fixtures/make_fixtures.py --check-roundtrip "$work/dylora-r2" --model $M --inputs $IN --expected "$work/dylora.logits"

# IST around DoRA (rollouts at steps 2 and 4): the run saves a plain PEFT DoRA folder.
"$BIN" train -q --threads 2 --model $M --data tests/fixtures/data/chat.jsonl --max-steps 5 --lr 0.05 \
  --method ist --ist-base dora --ist-trainable-fraction 0.5 --ist-rollouts 2 --ist-update-interval 2 \
  --lora-r 4 --target-modules q_proj,v_proj --output "$work/ist" >/dev/null
"$BIN" logits --threads 2 --model $M --adapter "$work/ist" --inputs $IN --out "$work/ist.logits"
"$PY" tests/fixtures/make_fixtures.py --check-roundtrip "$work/ist" --model $M --inputs $IN --expected "$work/ist.logits"

"$BIN" merge --threads 2 --model $M --adapter "$work/adapter" --output "$work/merged" >/dev/null
"$BIN" logits --threads 2 --model "$work/merged" --inputs $IN --out "$work/merged.logits"
"$PY" tests/fixtures/check_model_folder.py "$work/merged" --inputs $IN --expected "$work/merged.logits"

"$BIN" train -q --threads 2 --model $M --data tests/fixtures/data/chat.jsonl --max-steps 3 --lr 1e-3 \
  --method full --output "$work/full" >/dev/null
"$BIN" logits --threads 2 --model "$work/full" --inputs $IN --out "$work/full.logits"
"$PY" tests/fixtures/check_model_folder.py "$work/full" --inputs $IN --expected "$work/full.logits"

# DiffFit on the bias-free Llama: the merge writes its biases through attention_bias/mlp_bias.
"$BIN" train -q --threads 2 --model $M --data tests/fixtures/data/chat.jsonl --max-steps 3 --lr 0.05 \
  --method difffit --output "$work/difffit" >/dev/null
"$BIN" merge --threads 2 --model $M --adapter "$work/difffit" --output "$work/difffit-merged" >/dev/null
"$BIN" logits --threads 2 --model $M --adapter "$work/difffit" --inputs $IN --out "$work/difffit.logits"
"$PY" tests/fixtures/check_model_folder.py "$work/difffit-merged" --inputs $IN --expected "$work/difffit.logits"

"$BIN" quantize --threads 2 --model $M --quantize nf4 --double-quant --output "$work/nf4" >/dev/null
"$BIN" logits --threads 2 --model "$work/nf4" --inputs $IN --out "$work/nf4.logits"
"$PY" tests/fixtures/check_model_folder.py "$work/nf4" --inputs $IN --expected "$work/nf4.logits"
# A QLoRA adapter merged into its NF4 base: the folder says it is bitsandbytes NF4.
"$BIN" train -q --threads 2 --model $M --data tests/fixtures/data/chat.jsonl --max-steps 3 --lr 0.05 \
  --quantize nf4 --double-quant --output "$work/qlora" >/dev/null
"$BIN" merge --threads 2 --model $M --adapter "$work/qlora" --quantize nf4 --double-quant --output "$work/qmerged" >/dev/null
"$BIN" logits --threads 2 --model "$work/qmerged" --inputs $IN --out "$work/qmerged.logits"
"$PY" tests/fixtures/check_model_folder.py "$work/qmerged" --inputs $IN --expected "$work/qmerged.logits"
"$BIN" train -q --threads 2 --model $M --data tests/fixtures/data/chat.jsonl --eval-data tests/fixtures/data/chat.jsonl \
  --max-steps 4 --eval-every 2 --report-to tensorboard --output "$work/tb" >/dev/null
"$PY" tests/fixtures/check_tensorboard.py "$work/tb"
# Tokens added to the tokenizer: resized embeddings, only the listed rows trained. peft's user
# resizes the base (random new rows); the adapter's saved tables replace them.
mkdir "$work/added" && cp $M/* "$work/added/"
"$PY" - "$work/added/tokenizer.json" <<'PYEOF'
import json, sys
p = sys.argv[1]
t = json.load(open(p))
for i, s in ((320, "<|call|>"), (321, "<|result|>")):
    t["added_tokens"].append({"id": i, "content": s, "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True})
json.dump(t, open(p, "w"))
PYEOF
printf '%s\n' '{"messages": [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "<|call|> weather <|result|> sunny"}]}' \
  '{"messages": [{"role": "user", "content": "time?"}, {"role": "assistant", "content": "<|call|> clock <|result|> noon"}]}' > "$work/added.jsonl"
"$BIN" train -q --threads 2 --model "$work/added" --data "$work/added.jsonl" --max-steps 3 --lr 0.05 \
  --resize-token-embeddings --trainable-token-indices 320,321,9 --output "$work/tokens" >/dev/null
TIN=tests/fixtures/tokens/llama_lora_tokens_resized_untied/inputs.safetensors  # ids 320, 321 and 9
"$BIN" logits --threads 2 --model "$work/added" --adapter "$work/tokens" --inputs $TIN --out "$work/tokens.logits"
"$PY" tests/fixtures/make_fixtures.py --check-roundtrip "$work/tokens" --model "$work/added" --resize 322 \
  --inputs $TIN --expected "$work/tokens.logits"

echo "check-interop: peft loads the adapter, transformers the merged (LoRA, DiffFit), the fully fine-tuned, the NF4 and the QLoRA-merged NF4 folder, with ferrule's logits;"
echo "check-interop: peft loads a DyLoRA adapter exported at rank 2 as LoRA, with ferrule's logits at that rank;"
echo "check-interop: peft loads the adapter trained on added tokens (resized embeddings) with ferrule's logits;"
echo "check-interop: tensorboard reads the event files with the values of metrics.jsonl"
