"""Triton BatchNorm (training mode) + activation + max-pool in one pass, and the pool's gradient gathered inside
the BatchNorm backward.

A fused conv + BatchNorm + activation block followed by a max-pool (VGG's and the CIFAR CNNs' stage ends) would
otherwise write y = act(bn(z)) (one activation), read it back in the pool, and in backward write the pool's
grad_y (one activation) that both BatchNorm backward passes read again. Here:

Forward   out[n, c, oh, ow] = max over the window of act(z * scale[c] + shift[c]), offsets = its tap, where
          scale / shift are the BatchNorm folded from the batch statistics (same arithmetic as
          batch_norm._batch_norm_act_fwd_kernel) and each candidate is rounded to out's dtype before the
          comparison, so the maximum, its tap, ties (first wins) and NaNs (last wins) are exactly those of
          max_pool2d(batch_norm_act(z)) (fastconv.triton.max_pool2d's rules). y never exists.
Backward  the BatchNorm backward's reduce and apply passes (batch_norm.py with `pool`) build grad_y per pixel
          on the fly (max_pool2d.window_grad_sum: grad_out summed over the windows whose argmax is that pixel).

Tensors are [N, C, H, W] read and written through their strides; a program owns [BLOCK_P pooled pixels,
BLOCK_C channels].
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._pool_args import offsets_dtype, pooled_memory_format
from ._common import ACTIVATIONS, acc_dtype, cdiv, check_runnable, needs_int64
from ._epilogue import activation
from .batch_norm import BLOCK_C, BLOCK_P, _affine_args, _bn_coefficients, _bn_tile
from .launch import run
from .max_pool2d import MAX_UNROLL_TAPS, _output_hw, first_tap, take_max


@triton.jit
def _pool_tap(z_base, h0, w0, kh, kw, KW, H, W, szh, szw, dil_h, dil_w, mask, scale, shift, best, best_tap,
              ACT: tl.constexpr, ACC: tl.constexpr, OUT: tl.constexpr):
    """Fold tap (kh, kw) into the running (max, tap) of act(z * scale + shift). Taps in the padding never win."""
    ih = h0 + kh * dil_h
    iw = w0 + kw * dil_w
    ok = mask & ((ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))[:, None]
    z = tl.load(z_base + (ih * szh + iw * szw)[:, None], mask=ok, other=0.0)
    v = activation(z.to(ACC) * scale[None, :] + shift[None, :], ACT)
    if OUT.primitive_bitwidth == 16:  # rounded as batch_norm_act stores y (16-bit from fp32)
        v = v.to(tl.float32)
    return take_max(v.to(OUT).to(ACC), ok, kh * KW + kw, best, best_tap)


@triton.jit
def _batch_norm_act_pool_fwd_kernel(
    z_ptr, y_ptr, off_ptr, mean_ptr, var_ptr, w_ptr, b_ptr,
    Q, C, H, W, OH, OW, eps,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    szn, szc, szh, szw, syn, syc, syh, syw,
    KH: tl.constexpr, KW: tl.constexpr, UNROLL: tl.constexpr,
    HAS_AFFINE: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Q = N * OH * OW pooled pixels; out and offsets share y's strides."""
    n, oh, ow, c, mask = _bn_tile(tl.program_id(0) * BLOCK_P, tl.program_id(1) * BLOCK_C, Q, C, OH, OW,
                                  IDX64, BLOCK_P, BLOCK_C)
    mean, invstd, gamma, beta = _bn_coefficients(c, C, mean_ptr, var_ptr, w_ptr, b_ptr, eps, HAS_AFFINE, ACC)
    scale = invstd * gamma
    shift = beta - mean * scale
    h0 = oh * stride_h - pad_h
    w0 = ow * stride_w - pad_w
    best_tap = tl.broadcast_to(first_tap(h0, w0, dil_h, dil_w, KW)[:, None], (BLOCK_P, BLOCK_C))
    best = tl.full((BLOCK_P, BLOCK_C), float("-inf"), ACC)
    z_base = z_ptr + (n * szn)[:, None] + (c * szc)[None, :]
    OUT: tl.constexpr = y_ptr.dtype.element_ty
    if UNROLL:
        for kh in tl.static_range(KH):
            for kw in tl.static_range(KW):
                best, best_tap = _pool_tap(z_base, h0, w0, kh, kw, KW, H, W, szh, szw, dil_h, dil_w, mask,
                                           scale, shift, best, best_tap, ACT, ACC, OUT)
    else:
        for kh in range(KH):
            for kw in range(KW):
                best, best_tap = _pool_tap(z_base, h0, w0, kh, kw, KW, H, W, szh, szw, dil_h, dil_w, mask,
                                           scale, shift, best, best_tap, ACT, ACC, OUT)
    out = (n * syn + oh * syh + ow * syw)[:, None] + (c * syc)[None, :]
    if OUT.primitive_bitwidth == 16:
        best = best.to(tl.float32)
    tl.store(y_ptr + out, best.to(OUT), mask=mask)
    tl.store(off_ptr + out, best_tap.to(off_ptr.dtype.element_ty), mask=mask)


def batch_norm_act_pool_forward(z, mean, var, weight, bias, eps: float, activation: str, kernel_size, stride,
                                padding, dilation, ceil_mode: bool, *, out=None, offsets=None,
                                force_int64: bool = False):
    """(out, offsets) = max_pool2d(act(bn(z))) with z's batch statistics (mean, biased var), its argmax taps
    (fastconv.ops.max_pool2d's offsets format). Arguments checked by the caller (check_pool_args)."""
    check_runnable(z)
    N, C, H, W = z.shape
    OH, OW = _output_hw(z.shape, kernel_size, stride, padding, dilation, ceil_mode)
    fmt = pooled_memory_format(z)
    if out is None:
        out = torch.empty((N, C, OH, OW), dtype=z.dtype, device=z.device, memory_format=fmt)
    if offsets is None:
        offsets = torch.empty((N, C, OH, OW), dtype=offsets_dtype(kernel_size), device=z.device, memory_format=fmt)
    Q = N * OH * OW
    if out.numel() == 0:
        return out, offsets
    w, b = _affine_args(weight, bias, mean)
    taps = kernel_size[0] * kernel_size[1]
    run(_batch_norm_act_pool_fwd_kernel, (cdiv(Q, BLOCK_P), cdiv(C, BLOCK_C)),
        z, out, offsets, mean, var, w, b, Q, C, H, W, OH, OW, eps,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        *z.stride(), *out.stride(),
        device=z.device, loop=taps,
        KH=kernel_size[0], KW=kernel_size[1], UNROLL=taps <= MAX_UNROLL_TAPS,
        HAS_AFFINE=weight is not None, ACT=ACTIVATIONS[activation], ACC=acc_dtype(z.dtype),
        IDX64=force_int64 or needs_int64(z, out), BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
    return out, offsets
