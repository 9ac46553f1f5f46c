#!/usr/bin/env bash
# Build, then run every test with ctest: the `cpu` label everywhere (C++ and the Python package's
# torch-free tests); the `gpu` label runs on all visible GPUs and reports itself skipped where there
# is none. Extra arguments go to ctest (e.g. -L cpu).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/build.sh"
source "$root/scripts/env.sh"
cd "$root/build"
ctest --output-on-failure "$@"
