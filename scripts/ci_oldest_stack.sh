#!/usr/bin/env bash
# CI: prove the oldest supported stack on CPU, beside README's path (.ci/run runs this in the background).
#
# Leg 1 is the lent GPU image's stack: torch 2.11.0 (+ torchvision 0.26.0), triton 3.6.0, Python 3.12, and an old
# setuptools (68.1.2, Ubuntu 24.04's and the oldest that runs on Python 3.12; pyproject.toml builds with >= 64).
# In a fresh virtualenv (FASTCONV_OLDEST_VENV, default .venv-oldest) and a copy of the work tree, it
#   1. installs the pinned stack (nothing else from pyproject's ranges)
#   2. with FASTCONV_OLDEST_BUILD=1 (off in CI: ~800 s of its 2 cores), builds the extension exactly as
#      scripts/gpu_check.sh does: `python setup.py build_ext --inplace`, CUDA
#      kernels for sm_90 only (TORCH_CUDA_ARCH_LIST=9.0, the H200's), MAX_JOBS=1
#   3. `import fastconv`, `python -m fastconv.info`
#   4. pytest: the extension (build info, sm_90 cubin, opcheck of the ext ops), the C++ CPU backend and the
#      Triton kernels under the interpreter (conv2d, conv+BN, max-pool), the quick kernel report for sm_80/sm_90
#      (compiles, tensor cores, no spills), the tile sweep's interpreter test, gpu_check.sh's no-GPU dry run
#      with this Python, the opchecks of the custom ops, and the direct launch's binding table against Triton
#      3.6's own binder. (CI's time budget keeps this selection; the whole suite is `FASTCONV_OLDEST_TESTS=tests`.)
# Leg 2, the oldest Python: the same torch / torchvision / triton on Python 3.10 (FASTCONV_OLDEST_VENV310,
# default .venv-oldest310; installed while leg 1 builds), without the extension: import, info, and the
# Python-level tests (backends, modules, bench harness, the named conv cases on the Triton interpreter).
# Where a machine lacks Python 3.12, leg 1 runs on python3 and says so; without Python 3.10, leg 2 is skipped
# with a warning.
# FASTCONV_OLDEST_PY310=0 skips leg 2. Exits non-zero when anything fails; timings per step are printed.
# FASTCONV_OLDEST_PYTHON / FASTCONV_OLDEST_PYTHON310 pick the interpreters (default: python3.X from PATH or
# pyenv); FASTCONV_OLDEST_TESTS replaces leg 1's pytest selection.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
T0=$(date +%s)
PINS=("torch==2.11.0" "torchvision==0.26.0" "triton==3.6.0" "setuptools==68.1.2")
TOOLS=(numpy tqdm matplotlib "pytest>=8" "pytest-benchmark>=4" "pytest-xdist>=3" ninja)
VENV=${FASTCONV_OLDEST_VENV:-$ROOT/.venv-oldest}

step() { echo "[oldest-stack $(( $(date +%s) - T0 ))s] $*"; }

find_python() {  # minor version (10, 12), explicit choice -> a working python3.<minor>
    local cand
    for cand in "$2" "python3.$1" "$(pyenv root 2>/dev/null)"/versions/3."$1".*/bin/python3."$1" "/usr/bin/python3.$1"; do
        [[ -n "$cand" ]] || continue
        if "$cand" -c "import sys; sys.exit(0 if sys.version_info[:2] == (3, $1) else 1)" >/dev/null 2>&1; then
            echo "$cand"; return
        fi
    done
    return 1
}

ensure_venv() {  # venv, python minor, explicit python, packages...: create and install unless already there
    local venv=$1 minor=$2 explicit=$3 base have start
    shift 3
    have=$("$venv/bin/python" -c 'import sys, torch, triton, torchvision; print(sys.version_info[1], torch.__version__.split("+")[0], triton.__version__, torchvision.__version__.split("+")[0])' 2>/dev/null || true)
    if [[ "${have#* }" == "2.11.0 3.6.0 0.26.0" && ( "${have%% *}" == "$minor" || -z "$minor" ) ]]; then
        step "reusing $venv (Python 3.${have%% *}, torch 2.11.0, triton 3.6.0, torchvision 0.26.0)"
        return
    fi
    if [[ -n "$minor" ]]; then
        base=$(find_python "$minor" "$explicit") || { step "no Python 3.$minor found (set FASTCONV_OLDEST_PYTHON*)"; return 1; }
    else
        base=python3
    fi
    rm -rf "$venv"
    "$base" -m venv "$venv"
    start=$(date +%s)
    "$venv/bin/python" -m pip install --progress-bar off "$@" >"$venv/pip-install.log" 2>&1 \
        || { tail -40 "$venv/pip-install.log"; step "pip install into $venv failed"; return 1; }
    step "created $venv with $("$base" --version) and installed $* in $(( $(date +%s) - start )) s ($(du -sm "$venv" | cut -f1) MB)"
}

# --- 1. environments (leg 2's installs in the background, while leg 1 builds) ------------------------------------------
VENV310=${FASTCONV_OLDEST_VENV310:-$ROOT/.venv-oldest310}
LEG2=${FASTCONV_OLDEST_PY310:-1}
if [[ "$LEG2" != 0 ]] && ! find_python 10 "${FASTCONV_OLDEST_PYTHON310:-}" >/dev/null; then
    step "WARNING: no Python 3.10 on this machine (set FASTCONV_OLDEST_PYTHON310): leg 2 is NOT run"
    LEG2=0
fi
if [[ "$LEG2" != 0 ]]; then
    ensure_venv "$VENV310" 10 "${FASTCONV_OLDEST_PYTHON310:-}" "${PINS[@]:0:3}" "${TOOLS[@]}" &
    LEG2_INSTALL=$!
fi
LEG1_MINOR=12
if ! find_python 12 "${FASTCONV_OLDEST_PYTHON:-}" >/dev/null; then
    step "WARNING: no Python 3.12 on this machine (set FASTCONV_OLDEST_PYTHON): leg 1 runs on $(python3 --version)"
    LEG1_MINOR=""
fi
ensure_venv "$VENV" "$LEG1_MINOR" "${FASTCONV_OLDEST_PYTHON:-}" "${PINS[@]}" "${TOOLS[@]}"
PY=$VENV/bin/python
"$PY" -c 'import sys, setuptools, torch, triton, torchvision, numpy
print("oldest-stack: python", sys.version.split()[0], "| torch", torch.__version__, "| torchvision", torchvision.__version__,
      "| triton", triton.__version__, "| setuptools", setuptools.__version__, "| numpy", numpy.__version__)'

# --- 2. a copy of the work tree, and the extension ------------------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastconv-oldest.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
git ls-files -z --cached --others --exclude-standard | tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$WORK"
cd "$WORK"
if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then export CUDA_HOME=/usr/local/cuda; fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-1}
# The extension build against torch 2.11 (~800 s on CI's 2 shared cores, half of this leg's CPU time) is opt-in:
# FASTCONV_OLDEST_BUILD=1. Without it the ext tests skip with the reason; the README path builds the extension
# (torch 2.14) and scripts/gpu_check.sh builds it on the GPU image itself.
if [[ "${FASTCONV_OLDEST_BUILD:-0}" == 1 ]]; then
    start=$(date +%s)
    "$PY" setup.py build_ext --inplace >"$WORK/build.log" 2>&1 || { tail -60 "$WORK/build.log"; step "BUILD FAILED"; exit 1; }
    step "extension built (setup.py build_ext --inplace, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST) in $(( $(date +%s) - start )) s"
else
    step "extension NOT built (FASTCONV_OLDEST_BUILD=1 builds it): backends cpu/cuda skip here"
fi

# --- 3. import, info -----------------------------------------------------------------------------------------------
export PYTHONPATH=$WORK
"$PY" -c 'import fastconv; print("import fastconv: ok", fastconv.__version__)'
"$PY" -m fastconv.info

# --- 4. tests --------------------------------------------------------------------------------------------------------
if [[ -n "${FASTCONV_OLDEST_TESTS:-}" ]]; then
    read -r -a SELECTION <<<"$FASTCONV_OLDEST_TESTS"
else
    # what differs between stacks: the extension against torch 2.11's headers, the ops' registration (opcheck,
    # mutable arguments), Triton 3.6's compiler (kernel report, sweep) and interpreter (a representative set of
    # numerics per kernel family), the GPU check's dry run; the whole suite is the README path's
    SELECTION=(tests/test_backend.py tests/test_kernel_report.py tests/test_tile_sweep.py
               tests/test_gpu_check.py tests/test_max_pool2d.py tests/test_launch_direct.py tests/test_gpu_host_path.py
               tests/test_conv2d.py::test_opcheck tests/test_conv2d.py::test_gradcheck_fused
               tests/test_conv_bn_act.py::test_opcheck tests/test_conv_bn_act.py::test_running_statistics_direct_op_calls
               tests/test_conv_bn_act.py::test_ext_batch_norm_ops_match_float64
               tests/test_residual_block.py::test_opcheck tests/test_residual_block.py::test_op_on_every_backend)
    # the build's own tests, where this leg built the extension
    [[ "${FASTCONV_OLDEST_BUILD:-0}" == 1 ]] && SELECTION=(tests/test_ext_build.py "${SELECTION[@]}")
fi
start=$(date +%s)
rc=0
# -m "slow or not slow": the slow tier too (the GPU check's dry runs)
"$PY" -m pytest -p no:cacheprovider -p no:xdist -q -rs -m "slow or not slow" "${SELECTION[@]}" || rc=$?
step "pytest (${SELECTION[*]}) exit $rc in $(( $(date +%s) - start )) s"
if [[ $rc -ne 0 ]]; then step "FAILED (leg 1)"; exit 1; fi
step "leg 1 OK: Python $("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])') / torch 2.11.0 / triton 3.6.0 builds, imports and passes"

# --- leg 2: Python 3.10 ------------------------------------------------------------------------------------------------
if [[ "$LEG2" == 0 ]]; then step "leg 2 (Python 3.10) NOT run (see above / FASTCONV_OLDEST_PY310=0)"; exit 0; fi
wait "$LEG2_INSTALL" || { step "FAILED: leg 2's install (Python 3.10)"; exit 1; }
rm -f "$WORK"/fastconv/_C*.so  # leg 1's extension is Python 3.12's; leg 2 runs without one
PY310=$VENV310/bin/python
"$PY310" -c 'import sys, torch, triton, fastconv; print("oldest-stack leg 2: python", sys.version.split()[0], "| torch", torch.__version__, "| triton", triton.__version__, "| import fastconv: ok")'
"$PY310" -m fastconv.info >/dev/null
start=$(date +%s)
rc=0
"$PY310" -m pytest -p no:cacheprovider -p no:xdist -q -rs tests/test_backend.py tests/test_bench.py || rc=$?
step "leg 2 pytest exit $rc in $(( $(date +%s) - start )) s"
if [[ $rc -ne 0 ]]; then step "FAILED (leg 2: Python 3.10)"; exit 1; fi
step "OK: the oldest stack (torch 2.11.0, torchvision 0.26.0, triton 3.6.0) on Python $("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])') and 3.10"
