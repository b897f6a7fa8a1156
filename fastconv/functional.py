"""Functional API with torch.nn.functional semantics, running on the backend fastconv.backend() selects."""
from __future__ import annotations

import torch

from . import _backend
from ._args import ConvArgs, as_list
from .ops import conv2d as _conv_ops

__all__ = ["conv2d"]


def conv2d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
           dilation=1, groups: int = 1, *, algo: str = "implicit") -> torch.Tensor:
    """Exactly F.conv2d (int/tuple/'same'/'valid' padding, unbatched 3-D input, batch 0, same errors), on
    fastconv kernels. `algo` picks the Triton algorithm: 'implicit' (implicit GEMM, no column buffer) or
    'im2col' (explicit column buffer + GEMM)."""
    return conv2d_fused(input, weight, bias, stride, padding, dilation, groups, algo=algo)


def conv2d_fused(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, scale=None, shift=None,
                 residual=None, activation: str = "identity", algo: str = "implicit") -> torch.Tensor:
    """act((conv2d(input, weight) + bias) * scale + shift + residual) in one kernel: scale/shift are
    per-output-channel vectors, residual has the output's shape."""
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
        if residual is not None and residual.dim() == 3:
            residual = residual.unsqueeze(0)
    args = ConvArgs(input, weight, bias, stride, padding, dilation, groups)
    out = torch.ops.fastconv.conv2d(
        input, weight, bias, as_list(args.stride), as_list(args.padding), as_list(args.dilation), groups,
        scale, shift, residual, activation, algo, _backend.current(),
    )
    return out.squeeze(0) if unbatched else out
