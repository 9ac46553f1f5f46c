#!/usr/bin/env bash
# The main job: build, then benchmark the layer on every visible GPU with the dsv4-flash preset.
# Extra arguments go to `megamoe bench` (e.g. --preset dsv4-pro --tokens 64,1024 --dtype fp8).
# Without a GPU it prints one line saying so and exits with status 2.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/build.sh"
source "$root/scripts/env.sh"
exec "$root/build/bin/megamoe" bench --preset dsv4-flash "$@"
