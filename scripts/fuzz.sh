#!/usr/bin/env bash
# Fuzzes ferrule's readers with libFuzzer (cargo-fuzz, a nightly toolchain): safetensors files
# and shard indexes, GGUF files, model config.json, adapter_config.json, JSONL records in the
# four shapes, and chat-template rendering of fuzzed messages. Each target starts from its
# committed seed corpus (fuzz/corpus/TARGET; new inputs go to a scratch copy) and runs SECONDS.
#
#   scripts/fuzz.sh [SECONDS] [TARGET ...]     (default 60 s, every target; a nightly job)
#
# Installs cargo-fuzz when missing. A crash stops with its input under fuzz/artifacts/TARGET:
# add it as a regression test (RELIABILITY.md lists the findings so far).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${1:-60}
shift || true
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(safetensors gguf model_config adapter_config jsonl chat_template)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cd fuzz
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t"
  echo "== $t (${SECONDS_EACH}s)"
  status=0
  cargo +nightly fuzz run "$t" "$scratch/$t" corpus/"$t" -- -max_total_time="$SECONDS_EACH" -rss_limit_mb=4096 -print_final_stats=1 >"$scratch/$t.log" 2>&1 || status=$?
  # libFuzzer separates its fields with tabs or spaces depending on the line.
  grep -E '^(#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units|stat::peak_rss|==[0-9]+== ERROR|SUMMARY|.*panicked)|cov:' "$scratch/$t.log" | tail -4 || true
  if [ "$status" -ne 0 ]; then
    tail -40 "$scratch/$t.log" >&2
    echo "fuzz target $t failed (exit $status); its input is under fuzz/artifacts/$t" >&2
    exit "$status"
  fi
done
