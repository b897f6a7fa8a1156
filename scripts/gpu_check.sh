#!/usr/bin/env bash
# One-command GPU verification for fastconv, sized for a lent GPU machine (a 390 s budget, meant for one H200; not yet
# run on a GPU; nothing is fetched, nothing installed):
#   PYTHON=python3 GPU_CHECK_OUT=$OUT bash scripts/gpu_check.sh
# Steps, in order of value, so that a run stopped early still leaves evidence (each has its own timeout, sent as
# SIGINT so pytest and the tile sweep still write what they have; GPU_CHECK_TIMEOUT_<STEP> overrides, all capped by
# GPU_CHECK_BUDGET, default 390 s):
#   env         versions, nvidia-smi, `python -m fastconv.info`
#   build       the C++/CUDA extension for the visible GPU's arch only (TORCH_CUDA_ARCH_LIST from the device), in
#               the background while the tile sweep runs; CUDA_HOME from nvcc's location
#   tile_sweep  scripts/tile_sweep.py: every tile of every Triton tile table, forced, vs float64 PyTorch
#   tests       the test suite on the GPU with FASTCONV_AUTOTUNE=0 (heuristic tiles), -n 8, junit; CPU-only files
#               that CI already proves (AOT kernel reports, the tile sweep's interpreter test, this script's dry
#               run, the CPU bench smoke run) are left out
#   bench       FASTCONV_BENCH_SET=check, autotuned: two conv layers fwd / fwd+bwd, the fused conv+BN+ReLU
#               training block, one whole model, vs cuDNN eager and torch.compile
#   overhead    host time per call on tiny tensors vs the nn modules (python -m bench._overhead: cuda, triton with
#               direct launches, triton through Triton's own launch path, torch), FASTCONV_AUTOTUNE=0; and
#               Triton's launch binding vs fastconv's direct-launch key (python -m bench._launch_binding)
#   profile     torch.profiler trace of CIFAR10CNN training steps (python -m fastconv.train --profile)
# Artefacts (at most 8 files) in GPU_CHECK_OUT, else $OUT, else gpu_check_out/<UTC stamp>/: summary.md (step table and
# key figures), tests.xml, bench.json, bench.md, tile_sweep.json, tile_sweep.md, overhead.md (GPU only),
# gpu_check.tar.gz (every log);
# rewritten after every step.
#
# Without a GPU it says so, runs what proves the script's own plumbing cheaply (env, the build unless
# GPU_CHECK_SKIP_BUILD=1, a CPU smoke subset of the tests, the tiny CPU bench set), skips the GPU-only steps with
# the reason, still leaves every artefact, and exits 3, so a CPU run can never be mistaken for a GPU verification.
# Exit status 1 when a step failed or timed out, 0 when all passed on a GPU.
#
# Environment: PYTHON (default .venv/bin/python if present, else python3), GPU_CHECK_OUT, GPU_CHECK_BUDGET,
# GPU_CHECK_TIMEOUT_<STEP>, GPU_CHECK_SKIP_BUILD=1, GPU_CHECK_TEST_WORKERS (default 8), GPU_CHECK_SWEEP_JOBS
# (default 8), GPU_CHECK_BENCH_SET (default check; tiny without a GPU), GPU_CHECK_WORK (scratch; default mktemp).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
T0=$(date +%s)
STAMP=$(date -u +%Y%m%dT%H%M%SZ)

if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=$ROOT/.venv/bin/python
elif command -v python3 >/dev/null 2>&1; then PY=python3
else PY=python; fi
HOSTPY=$(command -v python3 || command -v python || echo "$PY")  # stdlib-only helpers, even if $PY's torch is broken

RESULTS=${GPU_CHECK_OUT:-${OUT:-$ROOT/gpu_check_out/$STAMP}}
mkdir -p "$RESULTS" && RESULTS=$(cd "$RESULTS" && pwd)
[[ -z "${GPU_CHECK_OUT:-}${OUT:-}" && ! -e gpu_check_out/.gitignore ]] && echo '*' >gpu_check_out/.gitignore
SCRATCH=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
LOGS=$SCRATCH/gpu_check  # everything that ends up in gpu_check.tar.gz
mkdir -p "$LOGS"

cuda_home() {  # the toolkit of the nvcc on PATH (through links and wrapper scripts), else /usr/local/cuda
    local nvcc dir
    nvcc=$(command -v nvcc 2>/dev/null) || nvcc=""
    if [[ -n "$nvcc" ]]; then
        dir=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
        [[ -f "$dir/include/cuda_runtime.h" ]] && { echo "$dir"; return; }
        # a wrapper script (e.g. /usr/local/bin/nvcc running /usr/local/cuda/bin/nvcc): the toolkit nvcc names
        dir=$(nvcc --dryrun -E -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
        [[ -n "$dir" ]] && dir=$(readlink -f "$dir")
        [[ -n "$dir" && -f "$dir/include/cuda_runtime.h" ]] && { echo "$dir"; return; }
    fi
    [[ -x /usr/local/cuda/bin/nvcc ]] && echo /usr/local/cuda
}
[[ -z "${CUDA_HOME:-}" ]] && CUDA_HOME=$(cuda_home)
if [[ -n "${CUDA_HOME:-}" ]]; then export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PIP_NO_INDEX=1 HF_HUB_OFFLINE=1  # nothing is fetched
NPROC=$(nproc 2>/dev/null || echo 2)
BUDGET=${GPU_CHECK_BUDGET:-390}
FAILED=0

remaining() { echo $(( BUDGET - ($(date +%s) - T0) )); }
timeout_for() {  # step name, default seconds
    local var="GPU_CHECK_TIMEOUT_$(echo "$1" | tr '[:lower:]-' '[:upper:]_')"
    echo "${!var:-$2}"
}
record() {  # name status seconds note
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$LOGS/steps.tsv"
    printf '[gpu_check] %-10s %-24s %5ss  %s\n' "$1" "$2" "$3" "$4"
}
status_of() {  # exit code, limit -> status word
    if [[ $1 -eq 0 ]]; then echo ok
    elif [[ $1 -eq 124 || $1 -eq 137 ]]; then echo "TIMEOUT after ${2}s"
    else echo "FAILED (exit $1)"; fi
}
limit_for() {  # name default -> seconds (the step's timeout, capped by the budget left); 0 when nothing is left
    local limit left
    limit=$(timeout_for "$1" "$2")
    left=$(( $(remaining) - 5 ))
    [[ $limit -gt $left ]] && limit=$left
    [[ $limit -lt 5 ]] && limit=0
    echo "$limit"
}
run_step() {  # name default-timeout note command...  (SIGINT at the limit: pytest and the sweep write partial results)
    local name=$1 limit note=$3 start rc st
    limit=$(limit_for "$1" "$2")
    shift 3
    if [[ $limit -eq 0 ]]; then record "$name" "SKIPPED" 0 "the ${BUDGET}s budget is spent"; FAILED=1; return; fi
    echo "[gpu_check] ${name}: $* (timeout ${limit}s, log gpu_check/${name}.log)"
    start=$(date +%s)
    timeout --signal=INT --kill-after=20 "$limit" bash -c "$*" >"$LOGS/$name.log" 2>&1
    rc=$?
    st=$(status_of $rc "$limit")
    [[ $rc -ne 0 ]] && FAILED=1
    record "$name" "$st" "$(( $(date +%s) - start ))" "$note"
}
skip() { record "$1" "SKIPPED" 0 "$2"; }

flush() {  # summary.md and the artefacts so far, into $RESULTS (at most 8 files)
    [[ -f "$LOGS/tile_sweep/tile_sweep.json" ]] && cp -f "$LOGS/tile_sweep/tile_sweep.json" "$RESULTS/tile_sweep.json"
    [[ -f "$LOGS/tile_sweep/tile_sweep.md" ]] && cp -f "$LOGS/tile_sweep/tile_sweep.md" "$RESULTS/tile_sweep.md"
    [[ -f "$LOGS/tests.xml" ]] && cp -f "$LOGS/tests.xml" "$RESULTS/tests.xml"
    local bj bm
    bj="" bm=""  # the set's own results (<set>.json / .md); overhead.* and plots stay in the tarball
    [[ -f "$LOGS/bench/${BENCH_SET:-}.json" ]] && bj="$LOGS/bench/$BENCH_SET.json"
    [[ -f "$LOGS/bench/${BENCH_SET:-}.md" ]] && bm="$LOGS/bench/$BENCH_SET.md"
    [[ -n "$bj" ]] && cp -f "$bj" "$RESULTS/bench.json"
    [[ -n "$bm" ]] && cp -f "$bm" "$RESULTS/bench.md"
    [[ -f "$LOGS/overhead/overhead.md" ]] && cp -f "$LOGS/overhead/overhead.md" "$RESULTS/overhead.md"
    if ! "$HOSTPY" "$ROOT/scripts/gpu_check_summary.py" --steps "$LOGS/steps.tsv" --header "$LOGS/header.md" \
            --tile-sweep "$LOGS/tile_sweep/tile_sweep.json" --tests "$LOGS/tests.xml" --bench "${bj:-}" \
            --overhead "$LOGS/overhead/overhead.json" \
            --profile-top "$(ls "$LOGS"/profile/top_ops_rank*.txt 2>/dev/null | head -1)" \
            >"$LOGS/summary.md" 2>"$LOGS/summary.err"; then
        { cat "$LOGS/header.md"; echo; echo '| step | status | seconds | note |'; echo '|---|---|---:|---|'
          sed 's/\t/ | /g; s/^/| /; s/$/ |/' "$LOGS/steps.tsv"; echo; echo "(key figures failed: see summary.err)"
        } >"$LOGS/summary.md"
    fi
    cp -f "$LOGS/summary.md" "$RESULTS/summary.md"
    tar -czf "$RESULTS/gpu_check.tar.gz.tmp" -C "$SCRATCH" gpu_check 2>/dev/null
    if [[ $(stat -c %s "$RESULTS/gpu_check.tar.gz.tmp" 2>/dev/null || echo 0) -gt $(( 15 * 1024 * 1024 )) ]]; then
        tar -czf "$RESULTS/gpu_check.tar.gz.tmp" -C "$SCRATCH" --exclude='*.pt.trace.json' gpu_check 2>/dev/null
        echo "(profiler traces left out of gpu_check.tar.gz: over 15 MiB)" >>"$RESULTS/summary.md"
    fi
    mv -f "$RESULTS/gpu_check.tar.gz.tmp" "$RESULTS/gpu_check.tar.gz"
}

# --- env -----------------------------------------------------------------------------------------------------
: >"$LOGS/steps.tsv"
HAVE_GPU=0
ARCH_LIST=""
PROBE=$("$PY" -c "import torch; ok = torch.cuda.is_available(); print('%d.%d' % torch.cuda.get_device_capability() if ok else '', torch.cuda.get_device_name() if ok else '')" 2>/dev/null)
if [[ -n "${PROBE// /}" ]]; then
    HAVE_GPU=1
    ARCH_LIST=${PROBE%% *}
    GPU_NAME=${PROBE#* }
    echo "[gpu_check] GPU: $GPU_NAME (compute capability $ARCH_LIST)"
else
    GPU_NAME=none
    echo "[gpu_check] NO GPU: torch.cuda.is_available() is False here. This is NOT a GPU verification: GPU-only"
    echo "[gpu_check] steps are skipped with the reason, the script's plumbing still runs, and the exit status is 3."
fi
NO_GPU="no GPU (torch.cuda.is_available() is False)"
# the build and the tests see the same arch list: the visible GPU's (a caller's TORCH_CUDA_ARCH_LIST wins)
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" && -n "$ARCH_LIST" ]]; then export TORCH_CUDA_ARCH_LIST=$ARCH_LIST; fi
{
    echo "# gpu_check $STAMP"
    echo
    echo "GPU: $GPU_NAME; commit $(git rev-parse --short HEAD 2>/dev/null)$([[ -n "$(git status --porcelain 2>/dev/null)" ]] && echo ' (with local changes)'); python: $PY; CUDA_HOME=${CUDA_HOME:-unset}; TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset (setup.py default 8.0;9.0)}"
    [[ $HAVE_GPU == 0 ]] && echo && echo "**NO GPU: not a GPU verification.** GPU-only steps were skipped; the test and bench rows below are a CPU smoke run of this script's plumbing."
} >"$LOGS/header.md"
env_report() {
    date -u; uname -a; git -C "$ROOT" rev-parse HEAD; git -C "$ROOT" status --short
    nvidia-smi || echo "nvidia-smi: not available"
    echo "CUDA_HOME=${CUDA_HOME:-unset} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset} nproc=$(nproc)"
    nvcc --version || echo "nvcc: not found"
    "$PY" - <<'PYEOF'
import importlib, sys
print("python", sys.version.replace("\n", " "))
for name in ("setuptools", "torch", "triton", "torchvision", "numpy", "pytest", "xdist", "pytest_benchmark"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as e:  # noqa: BLE001 - report, go on
        print(name, "not importable:", type(e).__name__, e)
import torch
print("torch.version.cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
PYEOF
    "$PY" -m fastconv.info
}
export -f env_report
export PY ROOT
run_step env 60 "gpu_check/env.log" env_report  # (imports torch twice: 30 s was too tight on a loaded 2-core CI box)
flush

# --- build (background; the tile sweep needs no extension) -----------------------------------------------------
BUILD_PID=""
if [[ "${GPU_CHECK_SKIP_BUILD:-0}" == 1 ]]; then
    skip build "GPU_CHECK_SKIP_BUILD=1 (the extension as found: see env.log)"
else
    BUILD_LIMIT=$(limit_for build 200)
    BUILD_START=$(date +%s)
    echo "[gpu_check] build: setup.py build_ext --inplace, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-default} (background, timeout ${BUILD_LIMIT}s)"
    ( export MAX_JOBS=${MAX_JOBS:-$(( NPROC > 2 ? NPROC / 2 : 1 ))}
      timeout --kill-after=20 "$BUILD_LIMIT" bash -c "'$PY' setup.py build_ext --inplace && '$PY' -c 'import fastconv._C; from fastconv import _ext; print(_ext.build_info())'" \
          >"$LOGS/build.log" 2>&1 ) &
    BUILD_PID=$!
fi
wait_build() {
    [[ -z "$BUILD_PID" ]] && return
    wait "$BUILD_PID"
    local rc=$?
    [[ $rc -ne 0 ]] && FAILED=1
    record build "$(status_of $rc "$BUILD_LIMIT")" "$(( $(date +%s) - BUILD_START ))" "gpu_check/build.log (arch list ${TORCH_CUDA_ARCH_LIST:-default})"
    BUILD_PID=""
    flush
}

# --- tile sweep ------------------------------------------------------------------------------------------------
mkdir -p "$LOGS/tile_sweep"
if [[ $HAVE_GPU == 1 ]]; then
    SWEEP_LIMIT=$(limit_for tile_sweep 90)
    run_step tile_sweep 90 "tile_sweep.json, tile_sweep.md" "'$PY' '$ROOT/scripts/tile_sweep.py' --out '$LOGS/tile_sweep' \
        --jobs ${GPU_CHECK_SWEEP_JOBS:-8} --timeout $(( SWEEP_LIMIT > 15 ? SWEEP_LIMIT - 10 : SWEEP_LIMIT ))"
else
    skip tile_sweep "$NO_GPU; the sweep's own logic runs under the interpreter in CI (tests/test_tile_sweep.py)"
    printf '{"skipped": "%s", "rows": [], "summary": {}}\n' "$NO_GPU" >"$LOGS/tile_sweep/tile_sweep.json"
    printf '# Tile sweep\n\nSkipped: %s.\n' "$NO_GPU" >"$LOGS/tile_sweep/tile_sweep.md"
fi
flush

# --- tests ---------------------------------------------------------------------------------------------------------
wait_build
if [[ $HAVE_GPU == 1 ]]; then
    # the GPU-only hazards first (ticket-counter reductions, autotuning on shared buffers, grids by SM count, the
    # fused pool), so that a run cut short by its timeout has checked them; then every other file CI cannot prove
    FIRST="tests/test_launch.py tests/test_fewer_launches.py tests/test_batch_norm_act_pool.py"
    REST=$(ls tests/test_*.py | grep -v -x -F -e tests/test_launch.py -e tests/test_fewer_launches.py \
        -e tests/test_batch_norm_act_pool.py -e tests/test_kernel_report.py -e tests/test_cuda_report.py \
        -e tests/test_tile_sweep.py -e tests/test_gpu_check.py -e tests/test_bench.py | tr '\n' ' ')
    run_step tests 100 "tests.xml" "FASTCONV_AUTOTUNE=0 '$PY' -m pytest -n ${GPU_CHECK_TEST_WORKERS:-8} -p no:cacheprovider \
        -q -rfEs --durations=25 -m \"slow or not slow\" --junitxml='$LOGS/tests.xml' $FIRST $REST \
        --deselect tests/test_triton_max_pool2d.py::test_kernels_compile_for_sm80"
else
    # (the subset leaves out test_backend's two subprocess tests -- 15 s each, and the env step already ran
    # fastconv.info -- so that a loaded CI machine stays well inside the limit: 60 s was once overrun)
    run_step tests 120 "tests.xml ($NO_GPU: CPU smoke subset tests/test_backend.py; the suite is CI's)" \
        "'$PY' -m pytest -p no:cacheprovider -p no:xdist -q -rfEs --junitxml='$LOGS/tests.xml' tests/test_backend.py \
        -k 'not info_cli and not without_interpreter'"
fi
flush

# --- benchmarks ------------------------------------------------------------------------------------------------------
BENCH_SET=${GPU_CHECK_BENCH_SET:-check}
[[ $HAVE_GPU == 0 ]] && BENCH_SET=${GPU_CHECK_BENCH_SET:-tiny}
mkdir -p "$LOGS/bench"
if [[ $HAVE_GPU == 1 ]]; then BENCH_FILES="bench/bench_conv2d.py bench/bench_conv_bn_relu.py bench/bench_models.py"
else BENCH_FILES="bench"; fi
run_step bench 90 "bench.json, bench.md (set $BENCH_SET$([[ $HAVE_GPU == 0 ]] && echo ", $NO_GPU: CPU providers at tiny sizes"))" \
    "FASTCONV_BENCH_SET=$BENCH_SET FASTCONV_BENCH_OUT='$LOGS/bench' FASTCONV_BENCH_WARMUP_MS=10 FASTCONV_BENCH_REP_MS=40 \
    $([[ $HAVE_GPU == 0 ]] && echo "FASTCONV_BENCH_THREADS=1 FASTCONV_BENCH_CPU_ROUNDS=2") \
    '$PY' -m pytest $BENCH_FILES --benchmark -p no:xdist -p no:cacheprovider -q -rs --benchmark-columns=median,rounds"
# (no --benchmark-json: on an interrupted run pytest-benchmark's JSON writer fails on the benchmark cut short and
# takes fastconv's own results writer down with it; without it the rows done so far are written)
flush

# --- host overhead -----------------------------------------------------------------------------------------------------
if [[ $HAVE_GPU == 1 ]]; then
    mkdir -p "$LOGS/overhead"
    run_step overhead 40 "overhead.md (host time per call vs nn; launch_binding.md in the tarball)" \
        "FASTCONV_AUTOTUNE=0 FASTCONV_BENCH_OUT='$LOGS/overhead' '$PY' -m bench._overhead --rounds 9 --calls 50 --write \
        && FASTCONV_BENCH_OUT='$LOGS/overhead' '$PY' -m bench._launch_binding --calls 500 --write"
else
    skip overhead "$NO_GPU; the CPU rows (dry runs) are in bench/results, CI runs the harness (tests/test_bench.py)"
fi
flush

# --- profiler trace ---------------------------------------------------------------------------------------------------
if [[ $HAVE_GPU == 1 ]]; then
    run_step profile 40 "gpu_check/profile/ (trace, top_ops_rank0.txt)" "'$PY' -m fastconv.train --model cifar10_cnn \
        --data synthetic --data-dir '$SCRATCH/data' --synthetic-train 2048 --synthetic-test 256 --workers 2 \
        --batch-size 128 --amp bf16 --channels-last --max-steps 8 --no-progress \
        --profile '$LOGS/profile' --out '$LOGS/train'"
else
    skip profile "$NO_GPU"
fi
flush

echo
cat "$RESULTS/summary.md"
echo
echo "[gpu_check] artefacts in $RESULTS: $(cd "$RESULTS" && ls | tr '\n' ' ')"
echo "[gpu_check] done in $(( $(date +%s) - T0 )) s"
if [[ $FAILED == 1 ]]; then exit 1; fi
if [[ $HAVE_GPU == 0 ]]; then exit 3; fi
exit 0
