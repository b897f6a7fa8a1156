"""A conv2d whose input is rebuilt from the previous fused block's pre-BatchNorm output, as custom ops.

    fastconv::conv2d_prologue(input, in_scale, in_shift, in_activation, weight, bias?, stride, padding[4],
                              dilation, groups, scale?, shift?, residual?, activation, backend) -> Tensor
        x = in_act(input * in_scale[c] + in_shift[c])           (the prologue, per input channel c)
        y = act((conv(x, weight) + bias) * scale + shift + residual)   (fastconv::conv2d's epilogue)
    fastconv::conv2d_prologue_weight_grad(grad_output, input, in_scale, in_shift, in_activation, weight_size,
                                          stride, padding[4], dilation, groups, bias_grad, backend, channels_last)
        -> (grad_weight, grad_bias or an empty tensor): conv2d_weight_grad of the conv on x, from `input`.

`input` is z, the producer's conv output; in_scale / in_shift are its BatchNorm folded per channel
(in_scale = gamma * invstd, in_shift = beta - mean * in_scale), in training functions of the batch statistics, so
they take gradients like any input. Only the Triton backend fuses: its implicit-GEMM forward and wgrad kernels
apply the prologue to each operand tile in registers (PROLOGUE), so x never exists in memory, in forward or
backward. Backends 'torch', 'cpu' and 'cuda' materialise x with PyTorch ops and run their ordinary conv.

A separate op rather than optional arguments on fastconv::conv2d: conv2d's schema, autograd, autocast positions
and call sites stay as they are; this op's backward differs throughout (its input gradient goes through act'
to z, in_scale and in_shift, and its weight gradient reads z); and it has one algorithm (implicit GEMM: the
im2col path has no prologue), so no `algo` argument.

Backward, with c = conv(x, w) + bias and dx its input gradient (the dgrad, which needs no x):
    g = dx * in_act'(input * in_scale + in_shift)    (recomputed elementwise, PyTorch ops)
    grad_input = g * in_scale;  grad_in_scale = sum_{N,H,W} g * input;  grad_in_shift = sum_{N,H,W} g
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from .._args import accumulation_dtype
from ._autocast import register_autocast
from ._fastpath import FastOp
from . import conv2d as conv_ops
from .conv2d import (
    _EXT_BACKENDS,
    _MASK_FROM_OUTPUT,
    ACTIVATIONS,
    CONV2D_BACKENDS,
    _check_choice,
    _fake_alloc,
    _new_output,
    _torch_activation,
    activation_grad,
    epilogue_grads,
)
from . import _triton

_CHANNELS = (1, -1, 1, 1)


def _resolve(device: torch.device, backend: str) -> str:
    return _backend.resolve("conv2d", device, CONV2D_BACKENDS, backend)


def torch_prologue(z: torch.Tensor, in_scale: torch.Tensor, in_shift: torch.Tensor, activation: str) -> torch.Tensor:
    """x = act(z * in_scale + in_shift) per channel, as PyTorch ops: computed in the accumulation dtype and cast to
    z's, as the kernels do; z's layout is kept."""
    acc = accumulation_dtype(z.dtype)
    u = z.to(acc) * in_scale.to(acc).view(_CHANNELS) + in_shift.to(acc).view(_CHANNELS)
    return _torch_activation(u, activation).to(z.dtype)


def prologue_grads(grad_x, z, in_scale, in_shift, activation, want_z, want_scale, want_shift):
    """(grad_z, grad_in_scale, grad_in_shift) of x = act(z * in_scale + in_shift) from grad_x, each None unless
    wanted: g = grad_x * act'(u) at the recomputed u; grad_z = g * in_scale, grad_in_scale = sum g * z,
    grad_in_shift = sum g over N, H, W. Math in the accumulation dtype; each result in its input's dtype."""
    acc = accumulation_dtype(z.dtype)
    zf = z.to(acc)
    u = zf * in_scale.to(acc).view(_CHANNELS) + in_shift.to(acc).view(_CHANNELS)
    g = activation_grad(grad_x.to(acc), activation, u=u)
    grad_z = (g * in_scale.to(acc).view(_CHANNELS)).to(z.dtype) if want_z else None
    grad_scale = (g * zf).sum((0, 2, 3)).to(in_scale.dtype) if want_scale else None
    grad_shift = g.sum((0, 2, 3)).to(in_shift.dtype) if want_shift else None
    return grad_z, grad_scale, grad_shift


def _check_coefficients(input, in_scale, in_shift) -> None:
    for name, t in (("in_scale", in_scale), ("in_shift", in_shift)):
        if t.dim() != 1 or t.shape[0] != input.shape[1]:
            raise ValueError(f"fastconv.conv2d_prologue: {name} must have shape ({input.shape[1]},) (one value per "
                             f"input channel), got {tuple(t.shape)}")


@torch.library.custom_op("fastconv::conv2d_prologue", mutates_args=())
def conv2d_prologue(
    input: torch.Tensor,
    in_scale: torch.Tensor,
    in_shift: torch.Tensor,
    in_activation: str,
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
    backend: str = "auto",
) -> torch.Tensor:
    _check_choice(in_activation, ACTIVATIONS, "activation")
    _check_choice(activation, ACTIVATIONS, "activation")
    _check_coefficients(input, in_scale, in_shift)
    name = _resolve(input.device, backend)
    y = _new_output(input, weight, stride, padding, dilation)
    if name == "triton":
        tconv = _triton.conv2d

        tconv.conv2d_forward(input, weight, bias, stride, padding, dilation, groups, scale=scale, shift=shift,
                             residual=residual, activation=activation, out=y,
                             prologue=(in_scale, in_shift, in_activation))
        return y
    x = torch_prologue(input, in_scale, in_shift, in_activation)  # only the Triton path fuses
    if name in _EXT_BACKENDS:
        conv_ops.ext_conv2d(x, weight, bias, stride, padding, dilation, groups, scale, shift, residual, activation, y)
        return y
    y.copy_(conv_ops._torch_conv_forward(x, weight, bias, stride, padding, dilation, groups, scale, shift, residual,
                                         activation))
    return y


@conv2d_prologue.register_fake
def _(input, in_scale, in_shift, in_activation, weight, bias, stride, padding, dilation, groups, scale=None,
      shift=None, residual=None, activation="identity", backend="auto"):
    return _new_output(input, weight, stride, padding, dilation, _fake_alloc)


@torch.library.custom_op("fastconv::conv2d_prologue_weight_grad", mutates_args=())
def conv2d_prologue_weight_grad(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    in_scale: torch.Tensor,
    in_shift: torch.Tensor,
    in_activation: str,
    weight_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    bias_grad: bool,
    backend: str = "auto",
    channels_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    name = _resolve(grad_output.device, backend)
    if name == "triton":
        tconv = _triton.conv2d

        dw, db = tconv.conv2d_weight_grad(grad_output, input, tuple(weight_size), stride, padding, dilation, groups,
                                          bias_grad=bias_grad, prologue=(in_scale, in_shift, in_activation),
                                          channels_last=channels_last)
        return dw, (db if db is not None else grad_output.new_empty(0))
    x = torch_prologue(input, in_scale, in_shift, in_activation)
    return conv_ops.weight_grad_op(grad_output, x, weight_size, stride, padding, dilation, groups, bias_grad, name,
                                   channels_last)


@conv2d_prologue_weight_grad.register_fake
def _(grad_output, input, in_scale, in_shift, in_activation, weight_size, stride, padding, dilation, groups,
      bias_grad, backend="auto", channels_last=False):
    dw = torch.empty(weight_size, dtype=input.dtype, device=input.device,
                     memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return dw, grad_output.new_empty(weight_size[0] if bias_grad else 0)


# ----------------------------------------------------------------------------------------------------------
# Autograd: x = in_act(input * in_scale + in_shift); c = conv(x, w) + bias; y = act(c * scale + shift + residual).
# Saved: input (z), in_scale, in_shift, weight, bias, scale, shift (and residual / y where the activation mask
# needs them, as fastconv::conv2d does); never x.

def _setup_context(ctx, inputs, output):
    (z, in_scale, in_shift, in_activation, weight, bias, stride, padding, dilation, groups, scale, shift, residual,
     activation, backend) = inputs
    ctx.geometry = (list(stride), list(padding), list(dilation), groups)
    ctx.in_activation, ctx.activation = in_activation, activation
    ctx.backend = _resolve(z.device, backend)
    ctx.has_bias, ctx.residual_given = bias is not None, residual is not None
    ctx.input_size, ctx.weight_size = list(z.shape), list(weight.shape)
    keep_residual = activation not in _MASK_FROM_OUTPUT and residual is not None
    need_y = activation in ("relu", "relu6")
    ctx.save_for_backward(z, in_scale, in_shift, weight, bias, scale, shift, residual if keep_residual else None,
                          output if need_y else None)


def _backward(ctx, grad_y):
    z, in_scale, in_shift, weight, bias, scale, shift, residual, y = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.geometry
    # The dispatcher drops trailing arguments equal to their defaults (None, 'identity', 'auto'): no gradient there.
    needs = tuple(ctx.needs_input_grad) + (False,) * 15
    prologue = (in_scale, in_shift, ctx.in_activation)

    def recompute(epilogue):
        tail = (scale, shift, residual) if epilogue else (None, None, None)
        return conv2d_prologue_op(z, *prologue, weight, bias, stride, padding, dilation, groups, *tail, "identity",
                                  ctx.backend)

    grad_c, grad_scale, grad_shift, grad_residual = epilogue_grads(
        grad_y, ctx.activation, y, scale, shift, ctx.residual_given, needs[10:13], recompute)
    grad_c = grad_c.to(z.dtype)
    grad_z = grad_in_scale = grad_in_shift = grad_w = grad_b = None
    want_b = ctx.has_bias and needs[5]
    grad_c = conv_ops.grad_for_dgrad_and_wgrad(grad_c, ctx.backend, (needs[0] or needs[1] or needs[2])
                                               and (needs[4] or want_b))
    if needs[0] or needs[1] or needs[2]:
        grad_x = conv_ops.input_grad_op(grad_c, weight, ctx.input_size, stride, padding, dilation, groups,
                                        ctx.backend)
        grad_z, grad_in_scale, grad_in_shift = prologue_grads(grad_x, z, *prologue, *needs[:3])
    if needs[4] or want_b:
        dw, db = prologue_weight_grad_op(grad_c, z, *prologue, ctx.weight_size, stride, padding, dilation, groups,
                                         want_b, ctx.backend, conv_ops.weight_layout(weight))
        grad_w = dw if needs[4] else None
        grad_b = db if want_b else None
    return (grad_z, grad_in_scale, grad_in_shift, None, grad_w, grad_b, None, None, None, None,
            grad_scale, grad_shift, grad_residual, None, None)


conv2d_prologue.register_autograd(_backward, setup_context=_setup_context)
conv2d_prologue_op = FastOp(conv2d_prologue, _setup_context, _backward)  # see _fastpath
prologue_weight_grad_op = FastOp(conv2d_prologue_weight_grad)

_lib = torch.library.Library("fastconv", "IMPL")
# input (z), weight, bias and residual follow autocast like nn.Conv2d; the folded BatchNorm coefficients on both
# sides keep their precision (applied in fp32).
register_autocast(_lib, "fastconv::conv2d_prologue", cast_args=(0, 4, 5, 12))
