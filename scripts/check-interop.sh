#!/usr/bin/env bash
# Do transformers and peft load what today's ferrule writes? Trains a LoRA adapter on the tiny
# fixture model, merges it, quantizes the base to NF4, and checks with the Python reference
# stack (scripts/reference-venv.sh: created if missing, which needs PyPI) that peft's logits for
# the adapter, and transformers' for the merged and the quantized folder, equal ferrule's own
# (1e-4, f32), and that the tensorboard package reads the event files of --report-to tensorboard
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

"$BIN" merge --threads 2 --model $M --adapter "$work/adapter" --output "$work/merged" >/dev/null
"$BIN" logits --threads 2 --model "$work/merged" --inputs $IN --out "$work/merged.logits"
"$PY" tests/fixtures/check_model_folder.py "$work/merged" --inputs $IN --expected "$work/merged.logits"

"$BIN" quantize --threads 2 --model $M --quantize nf4 --double-quant --output "$work/nf4" >/dev/null
"$BIN" logits --threads 2 --model "$work/nf4" --inputs $IN --out "$work/nf4.logits"
"$PY" tests/fixtures/check_model_folder.py "$work/nf4" --inputs $IN --expected "$work/nf4.logits"
"$BIN" train -q --threads 2 --model $M --data tests/fixtures/data/chat.jsonl --eval-data tests/fixtures/data/chat.jsonl \
  --max-steps 4 --eval-every 2 --report-to tensorboard --output "$work/tb" >/dev/null
"$PY" tests/fixtures/check_tensorboard.py "$work/tb"
echo "check-interop: peft loads the adapter, transformers the merged and the NF4 folder, with ferrule's logits;"
echo "check-interop: tensorboard reads the event files with the values of metrics.jsonl"
