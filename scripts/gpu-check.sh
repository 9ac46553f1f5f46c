#!/usr/bin/env bash
# Everything that needs GPUs, in one run: the GPU test binaries, the timeout self-test, the SASS check,
# the benchmark (with the naive PyTorch layer beside it) and the NVLink/barrier microbenchmark.
# Logs go to $OUT (default ./out); a summary is printed last.
#
#   scripts/gpu-check.sh [steps...]     steps: sass gemm runtime layer selftest comm bench naive compare
#                                       (default: all of them)
# Environment: BIN (default build/bin; built with scripts/build.sh when missing), GPUS (default: all),
#   PRESETS (default dsv4-flash,dsv4-pro,dsv3), TOKENS (default 1,64,512,1024,2048,4096,8192),
#   ITERS (default 30), GTEST_FILTER (optional, for the test binaries).
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-$root/out}
mkdir -p "$OUT"
BIN=${BIN:-build/bin}
[ -x "$BIN/megamoe" ] || ./scripts/build.sh
GPUS=${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
PRESETS=${PRESETS:-dsv4-flash,dsv4-pro,dsv3}
TOKENS=${TOKENS:-1,64,512,1024,2048,4096,8192}
ITERS=${ITERS:-30}
steps=${*:-sass gemm runtime layer selftest comm bench naive compare}
summary=()
filter=()
[ -n "${GTEST_FILTER:-}" ] && filter=(--gtest_filter="$GTEST_FILTER")

step() {  # step NAME TIMEOUT_S COMMAND...: runs, logs to $OUT/NAME.log, records the outcome
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo "=== $name: $*" | tee "$OUT/$name.log"
  timeout --kill-after=10 "$limit" "$@" >>"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$OUT/$name.log"
  summary+=("$(printf '%-9s rc=%-3s %4ss  %s' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$([ $rc = 0 ] && echo ok || echo FAILED)")")
  return 0
}

{ date -u; nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv; } > "$OUT/machine.txt" 2>&1
for s in $steps; do
  case $s in
    sass)
      # The GEMMs must run on the tensor cores through wgmma: HGMMA in the SASS.
      step sass 120 bash -c "cuobjdump -sass $BIN/megamoe | grep -c HGMMA | tee /dev/stderr | awk '{exit !(\$1 > 0)}'" ;;
    gemm) MEGAMOE_TEST_GPUS=$GPUS step gemm 300 "$BIN/test_gpu_gemm" "${filter[@]}" ;;
    runtime) MEGAMOE_TEST_GPUS=$GPUS step runtime 400 "$BIN/test_gpu_runtime" "${filter[@]}" ;;
    layer) MEGAMOE_TEST_GPUS=$GPUS step layer 500 "$BIN/test_gpu_layer" "${filter[@]}" ;;
    selftest)
      if [ "$GPUS" -ge 2 ]; then
        # Must fail, within the timeout, naming the rank that never arrived.
        step selftest 60 bash -c "! $BIN/megamoe selftest --gpus $GPUS --skip-barrier-rank $((GPUS - 1)) --timeout 2 && grep -q 'waiting for rank $((GPUS - 1))' '$OUT/selftest.log'"
      fi ;;
    comm) step comm 120 "$BIN/megamoe" bench --comm --gpus "$GPUS" ;;
    bench) step bench 400 "$BIN/megamoe" bench --gpus "$GPUS" --preset "$PRESETS" --tokens "$TOKENS" --iters "$ITERS" --stages --json "$OUT/bench.jsonl" ;;
    naive)
      for p in ${PRESETS//,/ }; do
        step "naive-$p" 200 python3 -m torch.distributed.run --standalone --nproc_per_node "$GPUS" bench/naive_ep.py --preset "$p" --tokens "$TOKENS" --json "$OUT/bench.jsonl"
      done ;;
    compare) step compare 30 python3 bench/compare.py "$OUT/bench.jsonl" ;;
    *) echo "unknown step $s"; exit 2 ;;
  esac
done
echo
echo "=== summary ($GPUS GPUs, $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(date -u +%F))"
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
