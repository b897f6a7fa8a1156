"""Argument normalisation and validation with F.conv2d's semantics and error messages."""
from __future__ import annotations

from typing import Sequence

import torch


def pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    value = tuple(value)
    if len(value) == 1:
        return (int(value[0]), int(value[0]))
    if len(value) != 2:
        raise RuntimeError(
            f"expected {name} to be a single integer value or a list of 2 values to match the convolution "
            f"dimensions, but got {name}={list(value)}"
        )
    return (int(value[0]), int(value[1]))


def conv_output_size(size: int, k: int, stride: int, pad_lo: int, pad_hi: int, dilation: int) -> int:
    return (size + pad_lo + pad_hi - dilation * (k - 1) - 1) // stride + 1


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor laid out channels_last (and not simply contiguous), else contiguous:
    the layout an output or gradient made from `t` takes."""
    cl = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if cl else torch.contiguous_format


def memory_format_as(like: torch.Tensor, channels_last: bool | None) -> torch.memory_format:
    """channels_last or contiguous as `channels_last` asks (a layout carried as a flag: a chain's nn.Conv2d layout,
    functional.PendingBlock.out_channels_last), memory_format_of(like) when it is None."""
    if channels_last is None:
        return memory_format_of(like)
    return torch.channels_last if channels_last else torch.contiguous_format


def channels_strided(t: torch.Tensor | None) -> bool:
    """Whether t is a 4-D tensor with more than one channel whose channels are not at stride 1 (NCHW-like): the
    operands the Triton GEMMs read through a channels_last copy (triton._common.channels_contiguous)."""
    return t is not None and t.dim() == 4 and t.size(1) > 1 and t.stride(1) != 1


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels accumulate in and keep statistics / split-K partials in: fp64 for fp64 tensors
    (gradcheck), fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def output_memory_format(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """nn.Conv2d's rule (cuDNN and the CPU backends alike): channels_last out if the input or the weight
    is channels_last (and not simply contiguous), else contiguous."""
    cl = torch.channels_last in (memory_format_of(x), memory_format_of(weight))
    return torch.channels_last if cl else torch.contiguous_format


class ConvArgs:
    """Validated conv2d geometry. `padding` is (top, bottom, left, right); asymmetric only for 'same' with
    an even effective kernel, where (like PyTorch) the extra row/column goes at the bottom/right."""

    def __init__(self, x: torch.Tensor, weight: torch.Tensor, bias, stride, padding, dilation, groups: int):
        if x.dim() != 4:
            raise RuntimeError(
                f"Expected 3D (unbatched) or 4D (batched) input to conv2d, but got input of size: {list(x.shape)}"
            )
        if weight.dim() != 4:
            raise RuntimeError(
                f"weight should have 4 dimensions (out_channels, in_channels/groups, kH, kW), "
                f"but got weight of size {list(weight.shape)}"
            )
        self.stride = pair(stride, "stride")
        self.dilation = pair(dilation, "dilation")
        if not isinstance(groups, int) or groups <= 0:
            raise RuntimeError("non-positive groups is not supported")
        self.groups = groups
        if any(s <= 0 for s in self.stride):
            raise RuntimeError("non-positive stride is not supported")
        if any(d <= 0 for d in self.dilation):
            raise RuntimeError(f"dilation should be greater than zero, but got {list(self.dilation)}")
        kh, kw = weight.shape[2], weight.shape[3]
        if isinstance(padding, str):
            if padding == "valid":
                self.padding = (0, 0, 0, 0)
            elif padding == "same":
                if self.stride != (1, 1):
                    raise RuntimeError("padding='same' is not supported for strided convolutions")
                th = self.dilation[0] * (kh - 1)
                tw = self.dilation[1] * (kw - 1)
                self.padding = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
            else:
                raise RuntimeError(f"Invalid padding string: '{padding}'")
        else:
            ph, pw = pair(padding, "padding")
            if ph < 0 or pw < 0:
                raise RuntimeError("negative padding is not supported")
            self.padding = (ph, ph, pw, pw)

        c_in = x.shape[1]
        c_out = weight.shape[0]
        if c_out % groups != 0:
            raise RuntimeError(
                f"Given groups={groups}, expected weight to be divisible by {groups} at dimension 0, but got "
                f"weight of size [{list(weight.shape)}] instead"
            )
        if weight.shape[1] * groups != c_in:
            raise RuntimeError(
                f"Given groups={groups}, weight of size {list(weight.shape)}, expected input{list(x.shape)} to have "
                f"{weight.shape[1] * groups} channels, but got {c_in} channels instead"
            )
        if bias is not None and (bias.dim() != 1 or bias.shape[0] != c_out):
            raise RuntimeError(
                f"Given weight of size {list(weight.shape)}, expected bias to be 1-dimensional with {c_out} "
                f"elements, but got bias of size {list(bias.shape)} instead"
            )
        # Under autocast the op's Autocast kernel casts input, weight and bias to one dtype (as ATen does for
        # nn.Conv2d), so mixed dtypes are fine there: a bf16 activation meets fp32 weights in every layer
        # after the first.
        mixed_ok = x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)
        if x.dtype != weight.dtype and not mixed_ok:
            raise RuntimeError(
                f"Input type ({x.dtype}) and weight type ({weight.dtype}) should be the same"
            )
        if bias is not None and bias.dtype != x.dtype and not mixed_ok:
            raise RuntimeError(f"Input type ({x.dtype}) and bias type ({bias.dtype}) should be the same")
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.device != x.device:
                raise RuntimeError(
                    f"Input and {name} should be on the same device, but got input on {x.device} and "
                    f"{name} on {t.device}"
                )
        if not x.is_floating_point():
            raise RuntimeError(f"fastconv conv2d supports floating-point tensors, got {x.dtype}")

        top, bottom, left, right = self.padding
        padded_h = x.shape[2] + top + bottom
        padded_w = x.shape[3] + left + right
        eff_kh = self.dilation[0] * (kh - 1) + 1
        eff_kw = self.dilation[1] * (kw - 1) + 1
        if padded_h < eff_kh or padded_w < eff_kw:
            raise RuntimeError(
                f"Calculated padded input size per channel: ({padded_h} x {padded_w}). Kernel size: "
                f"({eff_kh} x {eff_kw}). Kernel size can't be greater than actual input size"
            )
        self.out_hw = (
            conv_output_size(x.shape[2], kh, self.stride[0], top, bottom, self.dilation[0]),
            conv_output_size(x.shape[3], kw, self.stride[1], left, right, self.dilation[1]),
        )


def check_same_device(*tensors: torch.Tensor | None) -> None:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise RuntimeError(f"Expected all tensors to be on the same device, but found {sorted(map(str, devices))}")


def as_list(v: Sequence[int]) -> list[int]:
    return [int(i) for i in v]
