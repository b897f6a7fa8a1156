"""Which fastconv kernel backend a test runs on, and skipping (with the reason) where it cannot run here.

    triton  the Triton kernels: CUDA tensors, or CPU tensors through the interpreter (conftest sets it up).
    cpu     the C++ CPU twins in fastconv._C: CPU tensors; skipped when the extension is not built.
    cuda    the CUDA C++ kernels in fastconv._C: CUDA tensors; marked gpu, skipped without a GPU or without
            the CUDA part of the extension.
"""
from __future__ import annotations

import pytest
import torch

KERNEL_BACKENDS = ["triton", "cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
EXT_BACKENDS = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def skip_unless_runnable(name: str) -> None:
    """pytest.skip with the reason when backend `name` cannot run in this environment."""
    if name not in ("cpu", "cuda"):
        return
    from fastconv import _ext

    if not _ext.load():
        pytest.skip(f"backend {name!r} needs the C++ extension: {_ext.reason()}")
    if name == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("backend 'cuda' needs a CUDA device, and torch sees none")
        ok, why = _ext.cuda_kernels_status()
        if not ok:
            pytest.skip(f"backend 'cuda': {why}")


def tensor_device(name: str, triton_device: torch.device) -> torch.device:
    """Where backend `name` takes its tensors (Triton: the GPU if any, else the interpreter on CPU)."""
    return {"triton": triton_device, "cpu": torch.device("cpu"), "cuda": torch.device("cuda")}[name]
