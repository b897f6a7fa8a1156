"""A training-mode residual block as one autograd node: both uses of the block's input in one backward.

    fastconv::residual_block_train(input, weight1, bias1?, bn_weight1?, bn_bias1?, weight2, bias2?, bn_weight2?,
        bn_bias2?, shortcut_weight?, shortcut_bias?, shortcut_bn_weight?, shortcut_bn_bias?,
        stride1, padding1[4], dilation1, groups1, stride2, padding2[4], dilation2, groups2,
        shortcut_stride, shortcut_padding[4], shortcut_dilation, shortcut_groups, eps[3], momentum[3],
        activation1, activation, algo1, backend, out_channels_last?,
        running_mean1(a!)?, running_var1(b!)?, num_batches_tracked1(c!)?, momentum_tensor1?,
        running_mean2(d!)?, running_var2(e!)?, num_batches_tracked2(f!)?, momentum_tensor2?,
        shortcut_running_mean(g!)?, shortcut_running_var(h!)?, shortcut_num_batches_tracked(i!)?,
        shortcut_momentum_tensor?)
        -> (y, z1, mean1, var1, scale1, shift1, z2, mean2, var2, zs, mean_s, var_s, act_bits)

        y = activation(bn2(conv2(activation1(bn1(conv1(input))))) + shortcut), shortcut = input, or
        bn_s(conv_s(input)) with a shortcut weight (ResNet's projection), every BatchNorm with batch statistics
        (and F.batch_norm's running-statistics update where running buffers are given; eps / momentum in the
        order 1, 2, shortcut). The same kernels as the chain ops (ops.conv_bn_chain): block 1's output is read
        by conv2's operand prologue and never materialised; y is normalised once, act' kept as bits for a mask
        activation (fastconv._act_bits). Every output but y is a non-differentiable intermediate for the
        backward (zs, mean_s, var_s empty without a shortcut conv; act_bits empty without bits).

Why one op. Apart, the block's input has two autograd users (conv1, and the residual or the shortcut conv), so
autograd adds their two gradients in a pass of its own (reads two activations, writes one), and the residual's
gradient g = grad_y * act'(u) is written by BatchNorm's backward only to be read by that add. Here conv1's dgrad
adds the other gradient in its store (fastconv::conv2d_input_grad's `add`): with an identity shortcut that is
grad_y masked by the act' bits, so g is never written at all; with a shortcut conv it is the shortcut's dgrad.

Autograd: gradients of input, the three weights and biases and the BatchNorm affines, as the separate ops give
them (tests/test_residual_block.py against float64 PyTorch).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _act_bits, _backend
from . import conv2d as conv_ops
from .._args import memory_format_as
from .conv_bn_act import (
    SUPPORTED_BACKENDS,
    _conv_backend,
    _register_autograd_of_mutating_op,
    batch_norm_act_grads,
    batch_norm_act_op,
    conv_bn_act_train,
    triton_bn_act,
)
from .conv_bn_chain import batch_norm_act_train, conv_bn_stats_train, input_grad_bn_act_op
from .conv2d_prologue import prologue_weight_grad_op
from ._autocast import register_autocast
from ._fastpath import FastOp, impl_of

_NUM_INPUTS = 44
# positions of the mutable arguments (running statistics, counters)
_MUTATED = (32, 33, 34, 36, 37, 38, 40, 41, 42)


def _resolve(device: torch.device, backend: str) -> str:
    return _backend.resolve("conv_bn_act", device, SUPPORTED_BACKENDS, backend)


def _forward(ops, fold_shortcut, input, w1, b1, bw1, bb1, w2, b2, bw2, bb2, ws, bs, bws, bbs, stride1, padding1,
             dilation1, groups1, stride2, padding2, dilation2, groups2, stride_s, padding_s, dilation_s, groups_s, eps,
             momentum, activation1, activation, algo1, backend, out_channels_last, rm1, rv1, nbt1, mt1, rm2, rv2,
             nbt2, mt2, rms, rvs, nbts, mts):
    """The block through `ops` = (conv_bn_stats_train, conv_bn_act_train, batch_norm_act_train): their
    implementations (the op) or the custom ops themselves (its fake). fold_shortcut (Triton): the projection
    stops at its statistics and the last normalize reads its z with its BatchNorm folded (scale, shift), so its
    normalized output is never written; else conv_bn_act_train makes it."""
    stats_train, act_train, bn_act_train = ops
    if len(eps) != 3 or len(momentum) != 3:
        raise ValueError("fastconv.residual_block_train: eps and momentum take 3 values (BatchNorm 1, 2, shortcut)")
    # the shapes first: nothing (running statistics included) is touched by a call that cannot add its shortcut
    out_shape = conv_ops.output_shape(conv_ops.output_shape(input.shape, w1.shape, stride1, padding1, dilation1),
                                      w2.shape, stride2, padding2, dilation2)
    shortcut_shape = (tuple(input.shape) if ws is None
                      else conv_ops.output_shape(input.shape, ws.shape, stride_s, padding_s, dilation_s))
    if shortcut_shape != out_shape:
        raise ValueError(f"fastconv.residual_block_train: the shortcut's output {list(shortcut_shape)} does not "
                         f"match the block's {list(out_shape)}")
    z1, mean1, var1, scale1, shift1 = stats_train(
        input, w1, b1, None, None, None, None, 0.0, "identity", stride1, padding1, dilation1, groups1, algo1,
        backend, rm1, rv1, momentum[0], mt1, bw1, bb1, eps[0], None, None, nbt1)
    z2, mean2, var2, _, _ = stats_train(
        z1, w2, b2, mean1, var1, bw1, bb1, eps[0], activation1, stride2, padding2, dilation2, groups2, "implicit",
        backend, rm2, rv2, momentum[1], mt2, None, None, eps[1], scale1, shift1, nbt2)
    affine = None
    if ws is not None and fold_shortcut:
        zs, mean_s, var_s, *affine = stats_train(
            input, ws, bs, None, None, None, None, 0.0, "identity", stride_s, padding_s, dilation_s, groups_s,
            "implicit", backend, rms, rvs, momentum[2], mts, bws, bbs, eps[2], None, None, nbts)
        residual = zs
    elif ws is not None:
        residual, zs, mean_s, var_s = act_train(input, ws, bs, bws, bbs, None, stride_s, padding_s, dilation_s,
                                                groups_s, eps[2], "identity", "implicit", backend, rms, rvs,
                                                momentum[2], mts, nbts)
    else:
        residual, zs, mean_s, var_s = input, input.new_empty(0), mean2.new_empty(0), mean2.new_empty(0)
    if affine is None:
        y, bits = bn_act_train(z2, mean2, var2, bw2, bb2, residual, eps[1], activation, backend, out_channels_last)
    else:
        wanted = _act_bits.wanted(residual, activation)
        bits = _act_bits.empty(z2, wanted)
        y = triton_bn_act(z2, mean2, var2, bw2, bb2, residual, eps[1], activation,
                          memory_format_as(z2, out_channels_last), bits if wanted else None, residual_affine=affine)
    return y, z1, mean1, var1, scale1, shift1, z2, mean2, var2, zs, mean_s, var_s, bits


_IMPLS = (impl_of(conv_bn_stats_train), impl_of(conv_bn_act_train), impl_of(batch_norm_act_train))


@torch.library.custom_op("fastconv::residual_block_train", mutates_args=(
    "running_mean1", "running_var1", "num_batches_tracked1", "running_mean2", "running_var2", "num_batches_tracked2",
    "shortcut_running_mean", "shortcut_running_var", "shortcut_num_batches_tracked"))
def residual_block_train(
    input: torch.Tensor,
    weight1: torch.Tensor,
    bias1: Optional[torch.Tensor],
    bn_weight1: Optional[torch.Tensor],
    bn_bias1: Optional[torch.Tensor],
    weight2: torch.Tensor,
    bias2: Optional[torch.Tensor],
    bn_weight2: Optional[torch.Tensor],
    bn_bias2: Optional[torch.Tensor],
    shortcut_weight: Optional[torch.Tensor],
    shortcut_bias: Optional[torch.Tensor],
    shortcut_bn_weight: Optional[torch.Tensor],
    shortcut_bn_bias: Optional[torch.Tensor],
    stride1: list[int],
    padding1: list[int],
    dilation1: list[int],
    groups1: int,
    stride2: list[int],
    padding2: list[int],
    dilation2: list[int],
    groups2: int,
    shortcut_stride: list[int],
    shortcut_padding: list[int],
    shortcut_dilation: list[int],
    shortcut_groups: int,
    eps: list[float],
    momentum: list[float],
    activation1: str = "relu",
    activation: str = "relu",
    algo1: str = "implicit",
    backend: str = "auto",
    out_channels_last: Optional[bool] = None,
    running_mean1: Optional[torch.Tensor] = None,
    running_var1: Optional[torch.Tensor] = None,
    num_batches_tracked1: Optional[torch.Tensor] = None,
    momentum_tensor1: Optional[torch.Tensor] = None,
    running_mean2: Optional[torch.Tensor] = None,
    running_var2: Optional[torch.Tensor] = None,
    num_batches_tracked2: Optional[torch.Tensor] = None,
    momentum_tensor2: Optional[torch.Tensor] = None,
    shortcut_running_mean: Optional[torch.Tensor] = None,
    shortcut_running_var: Optional[torch.Tensor] = None,
    shortcut_num_batches_tracked: Optional[torch.Tensor] = None,
    shortcut_momentum_tensor: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    args = list(locals().values())
    args[30] = name = _resolve(input.device, backend)  # one resolution for the whole block
    return _forward(_IMPLS, name == "triton", *args)


@residual_block_train.register_fake
def _(*args):
    args = list(args) + [None] * (_NUM_INPUTS - len(args))
    return _forward((conv_bn_stats_train, conv_bn_act_train, batch_norm_act_train), False, *args)


def _setup_context(ctx, inputs, output):
    inputs = list(inputs) + [None] * (_NUM_INPUTS - len(inputs))  # trailing defaults may be dropped
    (x, w1, b1, bw1, bb1, w2, b2, bw2, bb2, ws, bs, bws, bbs, stride1, padding1, dilation1, groups1, stride2,
     padding2, dilation2, groups2, stride_s, padding_s, dilation_s, groups_s, eps, _momentum, activation1,
     activation, _algo1, backend, *_rest) = inputs
    _, z1, mean1, var1, scale1, shift1, z2, mean2, var2, zs, mean_s, var_s, bits = output
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.geometry = ((list(stride1), list(padding1), list(dilation1), groups1),
                    (list(stride2), list(padding2), list(dilation2), groups2),
                    (list(stride_s), list(padding_s), list(dilation_s), groups_s))
    ctx.eps, ctx.activation1, ctx.activation = list(eps), activation1, activation
    ctx.backend = _resolve(x.device, backend)
    ctx.has_bias = (b1 is not None, b2 is not None, bs is not None)
    ctx.has_shortcut = ws is not None
    ctx.has_bits = bits.numel() > 0
    ctx.save_for_backward(x, w1, bw1, bb1, w2, bw2, bb2, ws, bws, bbs, z1, mean1, var1, scale1, shift1, z2, mean2,
                          var2, zs, mean_s, var_s, bits)
    conv_ops.mark_saved(x)


def _backward(ctx, grad_y, *_grad_intermediates):
    if grad_y is None:
        return (None,) * _NUM_INPUTS
    (x, w1, bw1, bb1, w2, bw2, bb2, ws, bws, bbs, z1, mean1, var1, scale1, shift1, z2, mean2, var2, zs, mean_s,
     var_s, bits) = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad) + (False,) * _NUM_INPUTS
    geo1, geo2, geo_s = ctx.geometry
    eps1, eps2, eps_s = ctx.eps
    name = ctx.backend
    conv_name = _conv_backend(name)
    want_x = needs[0]
    bits = bits if ctx.has_bits else None

    # The last BatchNorm + activation. Its residual's gradient g = grad_y * act'(u) is wanted as a tensor only
    # by a shortcut conv, or where act' needs u (no bits); with an identity shortcut conv1's dgrad adds grad_y
    # masked by the bits (act' = 1 for identity) in its store instead.
    mask_in_dgrad = not ctx.has_shortcut and (bits is not None or ctx.activation == "identity")
    want_g = (ctx.has_shortcut and any(needs[i] for i in (0, 9, 10, 11, 12))) or (want_x and not mask_in_dgrad)
    residual = None
    if bits is None and ctx.activation != "identity":  # act' from u = bn(z2) + residual, the residual rebuilt
        residual = x if not ctx.has_shortcut else batch_norm_act_op(zs, mean_s, var_s, bws, bbs, None, eps_s,
                                                                    "identity", name)
    dz2, grad_bw2, grad_bb2, g = batch_norm_act_grads(grad_y, z2, mean2, var2, bw2, bb2, residual, eps2,
                                                      ctx.activation, needs[7], needs[8], want_g, name, bits)

    # conv2, whose input is block 1's virtual output: dgrad with BatchNorm 1's backward, the prologue's wgrad
    grad_w2 = grad_b2 = grad_w1 = grad_b1 = grad_bw1 = grad_bb1 = None
    want_z1 = any(needs[i] for i in (0, 1, 2, 3, 4))
    want_w2 = needs[5] or (ctx.has_bias[1] and needs[6])
    dz2 = conv_ops.grad_for_dgrad_and_wgrad(dz2, conv_name, want_z1 and want_w2)
    stride2, padding2, dilation2, groups2 = geo2
    dz1 = None
    if want_z1:
        dz1, sum_g1, sum_gx1 = input_grad_bn_act_op(dz2, w2, z1, mean1, var1, bw1, bb1, eps1, ctx.activation1,
                                                    stride2, padding2, dilation2, groups2, name)
        grad_bw1 = sum_gx1 if (bw1 is not None and needs[3]) else None
        grad_bb1 = sum_g1 if (bb1 is not None and needs[4]) else None
    if want_w2:
        grad_w2, db2 = prologue_weight_grad_op(dz2, z1, scale1, shift1, ctx.activation1, list(w2.shape), stride2,
                                               padding2, dilation2, groups2, ctx.has_bias[1] and needs[6], conv_name,
                                               conv_ops.weight_layout(w2))
        grad_w2 = grad_w2 if needs[5] else None
        grad_b2 = db2 if (ctx.has_bias[1] and needs[6]) else None

    # the shortcut conv + BatchNorm (identity activation) from g: its dgrad is the add of conv1's
    add, add_bits = (grad_y, bits) if mask_in_dgrad else (g, None)
    grad_ws = grad_bs = grad_bws = grad_bbs = None
    if ctx.has_shortcut:
        add, add_bits = None, None
        if any(needs[i] for i in (0, 9, 10, 11, 12)):
            dzs, grad_bws, grad_bbs, _ = batch_norm_act_grads(g, zs, mean_s, var_s, bws, bbs, None, eps_s,
                                                              "identity", needs[11], needs[12], False, name)
            stride_s, padding_s, dilation_s, groups_s = geo_s
            want_ws = needs[9] or (ctx.has_bias[2] and needs[10])
            dzs = conv_ops.grad_for_dgrad_and_wgrad(dzs, conv_name, want_x and want_ws)
            if want_x:
                add = conv_ops.input_grad_op(dzs, ws, list(x.shape), stride_s, padding_s, dilation_s, groups_s,
                                             conv_name)
            if want_ws:
                grad_ws, dbs = conv_ops.weight_grad_op(dzs, x, list(ws.shape), stride_s, padding_s, dilation_s,
                                                       groups_s, ctx.has_bias[2] and needs[10], conv_name,
                                                       conv_ops.weight_layout(ws))
                grad_ws = grad_ws if needs[9] else None
                grad_bs = dbs if (ctx.has_bias[2] and needs[10]) else None

    # conv1: dx = dgrad + the other use's gradient, summed in the dgrad's store
    grad_x = None
    if dz1 is not None:
        stride1, padding1, dilation1, groups1 = geo1
        want_w1 = needs[1] or (ctx.has_bias[0] and needs[2])
        dz1 = conv_ops.grad_for_dgrad_and_wgrad(dz1, conv_name, want_x and want_w1)
        if want_x:
            grad_x = conv_ops.input_grad_op(dz1, w1, list(x.shape), stride1, padding1, dilation1, groups1, conv_name,
                                            add, add_bits)
        if want_w1:
            grad_w1, db1 = conv_ops.weight_grad_op(dz1, x, list(w1.shape), stride1, padding1, dilation1, groups1,
                                                   ctx.has_bias[0] and needs[2], conv_name,
                                                   conv_ops.weight_layout(w1))
            grad_w1 = grad_w1 if needs[1] else None
            grad_b1 = db1 if (ctx.has_bias[0] and needs[2]) else None
    return (grad_x, grad_w1, grad_b1, grad_bw1, grad_bb1, grad_w2, grad_b2, grad_bw2, grad_bb2, grad_ws, grad_bs,
            grad_bws, grad_bbs, *(None,) * (_NUM_INPUTS - 13))


_register_autograd_of_mutating_op(residual_block_train, _backward, _setup_context)
residual_block_train_op = FastOp(residual_block_train, _setup_context, _backward, mutated=_MUTATED)

_lib = torch.library.Library("fastconv", "IMPL")
# the convs' inputs, weights and biases follow autocast like nn.Conv2d; BatchNorm parameters and statistics do not
register_autocast(_lib, "fastconv::residual_block_train", cast_args=(0, 1, 2, 5, 6, 9, 10))
