#!/usr/bin/env bash
# Installs the pinned dependencies that a fresh machine lacks into .deps/ (ignored by git):
#   CUTLASS/CuTe 4.2.0 headers from the PyPI wheel nvidia-cutlass==4.2.0.0 (headers only, --no-deps).
# Checks the rest: CUDA 13 toolkit and NCCL 2.28.9 from /usr/local/cuda, GoogleTest from the system,
# ninja and pytest from PyPI.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
deps="$root/.deps"
cutlass_version=4.2.0.0
cutlass_dir="$deps/cutlass-$cutlass_version"
cuda_home=${CUDA_HOME:-/usr/local/cuda}

if [ ! -f "$cutlass_dir/include/cute/tensor.hpp" ]; then
  echo "bootstrap: fetching nvidia-cutlass==$cutlass_version headers"
  tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --only-binary=:all: "nvidia-cutlass==$cutlass_version" -d "$tmp"
  wheel=$(ls "$tmp"/nvidia_cutlass-*.whl)
  mkdir -p "$tmp/x"
  python3 - "$wheel" "$tmp/x" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for n in z.namelist():
        if n.startswith(("cutlass_library/source/include/", "cutlass_library/source/tools/util/include/")):
            z.extract(n, sys.argv[2])
PY
  rm -rf "$cutlass_dir"
  mkdir -p "$cutlass_dir"
  mv "$tmp/x/cutlass_library/source/include" "$cutlass_dir/include"
  mv "$tmp/x/cutlass_library/source/tools/util/include" "$cutlass_dir/util-include"
  rm -rf "$tmp"
fi

if ! command -v "$cuda_home/bin/nvcc" >/dev/null; then
  echo "bootstrap: no nvcc at $cuda_home/bin/nvcc (set CUDA_HOME to a CUDA 13 toolkit)" >&2; exit 1
fi
nccl_code=$(sed -n 's/^#define NCCL_VERSION_CODE \([0-9]*\).*/\1/p' "$cuda_home/include/nccl.h" 2>/dev/null || true)
if [ "$nccl_code" != "22809" ]; then
  echo "bootstrap: $cuda_home/include/nccl.h is NCCL version code '${nccl_code:-missing}', need 22809 (2.28.9)" >&2; exit 1
fi
if [ ! -f /usr/include/gtest/gtest.h ]; then
  echo "bootstrap: installing GoogleTest from the system packages"
  if [ "$(id -u)" = 0 ]; then apt-get install -y -q libgtest-dev >/dev/null; else sudo apt-get install -y -q libgtest-dev >/dev/null; fi
fi
command -v ninja >/dev/null || { echo "bootstrap: ninja not found; installing"; python3 -m pip install --quiet ninja; }
# The Python package's tests run under ctest.
python3 -c "import pytest" 2>/dev/null || { echo "bootstrap: installing pytest"; python3 -m pip install --quiet pytest; }
echo "bootstrap: ok (CUTLASS $cutlass_version in $cutlass_dir, NCCL 2.28.9 and CUDA in $cuda_home)"
