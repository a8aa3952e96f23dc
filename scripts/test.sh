#!/usr/bin/env bash
# The test command (README, .ci/run): fetch the offline assets (idempotent, checksummed),
# then run every test of the workspace. Real-model tests use the assets; the rest use the
# committed fixtures in tests/fixtures.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-assets.sh
cargo test --workspace --all-targets "$@"
