"""max_pool2d throughput: fastconv Triton / CUDA C++ / C++ CPU vs PyTorch eager and torch.compile on every
pooling layer of the documented architectures."""
from __future__ import annotations

import pytest
import torch

from bench import _cases, _inputs, _modes, _providers

PROVIDERS, _ = _providers.for_device(_cases.device())
CASES = _cases.cases("max_pool2d", PROVIDERS)


def build(case: _cases.Case, device: torch.device):
    L, N = case.problem.layer, case.problem.N
    dtype, grad = _inputs.DTYPES[case.dtype], _modes.needs_grad(case.mode)
    OH, OW = L.out_hw

    def make_set():
        x = _inputs.randn((N, L.C, L.H, L.W), dtype, case.layout, device, grad)
        g = _inputs.randn((N, L.C, OH, OW), dtype, case.layout, device) if grad else None
        return (x,), g

    f = _providers.max_pool2d(case.provider, L)
    return _modes.timed(f, make_set, case.mode, device, lambda: _providers.context(case.provider)), ()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_max_pool2d(case, bench_row):
    bench_row(case, build)
