#!/usr/bin/env bash
# Everything that needs a GPU, in one run: the GPU test suites over NCCL (one process per GPU) and over
# the loopback transport (W ranks on one GPU), the stress run, the sanitizers, the SASS check, the
# refactor fingerprint, the Python package's tests and example, the benchmarks (ours, the naive
# PyTorch layers, our PyTorch op, the card's ceilings) and their comparison. A summary is printed
# last; logs go to $OUT (default ./out): summary.txt, all.log (every step's log, appended as it ends),
# bench.jsonl and logs.tar.gz (the same logs, one file a step).
#
#   scripts/gpu-check.sh [steps...]
#     steps: machine ceilings sass gemm runtime layer layer-fused stress sanitize selftest golden python example
#            python-dist example-dist comm stream bench naive op-bench compare   (default: all of them, in that
#            order; python-dist and example-dist run under torchrun and only with 2 or more GPUs;
#            `profile` (Nsight Compute on the grouped GEMMs) and `profile-source` (their warp samples
#            by source line) run only when named;
#            op-bench times torch.ops.megamoe.forward as bench times the C++ layer, and compare puts
#            the two side by side)
# Environment:
#   BIN (default build/bin; built with scripts/build.sh when missing), LIB (default build/lib)
#   OLD_BIN          a build of an earlier version (golden, bench-old: same run, both builds)
#   GPUS             GPUs for the NCCL runs (default: all)
#   LOOPBACK_RANKS   loopback rank counts (default "1 2 3 4 8"; set but empty: none, the NCCL run only)
#   FUSED_LOOPBACK_RANKS  the same for layer-fused: the layer suite with MEGAMOE_IMPL=fused (default "2 3 4")
#   FUSED_POOL_ROWS  the fused forward's pools layer-fused runs with (MEGAMOE_POOL_ROWS; default "0 256":
#                    the default pool, compact_pool_rows, which at the tests' shapes is the worst case
#                    below 4 ranks and windows from 4 ranks on, and windows of 256 rows)
#   IMPLS            the forward implementations bench times, one table each (default staged,fused)
#   STRESS_STEPS     forwards of the stress run at W = 4 (default 10000)
#   SANITIZE_TOOLS (default "memcheck racecheck synccheck initcheck"), SANITIZE_RANKS (default 2),
#   SANITIZE_FILTER (default the tiny-shape layer tests), SANITIZE_TIMEOUT (s per tool, default 300),
#   SANITIZE_BARRIER_TIMEOUT_S (the layer's waits for peers under the sanitizers, default 30),
#   SANITIZE_IMPLS (default "staged fused fused-pool256"), SANITIZE_REPEAT (runs of each, default 1:
#   a hang seen in a few runs in a hundred needs many)
#   MAX_STEP_S       caps every step's time limit (a first run on a new machine, a short budget)
#   HANG_DUMP_S      a step still running this many seconds before its limit gets its processes'
#                    threads (state, kernel wait channel) and our programs' host backtraces (cuda-gdb,
#                    else gdb) written into its log before the limit stops it (default: no dump)
#   PRESETS (default dsv4-flash,dsv4-pro,dsv3), TOKENS (default 1,64,512,1024,2048,4096,8192),
#   DTYPES (default "fp8 bf16"), ITERS (default 30), EXPERTS_dsv4_flash etc. (default: the experts of
#   one rank of EP 4 on one GPU: 64, 96, 64), GTEST_FILTER (optional, for the test binaries),
#   PROFILE_TOKENS   tokens of the profile steps (default 64)
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
source scripts/env.sh
OUT=${OUT:-$root/out}
mkdir -p "$OUT/logs"
: > "$OUT/summary.txt"
: > "$OUT/all.log"
BIN=${BIN:-build/bin}
LIB=${LIB:-build/lib}
[ -x "$BIN/megamoe" ] || ./scripts/build.sh
GPUS=${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
LOOPBACK_RANKS=${LOOPBACK_RANKS-1 2 3 4 8}
STRESS_STEPS=${STRESS_STEPS:-10000}
PRESETS=${PRESETS:-dsv4-flash,dsv4-pro,dsv3}
TOKENS=${TOKENS:-1,64,512,1024,2048,4096,8192}
DTYPES=${DTYPES:-fp8 bf16}
ITERS=${ITERS:-30}
steps=${*:-machine ceilings sass gemm runtime layer layer-fused stress sanitize selftest golden python example python-dist example-dist comm stream bench naive op-bench compare}
summary=()
filter=()
[ -n "${GTEST_FILTER:-}" ] && filter=(--gtest_filter="$GTEST_FILTER")

dump_processes() {  # dump_processes PGID: a step's processes as it nears its limit (HANG_DUMP_S)
  echo "=== still running $HANG_DUMP_S s before the step's limit: its processes and threads"
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
  local p t debugger
  debugger=$(command -v cuda-gdb || command -v gdb)
  for p in $(pgrep -g "$1"); do
    echo "--- pid $p: $(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | cut -c1-200)"
    for t in /proc/"$p"/task/*; do
      echo "  thread ${t##*/} $(cat "$t/comm" 2>/dev/null) state $(awk '{print $3}' "$t/stat" 2>/dev/null) wchan $(cat "$t/wchan" 2>/dev/null)"
    done
    # The host backtraces of our programs (not of the sanitizer or of timeout around them). Under
    # compute-sanitizer cuda-gdb cannot reach the GPU ("Could not find CUDA Debugger back-end"): it
    # prints the host backtraces, then its attach ends the process (the step fails with rc 11 at
    # the dump, not at its limit). 40 frames: under the sanitizer a test's own frames start ~20 below
    # the driver's.
    case "$(cat "/proc/$p/comm" 2>/dev/null)" in
      test_gpu_*|megamoe|golden_forward|python*)
        [ -n "$debugger" ] && timeout 60 "$debugger" -p "$p" -batch -ex "set pagination off" -ex "thread apply all bt 40" \
          2>&1 | grep -E "^Thread|^#" | head -600 ;;
    esac
  done
}

step() {  # step NAME TIMEOUT_S COMMAND...: runs, logs to $OUT/logs/NAME.log (+ all.log), records the outcome
  local name=$1 limit=$2; shift 2
  [ -n "${MAX_STEP_S:-}" ] && [ "$limit" -gt "$MAX_STEP_S" ] && limit=$MAX_STEP_S
  local t0=$(date +%s)
  echo "=== $name: $*" | tee "$OUT/logs/$name.log"
  # timeout runs the step in a process group of its own (its pid's) and stops the whole group.
  timeout --kill-after=10 "$limit" "$@" >>"$OUT/logs/$name.log" 2>&1 &
  local pid=$!
  if [ -n "${HANG_DUMP_S:-}" ] && [ "$limit" -gt "$HANG_DUMP_S" ]; then
    while kill -0 "$pid" 2>/dev/null && [ $(( $(date +%s) - t0 )) -lt $(( limit - HANG_DUMP_S )) ]; do sleep 1; done
    kill -0 "$pid" 2>/dev/null && dump_processes "$pid" >>"$OUT/logs/$name.log" 2>&1
  fi
  wait "$pid"
  local rc=$?
  tail -n 25 "$OUT/logs/$name.log"
  cat "$OUT/logs/$name.log" >> "$OUT/all.log"  # one file that comes back even if the run is cut short
  local line
  line=$(printf '%-22s rc=%-3s %4ss  %s' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$([ $rc = 0 ] && echo ok || echo FAILED)")
  summary+=("$line")
  echo "$line" >> "$OUT/summary.txt"
  return 0
}

experts_of() {  # one rank's share of EP 4 on one GPU
  case $1 in dsv4-flash) echo "${EXPERTS_dsv4_flash:-64}" ;; dsv4-pro) echo "${EXPERTS_dsv4_pro:-96}" ;;
             dsv3) echo "${EXPERTS_dsv3:-64}" ;; *) echo 0 ;; esac
}
experts_flag() { [ "$GPUS" = 1 ] && [ "$(experts_of "$1")" != 0 ] && echo "--experts $(experts_of "$1")"; }

for s in $steps; do
  case $s in
    machine)
      step machine 60 bash -c "date -u; nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv; python3 -c 'import torch; print(torch.__version__)'" ;;
    ceilings) step ceilings 120 python3 bench/ceilings.py ;;
    sass)
      # The GEMMs must run on the tensor cores through wgmma: bf16 HGMMA and fp8 (E4M3) GMMA in the SASS.
      step sass 120 bash -c "cuobjdump -sass $LIB/libmegamoe.so | grep -oE '[HQ]GMMA\.[0-9x]+\.F32\.[A-Z0-9.]+' | sort | uniq -c | tee /dev/stderr | grep -q BF16 && cuobjdump -sass $LIB/libmegamoe.so | grep -qE 'GMMA.*E4M3'"
      # Per kernel: instructions, spills, and spills and R2UR moves inside its wgmma loops; fails if a
      # grouped GEMM spills inside one (scripts/sass_check.py).
      step sass-loops 120 python3 scripts/sass_check.py "$LIB/libmegamoe.so" ;;
    gemm) step gemm 300 env MEGAMOE_TEST_RANKS=1 "$BIN/test_gpu_gemm" "${filter[@]}" ;;
    runtime|layer)
      limit=$([ $s = layer ] && echo 500 || echo 300)
      step "$s-nccl-$GPUS" "$limit" env MEGAMOE_TEST_GPUS="$GPUS" "$BIN/test_gpu_$s" "${filter[@]}"
      for w in $LOOPBACK_RANKS; do
        step "$s-loopback-$w" "$limit" env MEGAMOE_TEST_RANKS="$w" "$BIN/test_gpu_$s" "${filter[@]}"
      done ;;
    layer-fused)
      # Every layer test again with the whole forward in one persistent kernel (LayerOptions::impl),
      # with its default pool and with a 256-row pool (MEGAMOE_POOL_ROWS: FC1 and FC2 in windows).
      for pool in ${FUSED_POOL_ROWS:-0 256}; do
        tag=$([ "$pool" = 0 ] && echo "" || echo "-pool$pool")
        step "layer-fused$tag-nccl-$GPUS" 500 env MEGAMOE_IMPL=fused MEGAMOE_POOL_ROWS="$pool" MEGAMOE_TEST_GPUS="$GPUS" \
          "$BIN/test_gpu_layer" "${filter[@]}"
        for w in ${FUSED_LOOPBACK_RANKS-2 3 4}; do
          step "layer-fused$tag-loopback-$w" 500 env MEGAMOE_IMPL=fused MEGAMOE_POOL_ROWS="$pool" MEGAMOE_TEST_RANKS="$w" \
            "$BIN/test_gpu_layer" "${filter[@]}"
        done
      done ;;
    stress)
      step stress-loopback-4 500 env MEGAMOE_TEST_RANKS=4 MEGAMOE_STRESS_STEPS="$STRESS_STEPS" "$BIN/test_gpu_layer" --gtest_filter='Stress.*' ;;
    sanitize)
      # The tiny-shape layer tests at W = 2 on the loopback transport (ncclMemAlloc is not permitted
      # under the sanitizer on these machines); every tool must report 0 errors.
      # Both forward implementations, the fused one also with a 256-row pool (windows).
      for impl in ${SANITIZE_IMPLS:-staged fused fused-pool256}; do
        for tool in ${SANITIZE_TOOLS:-memcheck racecheck synccheck initcheck}; do
          pool=$([ $impl = fused-pool256 ] && echo 256 || echo 0)
          for run in $(seq "${SANITIZE_REPEAT:-1}"); do
            step "sanitize-$impl-$tool$([ "${SANITIZE_REPEAT:-1}" -gt 1 ] && echo "-$run")" "${SANITIZE_TIMEOUT:-300}" \
              env MEGAMOE_IMPL=${impl%-pool256} MEGAMOE_POOL_ROWS=$pool MEGAMOE_TEST_RANKS="${SANITIZE_RANKS:-2}" \
              MEGAMOE_BARRIER_TIMEOUT_S="${SANITIZE_BARRIER_TIMEOUT_S:-30}" compute-sanitizer --tool "$tool" --error-exitcode 1 \
              "$BIN/test_gpu_layer" --gtest_filter="${SANITIZE_FILTER:-Layer*.Tiny*:Layer*.Deterministic*}"
          done
        done
      done ;;
    selftest)
      if [ "$GPUS" -ge 2 ]; then
        # Must fail, within the timeout, naming the rank that never arrived.
        step selftest 60 bash -c "! $BIN/megamoe selftest --gpus $GPUS --skip-barrier-rank $((GPUS - 1)) --timeout 2 && grep -q 'waiting for rank $((GPUS - 1))' '$OUT/logs/selftest.log'"
      fi ;;
    golden)
      # The BF16 layer's output on fixed inputs, from an earlier build and this one: identical lines.
      if [ -n "${OLD_BIN:-}" ]; then
        step golden 300 bash -c "$OLD_BIN/golden_forward > $OUT/logs/golden-old.txt && $BIN/golden_forward > $OUT/logs/golden-new.txt && diff $OUT/logs/golden-old.txt $OUT/logs/golden-new.txt && wc -l < $OUT/logs/golden-new.txt"
      fi ;;
    python)
      step python 600 env MEGAMOE_LIBRARY="$LIB/libmegamoe.so" MEGAMOE_REQUIRE_LIBRARY=1 MEGAMOE_REQUIRE_GPU=1 \
        PYTHONPATH=python python3 -m pytest -v -rs python/tests ;;  # -v: every test and its result, for docs/GPU-RUNS.md
    example)
      step example 300 env MEGAMOE_LIBRARY="$LIB/libmegamoe.so" PYTHONPATH=python python3 examples/deepseek_moe_block.py ;;
    python-dist)  # the PyTorch layer across GPUs: one process per GPU under torchrun, the op joins the group
      [ "$GPUS" -ge 2 ] && step "python-dist-$GPUS" 400 env MEGAMOE_LIBRARY="$LIB/libmegamoe.so" MEGAMOE_REQUIRE_LIBRARY=1 \
        MEGAMOE_REQUIRE_GPU=1 PYTHONPATH=python python3 -m torch.distributed.run --standalone --nproc_per_node "$GPUS" \
        -m pytest -v -p no:cacheprovider python/tests/test_torch_distributed.py ;;
    example-dist)
      [ "$GPUS" -ge 2 ] && step "example-dist-$GPUS" 300 env MEGAMOE_LIBRARY="$LIB/libmegamoe.so" PYTHONPATH=python \
        python3 -m torch.distributed.run --standalone --nproc_per_node "$GPUS" examples/deepseek_moe_block.py ;;
    comm) step comm 120 "$BIN/megamoe" bench --comm --gpus "$GPUS" ;;
    stream) step stream 60 "$BIN/megamoe" bench --stream ;;
    bench)
      for p in ${PRESETS//,/ }; do
        for d in $DTYPES; do
          step "bench-$p-$d" 400 "$BIN/megamoe" bench --gpus "$GPUS" --preset "$p" $(experts_flag "$p") --dtype "$d" \
            --tokens "$TOKENS" --iters "$ITERS" --stages --impl "${IMPLS:-staged,fused}" --json "$OUT/bench.jsonl"
        done
        if [ -n "${OLD_BIN:-}" ]; then  # the earlier build, same run (it knows bf16 only and no JSON variant)
          step "bench-$p-bf16-old" 400 "$OLD_BIN/megamoe" bench --gpus "$GPUS" --preset "$p" $(experts_flag "$p") \
            --tokens "$TOKENS" --iters "$ITERS"
        fi
      done ;;
    naive)
      for p in ${PRESETS//,/ }; do
        for d in $DTYPES; do
          step "naive-$p-$d" 300 python3 -m torch.distributed.run --standalone --nproc_per_node "$GPUS" bench/naive_ep.py \
            --preset "$p" $(experts_flag "$p") --dtype "$d" --tokens "$TOKENS" --json "$OUT/bench.jsonl"
        done
      done ;;
    op-bench)
      # The same layer through the PyTorch op, same shapes and iterations as bench: the op's latency
      # under graph replay should equal bench's (compare: "op / C++"); eager is reported beside it.
      for p in ${PRESETS//,/ }; do
        for d in $DTYPES; do
          step "op-bench-$p-$d" 300 env MEGAMOE_LIBRARY="$LIB/libmegamoe.so" PYTHONPATH=python \
            python3 -m torch.distributed.run --standalone --nproc_per_node "$GPUS" bench/op_bench.py \
            --preset "$p" $(experts_flag "$p") --dtype "$d" --tokens "$TOKENS" --iters "$ITERS" --json "$OUT/bench.jsonl"
        done
      done ;;
    compare) step compare 30 python3 bench/compare.py "$OUT/bench.jsonl" ;;
    profile)
      # Not in the default list: Nsight Compute on the grouped GEMMs (FC1, FC2) of one rank's share of
      # EP 4 at PROFILE_TOKENS, FP8 and BF16, the sections that say what bounds a kernel (throughput,
      # memory, warp stalls, issue). Text in profile-<dtype>.log; reports in $OUT/*.ncu-rep.
      for d in $DTYPES; do
        step "profile-$d" 300 ncu --target-processes all -k regex:grouped_gemm_kernel --launch-skip 8 --launch-count 4 \
          --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
          --section WarpStateStats --section SchedulerStats --section LaunchStats --section Occupancy \
          -f -o "$OUT/profile-$d" "$BIN/megamoe" bench --gpus 1 --preset dsv4-flash --experts 64 --dtype "$d" \
          --tokens "${PROFILE_TOKENS:-64}" --iters 2
        step "profile-$d-text" 60 ncu --import "$OUT/profile-$d.ncu-rep" --page details
      done ;;
    profile-source)
      # Not in the default list: where the grouped GEMMs' warps wait, by source line (Nsight Compute's
      # warp-state samples with the sources imported, summarised by bench/ncu_source_summary.py), for
      # the staged FP8 and BF16 GEMMs at PROFILE_TOKENS. Reports in $OUT/source-<dtype>.ncu-rep.
      for d in $DTYPES; do
        step "profile-source-$d" 300 ncu --target-processes all -k regex:grouped_gemm_kernel --launch-skip 8 \
          --launch-count 2 --set full --import-source yes -f -o "$OUT/source-$d" "$BIN/megamoe" bench --gpus 1 \
          --preset dsv4-flash --experts 64 --dtype "$d" --tokens "${PROFILE_TOKENS:-64}" --iters 2 --impl staged
        step "profile-source-$d-lines" 120 bash -c "ncu --import '$OUT/source-$d.ncu-rep' --page source --csv \
          --print-source cuda,sass > '$OUT/source-$d.csv' && python3 bench/ncu_source_summary.py '$OUT/source-$d.csv'"
      done ;;
    *) echo "unknown step $s"; exit 2 ;;
  esac
done
echo
echo "=== summary ($GPUS GPUs, $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(date -u +%F))"
printf '%s\n' "${summary[@]}"
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$OUT/logs"
