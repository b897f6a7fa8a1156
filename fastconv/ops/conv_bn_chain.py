"""Chains of training-mode fused conv + BatchNorm + activation blocks whose normalised outputs never exist.

In a chain x -> [conv1, bn1, act1] -> [conv2, bn2, act2] -> ..., block k's output y_k = act_k(bn_k(z_k)) is
only the next conv's input. These ops keep it virtual: block k stops after its conv and batch statistics
(z_k, mean_k, var_k); block k+1's conv reads z_k and applies act_k(z_k * scale_k + shift_k) while loading its
operand tiles (the Triton kernels' PROLOGUE, forward and wgrad); the chain's last block is normalised once,
where a consumer needs the tensor.

    fastconv::conv_bn_stats_train(input, weight, bias?, in_mean?, in_var?, in_weight?, in_bias?, in_eps,
                                  in_activation, stride, padding[4], dilation, groups, algo, backend,
                                  running_mean(a!)?, running_var(b!)?, momentum, momentum_tensor?,
                                  bn_weight?, bn_bias?, bn_eps, in_scale?, in_shift?, num_batches_tracked(c!)?)
        -> (z, mean, var, scale, shift)
        z = conv(x) + bias and its batch mean / biased variance (fp32; fp64 for fp64), where x = input, or,
        with in_mean / in_var, x = in_activation(bn(input)) with the producer's batch statistics and affine
        (input is then the producer's z). scale / shift: this block's BatchNorm (bn_weight, bn_bias, bn_eps)
        folded per channel, scale = bn_weight * rsqrt(var + bn_eps), shift = bn_bias - mean * scale, in the
        statistics' dtype: the next block's in_scale / in_shift (Triton: written by the statistics finalize's
        last pass, no launch of their own). With in_scale / in_shift (the producer's), the prologue uses them
        in forward and backward; without, they are folded from in_mean, in_var, in_weight, in_bias here
        (fold_batch_norm, PyTorch ops). z is channels_last on Triton whatever the input's layout
        (conv2d.internal_format), nn.Conv2d's layout elsewhere.
    fastconv::batch_norm_act_train(z, mean, var, bn_weight?, bn_bias?, residual?, eps, activation, backend,
                                   out_channels_last?) -> (y, act_bits)
        y = act((z - mean) / sqrt(var + eps) * bn_weight + bn_bias [+ residual]), mean / var z's batch
        statistics; y channels_last or contiguous as out_channels_last asks (a chain's nn.Conv2d layout: on
        Triton the producer's z is channels_last whatever the model's layout), like z when it is None.
        act_bits (no gradient): with a residual and a mask activation (relu, relu6), act'(u) as bits
        (fastconv._act_bits, 1/16 of a bf16 y), which its backward reads instead of the residual: the residual is
        neither saved by this op nor read again; else an empty int32 tensor.

Autograd. mean / var are batch statistics of z, so they carry no gradient of their own: the consumer's
backward applies BatchNorm's training-mode gradient, which accounts for them (fastconv::batch_norm_act_backward:
grad_z = gamma * invstd * (g - mean(g) - xhat * mean(g * xhat)), g = grad_y * act'). conv_bn_stats_train's
backward from grad_z: dgrad gives the gradient of the virtual x, batch_norm_act_backward turns it into the
gradients of the producer's z, gamma and beta, and the weight gradient reads z through the prologue again.
Saved per block: its input (the producer's z, or x) and the statistics; never y.

Only the Triton backend fuses. The other backends compute the same values by materialising x with PyTorch
ops (correct, no saving), which is why fastconv.FusedSequential chains blocks only on the Triton backend.
With running_mean / running_var (and num_batches_tracked) the op also updates them as fastconv::conv_bn_act_train
does (Triton: in the statistics finalize's last pass; cpu / cuda: in ext_batch_norm_finalize).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _act_bits, _backend
from . import conv2d as conv_ops
from .._args import memory_format_as, memory_format_of
from .conv2d import ALGOS, ACTIVATIONS, _check_choice, _fake_alloc, internal_format, output_geometry
from .conv2d_prologue import prologue_weight_grad_op, torch_prologue
from .conv_bn_act import (
    SUPPORTED_BACKENDS,
    _check_running,
    _conv_backend,
    _register_autograd_of_mutating_op,
    _stat_dtype,
    _sum_dtypes,
    batch_norm_act,
    batch_norm_act_backward_op,
    batch_norm_act_grads,
    torch_bn_u,
    triton_bn_act,
    ext_finalize,
    counted_here,
    finalize_running,
    fold_batch_norm,
    mark_saved,
    update_running_stats,
)
from ._autocast import register_autocast
from ._fastpath import FastOp, impl_of
from . import _triton

_NUM_INPUTS = 25  # conv_bn_stats_train's arguments


def _resolve(device: torch.device, backend: str) -> str:
    return _backend.resolve("conv_bn_act", device, SUPPORTED_BACKENDS, backend)


def _prologue(in_mean, in_var, in_weight, in_bias, in_eps, in_activation, in_scale=None, in_shift=None):
    """(in_scale, in_shift, in_activation) of the producer's BatchNorm, or None without one: the producer's folded
    coefficients when given, else folded here."""
    if in_mean is None:
        return None
    if in_scale is not None and in_shift is not None:
        return in_scale, in_shift, in_activation
    return (*fold_batch_norm(in_mean, in_var, in_weight, in_bias, in_eps), in_activation)


def _stats_of(z: torch.Tensor):
    zf = z.to(_stat_dtype(z.dtype))
    return zf.mean((0, 2, 3)), zf.var((0, 2, 3), unbiased=False)


@torch.library.custom_op("fastconv::conv_bn_stats_train",
                         mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def conv_bn_stats_train(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    in_mean: Optional[torch.Tensor],
    in_var: Optional[torch.Tensor],
    in_weight: Optional[torch.Tensor],
    in_bias: Optional[torch.Tensor],
    in_eps: float,
    in_activation: str,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    algo: str = "implicit",
    backend: str = "auto",
    running_mean: Optional[torch.Tensor] = None,
    running_var: Optional[torch.Tensor] = None,
    momentum: float = 0.1,
    momentum_tensor: Optional[torch.Tensor] = None,
    bn_weight: Optional[torch.Tensor] = None,
    bn_bias: Optional[torch.Tensor] = None,
    bn_eps: float = 1e-5,
    in_scale: Optional[torch.Tensor] = None,
    in_shift: Optional[torch.Tensor] = None,
    num_batches_tracked: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_choice(in_activation, ACTIVATIONS, "activation")
    _check_choice(algo, ALGOS, "algo")
    _check_running(running_mean, running_var, momentum_tensor, weight.shape[0], num_batches_tracked)
    nbt = counted_here(num_batches_tracked, momentum_tensor)
    if (in_mean is None) != (in_var is None):
        raise ValueError("fastconv.conv_bn_stats_train: in_mean and in_var are given together or not at all")
    if (in_scale is None) != (in_shift is None) or (in_scale is not None and in_mean is None):
        raise ValueError("fastconv.conv_bn_stats_train: in_scale and in_shift are given together, with in_mean")
    prologue = _prologue(in_mean, in_var, in_weight, in_bias, in_eps, in_activation, in_scale, in_shift)
    name = _resolve(input.device, backend)
    if name == "triton" and (prologue is None or algo == "implicit"):
        tbn, tconv, tim2col = _triton.batch_norm, _triton.conv2d, _triton.im2col

        shape, fmt = output_geometry(input, weight, stride, padding, dilation)
        z = conv_ops.alloc(shape, input.dtype, input.device, internal_format(name, fmt))  # channels_last
        if prologue is None:
            conv = tconv.conv2d_forward if algo == "implicit" else tim2col.conv2d_im2col
            _, stats = conv(input, weight, bias, stride, padding, dilation, groups, out=z, stats=True)
        else:
            _, stats = tconv.conv2d_forward(input, weight, bias, stride, padding, dilation, groups, out=z,
                                            stats=True, prologue=prologue)
        running, after = finalize_running(running_mean, running_var, momentum, momentum_tensor, nbt)
        mean, var, scale, shift = tbn.finalize(stats, z.shape[1], bias, running, fold=(bn_weight, bn_bias, bn_eps))
        after(mean, var, z)
        return z, mean, var, scale, shift
    x = input if prologue is None else torch_prologue(input, *prologue)  # materialised: only Triton fuses
    conv_name = _conv_backend(name)
    if conv_name in ("cpu", "cuda"):
        z, (cnt, mean_p, m2_p) = conv_ops.ext_conv2d(x, weight, bias, stride, padding, dilation, groups, stats=True)
        mean, var = ext_finalize(cnt, mean_p, m2_p, bias, z, (running_mean, running_var, momentum, momentum_tensor,
                                                              nbt))
    else:
        z = conv_ops.conv2d_op(x, weight, bias, stride, padding, dilation, groups, None, None, None, "identity",
                               algo, conv_name)
        mean, var = _stats_of(z)
        update_running_stats(running_mean, running_var, mean, var, z, momentum, momentum_tensor, nbt)
    return (z, mean, var, *fold_batch_norm(mean, var, bn_weight, bn_bias, bn_eps))


@conv_bn_stats_train.register_fake
def _(input, weight, bias, in_mean, in_var, in_weight, in_bias, in_eps, in_activation, stride, padding, dilation,
      groups, algo="implicit", backend="auto", running_mean=None, running_var=None, momentum=0.1,
      momentum_tensor=None, bn_weight=None, bn_bias=None, bn_eps=1e-5, in_scale=None, in_shift=None,
      num_batches_tracked=None):
    _check_running(running_mean, running_var, momentum_tensor, weight.shape[0], num_batches_tracked)
    shape, fmt = output_geometry(input, weight, stride, padding, dilation)
    name = _resolve(input.device, backend)
    fused = name == "triton" and (in_mean is None or algo == "implicit")  # the op's own Triton path
    z = _fake_alloc(shape, input.dtype, input.device, internal_format(name, fmt) if fused else fmt)
    stat = input.new_empty(weight.shape[0], dtype=_stat_dtype(input.dtype))
    return z, stat, torch.empty_like(stat), torch.empty_like(stat), torch.empty_like(stat)


def _setup_context(ctx, inputs, output):
    (x, weight, bias, in_mean, in_var, in_weight, in_bias, in_eps, in_activation, stride, padding, dilation,
     groups, algo, backend, *rest) = inputs
    in_scale, in_shift = (list(rest) + [None] * 9)[7:9]  # trailing defaults may be dropped
    _, mean, var, scale, shift = output
    ctx.mark_non_differentiable(mean, var, scale, shift)
    ctx.set_materialize_grads(False)
    ctx.geometry = (list(stride), list(padding), list(dilation), groups)
    ctx.in_eps, ctx.in_activation = in_eps, in_activation
    ctx.backend = _resolve(x.device, backend)
    ctx.has_bias = bias is not None
    ctx.input_size, ctx.weight_size = list(x.shape), list(weight.shape)
    ctx.save_for_backward(x, weight, in_mean, in_var, in_weight, in_bias, in_scale, in_shift)
    mark_saved(x)


def _backward(ctx, grad_z, _grad_mean, _grad_var, _grad_scale, _grad_shift):
    if grad_z is None:
        return (None,) * _NUM_INPUTS
    x, weight, in_mean, in_var, in_weight, in_bias, in_scale, in_shift = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.geometry
    needs = tuple(ctx.needs_input_grad) + (False,) * _NUM_INPUTS  # trailing defaults may be dropped
    conv_backend = _conv_backend(ctx.backend)
    grad_z = grad_z.to(x.dtype)
    prologue = _prologue(in_mean, in_var, in_weight, in_bias, ctx.in_eps, ctx.in_activation, in_scale, in_shift)
    grad_input = grad_in_weight = grad_in_bias = grad_w = grad_b = None
    want_dx = needs[0] or (prologue is not None and (needs[5] or needs[6]))
    want_b = ctx.has_bias and needs[2]
    grad_z = conv_ops.grad_for_dgrad_and_wgrad(grad_z, conv_backend, want_dx and (needs[1] or want_b))
    if want_dx:
        # the gradient of the conv's input x (virtual with a prologue)
        if prologue is None:
            grad_input = conv_ops.input_grad_op(grad_z, weight, ctx.input_size, stride, padding, dilation, groups,
                                                conv_backend)
        else:  # x = act(bn(input)) with input's batch statistics: dgrad, then BatchNorm's training-mode gradient
            grad_input, sum_g, sum_gx = input_grad_bn_act_op(grad_z, weight, x, in_mean, in_var, in_weight, in_bias,
                                                             ctx.in_eps, ctx.in_activation, stride, padding,
                                                             dilation, groups, ctx.backend)
            grad_in_weight = sum_gx if (in_weight is not None and needs[5]) else None
            grad_in_bias = sum_g if (in_bias is not None and needs[6]) else None
            grad_input = grad_input if needs[0] else None
    if needs[1] or want_b:
        if prologue is None:
            grad_w, db = conv_ops.weight_grad_op(grad_z, x, ctx.weight_size, stride, padding, dilation, groups,
                                                 want_b, conv_backend, conv_ops.weight_layout(weight))
        else:
            grad_w, db = prologue_weight_grad_op(grad_z, x, *prologue, ctx.weight_size, stride, padding, dilation,
                                                 groups, want_b, conv_backend, conv_ops.weight_layout(weight))
        grad_w = grad_w if needs[1] else None
        grad_b = db if want_b else None
    return (grad_input, grad_w, grad_b, None, None, grad_in_weight, grad_in_bias, *(None,) * (_NUM_INPUTS - 7))


@torch.library.custom_op("fastconv::conv2d_input_grad_bn_act", mutates_args=())
def conv2d_input_grad_bn_act(
    grad_output: torch.Tensor,
    weight: torch.Tensor,
    z: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    bn_weight: Optional[torch.Tensor],
    bn_bias: Optional[torch.Tensor],
    eps: float,
    activation: str,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_z, sum_g, sum_gx): the gradient of z through x = act(bn(z)) (z's batch statistics mean / var) and
    conv(x, weight), and BatchNorm's sums (dbeta = sum_g, dgamma = sum_gx, in bn_bias's / bn_weight's dtypes),
    as input_grad_op followed by batch_norm_act_backward compute them. Triton: the dgrad's epilogue takes the sums
    per tile (no reduce pass over dx and z) where it can (triton.conv2d.bn_grad_fusable); the other backends run
    the two ops."""
    name = _resolve(z.device, backend)
    fmt = memory_format_of(z)
    if name == "triton":
        tbn = _triton.batch_norm

        grad_z = conv_ops.alloc(z.shape, z.dtype, z.device, fmt)  # looked up per call (tests poison it)
        return tbn.conv2d_input_grad_bn_act(grad_output, weight, z, mean, var, bn_weight, bn_bias, eps, activation,
                                            stride, padding, dilation, groups, out=grad_z,
                                            param_dtypes=_sum_dtypes(mean, bn_weight, bn_bias))
    grad_x = conv_ops.input_grad_op(grad_output, weight, list(z.shape), stride, padding, dilation, groups,
                                    _conv_backend(name))
    grad_z, sum_g, sum_gx, _ = batch_norm_act_backward_op(grad_x.contiguous(memory_format=fmt), z, mean, var,
                                                          bn_weight, bn_bias, None, eps, activation, False, name)
    return grad_z, sum_g, sum_gx


@conv2d_input_grad_bn_act.register_fake
def _(grad_output, weight, z, mean, var, bn_weight, bn_bias, eps, activation, stride, padding, dilation, groups,
      backend="auto"):
    g_dtype, gx_dtype = _sum_dtypes(mean, bn_weight, bn_bias)
    grad_z = torch.empty(z.shape, dtype=z.dtype, device=z.device, memory_format=memory_format_of(z))
    return grad_z, mean.new_empty(z.shape[1], dtype=g_dtype), mean.new_empty(z.shape[1], dtype=gx_dtype)


input_grad_bn_act_op = FastOp(conv2d_input_grad_bn_act)


_register_autograd_of_mutating_op(conv_bn_stats_train, _backward, _setup_context)
conv_bn_stats_train_op = FastOp(conv_bn_stats_train, _setup_context, _backward, mutated=(15, 16, 24))


@torch.library.custom_op("fastconv::batch_norm_act_train", mutates_args=())
def batch_norm_act_train(
    z: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    bn_weight: Optional[torch.Tensor],
    bn_bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    eps: float,
    activation: str,
    backend: str = "auto",
    out_channels_last: Optional[bool] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    name = _resolve(z.device, backend)
    fmt = memory_format_as(z, out_channels_last)  # the chain's nn layout (Triton's z is channels_last regardless)
    if name == "triton":  # one kernel; with bits, it stores them as it normalises
        wanted = _act_bits.wanted(residual, activation)
        bits = _act_bits.empty(z, wanted)
        return (triton_bn_act(z, mean, var, bn_weight, bn_bias, residual, eps, activation, fmt,
                              bits if wanted else None), bits)
    y = impl_of(batch_norm_act)(z, mean, var, bn_weight, bn_bias, residual, eps, activation, name)
    y = y.contiguous(memory_format=fmt)  # (z is laid out as asked on these backends: no copy in a chain)
    if not _act_bits.wanted(residual, activation):
        return y, _act_bits.empty(z, False)
    return y, _act_bits.of(torch_bn_u(z, mean, var, bn_weight, bn_bias, residual, eps), activation)


@batch_norm_act_train.register_fake
def _(z, mean, var, bn_weight, bn_bias, residual, eps, activation, backend="auto", out_channels_last=None):
    y = torch.empty(z.shape, dtype=z.dtype, device=z.device, memory_format=memory_format_as(z, out_channels_last))
    return y, _act_bits.empty(z, _act_bits.wanted(residual, activation))


def _bn_setup_context(ctx, inputs, output):
    z, mean, var, bn_weight, bn_bias, residual, eps, activation, backend, *_ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.eps, ctx.activation = eps, activation
    ctx.backend = _resolve(z.device, backend)
    ctx.has_residual = residual is not None
    ctx.has_bits = _act_bits.wanted(residual, activation)
    # act' needs u = bn(z) + residual: the bits where the forward kept them, else the residual (SiLU, hardswish)
    keep = output[1] if ctx.has_bits else residual if activation != "identity" else None
    ctx.save_for_backward(z, mean, var, bn_weight, bn_bias, keep)
    mark_saved(None if ctx.has_bits else keep)


def _bn_backward(ctx, grad_y, _grad_bits=None):
    if grad_y is None:  # y took no part in the loss
        return (None,) * 10
    z, mean, var, bn_weight, bn_bias, kept = ctx.saved_tensors
    residual, bits = (None, kept) if ctx.has_bits else (kept, None)
    needs = tuple(ctx.needs_input_grad) + (False,) * 10
    grad_z, grad_gamma, grad_beta, grad_res = batch_norm_act_grads(
        grad_y, z, mean, var, bn_weight, bn_bias, residual, ctx.eps, ctx.activation, needs[3], needs[4],
        ctx.has_residual and needs[5], ctx.backend, bits)
    return (grad_z if needs[0] else None, None, None, grad_gamma, grad_beta, grad_res, None, None, None, None)


batch_norm_act_train.register_autograd(_bn_backward, setup_context=_bn_setup_context)
batch_norm_act_train_op = FastOp(batch_norm_act_train, _bn_setup_context, _bn_backward)

_lib = torch.library.Library("fastconv", "IMPL")
# the conv's input, weight and bias follow autocast like nn.Conv2d; statistics and BatchNorm parameters do not
register_autocast(_lib, "fastconv::conv_bn_stats_train", cast_args=(0, 1, 2))
