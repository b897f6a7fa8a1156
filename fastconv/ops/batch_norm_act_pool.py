"""A training-mode BatchNorm + activation followed by a max-pool, as one op: the block's normalised output y is
never materialised, in forward or backward.

    fastconv::batch_norm_act_pool_train(z, mean, var, bn_weight?, bn_bias?, eps, activation, kernel_size[2],
                                        stride[2], padding[2], dilation[2], ceil_mode, backend,
                                        out_channels_last?) -> (out, offsets)
        out, offsets = max_pool2d(act((z - mean) / sqrt(var + eps) * bn_weight + bn_bias)), mean / var z's
        batch statistics (a PendingBlock's: functional.bn_act_max_pool). offsets: the argmax taps, in
        fastconv.ops.max_pool2d's format, laid out like out: channels_last or contiguous as out_channels_last asks
        (a chain's nn layout), else as max_pool2d of z would lay them out. Differentiable with respect to z,
        bn_weight and bn_bias.
    fastconv::batch_norm_act_pool_backward(grad_out, offsets, z, mean, var, bn_weight?, bn_bias?, eps,
                                           activation, kernel_size, stride, padding, dilation, ceil_mode,
                                           backend) -> (grad_z, sum_g, sum_gx)
        BatchNorm's training-mode gradient (as fastconv::batch_norm_act_backward) of the pooled block.

Triton: one kernel pools act(bn(z)) as it reads z (fastconv.triton.batch_norm_act_pool), and the BatchNorm
backward's two passes gather the pool's gradient per pixel from grad_out and offsets (no grad_y tensor).
The other backends compose fastconv's batch_norm_act / max_pool2d ops (same values, no saving).
Autograd saves z, the statistics, the BatchNorm parameters and the int8 offsets.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from .._args import memory_format_as
from .._pool_args import pool_outputs, pooled_memory_format
from .conv_bn_act import SUPPORTED_BACKENDS, _sum_dtypes, batch_norm_act, batch_norm_act_backward
from ._fastpath import FastOp, impl_of
from .max_pool2d import _fake_alloc, _max_pool2d_checked, alloc, check_pool_args, max_pool2d_input_grad
from . import _triton


def _resolve(z: torch.Tensor, backend: str) -> str:
    return _backend.resolve("conv_bn_act", z.device, SUPPORTED_BACKENDS, backend, z.dtype)


def _check(z, kernel_size, stride, padding, dilation, ceil_mode):
    if z.dim() != 4:
        raise RuntimeError(f"fastconv::batch_norm_act_pool_train expects a 4-D [N, C, H, W] z, got shape "
                           f"{list(z.shape)}")
    check_pool_args(z.shape, kernel_size, stride, padding, dilation, ceil_mode)


@torch.library.custom_op("fastconv::batch_norm_act_pool_train", mutates_args=())
def batch_norm_act_pool_train(
    z: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    bn_weight: Optional[torch.Tensor],
    bn_bias: Optional[torch.Tensor],
    eps: float,
    activation: str,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    ceil_mode: bool,
    backend: str = "auto",
    out_channels_last: Optional[bool] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check(z, kernel_size, stride, padding, dilation, ceil_mode)
    return _forward_checked(z, mean, var, bn_weight, bn_bias, eps, activation, kernel_size, stride, padding,
                            dilation, ceil_mode, backend, out_channels_last)


def _forward_checked(z, mean, var, bn_weight, bn_bias, eps, activation, kernel_size, stride, padding, dilation,
                     ceil_mode, backend="auto", out_channels_last=None):
    name = _resolve(z, backend)
    if name == "triton":
        tpool = _triton.batch_norm_act_pool

        out, offsets = _alloc_outputs(z, kernel_size, stride, padding, dilation, ceil_mode, alloc, out_channels_last)
        return tpool.batch_norm_act_pool_forward(z, mean, var, bn_weight, bn_bias, eps, activation, kernel_size,
                                                 stride, padding, dilation, ceil_mode, out=out, offsets=offsets)
    y = impl_of(batch_norm_act)(z, mean, var, bn_weight, bn_bias, None, eps, activation, name)
    out, offsets = _max_pool2d_checked(y, kernel_size, stride, padding, dilation, ceil_mode, name)
    if out_channels_last is None:
        return out, offsets
    # (copies only where asked for another layout than z's: a chain's z is laid out like y on these backends)
    fmt = pooled_memory_format(z, memory_format_as(z, out_channels_last))
    return out.contiguous(memory_format=fmt), offsets.contiguous(memory_format=fmt)


@batch_norm_act_pool_train.register_fake
def _(z, mean, var, bn_weight, bn_bias, eps, activation, kernel_size, stride, padding, dilation, ceil_mode,
      backend="auto", out_channels_last=None):
    _check(z, kernel_size, stride, padding, dilation, ceil_mode)
    return _alloc_outputs(z, kernel_size, stride, padding, dilation, ceil_mode, _fake_alloc, out_channels_last)


def _alloc_outputs(z, kernel_size, stride, padding, dilation, ceil_mode, allocate, out_channels_last=None):
    """(out, offsets) for pooling act(bn(z)), laid out as max_pool2d(batch_norm_act(z))'s, or channels_last /
    contiguous as out_channels_last asks (a chain's nn layout; Triton's z is channels_last whatever it is)."""
    fmt = pooled_memory_format(z, memory_format_as(z, out_channels_last))
    return pool_outputs(z, kernel_size, stride, padding, dilation, ceil_mode, fmt, allocate)


@torch.library.custom_op("fastconv::batch_norm_act_pool_backward", mutates_args=())
def batch_norm_act_pool_backward(
    grad_out: torch.Tensor,
    offsets: torch.Tensor,
    z: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    bn_weight: Optional[torch.Tensor],
    bn_bias: Optional[torch.Tensor],
    eps: float,
    activation: str,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    ceil_mode: bool,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    name = _resolve(z, backend)
    geo = (list(kernel_size), list(stride), list(padding), list(dilation))
    if name == "triton":  # (ceil_mode is in the shapes of grad_out / offsets)
        from .._args import memory_format_of
        tbn = _triton.batch_norm

        grad_z = alloc(z.shape, z.dtype, z.device, memory_format_of(z))
        _, sum_g, sum_gx, _ = tbn.batch_norm_act_backward(
            grad_out, z, mean, var, bn_weight, bn_bias, eps, activation, grad_z=grad_z,
            param_dtypes=_sum_dtypes(mean, bn_weight, bn_bias), pool=(offsets, *geo))
        return grad_z, sum_g, sum_gx
    from .._args import memory_format_of

    channels_last = memory_format_of(z) == torch.channels_last
    grad_y = impl_of(max_pool2d_input_grad)(grad_out, offsets, list(z.shape), *geo, ceil_mode, channels_last, name)
    grad_z, sum_g, sum_gx, _ = impl_of(batch_norm_act_backward)(grad_y, z, mean, var, bn_weight, bn_bias, None,
                                                                 eps, activation, False, name)
    return grad_z, sum_g, sum_gx


@batch_norm_act_pool_backward.register_fake
def _(grad_out, offsets, z, mean, var, bn_weight, bn_bias, eps, activation, kernel_size, stride, padding, dilation,
      ceil_mode, backend="auto"):
    g_dtype, gx_dtype = _sum_dtypes(mean, bn_weight, bn_bias)
    return torch.empty_like(z), torch.empty_like(mean, dtype=g_dtype), torch.empty_like(mean, dtype=gx_dtype)


def _setup_context(ctx, inputs, output):
    (z, mean, var, bn_weight, bn_bias, eps, activation, kernel_size, stride, padding, dilation, ceil_mode, backend,
     *_) = inputs
    _, offsets = output
    ctx.mark_non_differentiable(offsets)
    ctx.set_materialize_grads(False)
    ctx.eps, ctx.activation = eps, activation
    ctx.geometry = (list(kernel_size), list(stride), list(padding), list(dilation), bool(ceil_mode))
    ctx.backend = _resolve(z, backend)
    ctx.save_for_backward(z, mean, var, bn_weight, bn_bias, offsets)


def _backward(ctx, grad_out, _grad_offsets):
    if grad_out is None:
        return (None,) * 14
    z, mean, var, bn_weight, bn_bias, offsets = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_z, sum_g, sum_gx = batch_norm_act_pool_backward_op(grad_out, offsets, z, mean, var, bn_weight, bn_bias,
                                                            ctx.eps, ctx.activation, *ctx.geometry, ctx.backend)
    return (grad_z if needs[0] else None, None, None,
            sum_gx if (bn_weight is not None and needs[3]) else None,
            sum_g if (bn_bias is not None and needs[4]) else None, *(None,) * 9)


batch_norm_act_pool_train.register_autograd(_backward, setup_context=_setup_context)
batch_norm_act_pool_train_op = FastOp(batch_norm_act_pool_train, _setup_context, _backward,
                                      checked=_forward_checked)
batch_norm_act_pool_backward_op = FastOp(batch_norm_act_pool_backward)
