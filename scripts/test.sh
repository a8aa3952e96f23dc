#!/usr/bin/env bash
# The test command (README, .ci/run): install the system BLAS (scripts/install-deps.sh) and
# fetch the offline assets (both idempotent, the assets checksummed),
# check formatting and lints (cargo fmt --check, cargo clippy -D warnings), then run every
# test of the workspace. Real-model tests use the assets; the rest use the
# committed fixtures in tests/fixtures.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/fetch-assets.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace --all-targets "$@"
