#!/usr/bin/env bash
# Installs the pinned dependencies (scripts/bootstrap.sh), configures and builds everything into build/.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
./scripts/bootstrap.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "${MEGAMOE_BUILD_JOBS:-$(nproc)}"
