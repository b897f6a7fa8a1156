"""Test set-up: without a CUDA device, the real Triton kernels run on CPU tensors through the Triton
interpreter (TRITON_INTERPRET=1 must be set before triton compiles any @triton.jit function)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the Triton kernels under test run: the GPU when there is one, else the CPU interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
