#!/usr/bin/env bash
# Creates the Python *reference* environment (torch, transformers, peft, bitsandbytes) that
# fixtures and benchmark baselines are made with, and tensorboard, whose reader checks the
# event files of --report-to tensorboard, mergekit, whose merges `ferrule merge --config` matches,
# galore-torch (GaLore fixtures) and tensorly (imported by the Natural GaLore reference code). Never needed to build or run ferrule.
# Usage: scripts/reference-venv.sh [DIR]   (default: ~/.cache/ferrule/ref-venv); prints DIR/bin/python.
set -euo pipefail
DIR=${1:-${FERRULE_REF_VENV:-$HOME/.cache/ferrule/ref-venv}}
if [ ! -x "$DIR/bin/python" ]; then
  python3 -m venv "$DIR"
  "$DIR/bin/pip" install --quiet --upgrade pip
fi
"$DIR/bin/pip" install --quiet torch==2.15.0 transformers==5.24.0 peft==0.21.2 safetensors numpy gguf bitsandbytes psutil tensorboard==2.21.0 mergekit==0.1.5 galore-torch==1.0 tensorly==0.9.0 >&2
echo "$DIR/bin/python"
