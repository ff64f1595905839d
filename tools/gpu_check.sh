#!/usr/bin/env bash
# GPU check of quamba-kernels. Runs ON the GPU machine from the repository root:
#   1. builds the kernels (pip --target /tmp/qk; scikit-build-core, nanobind, cmake, ninja, torch
#      and pytest must be installed there; no network needed);
#   2. runs the GPU parity tests (pytest -m gpu) of packages/quamba-kernels/tests;
#   3. runs the benchmarks at Mamba-2.8B shapes (kernels; GEMMs; end-to-end FP16 vs W8A8);
#   4. runs compute-sanitizer memcheck and racecheck on a small sweep of every kernel;
# and prints a compact summary table last. Full logs go to $OUT (default /tmp/gpu_check).
#
# Options (environment): SKIP_TESTS=1, SKIP_SANITIZER=1, SKIP_BENCH=1, SKIP_GEMM_BENCH=1,
# SKIP_E2E=1, SKIP_EVAL_SPEED=1, PROBE=1 (also run tools/bench/persistent_decode_probe.py),
# COSTS=1 (also run tools/bench/model_costs.py, COSTS_ARGS: each kernel's time in the prefill or,
# with --phase decode or both, in a decode step), PERSISTENT=1 (also run
# tools/bench/persistent_decode.py, PERSISTENT_ARGS: the persistent decode kernel against the
# per-op decode step, and its phases),
# PYTEST_ARGS="-x", PYTEST_K="conv or scan" (a -k expression),
# BENCH_ARGS=--quick, GEMM_BENCH_ARGS,
# E2E_ARGS ("--sizes 2.8b"), BUDGET_S (default 440): stages that would start after it are skipped.
# The whole set takes longer than one 10-minute device call: split it with the SKIP_* options.
# QUAMBA_CUDA_ARCHS (default 90) picks what is built; QUAMBA_CUDA_ARCHS=80-virtual SKIP_BENCH=1 ...
# runs the code paths of sm_80 / sm_86 / sm_89 on a Hopper GPU (compute_80 PTX, JIT-compiled by
# the driver: no programmatic launch, no wgmma GEMM), e.g. with SKIP_E2E=1 SKIP_SANITIZER=1.
set -uo pipefail
T0=$(date +%s)
BUDGET_S="${BUDGET_S:-440}"
left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }
# A benchmark stage: runs "$@" (within the time left) into $OUT/LOG.log and sets status_NAME;
# on failure prints the log's last TAIL lines. Usage: run_stage NAME LOG TAIL COMMAND...
run_stage() {
  local name=$1 log="$OUT/$2.log" tail_lines=$3 start
  shift 3
  start=$(date +%s)
  if timeout $(( $(left) - 20 )) "$@" >"$log" 2>&1; then
    printf -v "status_$name" 'ok (%s s)' "$(( $(date +%s) - start ))"
  else
    printf -v "status_$name" 'FAILED'
    tail -"$tail_lines" "$log"
  fi
}

OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
status_build="skipped" status_tests="skipped" status_memcheck="skipped" status_racecheck="skipped"
status_bench="skipped" status_eval_speed="skipped" tests_summary=""
status_gemm_bench="skipped" status_e2e="skipped" status_probe="skipped" status_costs="skipped"
status_persistent="skipped"

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  nvcc --version | tail -2
  "$PYTHON" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__)'
  "$PYTHON" tools/bench/provenance.py  # the digest of the sources checked (matches the JSON files)
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# ---- 1. build ----
start=$(date +%s)
rm -rf /tmp/qk
if QUAMBA_CUDA_ARCHS="${QUAMBA_CUDA_ARCHS:-90}" QUAMBA_KERNELS_REQUIRE_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
  "$PYTHON" -m pip install --no-build-isolation --no-deps --target /tmp/qk packages/quamba-kernels \
  >"$OUT/build.log" 2>&1; then
  status_build="ok ($(( $(date +%s) - start )) s)"
else
  status_build="FAILED"
  tail -60 "$OUT/build.log"
fi
export PYTHONPATH="/tmp/qk:packages/quamba-layers/src:packages/quamba-modes/src:packages/quamba-eval/src:packages/quamba-compat/src"
export OUT

if [[ "$status_build" != "FAILED" ]]; then
  "$PYTHON" -c 'import quamba_kernels as q; print(q.build_info())' 2>&1 | tee -a "$OUT/env.txt"

  # ---- 2. GPU parity tests ----
  if [[ "${SKIP_TESTS:-0}" != "1" ]]; then
    start=$(date +%s)
    # -s shows the statistics printed by the last test (tie counts, fast-scan error ratios).
    timeout $(( $(left) - 30 )) "$PYTHON" -m pytest -m gpu -q -s -p no:cacheprovider ${PYTEST_ARGS:-} \
      ${PYTEST_K:+-k "$PYTEST_K"} \
      packages/quamba-kernels/tests packages/quamba-layers/tests packages/quamba-modes/tests \
      >"$OUT/pytest.log" 2>&1
    rc=$?
    tests_summary="$(grep -E '^[0-9]+ (passed|failed)|passed|failed' "$OUT/pytest.log" | tail -1)"
    if [[ $rc -eq 0 ]]; then status_tests="ok"; else status_tests="FAILED (rc $rc)"; fi
    status_tests="$status_tests ($(( $(date +%s) - start )) s): $tests_summary"
    grep -E '^(FAILED|ERROR)|Error' "$OUT/pytest.log" | head -40
    grep -E 'INT8 code comparisons|fast scan|2-1 vs 0' "$OUT/pytest.log" | tail -40
  fi

  # ---- 2b. evaluation speed: full lambada_openai, Mode 0 vs the simulation modes ----
  GPU_DATA="${GPU_DATA:-.gpu_data}"
  if [[ "${SKIP_EVAL_SPEED:-0}" != "1" && -f "$GPU_DATA/lambada_test.jsonl" && $(left) -gt 120 ]]; then
    start=$(date +%s)
    if timeout $(( $(left) - 60 )) "$PYTHON" tools/bench/eval_speed.py --data "$GPU_DATA/lambada_test.jsonl" \
        --tokenizer "$GPU_DATA/tokenizer.json" ${EVAL_SPEED_ARGS:-} >"$OUT/eval_speed.log" 2>&1; then
      status_eval_speed="ok ($(( $(date +%s) - start )) s)"
    else
      status_eval_speed="FAILED"; tail -20 "$OUT/eval_speed.log"
    fi
  fi

  # ---- 3. benchmarks ----
  if [[ "${SKIP_BENCH:-0}" != "1" && $(left) -gt 60 ]]; then
    start=$(date +%s)
    if timeout $(( $(left) - 20 )) "$PYTHON" tools/bench/bench_kernels.py ${BENCH_ARGS:-} >"$OUT/bench.log" 2>&1; then
      status_bench="ok ($(( $(date +%s) - start )) s)"
    else
      status_bench="FAILED"; tail -30 "$OUT/bench.log"
    fi
  fi
  if [[ "${SKIP_GEMM_BENCH:-0}" != "1" && $(left) -gt 60 ]]; then
    run_stage gemm_bench bench_gemm 30 "$PYTHON" tools/bench/bench_gemm.py ${GEMM_BENCH_ARGS:-}
  fi
  if [[ "${SKIP_E2E:-0}" != "1" && $(left) -gt 90 ]]; then
    run_stage e2e e2e 30 "$PYTHON" tools/bench/e2e.py ${E2E_ARGS:-}
  fi
  if [[ "${PROBE:-0}" == "1" && $(left) -gt 60 ]]; then
    run_stage probe probe 20 "$PYTHON" tools/bench/persistent_decode_probe.py
  fi
  if [[ "${COSTS:-0}" == "1" && $(left) -gt 60 ]]; then
    run_stage costs costs 20 "$PYTHON" tools/bench/model_costs.py ${COSTS_ARGS:-}
  fi
  if [[ "${PERSISTENT:-0}" == "1" && $(left) -gt 60 ]]; then
    run_stage persistent persistent_decode 20 "$PYTHON" tools/bench/persistent_decode.py \
      ${PERSISTENT_ARGS:-}
  fi
  # ---- 4. compute-sanitizer on a small sweep ----
  if [[ "${SKIP_SANITIZER:-0}" != "1" ]] && command -v compute-sanitizer >/dev/null; then
    for tool in memcheck racecheck; do
      [[ $(left) -gt 45 ]] || continue
      start=$(date +%s)
      { timeout $(( $(left) - 15 )) compute-sanitizer --tool "$tool" --error-exitcode 99 \
          "$PYTHON" tools/bench/bench_kernels.py --sweep \
        && timeout $(( $(left) - 10 )) compute-sanitizer --tool "$tool" --error-exitcode 99 \
          "$PYTHON" tools/bench/bench_gemm.py --sweep; } >"$OUT/sanitizer_$tool.log" 2>&1
      rc=$?
      summary="$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer_$tool.log" | tail -1)"
      if [[ $rc -eq 0 ]]; then result="ok"; else result="FAILED (rc $rc)"; tail -30 "$OUT/sanitizer_$tool.log"; fi
      printf -v "status_$tool" '%s' "$result ($(( $(date +%s) - start )) s) $summary"
    done
  fi

fi

echo
echo "================ quamba-kernels GPU check ================"
[[ -f "$OUT/bench.log" ]] && sed -n '/device-to-device copy/,$p' "$OUT/bench.log"
[[ -f "$OUT/eval_speed.log" ]] && grep -A12 '^lambada_openai' "$OUT/eval_speed.log"
[[ -f "$OUT/bench_gemm.log" ]] && sed -n '/device-to-device copy/,$p' "$OUT/bench_gemm.log"
[[ -f "$OUT/e2e.log" ]] && sed -n '/^model /,$p' "$OUT/e2e.log"
[[ -f "$OUT/probe.log" ]] && cat "$OUT/probe.log"
[[ -f "$OUT/costs.log" ]] && cat "$OUT/costs.log"
[[ -f "$OUT/persistent_decode.log" ]] && cat "$OUT/persistent_decode.log"
printf '%-10s %s\n' build "$status_build" tests "$status_tests" memcheck "$status_memcheck" \
  racecheck "$status_racecheck" bench "$status_bench" gemm_bench "$status_gemm_bench" \
  e2e "$status_e2e" eval_speed "$status_eval_speed" probe "$status_probe" costs "$status_costs" \
  persistent "$status_persistent"
[[ "$status_build" == "FAILED" || "$status_tests" == FAILED* ]] && exit 1
exit 0
