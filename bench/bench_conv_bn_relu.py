"""Fused conv → BatchNorm → ReLU throughput, training (forward, backward, both) and eval (BN folded):
fastconv.ConvBNReLU2d vs PyTorch eager nn.Sequential(conv, bn, relu) vs torch.compile of that Sequential,
on the conv layers of the documented architectures that have BatchNorm."""
from __future__ import annotations

import contextlib

import pytest
import torch

from bench import _cases, _inputs, _modes, _providers

PROVIDERS, _ = _providers.for_device(_cases.device())
CASES = _cases.cases("conv_bn_relu", PROVIDERS)


def build(case: _cases.Case, device: torch.device):
    L, N = case.problem.layer, case.problem.N
    grad = _modes.needs_grad(case.mode)
    OH, OW = L.out_hw
    module, params = _providers.conv_bn_relu(case.provider, L, device)
    module.train(case.mode != "eval")
    if case.mode == "eval":  # realistic running statistics, not the initial 0 / 1
        bn = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    amp = _inputs.DTYPES[case.dtype] if case.dtype in ("fp16", "bf16") else None

    act_dtype = torch.float32 if amp is None else amp

    def make_set():
        x = _inputs.randn((N, L.C, L.H, L.W), act_dtype, case.layout, device, grad)
        g = _inputs.randn((N, L.K, OH, OW), act_dtype, case.layout, device) if grad else None
        return (x,), g

    if case.layout == "channels_last":
        module.to(memory_format=torch.channels_last)

    @contextlib.contextmanager
    def forward_ctx():
        with _providers.context(case.provider), torch.autocast(device.type, amp, enabled=amp is not None):
            yield

    return _modes.timed(module, make_set, case.mode, device, forward_ctx, params if grad else ()), ()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_conv_bn_relu(case, bench_row):
    bench_row(case, build)
