#!/usr/bin/env bash
# The test command (README, .ci/run): install the system BLAS (scripts/install-deps.sh) and
# fetch the offline assets (both idempotent, the assets checksummed),
# check formatting and lints (cargo fmt --check, cargo clippy -D warnings), then run every
# test of the workspace, a short kill -9 / resume check (scripts/kill-resume.sh) and the check
# that peft and transformers load a fresh adapter, merged and NF4 folder (scripts/check-interop.sh).
# Real-model tests use the assets; the rest use the committed fixtures in tests/fixtures.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/fetch-assets.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The assets were just fetched: a test that cannot find one fails instead of skipping.
FERRULE_REQUIRE_ASSETS=1 cargo test --workspace --all-targets "$@"
# kill -9 at random moments, then --resume: the adapter must equal an uninterrupted run's
# (a few trials here; RELIABILITY.md records a long run).
scripts/kill-resume.sh 3
OPTIM=paged_adamw_8bit scripts/kill-resume.sh 2
# peft and transformers (the reference venv, created if missing) load what this build writes.
scripts/check-interop.sh
