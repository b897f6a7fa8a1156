"""torch.ops.fastconv.conv2d and its gradient ops: schemas, fake kernels, backend dispatch, autograd, autocast.

    fastconv::conv2d(input, weight, bias?, stride, padding[4], dilation, groups,
                     scale?, shift?, residual?, activation, algo, backend) -> Tensor
        y = act((conv(input, weight) + bias) * scale + shift + residual), in one kernel.
    fastconv::conv2d_input_grad(grad_output, weight, input_size, stride, padding[4], dilation, groups, backend,
                                add?, add_bits?) -> dx (+ add, masked by the act' bits add_bits where given)
    fastconv::conv2d_weight_grad(grad_output, input, weight_size, stride, padding[4], dilation, groups,
                                 bias_grad, backend, channels_last) -> (grad_weight, grad_bias or an empty tensor)
        grad_weight channels_last with `channels_last` (the weight's layout, weight_layout()), else contiguous.

padding is (top, bottom, left, right). `backend` is a name from fastconv._backend ('auto' resolves per
device); the forward's choice is saved and reused by its backward. Backends 'cpu' and 'cuda' run the C++
ops torch.ops.fastconv.ext_conv2d / ext_conv2d_input_grad / ext_conv2d_weight_grad (csrc/), whose fake
kernels are registered here.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _act_bits, _activations, _backend, _ext
from .._args import accumulation_dtype, channels_strided, conv_output_size, memory_format_of, output_memory_format
from ._autocast import register_autocast
from . import _fastpath
from ._fastpath import FastOp
from . import _triton

ALGOS = ("implicit", "im2col")
ACTIVATIONS = _activations.NAMES
# SUPPORTED_BACKENDS: the backends of the ops that still only have Triton and PyTorch kernels (conv_bn_act
# imports it); CONV2D_BACKENDS: conv2d's, which also runs on the C++ extension (fastconv._C).
SUPPORTED_BACKENDS = ("triton", "torch")
CONV2D_BACKENDS = ("triton", "torch", "cuda", "cpu")


def alloc(shape, dtype, device, memory_format) -> torch.Tensor:
    """Every output the kernels must fully write comes from here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)


def output_shape(x_shape, weight_shape, stride, padding, dilation) -> tuple[int, int, int, int]:
    """Shape of conv(x, weight) with padding (top, bottom, left, right)."""
    n, _, h, w = x_shape
    k, _, kh, kw = weight_shape
    top, bottom, left, right = padding
    return (n, k, conv_output_size(h, kh, stride[0], top, bottom, dilation[0]),
            conv_output_size(w, kw, stride[1], left, right, dilation[1]))


def output_geometry(x, weight, stride, padding, dilation) -> tuple[tuple[int, ...], torch.memory_format]:
    """(shape, memory format) of conv(x, weight) with padding (top, bottom, left, right): nn.Conv2d's."""
    shape = output_shape(x.shape, weight.shape, stride, padding, dilation)
    fmt = (torch.contiguous_format if x.is_contiguous() and weight.is_contiguous()  # the common case, quickly
           else output_memory_format(x, weight))
    return shape, fmt


def internal_format(backend: str, fmt: torch.memory_format) -> torch.memory_format:
    """The layout of a fused block's z (the pre-BatchNorm conv output it keeps for backward and a chained consumer
    conv reads) where nn's output layout is `fmt`: channels_last on the Triton backend, whose GEMMs read their
    operands channels_last (an NCHW z would be copied by the backward's dgrad and wgrad and by the consumer),
    `fmt` elsewhere. Outputs a user sees (a block's y, a pool's output) keep nn's layout."""
    return torch.channels_last if backend == "triton" else fmt


def _new_output(x, weight, stride, padding, dilation, allocate=None):
    shape, fmt = output_geometry(x, weight, stride, padding, dilation)
    return (allocate or alloc)(shape, x.dtype, x.device, fmt)  # looked up per call so tests can patch `alloc`


def _fake_alloc(shape, dtype, device, memory_format):
    return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)


# ----------------------------------------------------------------------------------------------------------
# PyTorch reference implementations (backend 'torch')

def _torch_activation(u: torch.Tensor, activation: str) -> torch.Tensor:
    return _activations.FUNCTIONS[activation](u)


def _symmetric(padding):
    top, bottom, left, right = padding
    return top == bottom and left == right


def _torch_conv_forward(x, weight, bias, stride, padding, dilation, groups, scale, shift, residual, activation):
    top, bottom, left, right = padding
    if _symmetric(padding):
        z = F.conv2d(x, weight, bias, stride, (top, left), dilation, groups)
    else:
        z = F.conv2d(F.pad(x, (left, right, top, bottom)), weight, bias, stride, 0, dilation, groups)
    return torch_conv_epilogue(z, scale, shift, residual, activation)


def torch_conv_epilogue(z, scale, shift, residual, activation):
    """The fused epilogue as PyTorch ops: act(z * scale + shift + residual)."""
    if scale is not None:
        z = z * scale[:, None, None]
    if shift is not None:
        z = z + shift[:, None, None]
    if residual is not None:
        z = z + residual
    return _torch_activation(z, activation)


def _padded_size(size, padding):
    N, C, H, W = size
    top, bottom, left, right = padding
    return [N, C, H + top + bottom, W + left + right]


def _torch_input_grad(grad_out, weight, input_size, stride, padding, dilation, groups):
    top, bottom, left, right = padding
    if _symmetric(padding):
        return torch.nn.grad.conv2d_input(list(input_size), weight, grad_out, stride, (top, left), dilation, groups)
    gp = torch.nn.grad.conv2d_input(_padded_size(input_size, padding), weight, grad_out, stride, 0, dilation, groups)
    return gp[:, :, top:top + input_size[2], left:left + input_size[3]]


def _torch_weight_grad(grad_out, x, weight_size, stride, padding, dilation, groups):
    top, bottom, left, right = padding
    if _symmetric(padding):
        return torch.nn.grad.conv2d_weight(x, list(weight_size), grad_out, stride, (top, left), dilation, groups)
    xp = F.pad(x, (left, right, top, bottom))
    return torch.nn.grad.conv2d_weight(xp, list(weight_size), grad_out, stride, 0, dilation, groups)


# ----------------------------------------------------------------------------------------------------------
# The C++ extension's ops (backends 'cpu' and 'cuda'); their schemas are in csrc/conv2d.cpp.

_EXT_BACKENDS = ("cpu", "cuda")


def _allow_tf32(t: torch.Tensor) -> bool:
    """fp32 GEMMs may use TF32 tensor cores exactly when nn.Conv2d would (_backend.conv_tf32_allowed)."""
    return bool(t.is_cuda and t.dtype == torch.float32 and _backend.conv_tf32_allowed())


def stats_tiles(n: int, oh: int, ow: int) -> int:
    """Rows of ext_conv2d's BatchNorm partials: one per kStatsRows output pixels (csrc, via ext_build_info)."""
    return -(-n * oh * ow // _ext.build_info()["stats_rows"])


def ext_conv2d(x, weight, bias, stride, padding, dilation, groups, scale=None, shift=None, residual=None,
               activation="identity", out=None, stats=False):
    """Run torch.ops.fastconv.ext_conv2d into `out` (allocated like the Python op's output if None).
    Returns out, or (out, (count, mean, M2)) with stats=True: BatchNorm partials [stats_tiles, C_out] of
    the conv before the bias, for fastconv::ext_batch_norm_finalize."""
    ops = ext_ops()
    if out is None:
        out = _new_output(x, weight, stride, padding, dilation)
    partials = ops.ext_conv2d(x, weight, bias, stride, padding, dilation, groups, scale, shift, residual,
                              _activations.CODES[activation], stats, _allow_tf32(x), out)
    return (out, tuple(partials)) if stats else out




def ext_ops():
    """torch.ops.fastconv with the C++ conv ops loaded and their fake kernels registered."""
    return _ext.ops("conv2d", _register_ext_fakes)


def _register_ext_fakes() -> None:
    torch.library.register_fake("fastconv::ext_conv2d", _fake_ext_conv2d)
    torch.library.register_fake("fastconv::ext_conv2d_input_grad", _fake_ext_conv2d_input_grad)
    torch.library.register_fake("fastconv::ext_conv2d_weight_grad", _fake_ext_conv2d_weight_grad)


def _fake_ext_conv2d(input, weight, bias, stride, padding, dilation, groups, scale, shift, residual, activation,
                     stats, allow_tf32, out):
    tiles = stats_tiles(out.shape[0], out.shape[2], out.shape[3]) if stats else 0
    acc = accumulation_dtype(input.dtype)
    return tuple(input.new_empty((tiles, weight.shape[0]), dtype=acc) for _ in range(3))


def _fake_ext_conv2d_input_grad(grad_output, weight, stride, padding, dilation, groups, allow_tf32, out):
    return None


def _fake_ext_conv2d_weight_grad(grad_output, input, weight_size, stride, padding, dilation, groups, bias_grad,
                                 allow_tf32):
    return input.new_empty(weight_size), input.new_empty(weight_size[0] if bias_grad else 0)


# ----------------------------------------------------------------------------------------------------------
# Custom ops

def _check_choice(value: str, choices, what: str) -> None:
    if value not in choices:
        raise ValueError(f"fastconv.conv2d: unknown {what} {value!r}; choose one of {', '.join(choices)}")


@torch.library.custom_op("fastconv::conv2d", mutates_args=())
def conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    activation: str = "identity",
    algo: str = "implicit",
    backend: str = "auto",
) -> torch.Tensor:
    _check_choice(activation, ACTIVATIONS, "activation")
    _check_choice(algo, ALGOS, "algo")
    name = _backend.resolve("conv2d", input.device, CONV2D_BACKENDS, backend)
    if name == "torch":
        z = _torch_conv_forward(input, weight, bias, stride, padding, dilation, groups, scale, shift, residual,
                                activation)
        shape, fmt = output_geometry(input, weight, stride, padding, dilation)
        if z.is_contiguous(memory_format=fmt) and z.dtype == input.dtype:
            return z  # a new tensor already in nn.Conv2d's layout (the common case): no copy
        y = alloc(shape, input.dtype, input.device, fmt)
        y.copy_(z)
        return y
    y = _new_output(input, weight, stride, padding, dilation)
    if name in _EXT_BACKENDS:
        ext_conv2d(input, weight, bias, stride, padding, dilation, groups, scale, shift, residual, activation, y)
        return y
    tconv, tim2col = _triton.conv2d, _triton.im2col

    launch = tconv.conv2d_forward if algo == "implicit" else tim2col.conv2d_im2col
    launch(input, weight, bias, stride, padding, dilation, groups,
           scale=scale, shift=shift, residual=residual, activation=activation, out=y)
    return y


@conv2d.register_fake
def _(input, weight, bias, stride, padding, dilation, groups, scale=None, shift=None, residual=None,
      activation="identity", algo="implicit", backend="auto"):
    return _new_output(input, weight, stride, padding, dilation, _fake_alloc)


@torch.library.custom_op("fastconv::conv2d_input_grad", mutates_args=())
def conv2d_input_grad(
    grad_output: torch.Tensor,
    weight: torch.Tensor,
    input_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    backend: str = "auto",
    add: Optional[torch.Tensor] = None,
    add_bits: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """dx of conv(x, weight) from grad_output, plus `add` (input_size, any strides) where given, masked by the
    act' bits `add_bits` (fastconv._act_bits) where given: a residual block's second gradient of its input,
    summed in the Triton dgrad's store (no separate pass); the other backends add with PyTorch ops."""
    _check_add(add, add_bits, input_size, grad_output)
    name = _backend.resolve("conv2d", grad_output.device, CONV2D_BACKENDS, backend)
    fmt = memory_format_of(grad_output)
    if name == "torch":
        torch_dx = _torch_input_grad(grad_output, weight, input_size, stride, padding, dilation, groups)
        if add is None and torch_dx.is_contiguous(memory_format=fmt) and torch_dx.dtype == grad_output.dtype:
            return torch_dx  # a new tensor already in dx's layout (symmetric padding): no copy
    dx = alloc(input_size, grad_output.dtype, grad_output.device, fmt)
    if name == "triton":
        tconv = _triton.conv2d

        return tconv.conv2d_input_grad(grad_output, weight, tuple(input_size), stride, padding, dilation, groups,
                                       out=dx, add=None if add is None else (add, add_bits))
    if name in _EXT_BACKENDS:
        ext_ops().ext_conv2d_input_grad(grad_output, weight, stride, padding, dilation, groups,
                                        _allow_tf32(grad_output), dx)
    else:  # torch: its result in dx's layout
        dx.copy_(torch_dx)
    if add is not None:
        # (a select where the bit is 0, as the Triton epilogue and PyTorch's threshold backward: a non-finite
        # gradient there adds 0)
        dx.add_(add if add_bits is None else torch.where(_act_bits.unpack(add_bits, input_size), add,
                                                         add.new_zeros(())))
    return dx


def _check_add(add, add_bits, input_size, grad_output) -> None:
    if add is None:
        if add_bits is not None:
            raise ValueError("fastconv.conv2d_input_grad: add_bits masks `add`, which is missing")
        return
    if list(add.shape) != list(input_size) or add.dtype != grad_output.dtype or add.device != grad_output.device:
        raise ValueError(f"fastconv.conv2d_input_grad: add must match dx ({list(input_size)}, {grad_output.dtype}, "
                         f"{grad_output.device}), got {list(add.shape)} {add.dtype} on {add.device}")
    if add_bits is not None:
        _act_bits.check_layout(add_bits, input_size, add.device, "fastconv.conv2d_input_grad: add_bits")


@conv2d_input_grad.register_fake
def _(grad_output, weight, input_size, stride, padding, dilation, groups, backend="auto", add=None, add_bits=None):
    _check_add(add, add_bits, input_size, grad_output)
    return torch.empty(input_size, dtype=grad_output.dtype, device=grad_output.device,
                       memory_format=memory_format_of(grad_output))


@torch.library.custom_op("fastconv::conv2d_weight_grad", mutates_args=())
def conv2d_weight_grad(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    bias_grad: bool,
    backend: str = "auto",
    channels_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dw, db): dw contiguous, or channels_last with `channels_last` (the weight's layout: see weight_layout)."""
    name = _backend.resolve("conv2d", grad_output.device, CONV2D_BACKENDS, backend)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if name in _EXT_BACKENDS:
        dw, db = ext_ops().ext_conv2d_weight_grad(grad_output, input, weight_size, stride, padding, dilation, groups,
                                                  bias_grad, _allow_tf32(input))
        return dw.contiguous(memory_format=fmt), db
    if name == "torch":
        dw = _torch_weight_grad(grad_output, input, weight_size, stride, padding, dilation, groups)
        db = grad_output.sum((0, 2, 3)) if bias_grad else grad_output.new_empty(0)
        return dw.contiguous(memory_format=fmt), db
    tconv = _triton.conv2d

    dw, db = tconv.conv2d_weight_grad(grad_output, input, tuple(weight_size), stride, padding, dilation, groups,
                                      bias_grad=bias_grad, channels_last=channels_last)
    return dw, (db if db is not None else grad_output.new_empty(0))


def weight_layout(weight: torch.Tensor) -> bool:
    """The weight-gradient ops' `channels_last` for this weight: its gradient is made in its own layout, which
    autograd's accumulation then keeps without a copy."""
    return memory_format_of(weight) == torch.channels_last


@conv2d_weight_grad.register_fake
def _(grad_output, input, weight_size, stride, padding, dilation, groups, bias_grad, backend="auto",
      channels_last=False):
    dw = torch.empty(weight_size, dtype=input.dtype, device=input.device,
                     memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    db = grad_output.new_empty(weight_size[0] if bias_grad else 0)
    return dw, db


# ----------------------------------------------------------------------------------------------------------
# Autograd: the backward is made of the gradient ops above (and elementwise epilogue algebra).
#   z = conv(x, w) + bias;  u = z * scale + shift + residual;  y = act(u)

_MASK_FROM_OUTPUT = set(_activations.MASK_ACTIVATIONS)


def _setup_context(ctx, inputs, output):
    (x, weight, bias, stride, padding, dilation, groups, scale, shift, residual, activation, algo, backend) = inputs
    ctx.geometry = (list(stride), list(padding), list(dilation), groups)
    ctx.activation = activation
    ctx.algo = algo
    ctx.backend = _backend.resolve("conv2d", x.device, CONV2D_BACKENDS, backend)
    ctx.has_bias = bias is not None
    ctx.input_size = list(x.shape)
    ctx.weight_size = list(weight.shape)
    need_y = activation in ("relu", "relu6")
    # silu/hardswish cannot be inverted from y: the backward recomputes u (saving memory instead).
    keep_residual = activation not in _MASK_FROM_OUTPUT and residual is not None
    ctx.save_for_backward(x, weight, bias, scale, shift, residual if keep_residual else None,
                          output if need_y else None)
    ctx.residual_given = residual is not None
    mark_saved(x, residual if keep_residual else None)


# Set on a tensor an op's autograd node has saved as it is (eager mode): a later consumer of the same tensor then
# saves it too instead of rebuilding it from its Producer (ops.conv_bn_act.Producer; that would cost a pass and save
# no memory). ResNet's projection shortcut reads the block input that conv1's op has saved already.
SAVED_ATTR = "_fastconv_saved"


def mark_saved(*tensors) -> None:
    """Record that these tensors are kept for backward by the calling op's node (see SAVED_ATTR)."""
    if torch.compiler.is_compiling():
        return
    for t in tensors:
        if t is not None and not isinstance(t, torch._subclasses.FakeTensor):
            setattr(t, SAVED_ATTR, True)


def activation_grad(grad_y, activation, y=None, u=None):
    """grad of act at pre-activation u; relu/relu6 masks also read off the output y (0 < y (< 6) iff
    0 < u (< 6)), whichever is given."""
    if activation == "identity":
        return grad_y
    if activation in ("relu", "relu6"):
        return grad_y * _activations.mask_derivative(y if y is not None else u, activation)
    if activation == "silu":
        s = torch.sigmoid(u)
        return grad_y * (s * (1 + u * (1 - s)))
    # hardswish: u*relu6(u+3)/6 -> (2u + 3)/6 on (-3, 3), 1 above, 0 below
    return grad_y * torch.where(u <= -3, torch.zeros_like(u), torch.where(u >= 3, torch.ones_like(u), (2 * u + 3) / 6))


def grad_for_dgrad_and_wgrad(grad: torch.Tensor, backend: str, both: bool) -> torch.Tensor:
    """A conv's output gradient as its two gradient launches read it. The Triton dgrad and wgrad each read their
    operands channels_last (triton._common.channels_contiguous, one copy per launch): an NCHW gradient that feeds
    both is copied here once instead. dx then comes out channels_last, as the gradient ops lay dx out like
    grad_output (a leaf's .grad is still laid out like the leaf: autograd's accumulation obeys its layout)."""
    if not both or backend != "triton" or not channels_strided(grad):
        return grad
    return grad.contiguous(memory_format=torch.channels_last)


def conv2d_grads(grad_z, x, weight, input_size, weight_size, geometry, want_x, want_w, want_b, backend):
    """(grad_x, grad_w, grad_b) of z = conv(x, weight) + bias from grad_z, each None unless wanted: the last
    step of the backward of conv2d and of conv_bn_act."""
    stride, padding, dilation, groups = geometry
    grad_x = grad_w = grad_b = None
    grad_z = grad_for_dgrad_and_wgrad(grad_z, backend, want_x and (want_w or want_b))
    if want_x:
        grad_x = input_grad_op(grad_z, weight, input_size, stride, padding, dilation, groups, backend)
    if want_w or want_b:
        grad_w, db = weight_grad_op(grad_z, x, weight_size, stride, padding, dilation, groups, want_b, backend,
                                    weight_layout(weight))
        grad_w = grad_w if want_w else None
        grad_b = db if want_b else None
    return grad_x, grad_w, grad_b


def epilogue_grads(grad_y, activation, y, scale, shift, residual_given, wants, recompute):
    """Backward of the fused epilogue y = act(u), u = z * scale + shift + residual, z = conv + bias:
    (grad_z, grad_scale, grad_shift, grad_residual), the last three None unless `wants` (three bools) asks.
    recompute(epilogue) reruns the forward without the activation: u with epilogue=True, z with False (only
    called where y cannot stand in for u, or for grad_scale)."""
    want_scale, want_shift, want_residual = wants
    u = recompute(True) if activation not in _MASK_FROM_OUTPUT else None
    grad_u = activation_grad(grad_y, activation, y, u)
    grad_residual = grad_u if (residual_given and want_residual) else None
    grad_shift = grad_u.sum((0, 2, 3)) if (shift is not None and want_shift) else None
    grad_scale = None
    grad_z = grad_u
    if scale is not None:
        if want_scale:
            grad_scale = (grad_u * recompute(False)).sum((0, 2, 3))
        grad_z = grad_u * scale[:, None, None]
    return grad_z, grad_scale, grad_shift, grad_residual


def _backward(ctx, grad_y):
    x, weight, bias, scale, shift, residual, y = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.geometry
    needs = ctx.needs_input_grad

    def recompute(epilogue):
        tail = (scale, shift, residual) if epilogue else (None, None, None)
        return conv2d_op(x, weight, bias, stride, padding, dilation, groups, *tail, "identity", ctx.algo, ctx.backend)

    grad_z, grad_scale, grad_shift, grad_residual = epilogue_grads(
        grad_y, ctx.activation, y, scale, shift, ctx.residual_given, needs[7:10], recompute)
    grad_x, grad_w, grad_b = conv2d_grads(grad_z.to(x.dtype), x, weight, ctx.input_size, ctx.weight_size,
                                          ctx.geometry, needs[0], needs[1], ctx.has_bias and needs[2], ctx.backend)
    return (grad_x, grad_w, grad_b, None, None, None, None, grad_scale, grad_shift, grad_residual,
            None, None, None)


conv2d.register_autograd(_backward, setup_context=_setup_context)
# The entry points fastconv calls (functional, backward functions): the custom ops, or in eager mode their
# implementations directly (see _fastpath).
conv2d_op = FastOp(conv2d, _setup_context, _backward)
input_grad_op = FastOp(conv2d_input_grad)
weight_grad_op = FastOp(conv2d_weight_grad)


def conv2d_call(input, weight, bias, stride, padding, dilation, groups, scale, shift, residual, activation, algo,
                backend):
    """conv2d_op for fastconv's own callers (`backend` resolved): in eager mode on the C++ backends a conv without
    an epilogue is one C++ autograd node (fastconv._C.conv2d_train, csrc/conv2d.cpp: the same ext ops as this
    op's implementation and _backward, without their Python frames); elsewhere the op."""
    if (backend in _EXT_BACKENDS and scale is None and shift is None and residual is None and activation == "identity"
            and _fastpath.eager(input)):
        entry = getattr(ext_ops(), "conv2d_train", None)
        if entry is not None:  # (None: an extension built before it existed)
            _check_choice(algo, ALGOS, "algo")
            shape, fmt = output_geometry(input, weight, stride, padding, dilation)
            out = entry(input, weight, bias, stride, padding, dilation, groups, shape, fmt == torch.channels_last,
                        _allow_tf32(input))
            if out.requires_grad:
                mark_saved(input)
            return out
    return conv2d_op(input, weight, bias, stride, padding, dilation, groups, scale, shift, residual, activation, algo,
                     backend)


def triton_replay(stride, padding, dilation, groups, activation: str, absent: tuple[bool, bool, bool, bool]):
    """A Replay (fastconv/triton/replay.py) of one conv call signature's eager no-grad call on the Triton backend
    (implicit GEMM) with this epilogue: `absent` says which of (bias, scale, shift, residual) the calls leave
    None; the Replay takes (input, weight, *the others present, in that order). conv2d_op's output, the op
    layers skipped after the first call. The functional layer keeps one per call signature and epilogue."""
    _check_choice(activation, ACTIVATIONS, "activation")
    return _triton.replay.Replay(functools.partial(_triton_forward, stride, padding, dilation, groups, activation,
                                                   absent))


def _triton_forward(stride, padding, dilation, groups, activation, absent, input, weight, *present):
    """conv2d_op's Triton implicit-GEMM forward, and what its launch read of each input (the channels_last copies
    it makes of NCHW operands): a Replay's compute."""
    given = iter(present)
    bias, scale, shift, residual = (None if a else next(given) for a in absent)
    y = _new_output(input, weight, stride, padding, dilation)
    common = _triton._common
    x, w = common.channels_contiguous(input), common.channels_contiguous(weight)
    _triton.conv2d.conv2d_forward(x, w, bias, stride, padding, dilation, groups, scale=scale, shift=shift,
                                  residual=residual, activation=activation, out=y)
    return (y,), (x, w, *present)


class TritonTrain:
    """The replays of one conv call signature's training calls on the Triton backend without an epilogue (implicit
    GEMM), for fastconv._C._triton_conv2d_train (csrc/triton_conv2d.cpp: one C++ autograd node; its backward
    mirrors _backward / conv2d_grads): `fwd` (conv2d_op's output), `dgrad` (conv2d_input_grad's), `wgrad` and
    `wgrad_bias` (conv2d_weight_grad's dw, and db). Each is a Replay returning a tuple."""

    __slots__ = ("fwd", "dgrad", "wgrad", "wgrad_bias")

    def __init__(self, stride, padding, dilation, groups: int, has_bias: bool, input_size, weight_size):
        replay = _triton.replay.Replay
        self.fwd = replay(functools.partial(_triton_forward, stride, padding, dilation, groups, "identity",
                                            (not has_bias, True, True, True)), single=False)
        self.dgrad = replay(functools.partial(_triton_input_grad, tuple(input_size), stride, padding, dilation,
                                              groups), single=False)
        self.wgrad, self.wgrad_bias = (
            replay(functools.partial(_triton_weight_grad, tuple(weight_size), stride, padding, dilation, groups,
                                     bias_grad), single=False) for bias_grad in (False, True))


def _triton_input_grad(input_size, stride, padding, dilation, groups, grad_output, weight):
    """conv2d_input_grad's Triton dgrad (dx laid out like grad_output) and what its launch read: a Replay's
    compute."""
    dx = alloc(input_size, grad_output.dtype, grad_output.device, memory_format_of(grad_output))
    common = _triton._common
    g, w = common.channels_contiguous(grad_output), common.channels_contiguous(weight)
    _triton.conv2d.conv2d_input_grad(g, w, input_size, stride, padding, dilation, groups, out=dx)
    return (dx,), (g, w)


def _triton_weight_grad(weight_size, stride, padding, dilation, groups, bias_grad, grad_output, input, weight):
    """conv2d_weight_grad's Triton (dw in the weight's layout[, db]) and what its launch read (the weight: its
    layout only): a Replay's compute."""
    common = _triton._common
    g, x = common.channels_contiguous(grad_output), common.channels_contiguous(input)
    dw, db = _triton.conv2d.conv2d_weight_grad(g, x, weight_size, stride, padding, dilation, groups,
                                               bias_grad=bias_grad, channels_last=weight_layout(weight))
    return ((dw, db) if bias_grad else (dw,)), (g, x, weight)


_lib = torch.library.Library("fastconv", "IMPL")
# input, weight, bias and residual follow autocast like nn.Conv2d; the per-channel scale/shift (folded
# BatchNorm) keep their precision and are applied to the fp32 accumulator.
register_autocast(_lib, "fastconv::conv2d", cast_args=(0, 1, 2, 9))
