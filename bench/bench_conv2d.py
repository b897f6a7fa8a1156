"""conv2d throughput: fastconv Triton (implicit GEMM, im2col), fastconv CUDA C++ / C++ CPU, PyTorch eager
(cuDNN / ATen) and torch.compile, on every layer of the documented architectures."""
from __future__ import annotations

import pytest
import torch

from bench import _cases, _inputs, _modes, _providers

PROVIDERS, _ = _providers.for_device(_cases.device())
CASES = _cases.cases("conv2d", PROVIDERS)


def build(case: _cases.Case, device: torch.device):
    L, N = case.problem.layer, case.problem.N
    dtype, grad = _inputs.DTYPES[case.dtype], _modes.needs_grad(case.mode)
    OH, OW = L.out_hw

    def make_set():
        x = _inputs.randn((N, L.C, L.H, L.W), dtype, case.layout, device, grad)
        w = _inputs.randn((L.K, L.C // L.groups, L.R, L.S), dtype, case.layout, device, grad)
        b = _inputs.randn((L.K,), dtype, case.layout, device, grad)
        g = _inputs.randn((N, L.K, OH, OW), dtype, case.layout, device) if grad else None
        return (x, w, b), g

    f = _providers.conv2d(case.provider, L)
    fn = _modes.timed(f, make_set, case.mode, device, lambda: _providers.context(case.provider))
    return fn, ()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_conv2d(case, bench_row):
    bench_row(case, build)
