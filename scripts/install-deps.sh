#!/usr/bin/env bash
# Installs the system libraries ferrule opens at run time: OpenBLAS, which computes the large
# matrix products (ops/blas.rs; about 1.2x the gemm crate's throughput on AVX2 machines).
# Without it ferrule runs the same code on the gemm crate, slower. Idempotent; needs root (or
# sudo) and apt-get, and only warns where neither is available.
set -euo pipefail
if ldconfig -p 2>/dev/null | grep -q 'libopenblas\.so\.0'; then
  exit 0
fi
SUDO=
[ "$(id -u)" = 0 ] || SUDO=$(command -v sudo || true)
if command -v apt-get >/dev/null && { [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; }; then
  echo "install libopenblas0-pthread (apt-get)" >&2
  $SUDO apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1 ||
    { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q libopenblas0-pthread >/dev/null; }
else
  echo "warning: OpenBLAS is not installed and cannot be installed here (no apt-get or no root);" \
    "ferrule will compute matrix products with the gemm crate, about 1.2x slower" >&2
fi
