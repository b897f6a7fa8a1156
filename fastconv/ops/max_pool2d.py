"""torch.ops.fastconv.max_pool2d and its gradient op: schemas, fake kernels, backend dispatch, autograd.

    fastconv::max_pool2d(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation,
                         bool ceil_mode, str backend="auto") -> (Tensor out, Tensor offsets)
    fastconv::max_pool2d_input_grad(Tensor grad_output, Tensor offsets, SymInt[4] input_size,
                                    int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation,
                                    bool ceil_mode, bool channels_last, str backend="auto") -> Tensor

`input` is 4-D [N, C, H, W] with any strides; padding is symmetric (pad_h, pad_w), as F.max_pool2d's.
Argument checking with PyTorch's messages is `check_pool_args` (fastconv.functional.max_pool2d runs it).

Offsets (the argmax, identical for every backend, so that fake kernels are exact): a tensor of `out`'s
shape and strides holding the tap of the window's maximum, kh * KW + kw (0 <= tap < KH*KW), i.e. the input
element ih = oh*stride_h - pad_h + kh*dil_h, iw = ow*stride_w - pad_w + kw*dil_w. Its dtype is
`offsets_dtype(kernel_size)`: the narrowest of int8 / int16 / int32 holding KH*KW - 1 (int8 up to 11x11
windows). `offsets_to_indices` turns it into F.max_pool2d(return_indices=True)'s int64 indices.
    triton  the Triton forward writes the taps directly (fastconv.triton.max_pool2d).
    cuda    the CUDA C++ kernels (csrc/cuda/max_pool2d.cu) through torch.ops.fastconv.ext_max_pool2d.
    cpu     their C++ CPU twin (csrc/cpu/max_pool2d.cpp), the same op for CPU tensors.
    torch   aten.max_pool2d_with_indices, its int64 indices converted to taps (`indices_to_offsets`).

Memory: autograd saves ONLY the offsets, never the input. The gradient needs just the argmax positions,
the input's size and memory format (plain Python values), so the backward never touches x. For a 2x2 pool
that is N*C*H*W/4 bytes (int8) where F.max_pool2d saves the whole input plus int64 indices: 1/24 of it for
fp32 (1/16 for fp16), and x can be freed as soon as the next layer no longer needs it.

Output memory format (out, offsets and grad_input alike): the input's suggested memory format
(Tensor.suggest_memory_format), as PyTorch's max_pool2d: channels_last in -> channels_last out.
"""
from __future__ import annotations

import functools
import importlib

import torch

from .. import _backend, _ext
from .._pool_args import (  # noqa: F401 (re-exported)
    offsets_dtype, pool_output_size, pool_outputs, suggest_memory_format)
from ._fastpath import FastOp
from . import _triton

SUPPORTED_BACKENDS = ("triton", "cuda", "cpu", "torch")
# The fastconv kernels (Triton, CUDA C++ and the C++ CPU twin alike) pool the dtypes in _backend.KERNEL_DTYPES;
# under backend 'auto' other dtypes run on PyTorch, an explicit kernel backend refuses them (_backend.resolve).


# ----------------------------------------------------------------------------------------------------------
# Geometry, formats and the offsets encoding (pure PyTorch: no Triton needed)



def _c_div(a: int, b: int) -> int:
    """C++ integer division (truncates toward zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def check_pool_args(shape, kernel_size, stride, padding, dilation, ceil_mode) -> tuple[int, int]:
    """ATen's max_pool2d checks after argument parsing, in ATen's order and with its messages (a 3-D
    unbatched or 4-D `shape`, the original input's). Returns (OH, OW)."""
    (kh, kw), (dh, dw), (ph, pw), (dil_h, dil_w) = kernel_size, stride, padding, dilation
    H, W = shape[-2], shape[-1]
    outs = []
    for size, k, s, p, d in ((H, kh, dh, ph, dil_h), (W, kw, dw, pw, dil_w)):  # pooling_output_shape
        if s == 0:
            raise RuntimeError("stride should not be zero")
        if p < 0:
            raise RuntimeError(f"pad must be non-negative, but got pad: {p}")
        if p > _c_div((k - 1) * d + 1, 2):
            raise RuntimeError(
                f"pad should be at most half of effective kernel size, but got pad={p}, kernel_size={k} and "
                f"dilation={d}")
        outs.append(pool_output_size(size, k, s, p, d, ceil_mode))
    oh, ow = outs
    # pool2d_shape_check
    if not (kw > 0 and kh > 0):
        raise RuntimeError(f"kernel size should be greater than zero, but got kH: {kh} kW: {kw}")
    if not (dw > 0 and dh > 0):
        raise RuntimeError(f"stride should be greater than zero, but got dH: {dh} dW: {dw}")
    if not (dil_h > 0 and dil_w > 0):
        raise RuntimeError(f"dilation should be greater than zero, but got dilationH: {dil_h} dilationW: {dil_w}")
    ndim = len(shape)
    valid_dims = shape[1] != 0 and shape[2] != 0
    if not ((ndim == 3 and shape[0] != 0 and valid_dims) or (ndim == 4 and valid_dims and shape[3] != 0)):
        raise RuntimeError("Expected 3D or 4D (batch mode) tensor with optional 0 dim batch size for input, "
                           f"but got:{list(shape)}")
    if not (kw // 2 >= pw and kh // 2 >= ph):
        raise RuntimeError("pad should be smaller than or equal to half of kernel size, but got "
                           f"padW = {pw}, padH = {ph}, kW = {kw}, kH = {kh}")
    if ow < 1 or oh < 1:
        c = shape[-3]
        raise RuntimeError(f"Given input size: ({c}x{H}x{W}). Calculated output size: ({c}x{oh}x{ow}). "
                           "Output size is too small")
    return oh, ow


def _window_origin(OH, OW, stride, padding, device):
    """(h0, w0): each window's top-left input row / column, broadcastable to [N, C, OH, OW]."""
    oh = torch.arange(OH, device=device, dtype=torch.int64).view(1, 1, OH, 1)
    ow = torch.arange(OW, device=device, dtype=torch.int64).view(1, 1, 1, OW)
    return oh * stride[0] - padding[0], ow * stride[1] - padding[1]


def tap_positions(offsets: torch.Tensor, kernel_size, stride, padding, dilation):
    """Taps -> the (ih, iw) input positions they stand for (int64, broadcast to offsets' shape/strides)."""
    h0, w0 = _window_origin(offsets.shape[2], offsets.shape[3], stride, padding, offsets.device)
    tap = offsets.to(torch.int64)
    kh = torch.div(tap, kernel_size[1], rounding_mode="floor")
    kw = tap - kh * kernel_size[1]
    return h0 + kh * dilation[0], w0 + kw * dilation[1]


def offsets_to_indices(offsets: torch.Tensor, input_size, kernel_size, stride, padding, dilation) -> torch.Tensor:
    """Taps -> F.max_pool2d(return_indices=True)'s int64 indices ih*W + iw into each input plane (same
    shape and strides as `offsets`). A window lying completely in the padding (possible with dilation)
    reports, as PyTorch does, its first tap at or past the top/left padding, which is outside the plane."""
    ih, iw = tap_positions(offsets, kernel_size, stride, padding, dilation)
    out = torch.empty_like(offsets, dtype=torch.int64)
    torch.add(ih * int(input_size[3]), iw, out=out)
    return out


def _in_plane(offsets, input_size, kernel_size, stride, padding, dilation):
    """(indices, mask of the windows whose argmax is a real input element, not a window in the padding)."""
    H, W = int(input_size[2]), int(input_size[3])
    ih, iw = tap_positions(offsets, kernel_size, stride, padding, dilation)
    return ih * W + iw, (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)


def indices_to_offsets(indices: torch.Tensor, input_size, kernel_size, stride, padding, dilation,
                       out: torch.Tensor) -> torch.Tensor:
    """PyTorch's int64 indices -> taps, written into `out`. An index outside the plane (a window lying
    completely in the padding) becomes the tap PyTorch started that window from."""
    H, W = int(input_size[2]), int(input_size[3])
    KH, KW = kernel_size
    h0, w0 = _window_origin(indices.shape[2], indices.shape[3], stride, padding, indices.device)
    ih = torch.div(indices, W, rounding_mode="floor")
    rh = ih - h0
    rw = indices - ih * W - w0
    kh = torch.div(rh, dilation[0], rounding_mode="floor")
    kw = torch.div(rw, dilation[1], rounding_mode="floor")
    real = ((indices >= 0) & (indices < H * W) & (rh - kh * dilation[0] == 0) & (rw - kw * dilation[1] == 0)
            & (kh >= 0) & (kh < KH) & (kw >= 0) & (kw < KW))
    # the first tap at or past the top/left padding: ceil(-h0 / dil) when h0 < 0
    kh0 = torch.where(h0 < 0, torch.div(dilation[0] - 1 - h0, dilation[0], rounding_mode="floor"), 0)
    kw0 = torch.where(w0 < 0, torch.div(dilation[1] - 1 - w0, dilation[1], rounding_mode="floor"), 0)
    out.copy_(torch.where(real, kh * KW + kw, kh0 * KW + kw0))
    return out


def alloc(shape, dtype, device, memory_format) -> torch.Tensor:
    """Every output the torch backend must fully write comes from here (tests poison it). The Triton
    launchers allocate their own outputs (they take no `out=`)."""
    return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)


def _fake_alloc(shape, dtype, device, memory_format):
    return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)


def _resolve(device: torch.device, dtype: torch.dtype, backend: str) -> str:
    return _backend.resolve("max_pool2d", device, SUPPORTED_BACKENDS, backend, dtype)


def ext_ops():
    """torch.ops.fastconv with the C++ max-pool ops loaded and their fake kernels registered."""
    return _ext.ops("max_pool2d", _register_ext_fakes)


def _register_ext_fakes() -> None:
    @torch.library.register_fake("fastconv::ext_max_pool2d")
    def _(input, kernel_size, stride, padding, dilation, ceil_mode, offsets=True):
        out, taps = _fake_forward(input, kernel_size, stride, padding, dilation, ceil_mode)
        return out, (taps if offsets else taps.new_empty(0))

    @torch.library.register_fake("fastconv::ext_max_pool2d_input_grad")
    def _(grad_output, offsets, input_size, kernel_size, stride, padding, dilation, ceil_mode, channels_last):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return _fake_alloc(list(input_size), grad_output.dtype, grad_output.device, fmt)


def _check_input(input: torch.Tensor) -> None:
    if input.dim() != 4:
        raise RuntimeError(f"fastconv::max_pool2d expects a 4-D [N, C, H, W] input, got shape {list(input.shape)}")


# ----------------------------------------------------------------------------------------------------------
# Custom ops

_FWD_SCHEMA = ("(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, bool ceil_mode, "
               "str backend=\"auto\") -> (Tensor, Tensor)")
_BWD_SCHEMA = ("(Tensor grad_output, Tensor offsets, SymInt[4] input_size, int[2] kernel_size, int[2] stride, "
               "int[2] padding, int[2] dilation, bool ceil_mode, bool channels_last, str backend=\"auto\") -> Tensor")


@torch.library.custom_op("fastconv::max_pool2d", mutates_args=(), schema=_FWD_SCHEMA)
def max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, backend="auto"):
    """(out, offsets): F.max_pool2d's output and the argmax taps (see module doc)."""
    _check_input(input)
    check_pool_args(input.shape, kernel_size, stride, padding, dilation, ceil_mode)
    return _max_pool2d_checked(input, kernel_size, stride, padding, dilation, ceil_mode, backend)


def _max_pool2d_checked(input, kernel_size, stride, padding, dilation, ceil_mode, backend="auto"):
    """max_pool2d after its argument checks: the eager entry point of callers that validated them
    (functional.max_pool2d, see FastOp)."""
    name = _resolve(input.device, input.dtype, backend)
    if name in ("cuda", "cpu"):
        return ext_ops().ext_max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode)
    geo = (tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation))
    if name == "triton":
        tpool = _triton.max_pool2d

        return tpool.max_pool2d_forward(input, *geo, ceil_mode)
    y_ref, idx = torch.ops.aten.max_pool2d_with_indices(input, *geo, ceil_mode)
    fmt = suggest_memory_format(input)
    y = alloc(y_ref.shape, input.dtype, input.device, fmt)
    y.copy_(y_ref)
    offsets = alloc(y_ref.shape, offsets_dtype(kernel_size), input.device, fmt)
    indices_to_offsets(idx, input.shape, *geo, out=offsets)
    return y, offsets


def forward_kernel(backend: str, geo, ceil_mode: bool):
    """(function, arguments) such that `function(input, *arguments)` is _max_pool2d_checked's output y on an
    already-resolved `backend` and validated geometry: the kernel call itself, without the argmax taps (nothing
    will read them), for an eager caller that needs no autograd (functional.max_pool2d caches it per layer call
    signature). On the C++ backends the geometry is converted once (fastconv._C.PoolGeometry); on the torch
    backend it is PyTorch's own max_pool2d, which is what its composition computes y with (without the indices
    it turns into taps)."""
    if backend in ("cuda", "cpu"):
        ops = ext_ops()
        planned = getattr(ops, "ext_max_pool2d_planned", None)
        if planned is not None:
            return planned, (importlib.import_module("fastconv._C").PoolGeometry(*geo, ceil_mode),)
        return _first(ops.ext_max_pool2d), (*geo, ceil_mode, False)  # an extension built before it
    if backend == "triton":
        return _triton.replay.Replay(functools.partial(_triton_forward, tuple(map(tuple, geo)), ceil_mode)), ()
    if backend == "torch":
        return torch.max_pool2d, (*geo, ceil_mode)
    return None


def _triton_forward(geo, ceil_mode, x):
    """The Triton forward's y without taps, and what its launch read of x (x itself): a Replay's compute."""
    return (_triton.max_pool2d.max_pool2d_forward(x, *geo, ceil_mode, False)[0],), (x,)


def _first(fn):
    """x, *args -> fn(x, *args)[0]"""
    return lambda x, *args: fn(x, *args)[0]


def _fake_forward(input, kernel_size, stride, padding, dilation, ceil_mode, backend="auto"):
    _check_input(input)
    return pool_outputs(input, kernel_size, stride, padding, dilation, ceil_mode, suggest_memory_format(input),
                        _fake_alloc)


max_pool2d.register_fake(_fake_forward)  # also the fake kernel of fastconv::ext_max_pool2d


def _torch_input_grad(grad_output, offsets, input_size, geo, ceil_mode, dx):
    """PyTorch's max_pool2d backward from the taps. Windows lying completely in the padding read no input
    element and get no gradient (PyTorch's CPU kernel would add it outside the plane), as in Triton's."""
    indices, real = _in_plane(offsets, input_size, *geo)
    # masked unconditionally: asking whether any window lies in the padding would sync the host
    grad_output = torch.where(real, grad_output, torch.zeros((), dtype=grad_output.dtype, device=grad_output.device))
    indices = torch.where(real, indices, 0)
    # `dx` only lends its shape and memory format: max_pool2d's backward never reads the input's values.
    dx.copy_(torch.ops.aten.max_pool2d_with_indices_backward(grad_output, dx, *geo, ceil_mode, indices))
    return dx


@torch.library.custom_op("fastconv::max_pool2d_input_grad", mutates_args=(), schema=_BWD_SCHEMA)
def max_pool2d_input_grad(grad_output, offsets, input_size, kernel_size, stride, padding, dilation, ceil_mode,
                          channels_last, backend="auto"):
    """grad_input of max_pool2d from grad_output and the forward's offsets alone: the input is not needed
    (only its size and whether it was channels_last). Deterministic: every grad_input element is a gather
    of the windows that picked it, summed in a fixed order (no atomics)."""
    geo = (tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    name = _resolve(grad_output.device, grad_output.dtype, backend)
    if name == "triton":
        tpool = _triton.max_pool2d

        return tpool.max_pool2d_backward(grad_output, list(input_size), offsets, *geo, ceil_mode, memory_format=fmt)
    if name in ("cuda", "cpu"):
        return ext_ops().ext_max_pool2d_input_grad(grad_output, offsets, [int(s) for s in input_size],
                                                   *map(list, geo), ceil_mode, channels_last)
    dx = alloc(list(input_size), grad_output.dtype, grad_output.device, fmt)
    return _torch_input_grad(grad_output, offsets, input_size, geo, ceil_mode, dx)


@max_pool2d_input_grad.register_fake
def _(grad_output, offsets, input_size, kernel_size, stride, padding, dilation, ceil_mode, channels_last,
      backend="auto"):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return _fake_alloc(list(input_size), grad_output.dtype, grad_output.device, fmt)


# ----------------------------------------------------------------------------------------------------------
# Autograd. The forward saves the offsets (int8 for windows up to 11x11) and nothing else: see module doc.

def _setup_context(ctx, inputs, output):
    x, kernel_size, stride, padding, dilation, ceil_mode, backend = inputs
    _, offsets = output
    ctx.mark_non_differentiable(offsets)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the offsets
    ctx.save_for_backward(offsets)
    ctx.geometry = (list(kernel_size), list(stride), list(padding), list(dilation), bool(ceil_mode))
    ctx.input_size = list(x.shape)
    ctx.channels_last = suggest_memory_format(x) == torch.channels_last
    ctx.backend = _resolve(x.device, x.dtype, backend)


def _backward(ctx, grad_out, _grad_offsets):
    grad_x = None
    if ctx.needs_input_grad[0] and grad_out is not None:
        (offsets,) = ctx.saved_tensors
        grad_x = max_pool2d_input_grad_op(grad_out, offsets, ctx.input_size, *ctx.geometry, ctx.channels_last,
                                       ctx.backend)
    return grad_x, None, None, None, None, None, None


max_pool2d.register_autograd(_backward, setup_context=_setup_context)


# The gradient op is linear in grad_output: its own gradient (double backward) gathers at the argmax.
def _grad_setup_context(ctx, inputs, output):
    _, offsets, input_size, kernel_size, stride, padding, dilation, *_ = inputs
    ctx.save_for_backward(offsets)
    ctx.geometry = (list(input_size), list(kernel_size), list(stride), list(padding), list(dilation))


def _grad_backward(ctx, grad_grad_input):
    (offsets,) = ctx.saved_tensors
    input_size, kernel_size, stride, padding, dilation = ctx.geometry
    gg = None
    if ctx.needs_input_grad[0]:
        N, C, H, W = input_size
        idx, real = _in_plane(offsets, input_size, kernel_size, stride, padding, dilation)
        flat = grad_grad_input.reshape(N, C, H * W)
        gg = torch.gather(flat, 2, torch.where(real, idx, 0).reshape(N, C, -1)).view(offsets.shape)
        gg = torch.where(real, gg, torch.zeros((), dtype=gg.dtype, device=gg.device))
    return gg, None, None, None, None, None, None, None, None, None


max_pool2d_input_grad.register_autograd(_grad_backward, setup_context=_grad_setup_context)
# eager entry points (see _fastpath)
max_pool2d_op = FastOp(max_pool2d, _setup_context, _backward, checked=_max_pool2d_checked)
max_pool2d_input_grad_op = FastOp(max_pool2d_input_grad, _grad_setup_context, _grad_backward)
