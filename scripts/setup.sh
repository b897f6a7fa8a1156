#!/usr/bin/env bash
# One-command set-up on a fresh machine: a virtualenv in .venv with fastconv installed (editable), its C++/CUDA
# extension fastconv._C built, and the test/benchmark tools. torch resolves to the registry's CUDA build (the
# CPU-only 2.13.0+cpu wheel some pip configs offer is excluded in pyproject.toml because torchvision does
# not import with it).
#
# The extension compiles against the installed torch, so the dependencies go in first and the package is
# then built with --no-build-isolation. Switches (see setup.py): FASTCONV_BUILD_EXT=0 (pure Python),
# FASTCONV_BUILD_CUDA=0 (CPU kernels only), TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), MAX_JOBS.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=/usr/local/cuda
fi
.venv/bin/python -m pip install --quiet --upgrade "pip>=24" "setuptools>=77" wheel
# Runtime + dev dependencies from pyproject.toml (torch must be present before the extension builds).
mapfile -t DEPS < <(.venv/bin/python - <<'PY'
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip's vendored copy of the same parser
    from pip._vendor import tomli as tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["dev"]))
PY
)
.venv/bin/python -m pip install --quiet "${DEPS[@]}"
start=$(date +%s)
.venv/bin/python -m pip install --quiet --no-build-isolation --no-deps -e .
echo "fastconv: package + extension built in $(( $(date +%s) - start )) s"
.venv/bin/python -c "import torch, torchvision, triton, fastconv
from fastconv import _ext
print('fastconv', fastconv.__version__, '| torch', torch.__version__, '| torchvision', torchvision.__version__, '| triton', triton.__version__)
print('fastconv._C:', _ext.build_info() if _ext.load() else 'not built: ' + _ext.reason())"
