#!/usr/bin/env bash
# Builds llama-cpp-python (llama.cpp's Python binding; PyPI has it as a source package only) into
# a venv for the GGUF export test that loads ferrule's files in llama.cpp
# (crates/ferrule/tests/export_gguf.rs skips that test without it).
# Usage: scripts/llama-cpp-venv.sh [DIR]   (default: ~/.cache/ferrule/llama-venv); prints DIR/bin/python.
# The C++ build takes a while: set CMAKE_BUILD_PARALLEL_LEVEL to the cores you can spare.
set -euo pipefail
DIR=${1:-${FERRULE_LLAMA_VENV:-$HOME/.cache/ferrule/llama-venv}}
if ! "$DIR/bin/python" -c "import llama_cpp" 2>/dev/null; then
  python3 -m venv "$DIR"
  "$DIR/bin/pip" install -q --upgrade pip
  CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF}" \
    "$DIR/bin/pip" install -q numpy llama-cpp-python >&2
fi
echo "$DIR/bin/python"
