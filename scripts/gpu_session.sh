#!/usr/bin/env bash
# One H100 session, in ~9 minutes: build the CUDA extension, run the GPU test lane, run
# compute-sanitizer on the small sanitizer subsets, run the benchmarks, print a short table.
#
#   bash scripts/gpu_session.sh            # on the GPU machine, from anywhere in the checkout
#
# Everything goes to $OUT (default out/gpu-session), in few files:
#   session.log     build, backends, nvidia-smi, tests, sanitizers (full output)
#   bench.log       python -m benchmarks output
#   bench/results.json, bench/results.md, bench/summary.png
# Knobs (environment): SESSION_BUDGET_S (540), BENCH_ARGS ("all"), SKIP_BUILD=1, SKIP_TESTS=1,
# SKIP_SANITIZERS=1, SKIP_BENCH=1, TESTS_TIMEOUT_S (400), SANITIZER_TIMEOUT_S (120).
#
# A device command may run 10 minutes, so a first session splits the work in three calls
# made back to back (the machine stays warm, and with it the build):
#   SKIP_SANITIZERS=1 SKIP_BENCH=1 bash scripts/gpu_session.sh             # build, GPU tests
#   SKIP_BUILD=1 SKIP_TESTS=1 SKIP_BENCH=1 bash scripts/gpu_session.sh     # sanitizers
#   SKIP_BUILD=1 SKIP_TESTS=1 SKIP_SANITIZERS=1 bash scripts/gpu_session.sh   # benchmarks
set -u -o pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-out/gpu-session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST="9.0a"
# A failed build must fail the tests, not skip the CUDA lane.
export LLMKERNELS_EXPECT_EXTENSION=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
SESSION_BUDGET_S=${SESSION_BUDGET_S:-540}
BENCH_ARGS=${BENCH_ARGS:-all}
LOG="$OUT/session.log"
: >"$LOG"
SUMMARY=()

stage() { echo "=== [$SECONDS s] $*" | tee -a "$LOG"; }
record() { SUMMARY+=("$(printf '%-28s %s' "$1" "$2")"); }

# ---- compute-sanitizer runs, one per entry: "<tool>|<arguments after --tool TOOL>".
# Each test file keeps a small sanitizer subset (tiny shapes): the sanitizers slow kernels
# down 10-100x. --kernel-name limits checking to our kernels (namespace llmkernels for
# LayerNorm/GELU; every attention kernel's name contains "attention").
NORM_GELU_SUBSET="--kernel-name kns=llmkernels python3 -m pytest tests/test_cuda_norm_gelu.py -q -x -p no:cacheprovider -k sanitizer_subset"
ATTENTION_SUBSET="--kernel-name kns=attention env LLMKERNELS_SANITIZER_SWEEP=1 python3 -m pytest tests/test_cuda_attention.py -q -x -p no:cacheprovider -k reference_sweep"
SANITIZER_RUNS=(
  "memcheck|$NORM_GELU_SUBSET"
  "racecheck|$NORM_GELU_SUBSET"
  "memcheck|$ATTENTION_SUBSET"
  "racecheck|$ATTENTION_SUBSET"
)

stage "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1 | tee -a "$LOG"

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  stage "build: pip install --no-build-isolation --no-deps -e ."
  python3 -m pip install --no-build-isolation --no-deps -e . >>"$LOG" 2>&1
  rc=$?; record "build" "rc=$rc ($SECONDS s)"
  [ $rc -ne 0 ] && tail -25 "$LOG"
fi
stage "backends"
python3 -c "import llmkernels; print(llmkernels.available_backends())" 2>&1 | tee -a "$LOG"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  stage "tests: pytest tests -q --maxfail=25"
  timeout "${TESTS_TIMEOUT_S:-400}" python3 -m pytest tests -q --maxfail=25 -p no:cacheprovider >"$OUT/tests.tmp" 2>&1
  rc=$?
  cat "$OUT/tests.tmp" >>"$LOG"
  tail -15 "$OUT/tests.tmp"
  record "tests" "rc=$rc: $(grep -E '(passed|failed|error)' "$OUT/tests.tmp" | tail -1)"
  rm -f "$OUT/tests.tmp"
fi

if [ "${SKIP_SANITIZERS:-0}" != 1 ]; then
  stage "sanitizers (${#SANITIZER_RUNS[@]} runs)"
  for entry in "${SANITIZER_RUNS[@]}"; do
    tool=${entry%%|*}
    command=${entry#*|}
    echo "--- compute-sanitizer --tool $tool $command" | tee -a "$LOG"
    # Without the caching allocator every tensor is its own allocation, so memcheck sees
    # an out-of-bounds access that would otherwise land inside a pooled block.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${SANITIZER_TIMEOUT_S:-120}" \
      compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 20 $command >"$OUT/sanitizer.tmp" 2>&1
    rc=$?
    cat "$OUT/sanitizer.tmp" >>"$LOG"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$OUT/sanitizer.tmp" | tail -3
    record "sanitizer $tool" "rc=$rc: $command"
    rm -f "$OUT/sanitizer.tmp"
  done
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  # The benchmarks get what is left of the session, less time to write their outputs; the
  # command skips (and records) the cases that would start past the budget.
  bench_budget=$((SESSION_BUDGET_S - SECONDS - 40))
  [ $bench_budget -lt 60 ] && bench_budget=60
  stage "benchmarks: python -m benchmarks $BENCH_ARGS (time budget ${bench_budget} s)"
  # shellcheck disable=SC2086
  timeout $((bench_budget + 60)) python3 -m benchmarks $BENCH_ARGS --out "$OUT/bench" --time-budget "$bench_budget" \
    >"$OUT/bench.log" 2>&1
  rc=$?
  record "benchmarks" "rc=$rc ($SECONDS s); skipped for time: $(grep -o '"skipped": "time budget[^"]*"' "$OUT/bench/results.json" 2>/dev/null | wc -l) measurements"
  [ $rc -ne 0 ] && tail -30 "$OUT/bench.log"
fi

stage "done"
grep -A3 "^## Anchors" "$OUT/bench/results.md" 2>/dev/null | sed -n 3p
echo
sed -n '/^## Headline/,/^### /p' "$OUT/bench/results.md" 2>/dev/null | sed '$d'
echo
printf '%s\n' "${SUMMARY[@]}"
