"""Pure-PyTorch helpers shared by the max-pool op layer and its Triton kernels (no Triton import)."""
from __future__ import annotations

from typing import Sequence

import torch

from ._args import memory_format_of


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


def pool_output_size(size, k: int, s: int, p: int, d: int, ceil_mode: bool):
    """ATen's pooling_output_shape_pad_lr with symmetric padding (div_rtn == Python's floor division)."""
    out = (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out = out - 1  # the last window must start inside the input or the left padding
    return out


class _DenseChannelsLast:
    """Shape and strides of a dense channels_last tensor, for suggest_memory_format (no allocation)."""

    def __init__(self, shape):
        N, C, H, W = shape
        self.shape, self._strides = shape, (H * W * C, 1, W * C, C)

    def stride(self):
        return self._strides


def pooled_memory_format(z: torch.Tensor, y_format: torch.memory_format | None = None) -> torch.memory_format:
    """The layout of max_pool2d(y) for y = batch_norm_act(z) (fastconv.ops.batch_norm_act_pool): y is dense in
    y_format (default memory_format_of(z)), and the pool's output takes y's suggested memory format."""
    fmt = memory_format_of(z) if y_format is None else y_format
    return suggest_memory_format(_DenseChannelsLast(z.shape)) if fmt == torch.channels_last else fmt


def pool_outputs(x: torch.Tensor, kernel_size, stride, padding, dilation, ceil_mode, memory_format, allocate):
    """(out, offsets) of pooling 4-D x: [N, C, OH, OW] in x's dtype and in offsets_dtype, both in
    `memory_format`, from allocate(shape, dtype, device, memory_format)."""
    N, C, H, W = x.shape
    oh = pool_output_size(H, kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode)
    ow = pool_output_size(W, kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode)
    return (allocate((N, C, oh, ow), x.dtype, x.device, memory_format),
            allocate((N, C, oh, ow), offsets_dtype(kernel_size), x.device, memory_format))
