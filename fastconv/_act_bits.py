"""The packed activation mask of a residual block's last BatchNorm: act'(u) as one bit per element.

y = act(bn(z) + residual) needs act'(u), u = bn(z) + residual, in backward. Recomputing u reads the residual
again in both backward passes (one activation-sized tensor each); for a mask activation (act' is 0 or 1: relu,
relu6) the forward stores the bits instead, 1/16 of a bf16 activation, and the backward reads those.

Layout (the Triton kernels' and these PyTorch twins'): pixels p = (n * H + h) * W + w enumerate N, H, W in order
whatever z's memory format; the bit of (p, c) is bit p % 32 of int32 word [p // 32, c] of an int32 tensor
[ceil(N * H * W / 32), C]. Pixels past the end are 0. A NaN u counts as 1, as in activation_grad (PyTorch's
threshold backward passes a NaN's gradient through).
"""
from __future__ import annotations

import torch

from ._activations import MASK_ACTIVATIONS, mask_derivative

# activations whose act' the bits carry (identity needs none: act' = 1)
BIT_ACTIVATIONS = tuple(a for a in MASK_ACTIVATIONS if a != "identity")
WORD_BITS = 32


def wanted(residual, activation: str) -> bool:
    """Whether a BatchNorm+activation over z with this residual keeps act' as bits for its backward."""
    return residual is not None and activation in BIT_ACTIVATIONS


def shape(z_shape) -> tuple[int, int]:
    N, C, H, W = z_shape
    return -(-(N * H * W) // WORD_BITS), C


def check(bits: torch.Tensor, z: torch.Tensor, activation: str) -> None:
    """ValueError unless `bits` can be act' bits of z for `activation` (the kernels read them unchecked)."""
    if activation not in BIT_ACTIVATIONS:
        raise ValueError(f"fastconv: act_bits carry a 0/1 derivative ({', '.join(BIT_ACTIVATIONS)}), not that of "
                         f"{activation!r}")
    check_layout(bits, z.shape, z.device, "fastconv: act_bits")


def check_layout(bits: torch.Tensor, z_shape, device: torch.device, what: str) -> None:
    """ValueError (starting with `what`) unless `bits` is laid out as the bits of a [N, C, H, W] tensor of shape
    z_shape on `device`: contiguous int32 words of shape(z_shape)."""
    want = shape(z_shape)
    if (bits.dtype != torch.int32 or tuple(bits.shape) != want or bits.device != device
            or not bits.is_contiguous()):
        raise ValueError(f"{what} must be a contiguous int32 tensor of shape {list(want)} on {device} "
                         f"(z {list(z_shape)}), got {bits.dtype} {list(bits.shape)} on {bits.device}")


def empty(z: torch.Tensor, want: bool) -> torch.Tensor:
    """The bits tensor for z (uninitialised), or an empty int32 tensor where none is kept."""
    return z.new_empty(shape(z.shape) if want else (0,), dtype=torch.int32)


def pack(mask: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] bool -> the int32 words (layout above)."""
    N, C, H, W = mask.shape
    rows, _ = shape(mask.shape)
    flat = mask.permute(0, 2, 3, 1).reshape(N * H * W, C).to(torch.int64)
    flat = torch.cat([flat, flat.new_zeros(rows * WORD_BITS - N * H * W, C)])
    weights = torch.ones(WORD_BITS, dtype=torch.int64, device=mask.device) << torch.arange(WORD_BITS,
                                                                                             device=mask.device)
    words = (flat.view(rows, WORD_BITS, C) * weights.view(1, WORD_BITS, 1)).sum(1)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)  # two's complement


def of(u: torch.Tensor, activation: str) -> torch.Tensor:
    """The bits of act'(u) for [N, C, H, W] pre-activations u (PyTorch ops; the Triton forward stores its own)."""
    return pack(mask_derivative(u, activation))


def unpack(words: torch.Tensor, z_shape) -> torch.Tensor:
    """The int32 words -> [N, C, H, W] bool (pack's inverse)."""
    N, C, H, W = z_shape
    bits = (words.to(torch.int64)[:, None, :] >> torch.arange(WORD_BITS, device=words.device)[None, :, None]) & 1
    return bits.reshape(-1, C)[:N * H * W].view(N, H, W, C).permute(0, 3, 1, 2).bool()
