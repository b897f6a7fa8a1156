"""Pure-PyTorch helpers shared by the max-pool op layer and its Triton kernels (no Triton import)."""
from __future__ import annotations

from typing import Sequence

import torch


def offsets_dtype(kernel_size: Sequence[int]) -> torch.dtype:
    """The argmax offsets' dtype: the narrowest signed integer dtype holding every tap kh*KW + kw."""
    taps = int(kernel_size[0]) * int(kernel_size[1])
    if taps <= 2**7:
        return torch.int8
    if taps <= 2**15:
        return torch.int16
    return torch.int32


def suggest_memory_format(t: torch.Tensor) -> torch.memory_format:
    """Tensor.suggest_memory_format() for a 4-D strided tensor (ATen's is_channels_last_strides_2d)."""
    sizes, strides = t.shape, t.stride()
    if strides[1] == 0:
        return torch.contiguous_format
    lo = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < lo:
            return torch.contiguous_format
        if d == 0 and lo == strides[1]:
            return torch.contiguous_format
        lo = strides[d] * (sizes[d] if sizes[d] > 1 else 1)
    return torch.channels_last
