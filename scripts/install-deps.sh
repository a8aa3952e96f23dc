#!/usr/bin/env bash
# Installs the system packages ferrule builds and runs with (Debian / Ubuntu, apt-get):
# - OpenBLAS (libopenblas0-pthread), opened at run time for the large matrix products
#   (ops/blas.rs; about 1.2x the gemm crate's throughput on AVX2 machines). Without it ferrule
#   runs the same code on the gemm crate, slower.
# - oneDNN 2.x (libdnnl2), opened at run time for bf16 products with f32 accumulation
#   (ops/onednn.rs; about 2x the f32 products on Zen 4's avx512_bf16, more on AMX). Without it
#   ferrule computes in f32 only.
# - Open MPI (openmpi-bin, libopenmpi-dev) and libclang-dev, which the `mpi` feature (on in the
#   default build) compiles against (the `mpi` crate generates its bindings with bindgen) and
#   which `mpirun` launches multi-process training with (docs/ARCHITECTURE.md, "Scale-out").
# Idempotent; needs root (or sudo) and apt-get, and only warns where neither is available.
set -euo pipefail
missing=()
ldconfig -p 2>/dev/null | grep -q 'libopenblas\.so\.0' || missing+=(libopenblas0-pthread)
ldconfig -p 2>/dev/null | grep -q 'libdnnl\.so\.2' || missing+=(libdnnl2)
command -v mpirun >/dev/null || missing+=(openmpi-bin)
command -v mpicc >/dev/null || missing+=(libopenmpi-dev) # mpicc ships with the headers
# libclang itself (libclang.so, libclang-14.so.1, ...), not libclang-cpp, which bindgen cannot use
ldconfig -p 2>/dev/null | grep -Eq 'libclang(-[0-9.]+)?\.so' ||
  ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/llvm-*/lib/libclang-[0-9]*.so* >/dev/null 2>&1 ||
  missing+=(libclang-dev)
[ ${#missing[@]} = 0 ] && exit 0
SUDO=
[ "$(id -u)" = 0 ] || SUDO=$(command -v sudo || true)
if command -v apt-get >/dev/null && { [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; }; then
  echo "install ${missing[*]} (apt-get)" >&2
  $SUDO apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 ||
    { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q "${missing[@]}" >/dev/null; }
else
  echo "warning: ${missing[*]} not installed and cannot be installed here (no apt-get or no root):" \
    "without oneDNN no bf16 products;" \
    "without OpenBLAS ferrule computes matrix products with the gemm crate (about 1.2x slower);" \
    "without Open MPI and libclang build with --no-default-features (single process only)" >&2
fi
