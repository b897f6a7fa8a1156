"""Training-mode fused conv + BatchNorm + activation as custom ops.

    fastconv::conv_bn_act_train(input, weight, bias?, bn_weight?, bn_bias?, residual?, stride, padding[4],
                                dilation, groups, eps, activation, algo, backend, running_mean(a!)?,
                                running_var(b!)?, momentum, momentum_tensor?, num_batches_tracked(c!)?)
                                -> (y, z, mean, var)
        z = conv(input) + bias, its batch statistics taken in the conv kernel's epilogue;
        y = act((z - mean) / sqrt(var + eps) * bn_weight + bn_bias [+ residual]).
        y takes nn.Conv2d's output layout; z, kept for backward (and read by a chained consumer conv), is
        channels_last on the Triton backend whatever the input's layout (conv2d.internal_format), laid out like
        y on the others. mean and biased var are per channel in fp32 (fp64 for fp64 input); z, mean, var carry
        no gradient.
        With running_mean / running_var (mutated in place, in their own dtype) the op also does F.batch_norm's
        running-statistics update, lerp(running, stat, momentum) with the unbiased variance; the momentum is
        momentum_tensor (0-dim, e.g. momentum=None's 1 / num_batches_tracked: read on the device, no host sync)
        when given, else the float momentum. Triton: in the statistics finalize's last pass; cpu / cuda: in
        ext_batch_norm_finalize; torch: PyTorch ops. num_batches_tracked (int64, with the running statistics): with a float momentum 1 is added to
        it, nn.BatchNorm2d's counter (Triton: by that same pass, no launch of its own); with momentum_tensor the
        caller has counted (the factor needs the new count) and it is left as it is. Any mutable argument may be
        omitted or None, on torch < 2.12 too (ops._mutable_ops).
    fastconv::batch_norm_act_backward(grad_y, z, mean, var, bn_weight?, bn_bias?, residual?, eps, activation,
                                      want_grad_residual, backend, act_bits?) -> (grad_z, sum_g, sum_gx, grad_residual)
        with g = grad_y * act'(u): grad_bn_bias = sum_g, grad_bn_weight = sum_gx (sum of g * xhat); act' read from
        act_bits where given (fastconv._act_bits: stored by fastconv::batch_norm_act_train). Accumulated in
        fp32 (fp64 for fp64); sum_g is returned in bn_bias's dtype and sum_gx in bn_weight's (the statistics'
        dtype without them), ready as the parameter gradients (Triton: stored cast by the apply pass).

Autograd saves input, weight, z, mean, var (and residual when an activation mask needs it); xhat, u and
the mask are recomputed in backward, never stored. Eval mode needs no op of its own: BatchNorm folds into
the conv epilogue's scale/shift (see functional.conv_bn_act).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .. import _act_bits, _backend, _ext
from .._args import accumulation_dtype, memory_format_of
from . import conv2d as conv_ops
from .conv2d import (
    SAVED_ATTR,
    mark_saved,
    _check_choice,
    _fake_alloc,
    internal_format,
    output_geometry,
    _torch_activation,
    activation_grad,
    _torch_conv_forward,
    ACTIVATIONS,
    ALGOS,
    alloc,
    conv2d_grads,
)
from ._autocast import register_autocast
from . import _fastpath
from ._fastpath import FastOp
from ._mutable_ops import lenient_inplace_view
from . import _triton

SUPPORTED_BACKENDS = ("triton", "cuda", "cpu", "torch")


def ext_stats_tile_rows(device_type: str) -> int:
    """Pixels per row of the [T, C] partials fastconv::ext_batch_norm_stats returns on `device_type`
    (kBnTileRowsCpu / kBnTileRowsCuda in csrc/include/fastconv/batch_norm.h, via ext_build_info)."""
    return _ext.build_info()["bn_tile_rows"][device_type]


_stat_dtype = accumulation_dtype


def fold_batch_norm(mean, var, weight, bias, eps: float):
    """BatchNorm with statistics (mean, var) as a per-channel affine map: ((z - mean) / sqrt(var + eps)) * weight
    + bias == z * scale + shift; returns (scale, shift). weight / bias may be None (affine=False)."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


_EVAL_FOLD_ATTR = "_fastconv_eval_fold"


def eval_fold(running_mean, running_var, bn_weight, bn_bias, eps: float, conv_bias=None):
    """(conv bias, scale, shift) of an eval block's conv launch: BatchNorm's running statistics folded into a
    per-channel affine map (fold_batch_norm); with `conv_bias` (the Triton backend) that bias folded into the
    shift as the Triton launcher would (_epilogue.fold_bias: conv bias None then), so the launch reads the two
    vectors as they are. A few small PyTorch ops (kernels on a GPU) per call, so in eager mode without a gradient
    the result is kept on running_mean and reused while running_mean, running_var, bn_weight, bn_bias and
    conv_bias are the same tensors with the same version counters and storage (an optimizer step, load_state_dict,
    a `.data` swap or any in-place change makes a new fold) and eps is the same. As autograd's own checks of saved
    tensors, it does not see an in-place write through `.data` (`p.data.add_(...)`: a tensor whose version counter
    PyTorch does not track); such writes need `with torch.no_grad(): p.add_(...)` instead."""
    others = (running_var, bn_weight, bn_bias, conv_bias)
    tensors = (running_mean, *others)
    keep = (not torch.compiler.is_compiling() and _fastpath.eager_uncompiled(running_mean)
            and not running_mean.is_inference()
            and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)))
    if keep:
        state = (eps, *((t._version, t.data_ptr(), t.dtype, t.shape) if t is not None else None for t in tensors))
        kept = getattr(running_mean, _EVAL_FOLD_ATTR, None)
        if kept is not None and kept[0] == state and all(a is b for a, b in zip(kept[1], others)):
            return kept[2]
    scale, shift = fold_batch_norm(running_mean, running_var, bn_weight, bn_bias, eps)
    if conv_bias is not None:
        conv_bias, shift = _triton._epilogue.fold_bias(conv_bias, scale, shift)
    folded = (conv_bias, scale, shift)
    if keep:
        setattr(running_mean, _EVAL_FOLD_ATTR, (state, others, folded))
    return folded


def torch_bn_u(z, mean, var, bn_weight, bn_bias, residual, eps):
    """u = bn(z) [+ residual] in the statistics' dtype (PyTorch ops)."""
    acc = _stat_dtype(z.dtype)
    shape = (1, -1, 1, 1)
    u = (z.to(acc) - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps)
    if bn_weight is not None:
        u = u * bn_weight.to(acc).view(shape) + bn_bias.to(acc).view(shape)
    if residual is not None:
        u = u + residual.to(acc)
    return u


def _torch_bn_act(z, mean, var, bn_weight, bn_bias, residual, eps, activation):
    return _torch_activation(torch_bn_u(z, mean, var, bn_weight, bn_bias, residual, eps), activation).to(z.dtype)


@torch.library.custom_op("fastconv::conv_bn_act_train",
                         mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def conv_bn_act_train(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    bn_weight: Optional[torch.Tensor],
    bn_bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    eps: float,
    activation: str = "relu",
    algo: str = "implicit",
    backend: str = "auto",
    running_mean: Optional[torch.Tensor] = None,
    running_var: Optional[torch.Tensor] = None,
    momentum: float = 0.1,
    momentum_tensor: Optional[torch.Tensor] = None,
    num_batches_tracked: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_choice(activation, ACTIVATIONS, "activation")
    _check_choice(algo, ALGOS, "algo")
    _check_running(running_mean, running_var, momentum_tensor, weight.shape[0], num_batches_tracked)
    nbt = counted_here(num_batches_tracked, momentum_tensor)
    name = _backend.resolve("conv_bn_act", input.device, SUPPORTED_BACKENDS, backend)
    if name in ("cuda", "cpu"):
        return _ext_forward(input, weight, bias, bn_weight, bn_bias, residual, stride, padding, dilation, groups,
                            eps, activation, algo, name, (running_mean, running_var, momentum, momentum_tensor, nbt))
    shape, fmt = output_geometry(input, weight, stride, padding, dilation)  # y takes nn.Conv2d's layout `fmt`
    z = alloc(shape, input.dtype, input.device, internal_format(name, fmt))
    if name == "torch":
        y = alloc(shape, input.dtype, input.device, fmt)
        z.copy_(_torch_conv_forward(input, weight, bias, stride, padding, dilation, groups, None, None, None,
                                    "identity"))
        zf = z.to(_stat_dtype(z.dtype))
        mean = zf.mean((0, 2, 3))
        var = zf.var((0, 2, 3), unbiased=False)
        y.copy_(_torch_bn_act(z, mean, var, bn_weight, bn_bias, residual, eps, activation))
        update_running_stats(running_mean, running_var, mean, var, z, momentum, momentum_tensor, nbt)
        return y, z, mean, var
    return _triton_forward(input, weight, bias, bn_weight, bn_bias, residual, stride, padding, dilation, groups, eps,
                           activation, algo, z, fmt, running_mean, running_var, momentum, momentum_tensor, nbt)


def _triton_forward(x, weight, bias, bn_weight, bn_bias, residual, stride, padding, dilation, groups, eps, activation,
                    algo, z, fmt, running_mean, running_var, momentum, momentum_tensor, nbt):
    """The Triton forward into z (channels_last): the conv with the statistics partials in its epilogue, their
    finalize (running statistics updated in its last pass where it can index them), the normalize pass into y
    (layout `fmt`); (y, z, mean, var). x and weight as the implicit GEMM reads them (channels_contiguous) or as
    given (im2col)."""
    tbn, tconv, tim2col = _triton.batch_norm, _triton.conv2d, _triton.im2col

    conv = tconv.conv2d_forward if algo == "implicit" else tim2col.conv2d_im2col
    _, stats = conv(x, weight, bias, stride, padding, dilation, groups, out=z, stats=True)
    running, after = finalize_running(running_mean, running_var, momentum, momentum_tensor, nbt)
    mean, var = tbn.finalize(stats, z.shape[1], bias, running)
    after(mean, var, z)
    y = triton_bn_act(z, mean, var, bn_weight, bn_bias, residual, eps, activation, fmt)
    return y, z, mean, var


def _check_running(running_mean, running_var, momentum_tensor, channels: int, num_batches_tracked=None) -> None:
    if (running_mean is None) != (running_var is None):
        raise ValueError("conv_bn_act_train: running_mean and running_var are given together or not at all")
    if num_batches_tracked is not None and (running_mean is None or num_batches_tracked.dim() != 0
                                            or num_batches_tracked.dtype != torch.int64):
        raise ValueError("conv_bn_act_train: num_batches_tracked is a 0-dim int64 tensor, given with the running "
                         "statistics")
    for name, buf in (("running_mean", running_mean), ("running_var", running_var)):
        if buf is not None and buf.numel() != channels:  # F.batch_norm's check and message
            raise RuntimeError(f"{name} should contain {channels} elements not {buf.numel()}")
    if momentum_tensor is not None and momentum_tensor.dim() != 0:
        raise ValueError(f"conv_bn_act_train: momentum_tensor must be 0-dim, got shape {list(momentum_tensor.shape)}")


def counted_here(num_batches_tracked, momentum_tensor):
    """The num_batches_tracked a training op adds 1 to: the given one with a float momentum; None with a
    momentum_tensor (momentum=None's 1 / num_batches_tracked, which needs the new count: the caller counted)."""
    return num_batches_tracked if momentum_tensor is None else None


def update_running_stats(running_mean, running_var, mean, var, z, momentum, momentum_tensor,
                         num_batches_tracked=None) -> None:
    """F.batch_norm's running-statistics update with PyTorch ops (backend torch, and the Triton finalize's
    buffers it cannot index; the Triton and C++ finalizes do it themselves): running = lerp(running, batch statistic, momentum), unbiased
    variance; num_batches_tracked, when given, counts the batch."""
    if running_mean is None:
        return
    if num_batches_tracked is not None:
        with torch.no_grad():
            num_batches_tracked.add_(1)
    count = z.shape[0] * z.shape[2] * z.shape[3]
    with torch.no_grad():
        unbiased = var * (count / max(count - 1, 1))
        for buf, stat in ((running_mean, mean), (running_var, unbiased)):
            w = momentum_tensor.to(device=buf.device, dtype=buf.dtype) if momentum_tensor is not None else momentum
            buf.lerp_(stat.to(buf.dtype), w)


def finalize_running(running_mean, running_var, momentum, momentum_tensor, num_batches_tracked):
    """The Triton finalize's share of the running-statistics bookkeeping: (its `running` argument, a function
    (mean, var, z) doing what it leaves to PyTorch ops). The finalize's last pass updates contiguous running
    buffers (its indexing) and counts num_batches_tracked (given here only when the op counts it: counted_here)."""
    in_kernel = running_mean is not None and running_mean.is_contiguous() and running_var.is_contiguous()
    count_in_kernel = in_kernel and num_batches_tracked is not None

    def after(mean, var, z):
        if not in_kernel:
            update_running_stats(running_mean, running_var, mean, var, z, momentum, momentum_tensor,
                                 num_batches_tracked)

    if not in_kernel:
        return None, after
    return (running_mean, running_var, momentum, momentum_tensor,
            *((num_batches_tracked,) if count_in_kernel else ())), after


def _ext_forward(input, weight, bias, bn_weight, bn_bias, residual, stride, padding, dilation, groups, eps,
                 activation, algo, name, running):
    """Backends 'cuda' / 'cpu': z = conv(x) + bias with the BatchNorm partials taken in the C++ conv's epilogue
    (before the bias), their Chan combination plus the bias and the running-statistics update (`running`:
    running_mean, running_var, momentum, momentum_tensor, the num_batches_tracked this op counts), then
    normalize + affine + activation in one pass. Where the conv op has no C++ kernels, z comes from its own
    backend and ext_batch_norm_stats takes the partials from z."""
    ops = ext_ops()
    conv_name = _conv_backend(name)
    if conv_name == name and hasattr(conv_ops, "ext_conv2d"):
        z, (cnt, mean_p, m2_p) = conv_ops.ext_conv2d(input, weight, bias, stride, padding, dilation, groups,
                                                    stats=True)
    else:
        z = conv_ops.conv2d(input, weight, bias, stride, padding, dilation, groups, algo=algo, backend=conv_name)
        cnt, mean_p, m2_p = ops.ext_batch_norm_stats(z)
        bias = None  # z has it
    mean, var = ext_finalize(cnt, mean_p, m2_p, bias, z, running)
    y = ops.ext_batch_norm_act(z, mean, var, bn_weight, bn_bias, residual, eps, activation)
    return y, z, mean, var


def ext_finalize(cnt, mean_p, m2_p, bias, z, running):
    """ext_batch_norm_finalize of z's partials (+ bias) with F.batch_norm's update of
    running = (running_mean, running_var, momentum, momentum_tensor, the num_batches_tracked counted here)."""
    return ext_ops().ext_batch_norm_finalize(cnt, mean_p, m2_p, bias, *running, z.shape[0] * z.shape[2] * z.shape[3])


def _conv_backend(name: str) -> str:
    """The conv op's backend inside a fused block on backend `name`: the same when the conv op has it."""
    conv_backends = getattr(conv_ops, "CONV2D_BACKENDS", conv_ops.SUPPORTED_BACKENDS)
    return name if name in conv_backends else "torch"


def ext_ops():
    """torch.ops.fastconv with the C++ BatchNorm ops loaded and their fake kernels registered."""
    return _ext.ops("conv_bn_act", _register_ext_fakes)


def _register_ext_fakes() -> None:
    @torch.library.register_fake("fastconv::ext_batch_norm_stats")
    def _(z):
        N, C, H, W = z.shape
        rows = ext_stats_tile_rows(z.device.type)
        tiles = max(1, -(-(N * H * W) // rows))
        stat = z.new_empty((tiles, C), dtype=_stat_dtype(z.dtype))
        return stat, torch.empty_like(stat), torch.empty_like(stat)

    @torch.library.register_fake("fastconv::ext_batch_norm_finalize")
    def _(count, mean, m2, bias, running_mean=None, running_var=None, momentum=0.1, momentum_tensor=None,
          num_batches_tracked=None, values=0):
        stat = count.new_empty(count.shape[1])
        return stat, torch.empty_like(stat)

    @torch.library.register_fake("fastconv::ext_batch_norm_act")
    def _(z, mean, var, weight, bias, residual, eps, activation):
        return torch.empty(z.shape, dtype=z.dtype, device=z.device, memory_format=memory_format_of(z))

    @torch.library.register_fake("fastconv::ext_batch_norm_act_backward")
    def _(grad_y, z, mean, var, weight, bias, residual, eps, activation, want_grad_residual):
        fmt = memory_format_of(z)
        grad_z = torch.empty(z.shape, dtype=z.dtype, device=z.device, memory_format=fmt)
        grad_res = (torch.empty(z.shape, dtype=z.dtype, device=z.device, memory_format=fmt) if want_grad_residual
                    else z.new_empty(0))
        stat = z.new_empty(z.shape[1], dtype=_stat_dtype(z.dtype))
        return grad_z, stat, torch.empty_like(stat), grad_res


@conv_bn_act_train.register_fake
def _(input, weight, bias, bn_weight, bn_bias, residual, stride, padding, dilation, groups, eps,
      activation="relu", algo="implicit", backend="auto", running_mean=None, running_var=None, momentum=0.1,
      momentum_tensor=None, num_batches_tracked=None):
    _check_running(running_mean, running_var, momentum_tensor, weight.shape[0], num_batches_tracked)
    shape, fmt = output_geometry(input, weight, stride, padding, dilation)
    name = _backend.resolve("conv_bn_act", input.device, SUPPORTED_BACKENDS, backend)
    y = _fake_alloc(shape, input.dtype, input.device, fmt)
    z = _fake_alloc(shape, input.dtype, input.device, internal_format(name, fmt))
    c = weight.shape[0]
    stat = input.new_empty(c, dtype=_stat_dtype(input.dtype))
    return y, z, stat, torch.empty_like(stat)


@torch.library.custom_op("fastconv::batch_norm_act_backward", mutates_args=())
def batch_norm_act_backward(
    grad_y: torch.Tensor,
    z: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    bn_weight: Optional[torch.Tensor],
    bn_bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    eps: float,
    activation: str,
    want_grad_residual: bool,
    backend: str = "auto",
    act_bits: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_z, sum_g, sum_gx, grad_residual or empty) of y = act(bn(z) [+ residual]) (z's batch statistics).
    act_bits: act'(u) as fastconv::batch_norm_act_train stored it (fastconv._act_bits), used instead of
    recomputing u, so the residual is not needed (it may be None); the C++ backends take that case with
    PyTorch ops."""
    name = _backend.resolve("conv_bn_act", z.device, SUPPORTED_BACKENDS, backend)
    g_dtype, gx_dtype = _sum_dtypes(mean, bn_weight, bn_bias)
    if act_bits is not None:
        _act_bits.check(act_bits, z, activation)
        if name in ("cuda", "cpu"):
            name = "torch"
    if name == "torch":
        acc = _stat_dtype(z.dtype)
        shape = (1, -1, 1, 1)
        invstd = torch.rsqrt(var + eps).view(shape)
        xhat = (z.to(acc) - mean.view(shape)) * invstd
        gamma = bn_weight.to(acc).view(shape) if bn_weight is not None else torch.ones_like(invstd)
        beta = bn_bias.to(acc).view(shape) if bn_bias is not None else torch.zeros_like(invstd)
        if act_bits is not None:
            g = grad_y.to(acc) * _act_bits.unpack(act_bits, z.shape)
        else:
            u = xhat * gamma + beta + (residual.to(acc) if residual is not None else 0)
            g = activation_grad(grad_y.to(acc), activation, u=u)
        P = z.shape[0] * z.shape[2] * z.shape[3]
        sum_g, sum_gx = g.sum((0, 2, 3)), (g * xhat).sum((0, 2, 3))
        grad_z = gamma * invstd * (g - sum_g.view(shape) / P - xhat * sum_gx.view(shape) / P)
        grad_res = g.to(z.dtype) if want_grad_residual else z.new_empty(0)
        return (grad_z.to(z.dtype).contiguous(memory_format=memory_format_of(z)), sum_g.to(g_dtype),
                sum_gx.to(gx_dtype), grad_res)
    if name in ("cuda", "cpu"):
        grad_z, sum_g, sum_gx, grad_res = ext_ops().ext_batch_norm_act_backward(
            grad_y, z, mean, var, bn_weight, bn_bias, residual, eps, activation, want_grad_residual)
        return grad_z, sum_g.to(g_dtype), sum_gx.to(gx_dtype), grad_res
    grad_z, sum_g, sum_gx, grad_res = _triton_bn_backward(grad_y, z, mean, var, bn_weight, bn_bias, residual, eps,
                                                          activation, want_grad_residual, act_bits)
    return grad_z, sum_g, sum_gx, (grad_res if grad_res is not None else z.new_empty(0))


def _triton_bn_backward(grad_y, z, mean, var, bn_weight, bn_bias, residual, eps, activation, want_residual,
                        act_bits=None):
    """The Triton passes of batch_norm_act_backward: (grad_z laid out like z, sum_g, sum_gx in the parameters'
    dtypes, grad_residual or None). grad_z is noted as scratch: the fused block's backward replay passes it on to
    its dgrad and wgrad (TritonBlockTrain), and the op returns it."""
    tbn = _triton.batch_norm

    fmt = memory_format_of(z)
    grad_z = _triton._common.noted("scratch", alloc(z.shape, z.dtype, z.device, fmt))
    grad_res = alloc(z.shape, z.dtype, z.device, fmt) if want_residual else None
    _, sum_g, sum_gx, grad_res = tbn.batch_norm_act_backward(
        grad_y, z, mean, var, bn_weight, bn_bias, eps, activation, residual, want_dres=want_residual,
        grad_z=grad_z, grad_res=grad_res, param_dtypes=_sum_dtypes(mean, bn_weight, bn_bias), act_bits=act_bits)
    return grad_z, sum_g, sum_gx, grad_res


def _sum_dtypes(mean, bn_weight, bn_bias):
    """(sum_g's, sum_gx's) dtype out of batch_norm_act_backward: the parameters' they are the gradients of."""
    return (bn_bias.dtype if bn_bias is not None else mean.dtype,
            bn_weight.dtype if bn_weight is not None else mean.dtype)


@batch_norm_act_backward.register_fake
def _(grad_y, z, mean, var, bn_weight, bn_bias, residual, eps, activation, want_grad_residual, backend="auto",
      act_bits=None):
    grad_z = torch.empty_like(z)
    grad_res = torch.empty_like(z) if want_grad_residual else z.new_empty(0)
    g_dtype, gx_dtype = _sum_dtypes(mean, bn_weight, bn_bias)
    return grad_z, torch.empty_like(mean, dtype=g_dtype), torch.empty_like(mean, dtype=gx_dtype), grad_res


@torch.library.custom_op("fastconv::batch_norm_act", mutates_args=())
def batch_norm_act(
    z: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    bn_weight: Optional[torch.Tensor],
    bn_bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    eps: float,
    activation: str,
    backend: str = "auto",
) -> torch.Tensor:
    """y = act((z - mean) / sqrt(var + eps) * bn_weight + bn_bias [+ residual]); used by backward to
    rebuild a fused block's output instead of keeping it."""
    name = _backend.resolve("conv_bn_act", z.device, SUPPORTED_BACKENDS, backend)
    if name == "triton":
        return triton_bn_act(z, mean, var, bn_weight, bn_bias, residual, eps, activation, memory_format_of(z))
    if name in ("cuda", "cpu"):
        return ext_ops().ext_batch_norm_act(z, mean, var, bn_weight, bn_bias, residual, eps, activation)
    y = alloc(z.shape, z.dtype, z.device, memory_format_of(z))
    return y.copy_(_torch_bn_act(z, mean, var, bn_weight, bn_bias, residual, eps, activation))


def triton_bn_act(z, mean, var, bn_weight, bn_bias, residual, eps, activation, fmt, act_bits=None,
                  residual_affine=None):
    """The Triton normalize pass of fastconv::batch_norm_act, batch_norm_act_train and residual_block_train: y in
    layout `fmt` (any: the kernel reads z and writes y through their strides), act_bits filled when given; the
    residual scaled and shifted per channel by residual_affine = (scale, shift) when given."""
    tbn = _triton.batch_norm

    y = alloc(z.shape, z.dtype, z.device, fmt)
    return tbn.batch_norm_act_forward(z, mean, var, bn_weight, bn_bias, eps, activation, residual, out=y,
                                      act_bits=act_bits, residual_affine=residual_affine)


@batch_norm_act.register_fake
def _(z, mean, var, bn_weight, bn_bias, residual, eps, activation, backend="auto"):
    return torch.empty_like(z)


class Producer:
    """What produced a fused block's output y: enough to rebuild y = act(bn(z) + residual) exactly.
    Attached to y (eager mode); a consumer block whose input is this same, unmodified y saves these
    (already saved by the producer) instead of y, so a chain of fused blocks keeps one tensor per block."""

    __slots__ = ("tensors", "eps", "activation", "version")

    def __init__(self, z, mean, var, bn_weight, bn_bias, residual, eps, activation, version):
        self.tensors = (z, mean, var, bn_weight, bn_bias, residual)
        self.eps, self.activation, self.version = eps, activation, version


PRODUCER_ATTR = "_fastconv_producer"


def _producer_of(x: torch.Tensor):
    rec = getattr(x, PRODUCER_ATTR, None)
    if rec is None or rec.version != x._version or getattr(x, SAVED_ATTR, False):
        return None
    return rec


def _setup_context(ctx, inputs, output):
    (x, weight, bias, bn_weight, bn_bias, residual, stride, padding, dilation, groups, eps, activation, algo,
     backend, *_running) = inputs
    y, z, mean, var = output
    ctx.mark_non_differentiable(z, mean, var)
    ctx.set_materialize_grads(False)  # z, mean, var get no gradient: no zero-filled tensors for them
    ctx.geometry = (list(stride), list(padding), list(dilation), groups)
    ctx.eps, ctx.activation = eps, activation
    ctx.backend = _backend.resolve("conv_bn_act", x.device, SUPPORTED_BACKENDS, backend)
    ctx.has_bias, ctx.has_residual = bias is not None, residual is not None
    ctx.input_size, ctx.weight_size = list(x.shape), list(weight.shape)
    producer, saved_x, kept_residual = _kept_for_backward(x, residual, activation)
    ctx.input_producer = None if producer is None else (producer.eps, producer.activation, len(producer.tensors))
    ctx.save_for_backward(saved_x, weight, bn_weight, bn_bias, kept_residual, z, mean, var,
                          *(producer.tensors if producer is not None else ()))
    mark_saved(saved_x, kept_residual)


def _kept_for_backward(x, residual, activation):
    """What a fused block's autograd node keeps of its input and residual (the Python node above and the C++ one,
    csrc/conv_bn_act.cpp): (x's Producer or None, x unless that producer rebuilds it in backward, the residual
    where a non-identity activation's derivative reads it again, else None)."""
    producer = (_producer_of(x) if not (torch.compiler.is_compiling() or isinstance(x, torch._subclasses.FakeTensor))
                else None)
    return producer, (x if producer is None else None), (residual if activation != "identity" else None)


_NO_PRODUCER = (None,) * 6 + (0.0, "identity")


def _producer_args(producer) -> tuple:
    """A producer as the C++ nodes take it (csrc/conv_bn_act.h, csrc/triton_conv_bn_act.h): its z, mean, var,
    bn_weight, bn_bias, residual, eps and activation; all None (eps 0, identity) without one."""
    return _NO_PRODUCER if producer is None else (*producer.tensors, producer.eps, producer.activation)


_NUM_INPUTS = 19  # conv_bn_act_train's arguments


def _backward(ctx, grad_y, _grad_z, _grad_mean, _grad_var):
    if grad_y is None:  # y took no part in the loss
        return (None,) * _NUM_INPUTS
    x, weight, bn_weight, bn_bias, residual, z, mean, var, *producer = ctx.saved_tensors
    if ctx.input_producer is not None:
        p_eps, p_activation, _ = ctx.input_producer
        x = batch_norm_act_op(*producer, p_eps, p_activation, ctx.backend)
    needs = ctx.needs_input_grad
    grad_z, grad_gamma, grad_beta, grad_res = batch_norm_act_grads(
        grad_y, z, mean, var, bn_weight, bn_bias, residual, ctx.eps, ctx.activation, needs[3], needs[4],
        ctx.has_residual and needs[5], ctx.backend)
    grad_x, grad_w, grad_b = conv2d_grads(grad_z, x, weight, ctx.input_size, ctx.weight_size, ctx.geometry,
                                          needs[0], needs[1], ctx.has_bias and needs[2], _conv_backend(ctx.backend))
    return (grad_x, grad_w, grad_b, grad_gamma, grad_beta, grad_res, *(None,) * (_NUM_INPUTS - 6))


def batch_norm_act_grads(grad_y, z, mean, var, bn_weight, bn_bias, residual, eps, activation, want_weight,
                         want_bias, want_residual, backend, act_bits=None):
    """(grad_z, grad_bn_weight, grad_bn_bias, grad_residual) of y = act(bn(z) [+ residual]) with z's batch
    statistics (BatchNorm's training-mode gradient), the last three None unless wanted (and present). The
    parameter gradients come in the parameters' dtypes. grad_y is laid out like z for the C++ kernels; the Triton
    passes read it through its strides (e.g. the NCHW or expanded gradient of a global average pool: no copy).
    act_bits: act' as the forward stored it (then residual is not read)."""
    if backend != "triton":
        grad_y = grad_y.contiguous(memory_format=memory_format_of(z))
    grad_z, sum_g, sum_gx, grad_res = batch_norm_act_backward_op(
        grad_y, z, mean, var, bn_weight, bn_bias, residual, eps, activation, want_residual, backend, act_bits)
    return (grad_z, sum_gx if (bn_weight is not None and want_weight) else None,
            sum_g if (bn_bias is not None and want_bias) else None, grad_res if want_residual else None)


def _register_autograd_of_mutating_op(op, backward, setup_context) -> None:
    """op.register_autograd for an op that mutates some inputs (here: the running statistics, which get no
    gradient). torch.library refuses register_autograd on any op with a mutable schema, although the autograd
    kernel every custom op already has (torch._library.autograd.make_autograd_impl: forward below autograd,
    defaults filled in, then setup_context; backward) handles one: what it needs is only the two functions, set
    here where register_autograd would set them. Covered by opcheck (with and without running statistics,
    inputs requiring grad), gradcheck and torch.compile(fullgraph) training."""
    if not (hasattr(op, "_backward_fn") and hasattr(op, "_setup_context_fn")):
        raise RuntimeError("fastconv: this torch's CustomOpDef has no _backward_fn/_setup_context_fn; "
                           "conv_bn_act_train's autograd needs updating for it")
    op._backward_fn = backward
    op._setup_context_fn = setup_context
    lenient_inplace_view(op)  # torch < 2.12: direct calls may omit the running statistics


_register_autograd_of_mutating_op(conv_bn_act_train, _backward, _setup_context)
# see _fastpath; the eager path bumps the running statistics' version counters as the dispatcher does
conv_bn_act_train_op = FastOp(conv_bn_act_train, _setup_context, _backward, mutated=(14, 15, 18))
batch_norm_act_op = FastOp(batch_norm_act)
batch_norm_act_backward_op = FastOp(batch_norm_act_backward)


def conv_bn_act_train_call(input, weight, bias, bn_weight, bn_bias, residual, stride, padding, dilation, groups, eps,
                           activation, algo, backend, running_mean=None, running_var=None, momentum=0.1,
                           momentum_tensor=None, num_batches_tracked=None):
    """conv_bn_act_train_op for fastconv's own callers (`backend` resolved): in eager mode on the C++ backends the
    whole op, forward and backward, is one C++ autograd node (fastconv._C.conv_bn_act_train, csrc/conv_bn_act.cpp:
    the same ext ops as _ext_forward / _backward, without their Python frames); elsewhere the op."""
    if backend in ("cpu", "cuda") and _conv_backend(backend) == backend and _fastpath.eager(input):
        entry = getattr(ext_ops(), "conv_bn_act_train", None)
        if entry is not None:  # (None: an extension built before it existed)
            return _ext_train_eager(entry, input, weight, bias, bn_weight, bn_bias, residual, stride, padding,
                                    dilation, groups, eps, activation, algo, backend, running_mean, running_var,
                                    momentum, momentum_tensor, num_batches_tracked)
    return conv_bn_act_train_op(input, weight, bias, bn_weight, bn_bias, residual, stride, padding, dilation, groups,
                                eps, activation, algo, backend, running_mean, running_var, momentum, momentum_tensor,
                                num_batches_tracked)


def _ext_train_eager(entry, x, weight, bias, bn_weight, bn_bias, residual, stride, padding, dilation, groups, eps,
                     activation, algo, backend, running_mean, running_var, momentum, momentum_tensor,
                     num_batches_tracked):
    """The op's checks, then fastconv._C.conv_bn_act_train; the producer bookkeeping of _setup_context (x rebuilt
    from the block that made it; what the node keeps marked saved when there is a node)."""
    _check_choice(activation, ACTIVATIONS, "activation")
    _check_choice(algo, ALGOS, "algo")
    _check_running(running_mean, running_var, momentum_tensor, weight.shape[0], num_batches_tracked)
    producer, saved_x, kept_residual = _kept_for_backward(x, residual, activation)
    shape, fmt = output_geometry(x, weight, stride, padding, dilation)
    y, z, mean, var = entry(
        x, weight, bias, bn_weight, bn_bias, residual, stride, padding, dilation, groups, eps, activation,
        running_mean, running_var, momentum, momentum_tensor, counted_here(num_batches_tracked, momentum_tensor),
        shape, fmt == torch.channels_last, conv_ops._allow_tf32(x), *_producer_args(producer))
    if y.requires_grad:  # a node was made (without a gradient the C++ node keeps nothing)
        mark_saved(saved_x, kept_residual)
    return y, z, mean, var


# ----------------------------------------------------------------------------------------------------------
# The Triton backend's eager training node: fastconv._C._triton_conv_bn_act_train (csrc/triton_conv_bn_act.cpp)

class TritonBlockTrain:
    """The replays (fastconv/triton/replay.py) of one fused block call signature's training calls on the Triton
    backend (implicit GEMM), for fastconv._C._triton_conv_bn_act_train: one C++ autograd node whose forward is the
    `fwd` replay (conv with statistics, finalize, normalize: 3-4 launches) and whose backward is one `bwd` replay
    (BatchNorm's reduce and apply passes, x rebuilt from its producer where the node keeps that, dgrad, wgrad: up to
    6 launches). They run what conv_bn_act_train's Triton branch and _backward run, in the same order, without
    their Python frames once learned. `absent`: which of (bias, bn_weight, bn_bias, residual, running_mean,
    running_var, momentum_tensor, the num_batches_tracked counted here) the calls leave None; eps, activation and
    the float momentum are the signature's (functional.conv_bn_act keys a trainer by them)."""

    __slots__ = ("fwd", "backward_replays", "signature")

    def __init__(self, stride, padding, dilation, groups: int, eps: float, activation: str, momentum: float,
                 absent: tuple, input_size, weight_size):
        geometry = (tuple(stride), tuple(padding), tuple(dilation), groups)
        self.fwd = _triton.replay.Replay(functools.partial(_triton_block_forward, *geometry, eps, activation,
                                                           momentum, absent), single=False)
        self.signature = (*geometry, eps, activation, tuple(input_size), tuple(weight_size))
        self.backward_replays = {}

    def bwd(self, flags: tuple, producer_eps: float, producer_activation: str, *tensors):
        """The backward's gradients (_triton_block_backward: `flags` says which are wanted and which inputs are
        given) through the replay of this (flags, producer) signature."""
        key = (flags, producer_eps, producer_activation)
        replay = self.backward_replays.get(key)
        if replay is None:
            replay = self.backward_replays[key] = _triton.replay.Replay(functools.partial(
                _triton_block_backward, *self.signature, flags, producer_eps, producer_activation), single=False)
        return replay(*tensors)


def _triton_block_forward(stride, padding, dilation, groups, eps, activation, momentum, absent, x, weight, *present):
    """conv_bn_act_train's Triton forward (implicit GEMM), (y, z, mean, var), and what its launches read of each
    input: a Replay's compute (TritonBlockTrain)."""
    given = iter(present)
    bias, bn_weight, bn_bias, residual, running_mean, running_var, momentum_tensor, nbt = (
        None if a else next(given) for a in absent)
    # the op's checks of the running statistics (their shapes and dtypes are then in the replay's specs: a call
    # that differs comes here again)
    _check_running(running_mean, running_var, momentum_tensor, weight.shape[0], nbt)
    shape, fmt = output_geometry(x, weight, stride, padding, dilation)
    z = alloc(shape, x.dtype, x.device, internal_format("triton", fmt))
    common = _triton._common
    xs, ws = common.channels_contiguous(x), common.channels_contiguous(weight)
    out = _triton_forward(xs, ws, bias, bn_weight, bn_bias, residual, stride, padding, dilation, groups, eps,
                          activation, "implicit", z, fmt, running_mean, running_var, momentum, momentum_tensor, nbt)
    return out, (xs, ws, *present)


def _triton_block_backward(stride, padding, dilation, groups, eps, activation, input_size, weight_size, flags,
                           producer_eps, producer_activation, grad, z, mean, var, *rest):
    """_backward's Triton launches and what they read of each input: a Replay's compute (TritonBlockTrain.bwd).
    flags = (want dx, dw, db, dbn_weight, dbn_bias, dresidual, and whether bn_weight, bn_bias, the kept residual,
    a producer, its bn_weight, bn_bias and residual are given); rest = ([bn_weight], [bn_bias], [residual], weight,
    then x or the producer's (z, mean, var, [bn_weight], [bn_bias], [residual])). Returns the wanted gradients in
    the order (dx, dw, db, dbn_weight, dbn_bias, dresidual)."""
    want_x, want_w, want_b, want_gamma, want_beta, want_res, *given = flags
    has_gamma, has_beta, has_res, producer, *producer_given = given
    it = iter(rest)
    bn_weight, bn_bias, residual = (next(it) if g else None for g in (has_gamma, has_beta, has_res))
    weight = next(it)
    if producer:
        p_z, p_mean, p_var = next(it), next(it), next(it)
        p_tensors = (p_z, p_mean, p_var, *(next(it) if g else None for g in producer_given))
        x = None
    else:
        x = next(it)
    seen = {}  # id(input) -> the tensor the launches read for it (a channels_last copy), where not the input
    grad_z, sum_g, sum_gx, grad_res = _triton_bn_backward(grad, z, mean, var, bn_weight, bn_bias, residual, eps,
                                                          activation, want_res)
    dx = dw = db = None
    if want_x:
        (dx,), (_, seen[id(weight)]) = conv_ops._triton_input_grad(input_size, stride, padding, dilation, groups,
                                                                    grad_z, weight)
    if want_w or want_b:
        if producer:  # x rebuilt from what its producer keeps (batch_norm_act's Triton pass)
            x = _triton._common.noted("scratch", triton_bn_act(*p_tensors, producer_eps, producer_activation,
                                                               memory_format_of(p_z)))
        dw_db, (_, xs, _) = conv_ops._triton_weight_grad(weight_size, stride, padding, dilation, groups, want_b,
                                                          grad_z, x, weight)
        if not producer:
            seen[id(x)] = xs
        dw, db = dw_db[0], (dw_db[1] if want_b else None)
    wanted = (dx, dw if want_w else None, db, sum_gx if want_gamma else None, sum_g if want_beta else None,
              grad_res if want_res else None)
    inputs = (grad, z, mean, var, *rest)
    return tuple(t for t in wanted if t is not None), tuple(seen.get(id(t), t) for t in inputs)


def triton_train_eager(trainers: dict, x, weight, bias, bn_weight, bn_bias, residual, stride, padding, dilation,
                       groups, eps, activation, running_mean, running_var, momentum, momentum_tensor,
                       num_batches_tracked):
    """conv_bn_act_train_op's (y, z, mean, var) through fastconv._C._triton_conv_bn_act_train (the Triton backend in
    eager mode, implicit GEMM; x 4-D), or None without that entry point. `trainers`: the functional layer's
    per-call-signature dict, which keeps a TritonBlockTrain per (eps, activation, momentum, absent tensors). The
    op's checks (those of the running statistics in the forward's compute, which runs for any call its replay
    has not seen), then the producer bookkeeping of _setup_context, as _ext_train_eager."""
    if activation not in ACTIVATIONS:
        _check_choice(activation, ACTIVATIONS, "activation")
    if momentum_tensor is not None and num_batches_tracked is not None:  # (the forward checks what it reads)
        _check_running(running_mean, running_var, momentum_tensor, weight.shape[0], num_batches_tracked)
    nbt = counted_here(num_batches_tracked, momentum_tensor)
    key = ("block", eps, activation, momentum, bias is None, bn_weight is None, bn_bias is None, residual is None,
           running_mean is None, running_var is None, momentum_tensor is None, nbt is None)
    trainer = trainers.get(key)
    if trainer is None:
        entry = getattr(ext_ops(), "_triton_conv_bn_act_train", None) if _ext.load() else None
        if entry is None:
            return None
        trainer = trainers[key] = (entry, TritonBlockTrain(stride, padding, dilation, groups, eps, activation,
                                                           momentum, key[4:], x.shape, weight.shape))
    producer, saved_x, kept_residual = _kept_for_backward(x, residual, activation)
    y, z, mean, var = trainer[0](x, weight, bias, bn_weight, bn_bias, residual, running_mean, running_var,
                                 momentum_tensor, nbt, kept_residual is not None, *_producer_args(producer),
                                 trainer[1])
    if y.requires_grad:  # a node was made (without a gradient the C++ node keeps nothing)
        mark_saved(saved_x, kept_residual)
    return y, z, mean, var


_lib = torch.library.Library("fastconv", "IMPL")
# input, weight, bias and residual follow autocast like nn.Conv2d; BatchNorm parameters and running statistics stay
# as they are.
register_autocast(_lib, "fastconv::conv_bn_act_train", cast_args=(0, 1, 2, 5))
