#!/usr/bin/env bash
# One-command set-up on a fresh machine: a virtualenv in .venv with fastconv installed (editable) and the
# test/benchmark tools. torch resolves to the registry's CUDA build (the CPU-only 2.13.0+cpu wheel some pip
# configs offer is excluded in pyproject.toml because torchvision does not import with it).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade "pip>=24" setuptools wheel
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/python -c "import torch, torchvision, triton, fastconv; print('fastconv', fastconv.__version__, '| torch', torch.__version__, '| torchvision', torchvision.__version__, '| triton', triton.__version__)"
