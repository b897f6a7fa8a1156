#!/usr/bin/env bash
# One-command GPU verification for fastconv: on a fresh GPU machine with torch and triton installed,
#   bash scripts/gpu_check.sh
# builds the C++/CUDA extension (when this checkout has one), runs the whole test suite (CUDA-backend numerics
# and gpu-marked tests included), the benchmark suite (quick set), a torch.profiler trace of CIFAR10CNN
# training steps and the kernel report, and leaves every log and artefact in gpu_check_out/<UTC timestamp>/,
# ending with a summary table (step, status, seconds, artefact). Budget: 10 minutes on one H100; every step
# has its own timeout (GPU_CHECK_TIMEOUT_<STEP> overrides, in seconds), capped by what is left of the overall
# budget (GPU_CHECK_BUDGET, default 570 s); the kernel report compiles on the CPU in the background meanwhile.
#
# Without a GPU it says so, skips the GPU-only steps with the reason, still runs what a CPU can (build, a tiny
# CPU benchmark run, the profiler run on CPU, the kernel report for sm_80/sm_90), and exits with status 3, so a
# CPU run can never be mistaken for a GPU verification. Exit status 1 when any step failed or timed out.
#
# Environment: PYTHON (default .venv/bin/python if present, else python), GPU_CHECK_OUT (output folder),
# GPU_CHECK_BENCH_SET (default quick on a GPU, tiny without), GPU_CHECK_SKIP_BUILD=1.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=$ROOT/.venv/bin/python
else PY=python; fi
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${GPU_CHECK_OUT:-$ROOT/gpu_check_out/$STAMP}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
[[ -z "${GPU_CHECK_OUT:-}" && ! -e gpu_check_out/.gitignore ]] && echo '*' >gpu_check_out/.gitignore  # never committed
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
NPROC=$(nproc 2>/dev/null || echo 2)

STEPS=() STATUS=() SECONDS_TAKEN=() ARTEFACTS=()
FAILED=0
BUDGET=${GPU_CHECK_BUDGET:-570}  # seconds for the whole run (10 minutes, less start-up slack)
T0=$(date +%s)

remaining() { echo $(( BUDGET - ($(date +%s) - T0) )); }

timeout_for() {  # step name, default seconds
    local var="GPU_CHECK_TIMEOUT_$(echo "$1" | tr '[:lower:]-' '[:upper:]_')"
    echo "${!var:-$2}"
}

record() {  # name status seconds artefact
    STEPS+=("$1") STATUS+=("$2") SECONDS_TAKEN+=("$3") ARTEFACTS+=("$4")
    printf '[gpu_check] %-14s %-28s %5ss  %s\n' "$1" "$2" "$3" "$4"
}

skip() {  # name reason
    record "$1" "SKIPPED" 0 "$2"
}

run_step() {  # name default-timeout artefact command...
    local name=$1 limit artefact=$3 start rc status
    limit=$(timeout_for "$1" "$2")
    shift 3
    local left
    left=$(( $(remaining) - 5 ))
    if [[ $left -lt 10 ]]; then
        record "$name" "SKIPPED" 0 "the ${BUDGET}s budget is spent"; FAILED=1; return
    fi
    [[ $limit -gt $left ]] && limit=$left
    echo "[gpu_check] ${name}: $* (timeout ${limit}s, log ${OUT}/${name}.log)"
    start=$(date +%s)
    timeout --kill-after=15 "$limit" bash -c "$*" >"$OUT/$name.log" 2>&1
    rc=$?
    if [[ $rc -eq 0 ]]; then status=ok
    elif [[ $rc -eq 124 || $rc -eq 137 ]]; then status="TIMEOUT after ${limit}s"; FAILED=1
    else status="FAILED (exit $rc)"; FAILED=1; fi
    record "$name" "$status" "$(( $(date +%s) - start ))" "$artefact"
}

# --- environment --------------------------------------------------------------------------------------------
run_step env 30 "$OUT/env.txt" "{ date -u; git -C '$ROOT' rev-parse HEAD; git -C '$ROOT' status --short; \
    nvidia-smi || echo 'nvidia-smi: not available'; '$PY' -m fastconv.info; } > '$OUT/env.txt' 2>&1"
HAVE_GPU=0
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    HAVE_GPU=1
    GPU_NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name())")
    echo "[gpu_check] GPU: $GPU_NAME"
else
    GPU_NAME=none
    echo "[gpu_check] NO GPU: torch.cuda.is_available() is False on this machine. This is NOT a GPU verification:"
    echo "[gpu_check] GPU-only steps are skipped with the reason; the CPU-runnable steps still run; exit status 3."
fi
NO_GPU_REASON="no GPU (torch.cuda.is_available() is False)"

# --- build the extension ------------------------------------------------------------------------------------
if [[ "${GPU_CHECK_SKIP_BUILD:-0}" == 1 ]]; then
    skip build "GPU_CHECK_SKIP_BUILD=1"
elif ! grep -qE "CUDAExtension|CppExtension|ext_modules" setup.py 2>/dev/null; then
    skip build "setup.py defines no C++/CUDA extension in this checkout (fastconv._C absent: backends cuda/cpu unavailable)"
else
    # only this GPU's architecture, to fit the budget (TORCH_CUDA_ARCH_LIST set by the caller wins)
    if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" && $HAVE_GPU == 1 ]]; then
        export TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    fi
    export MAX_JOBS=${MAX_JOBS:-$NPROC}
    run_step build 120 "$OUT/build.log" "'$PY' setup.py build_ext --inplace && '$PY' -c 'import fastconv._C'"
fi

# --- kernel report (CPU-only work: start it now, in the background, while the GPU runs the tests) -----------
REPORT_ARGS="--json --jobs $(( NPROC > 2 ? NPROC / 2 : 1 ))"
[[ $HAVE_GPU == 0 ]] && REPORT_ARGS="--json --quick --jobs 1"
REPORT_START=$(date +%s)
REPORT_LIMIT=$(timeout_for kernel_report $(( $(remaining) - 5 )))
timeout --kill-after=15 "$REPORT_LIMIT" "$PY" -m fastconv.kernel_report $REPORT_ARGS \
    >"$OUT/kernel_report.json" 2>"$OUT/kernel_report.log" &
REPORT_PID=$!

# --- the whole test suite -----------------------------------------------------------------------------------
if [[ $HAVE_GPU == 1 ]]; then
    run_step tests 180 "$OUT/tests.xml" "'$PY' -m pytest -q -n ${GPU_CHECK_TEST_WORKERS:-4} -p no:cacheprovider \
        --junitxml='$OUT/tests.xml' -rs --durations=20"
else
    skip tests "$NO_GPU_REASON; the suite's CPU run is CI's job (bash .ci/run)"
fi

# --- benchmarks ---------------------------------------------------------------------------------------------
BENCH_SET=${GPU_CHECK_BENCH_SET:-quick}
[[ $HAVE_GPU == 0 ]] && BENCH_SET=${GPU_CHECK_BENCH_SET:-tiny}
if [[ $HAVE_GPU == 1 ]]; then BENCH_OUT_ENV=""; else BENCH_OUT_ENV="FASTCONV_BENCH_OUT='$OUT/bench_results'"; fi
# on a GPU the results land in bench/results/<gpu>/ (to be committed) and are copied into $OUT afterwards
run_step bench 200 "$OUT/bench_results/" "FASTCONV_BENCH_SET=$BENCH_SET FASTCONV_BENCH_WARMUP_MS=10 \
    FASTCONV_BENCH_REP_MS=40 $BENCH_OUT_ENV '$PY' -m pytest bench --benchmark -p no:xdist -p no:cacheprovider -q \
    --benchmark-json='$OUT/bench_pytest_benchmark.json' --benchmark-columns=median,rounds"
if [[ $HAVE_GPU == 1 ]]; then
    slug=$(grep -o 'results written to [^ ]*' "$OUT/bench.log" | tail -1 | sed 's/results written to //; s/\/[^/]*$//')
    [[ -n "$slug" && -d "$slug" ]] && mkdir -p "$OUT/bench_results" && cp "$slug"/"$BENCH_SET".* "$slug"/"$BENCH_SET"-*.png "$OUT/bench_results/" 2>/dev/null
fi

# --- profiler trace of CIFAR10CNN training steps ------------------------------------------------------------
if "$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('fastconv.train') else 1)" 2>/dev/null; then
    run_step profile 90 "$OUT/profile/" "'$PY' -m fastconv.train --model cifar10_cnn --data synthetic --max-steps 8 \
        --profile '$OUT/profile' --out '$OUT/train'"
else
    skip profile "fastconv.train (issue 5) is not in this checkout"
fi

# --- collect the kernel report ------------------------------------------------------------------------------
wait "$REPORT_PID"
rc=$?
if [[ $rc -eq 0 ]]; then status=ok
elif [[ $rc -eq 124 || $rc -eq 137 ]]; then status="TIMEOUT after ${REPORT_LIMIT}s"; FAILED=1
else status="FAILED (exit $rc)"; FAILED=1; fi
record kernel_report "$status" "$(( $(date +%s) - REPORT_START ))" "$OUT/kernel_report.json ($REPORT_ARGS)"

# --- summary ------------------------------------------------------------------------------------------------
{
    echo "# gpu_check $STAMP"
    echo
    echo "GPU: $GPU_NAME; commit $(git rev-parse --short HEAD 2>/dev/null); python $PY"
    [[ $HAVE_GPU == 0 ]] && echo "NO GPU: not a GPU verification (GPU-only steps skipped)."
    echo
    echo "| step | status | seconds | artefact |"
    echo "|---|---|---|---|"
    for i in "${!STEPS[@]}"; do
        echo "| ${STEPS[$i]} | ${STATUS[$i]} | ${SECONDS_TAKEN[$i]} | ${ARTEFACTS[$i]} |"
    done
} >"$OUT/summary.md"
echo
cat "$OUT/summary.md"
echo
echo "[gpu_check] everything is in $OUT"
if [[ $FAILED == 1 ]]; then exit 1; fi
if [[ $HAVE_GPU == 0 ]]; then exit 3; fi
exit 0
