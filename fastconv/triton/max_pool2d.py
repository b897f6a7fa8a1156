"""Triton max_pool2d: forward with a compact argmax, deterministic gather backward.

Semantics (those of torch.nn.functional.max_pool2d, CPU and CUDA alike):
  * output size: ATen's pooling_output_shape, including ceil_mode's rule that the last window must start
    inside the input or the left padding (see `pool_output_size`); padding <= kernel_size // 2.
  * each window is scanned kh-major then kw; an element replaces the running max when
    `val > max or isnan(val)`, so ties keep the FIRST maximum and NaNs propagate with the LAST NaN's
    position. Padding is -inf that never wins: the running index starts at the window's first tap whose
    row/column is >= 0 (the taps that skip the left/top padding), so a window of all -inf reports that
    tap. With dilation a window can lie completely in the padding (e.g. kernel 2, dilation 4, pad 1,
    width 3): PyTorch then returns -inf and an index outside the plane; so do we. (PyTorch's CPU backward
    then adds that window's gradient out of the plane, into a neighbouring row/plane; ours drops it, the
    true gradient of a window that reads no input element.)
  * the output (and `offsets`, and the backward's grad_input) take the input's memory format as
    Tensor.suggest_memory_format() decides it: channels_last in -> channels_last out.

Offsets format (the argmax, as produced by the forward and consumed by the backward): a tensor of y's
shape and strides holding the tap inside the window, `kh * KW + kw` (0 <= tap < KH*KW), so that
    ih = oh*stride_h - pad_h + kh*dil_h,   iw = ow*stride_w - pad_w + kw*dil_w.
Its dtype is the narrowest of int8 / int16 / int32 that holds KH*KW - 1 (`offsets_dtype`): int8 for every
kernel up to 11x11, an eighth of PyTorch's int64 indices. `offsets_to_indices` turns it into PyTorch's
indices (flat ih*W + iw into each input plane, int64).

Blocking: both kernels work on a 1-D block of BLOCK elements of the tensor they WRITE (y in the forward,
grad_input in the backward), flattened in that tensor's own memory order: (n, oh, ow, c) for
channels_last, (n, c, oh, ow) otherwise. The write is then one contiguous, vectorisable run per program,
and consecutive lanes read consecutive channels (channels_last: coalesced, vectorised when C % 16 == 0) or
consecutive columns (NCHW: stride_w elements apart) of the other tensors, which are read through their
strides, so non-contiguous views need no copy. A [pixels, channels] 2-D tile would only help
channels_last; the 1-D run serves both layouts with one kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._pool_args import offsets_dtype, pool_output_size, suggest_memory_format  # noqa: F401 (re-exported)
from ._common import PlanCache, acc_dtype, cdiv, check_runnable, interpreting, needs_int64
from .launch import run

# GPU launch: BLOCK elements per program. 512 with 4 warps (4 elements per thread: 16-byte fp32 / 8-byte
# fp16 stores of y and dx, 32-56 registers on sm_80/sm_90, no spills). The int64 path and fp64 run 256 with
# 8 warps (1 element per thread): their 64-bit divisions otherwise take ~150 registers in the backward and
# spill a few bytes on sm_90.
GPU_LAUNCH = (512, 4)
GPU_LAUNCH_WIDE = (256, 8)
# Windows of at most this many taps (5x5) are fully unrolled in the forward; larger ones loop (8x8 unrolled
# spills on sm_80/sm_90 with the int64 path, 6x6 already needs 133 registers).
MAX_UNROLL_TAPS = 25
# Under the interpreter a small block, so that test shapes cross several block boundaries.
BLOCK_INTERPRET = 128


@triton.jit
def _split_flat(flat, C, H, W, CHANNELS_LAST: tl.constexpr):
    """Flat index in a dense [N, C, H, W] tensor's memory order -> (n, c, h, w)."""
    if CHANNELS_LAST:
        c = flat % C
        t = flat // C
        w = t % W
        t = t // W
        h = t % H
        n = t // H
    else:
        w = flat % W
        t = flat // W
        h = t % H
        t = t // H
        c = t % C
        n = t // C
    return n, c, h, w


@triton.jit
def first_tap(h0, w0, dil_h, dil_w, KW):
    """PyTorch's starting tap of a window whose top-left input position is (h0, w0): the first tap at or past the
    top/left padding (row/col >= 0), even when that tap is itself past the bottom/right edge (a window
    completely in the padding)."""
    kh0 = tl.where(h0 < 0, (dil_h - 1 - h0) // dil_h, 0)
    kw0 = tl.where(w0 < 0, (dil_w - 1 - w0) // dil_w, 0)
    return (kh0 * KW + kw0).to(tl.int32)


@triton.jit
def take_max(v, ok, tap, best, best_tap):
    """Fold candidate v (tap `tap`, valid where ok) into the running (max, tap): strict > keeps the first
    maximum; `v != v` lets every NaN through (so the last NaN wins)."""
    take = ok & ((v > best) | (v != v))
    return tl.where(take, v, best), tl.where(take, tap, best_tap)


@triton.jit
def _fwd_tap(x_base, h0, w0, kh, kw, KW, H, W, sxh, sxw, dil_h, dil_w, mask, best, best_tap,
             ACC_TYPE: tl.constexpr):
    """Fold tap (kh, kw) into the running (max, tap). Out-of-image taps (padding) never win."""
    ih = h0 + kh * dil_h
    iw = w0 + kw * dil_w
    ok = mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    v = tl.load(x_base + ih * sxh + iw * sxw, mask=ok, other=float("-inf")).to(ACC_TYPE)
    return take_max(v, ok, kh * KW + kw, best, best_tap)


@triton.jit
def _max_pool2d_fwd_kernel(
    x_ptr, y_ptr, off_ptr,
    TOTAL, C, H, W, OH, OW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sxn, sxc, sxh, sxw,
    KH: tl.constexpr, KW: tl.constexpr, UNROLL: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, ACC_TYPE: tl.constexpr, IDX64: tl.constexpr, BLOCK: tl.constexpr,
    STORE_TAPS: tl.constexpr = True,
):
    """y[n, c, oh, ow] = max over the window, off = its tap (not stored without STORE_TAPS: a forward that no
    backward follows). y and off are dense in y's memory order (flat index == element offset); x is read
    through its strides."""
    pid = tl.program_id(0)
    if IDX64:
        pid = pid.to(tl.int64)
    flat = pid * BLOCK + tl.arange(0, BLOCK)
    mask = flat < TOTAL
    n, c, oh, ow = _split_flat(flat, C, OH, OW, CHANNELS_LAST)
    h0 = oh * stride_h - pad_h
    w0 = ow * stride_w - pad_w
    x_base = x_ptr + n * sxn + c * sxc
    best_tap = first_tap(h0, w0, dil_h, dil_w, KW)
    best = tl.full((BLOCK,), float("-inf"), ACC_TYPE)
    if UNROLL:  # small windows: every tap unrolled, all loads independent
        for kh in tl.static_range(KH):
            for kw in tl.static_range(KW):
                best, best_tap = _fwd_tap(x_base, h0, w0, kh, kw, KW, H, W, sxh, sxw, dil_h, dil_w,
                                          mask, best, best_tap, ACC_TYPE)
    else:  # large windows (global pooling): a loop, not thousands of unrolled taps
        for kh in range(KH):
            for kw in range(KW):
                best, best_tap = _fwd_tap(x_base, h0, w0, kh, kw, KW, H, W, sxh, sxw, dil_h, dil_w,
                                          mask, best, best_tap, ACC_TYPE)
    tl.store(y_ptr + flat, best.to(y_ptr.dtype.element_ty), mask=mask)
    if STORE_TAPS:
        tl.store(off_ptr + flat, best_tap.to(off_ptr.dtype.element_ty), mask=mask)


@triton.jit
def window_grad_sum(dy_ptr, off_ptr, n, c, h, w, mask, OH, OW, KH, KW, NH, NW, stride_h, stride_w, pad_h, pad_w,
                    dil_h, dil_w, sdn, sdc, sdh, sdw, son, soc, soh, sow, ACC: tl.constexpr):
    """The max-pool input gradient at input positions (n, c, h, w) (index tensors that broadcast to mask's
    shape: one lane per element, or [pixels, 1] x [1, channels] tiles): the sum of dy[n, c, oh, ow] over the
    windows whose argmax tap is (h, w), in (oh, ow) raster order; zero where no window picked it.

    (h, w) is tap kh of window oh iff h = oh*stride_h - pad_h + kh*dil_h with 0 <= kh < KH, i.e.
        oh*stride_h = h + pad_h - kh*dil_h,   so   ceil((h + pad_h - (KH-1)*dil_h) / stride_h) <= oh
                                                    and oh <= floor((h + pad_h) / stride_h),
    and the oh in that range with (h + pad_h - oh*stride_h) % dil_h == 0 are the windows (kh is the
    quotient). The range holds at most NH = (KH-1)*dil_h // stride_h + 1 values (`candidate_windows`; 1 when
    windows do not overlap), so every lane runs NH candidates from its own lower bound (NW likewise)."""
    th = h + pad_h                     # >= 0
    tw = w + pad_w
    # first candidate window: ceil(max(th - (KH-1)*dil, 0) / stride); numerators are kept >= 0 because
    # integer division truncates toward zero.
    oh_lo = (tl.maximum(th - (KH - 1) * dil_h, 0) + stride_h - 1) // stride_h
    ow_lo = (tl.maximum(tw - (KW - 1) * dil_w, 0) + stride_w - 1) // stride_w
    oh_hi = tl.minimum(th // stride_h, OH - 1)
    ow_hi = tl.minimum(tw // stride_w, OW - 1)
    dy_base = dy_ptr + n * sdn + c * sdc
    off_base = off_ptr + n * son + c * soc
    acc = tl.zeros(mask.shape, ACC)
    for i in range(NH):
        oh = oh_lo + i
        rh = th - oh * stride_h        # = kh * dil_h when oh is a window of this row
        kh = rh // dil_h
        row_ok = (oh <= oh_hi) & (rh >= 0) & (rh - kh * dil_h == 0)
        for j in range(NW):
            ow = ow_lo + j
            rw = tw - ow * stride_w
            kw = rw // dil_w
            ok = mask & row_ok & (ow <= ow_hi) & (rw >= 0) & (rw - kw * dil_w == 0)
            tap = tl.load(off_base + oh * soh + ow * sow, mask=ok, other=-1).to(tl.int32)
            hit = ok & (tap == (kh * KW + kw).to(tl.int32))
            acc += tl.load(dy_base + oh * sdh + ow * sdw, mask=hit, other=0.0).to(ACC)
    return acc


@triton.jit
def _max_pool2d_bwd_kernel(
    dy_ptr, off_ptr, dx_ptr,
    TOTAL, C, H, W, OH, OW, KH, KW, NH, NW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sdyn, sdyc, sdyh, sdyw,
    son, soc, soh, sow,
    CHANNELS_LAST: tl.constexpr, ACC_TYPE: tl.constexpr, IDX64: tl.constexpr, BLOCK: tl.constexpr,
):
    """Gather: dx[n, c, h, w] = the sum of dy[n, c, oh, ow] over the windows whose argmax tap is (h, w)
    (window_grad_sum). Each dx element is written exactly once: deterministic, no atomics, zeros included."""
    pid = tl.program_id(0)
    if IDX64:
        pid = pid.to(tl.int64)
    flat = pid * BLOCK + tl.arange(0, BLOCK)
    mask = flat < TOTAL
    n, c, h, w = _split_flat(flat, C, H, W, CHANNELS_LAST)
    acc = window_grad_sum(dy_ptr, off_ptr, n, c, h, w, mask, OH, OW, KH, KW, NH, NW, stride_h, stride_w, pad_h,
                          pad_w, dil_h, dil_w, sdyn, sdyc, sdyh, sdyw, son, soc, soh, sow, ACC_TYPE)
    tl.store(dx_ptr + flat, acc.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Python side
# ----------------------------------------------------------------------------------------------------------

def _check_args(shape, kernel_size, stride, padding, dilation) -> None:
    kh, kw = kernel_size
    if kh <= 0 or kw <= 0:
        raise RuntimeError(f"kernel size should be greater than zero, but got kH: {kh} kW: {kw}")
    if stride[0] <= 0 or stride[1] <= 0:
        raise RuntimeError(f"stride should be greater than zero, but got dH: {stride[0]} dW: {stride[1]}")
    if dilation[0] <= 0 or dilation[1] <= 0:
        raise RuntimeError(
            f"dilation should be greater than zero, but got dilationH: {dilation[0]} dilationW: {dilation[1]}"
        )
    if not (kw // 2 >= padding[1] >= 0 and kh // 2 >= padding[0] >= 0):
        raise RuntimeError(
            "pad should be at most half of effective kernel size, but got "
            f"pad={padding}, kernel_size={kernel_size} and dilation={dilation}"
        )
    if len(shape) != 4:
        raise RuntimeError(f"max_pool2d launcher expects a 4-D [N, C, H, W] tensor, got shape {list(shape)}")


def _output_hw(shape, kernel_size, stride, padding, dilation, ceil_mode) -> tuple[int, int]:
    H, W = shape[2], shape[3]
    OH = pool_output_size(H, kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode)
    OW = pool_output_size(W, kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode)
    if OH < 1 or OW < 1:
        raise RuntimeError(
            f"Given input size: ({shape[1]}x{H}x{W}). Calculated output size: ({shape[1]}x{OH}x{OW}). "
            "Output size is too small"
        )
    return OH, OW


def candidate_windows(kernel_size, stride, dilation) -> tuple[int, int]:
    """(NH, NW) of window_grad_sum: the most windows one input position can belong to, per dimension."""
    return ((kernel_size[0] - 1) * dilation[0] // stride[0] + 1, (kernel_size[1] - 1) * dilation[1] // stride[1] + 1)


def gpu_launch(idx64: bool, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK, num_warps) of both kernels on a GPU."""
    return GPU_LAUNCH_WIDE if (idx64 or dtype == torch.float64) else GPU_LAUNCH


def _launch_meta(idx64: bool, dtype: torch.dtype) -> tuple[int, dict]:
    if interpreting():
        return BLOCK_INTERPRET, {}
    block, warps = gpu_launch(idx64, dtype)
    return block, {"num_warps": warps}


def max_pool2d_forward(
    x: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    ceil_mode: bool,
    store_offsets: bool = True,
    *,
    force_int64: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Max pooling of a 4-D x (any strides). Returns (y, offsets): y in x's suggested memory format and
    offsets (same shape and strides, `offsets_dtype(kernel_size)`) holding the argmax tap kh*KW + kw; without
    `store_offsets` (no backward will follow) offsets is None and the kernel writes only y."""
    check_runnable(x)
    # everything but the output allocation depends only on the call signature: worked out once per signature
    key = (x.shape, x.stride(), x.dtype, x.device, tuple(kernel_size), tuple(stride), tuple(padding),
           tuple(dilation), ceil_mode, store_offsets, force_int64, interpreting())
    plan = _FWD_PLANS.get(key) or _FWD_PLANS.put(key, _forward_plan(
        x, kernel_size, stride, padding, dilation, ceil_mode, store_offsets, force_int64))
    shape, fmt, off_dtype, grid, args, kwargs = plan
    y = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    offsets = torch.empty(shape, dtype=off_dtype, device=x.device, memory_format=fmt) if store_offsets else None
    if grid is not None:
        run(_max_pool2d_fwd_kernel, grid, x, y, offsets if store_offsets else y, *args, device=x.device, **kwargs)
    return y, offsets


_FWD_PLANS = PlanCache()


def _forward_plan(x, kernel_size, stride, padding, dilation, ceil_mode, store_offsets, force_int64):
    """(output shape, memory format, offsets dtype, grid (None: empty output), the launch's arguments after the
    three tensors, its keyword arguments) of max_pool2d_forward's call signature; raises PyTorch's errors."""
    _check_args(x.shape, kernel_size, stride, padding, dilation)
    N, C, H, W = x.shape
    OH, OW = _output_hw(x.shape, kernel_size, stride, padding, dilation, ceil_mode)
    fmt = suggest_memory_format(x)
    shape = (N, C, OH, OW)
    total = N * C * OH * OW
    if total == 0:
        return shape, fmt, offsets_dtype(kernel_size), None, (), {}
    idx64 = force_int64 or needs_int64(x, torch.empty(shape, dtype=x.dtype, device="meta", memory_format=fmt))
    block, meta = _launch_meta(idx64, x.dtype)
    args = (total, C, H, W, OH, OW, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            *x.stride())
    kwargs = dict(loop=kernel_size[0] * kernel_size[1],
                  KH=kernel_size[0], KW=kernel_size[1], UNROLL=kernel_size[0] * kernel_size[1] <= MAX_UNROLL_TAPS,
                  CHANNELS_LAST=fmt == torch.channels_last, ACC_TYPE=acc_dtype(x.dtype), IDX64=idx64, BLOCK=block,
                  STORE_TAPS=store_offsets, **meta)
    return shape, fmt, offsets_dtype(kernel_size), (cdiv(total, block),), args, kwargs


def max_pool2d_backward(
    grad_out: torch.Tensor,
    x_or_shape,
    offsets: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    ceil_mode: bool,
    *,
    memory_format: torch.memory_format | None = None,
    force_int64: bool = False,
) -> torch.Tensor:
    """grad_input of max_pool2d from grad_out (any strides) and the forward's offsets.

    x_or_shape: the forward input (only its shape and memory format are used) or its [N, C, H, W] shape.
    grad_input's memory format: `memory_format` if given, else x's suggested format, else (shape only)
    the offsets' format, which the forward took from x. Every element is written (no zero-fill pass).
    """
    check_runnable(grad_out, offsets)
    if isinstance(x_or_shape, torch.Tensor):
        shape = tuple(x_or_shape.shape)
        fmt = memory_format or suggest_memory_format(x_or_shape)
    else:
        shape = tuple(int(s) for s in x_or_shape)
        fmt = memory_format or suggest_memory_format(offsets)
    _check_args(shape, kernel_size, stride, padding, dilation)
    N, C, H, W = shape
    OH, OW = _output_hw(shape, kernel_size, stride, padding, dilation, ceil_mode)
    if tuple(grad_out.shape) != (N, C, OH, OW) or tuple(offsets.shape) != (N, C, OH, OW):
        raise RuntimeError(
            f"max_pool2d_backward: expected grad_out and offsets of shape {[N, C, OH, OW]}, got "
            f"{list(grad_out.shape)} and {list(offsets.shape)}"
        )
    if offsets.dtype not in (torch.int8, torch.int16, torch.int32):
        raise RuntimeError(f"max_pool2d_backward: offsets must be int8/int16/int32 taps, got {offsets.dtype}")
    dx = torch.empty(shape, dtype=grad_out.dtype, device=grad_out.device, memory_format=fmt)
    total = dx.numel()
    if total == 0:
        return dx
    KH, KW = kernel_size
    NH, NW = candidate_windows(kernel_size, stride, dilation)
    idx64 = force_int64 or needs_int64(grad_out, offsets, dx)
    block, meta = _launch_meta(idx64, grad_out.dtype)
    run(_max_pool2d_bwd_kernel, (cdiv(total, block),),
        grad_out, offsets, dx,
        total, C, H, W, OH, OW, KH, KW, NH, NW,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        *grad_out.stride(), *offsets.stride(),
        device=grad_out.device, loop=NH * NW,
        CHANNELS_LAST=fmt == torch.channels_last,
        ACC_TYPE=acc_dtype(grad_out.dtype),
        IDX64=idx64,
        BLOCK=block,
        **meta,
    )
    return dx


def offsets_to_indices(
    offsets: torch.Tensor,
    x_or_shape,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """The forward's taps -> F.max_pool2d(return_indices=True)'s int64 indices (ih*W + iw per plane),
    same shape and memory format as offsets. Plain tensor math: runs on any device, no Triton."""
    W = int((x_or_shape.shape if isinstance(x_or_shape, torch.Tensor) else x_or_shape)[3])
    OH, OW = offsets.shape[2], offsets.shape[3]
    tap = offsets.to(torch.int64)
    kh = torch.div(tap, kernel_size[1], rounding_mode="floor")
    kw = tap - kh * kernel_size[1]
    dev = offsets.device
    oh = torch.arange(OH, device=dev, dtype=torch.int64).view(1, 1, OH, 1)
    ow = torch.arange(OW, device=dev, dtype=torch.int64).view(1, 1, 1, OW)
    ih = oh * stride[0] - padding[0] + kh * dilation[0]
    iw = ow * stride[1] - padding[1] + kw * dilation[1]
    return ih * W + iw
