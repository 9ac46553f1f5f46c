#!/usr/bin/env bash
# Build, then run every test with ctest: the `cpu` label everywhere; the `gpu` label runs on all
# visible GPUs and reports itself skipped where there is none.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/build.sh"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$root/build"
ctest --output-on-failure "$@"
