"""Functional API with torch.nn.functional semantics, running on the backend fastconv.backend() selects."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import _activations, _backend, _ext
from ._args import ConvArgs, as_list, memory_format_as, memory_format_of
from .ops import conv2d as conv_ops, conv2d_prologue as prologue_ops, conv_bn_act as cba_ops
from .ops import batch_norm_act_pool as bn_pool_ops, conv_bn_chain as chain_ops, max_pool2d as _pool_ops
from .ops import _fastpath

__all__ = ["conv2d", "conv2d_fused", "conv2d_prologue", "conv_bn_act", "conv_bn_relu", "max_pool2d"]


def conv2d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
           dilation=1, groups: int = 1, *, algo: str = "implicit") -> torch.Tensor:
    """Exactly F.conv2d (int/tuple/'same'/'valid' padding, unbatched 3-D input, batch 0, same errors), on
    fastconv kernels. `algo` picks the Triton algorithm: 'implicit' (implicit GEMM, no column buffer) or
    'im2col' (explicit column buffer + GEMM)."""
    return conv2d_fused(input, weight, bias, stride, padding, dilation, groups, algo=algo)


_GEOMETRY: dict = {}
_GEOMETRY_MAX = 4096


_NO_KEY = object()


def _arg_key(v):
    """A hashable stand-in of a geometry argument for the validation caches below (equal only where the
    checks give the same answer); _NO_KEY for one that is not None, a plain int, a string or a sequence of
    plain ints (such calls are validated every time)."""
    t = type(v)
    if t is int or t is str or v is None:
        return v
    if t is tuple or t is list:
        if len(v) == 2 and type(v[0]) is int and type(v[1]) is int:  # the common case, without a generator
            return (v[0], v[1])
        if all(type(i) is int for i in v):
            return tuple(v)
    return _NO_KEY


def _conv_call(op, supported, input, weight, bias, stride, padding, dilation, groups):
    """(requested backend, resolved backend, geometry, replay) of a conv call of fastconv `op`: the backend choice
    (_backend.choose) and, unless it is nn's own path (requested 'auto' resolved to 'torch': geometry None,
    F.conv2d validates), F.conv2d's argument checks (ConvArgs) -> geometry = (stride, padding (top, bottom,
    left, right), dilation as lists, output (H, W)) of the batched input. Both depend only on the backend
    requested, shapes, dtypes, devices, autocast and the arguments, so in eager mode each distinct call
    signature is worked out once (a module's call costs a dict lookup). replay: for an eager 4-D call on the Triton
    backend, the signature's Replays of its no-grad conv calls per epilogue (_replayed), else None."""
    key = None
    if not torch.compiler.is_compiling():
        s, p, d = _arg_key(stride), _arg_key(padding), _arg_key(dilation)
        if s is not _NO_KEY and p is not _NO_KEY and d is not _NO_KEY and type(groups) is int:
            dev = input.device
            key = (op, _backend.current(), _backend.planning(), input.shape, input.dtype, dev, weight.shape, weight.dtype, weight.device,
                   None if bias is None else (bias.shape, bias.dtype, bias.device), s, p, d, groups,
                   # (any autocast first: a C flag, where dev.type alone costs ~1.5 µs per call)
                   torch._C._is_any_autocast_enabled() and dev.type != "meta" and torch.is_autocast_enabled(dev.type),
                   _backend.conv_tf32_allowed())  # (the replay's launch reads it)
            found = _GEOMETRY.get(key)
            if found is not None:
                return found
    requested, name = _backend.choose(op, input.device, supported, input.dtype)
    geometry = replay = None
    if not (name == "torch" and requested == "auto"):
        batched = input.unsqueeze(0) if input.dim() == 3 else input
        args = ConvArgs(batched, weight, bias, stride, padding, dilation, groups)
        geometry = (as_list(args.stride), as_list(args.padding), as_list(args.dilation), args.out_hw)
        if key is not None and name == "triton" and input.dim() == 4:
            replay = {}  # (activation, which epilogue tensors are None) -> its Replay (_replayed)
    found = (requested, name, geometry, replay)
    if key is not None and len(_GEOMETRY) < _GEOMETRY_MAX:
        _GEOMETRY[key] = found
    return found


def _replayed(replays, input, weight, bias, scale, shift, residual, activation, algo, geometry, groups):
    """A Triton conv call's output through its Replay (fastconv/triton/replay.py: its launch replayed from C++
    after the call signature's first call), or None where that does not apply: im2col, not plain eager
    (compiling, a dispatch mode, the profiler, autocast), a gradient needed through an epilogue. A conv without
    an epilogue that needs a gradient is one C++ autograd node whose launches are replays
    (fastconv._C._triton_conv2d_train). `replays`: the call signature's Replays per epilogue and its TritonTrain
    (_conv_call); geometry: (stride, padding, dilation) as the op takes them."""
    if algo != "implicit" or not _fastpath.eager_uncompiled(input):
        return None
    plain = scale is None and shift is None and residual is None
    if plain:  # (without a generator)
        present = () if bias is None else (bias,)
    else:
        present = tuple(t for t in (bias, scale, shift, residual) if t is not None)
    if torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad
                                    or any(t.requires_grad for t in present)):
        if not plain or activation != "identity":
            return None
        return _trained(replays, input, weight, bias, geometry, groups)
    kind = (activation, bias is None, scale is None, shift is None, residual is None)
    replay = replays.get(kind)
    if replay is None:
        replay = replays[kind] = conv_ops.triton_replay(*geometry, groups, activation, kind[1:])
    return replay(input, weight, *present)


def _trained(replays, input, weight, bias, geometry, groups):
    """The training call of a Triton conv without an epilogue as one C++ autograd node (_replayed), or None without
    the extension's entry point."""
    train = replays.get("train")
    if train is None:
        entry = getattr(conv_ops.ext_ops(), "_triton_conv2d_train", None) if _ext.load() else None
        if entry is None:
            return None
        train = replays["train"] = (entry, conv_ops.TritonTrain(*geometry, groups, bias is not None, input.shape,
                                                                  weight.shape))
    y = train[0](input, weight, bias, train[1])
    conv_ops.mark_saved(input)
    return y


def _batched(input, residual):
    """Unbatched (C, H, W) input (and residual) -> a batch of one; returns (input, residual, unbatched)."""
    if input.dim() != 3:
        return input, residual, False
    if residual is not None and residual.dim() == 3:
        residual = residual.unsqueeze(0)
    return input.unsqueeze(0), residual, True


def conv2d_fused(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, scale=None, shift=None,
                 residual=None, activation: str = "identity", algo: str = "implicit") -> torch.Tensor:
    """act((conv2d(input, weight) + bias) * scale + shift + residual) in one kernel: scale/shift are
    per-output-channel vectors, residual has the output's shape."""
    requested, name, geometry, replay = _conv_call("conv2d", conv_ops.CONV2D_BACKENDS, input, weight, bias, stride,
                                                   padding, dilation, groups)
    if replay is not None:
        out = _replayed(replay, input, weight, bias, scale, shift, residual, activation, algo, geometry[:3], groups)
        if out is not None:
            return out
    if geometry is None:  # 'auto' chose PyTorch: what nn.Conv2d runs (plus the epilogue as PyTorch ops)
        return conv_ops.torch_conv_epilogue(F.conv2d(input, weight, bias, stride, padding, dilation, groups),
                                            scale, shift, residual, activation)
    unbatched = False
    if input.dim() == 3:
        input, residual, unbatched = _batched(input, residual)
    stride, padding, dilation, _ = geometry
    out = conv_ops.conv2d_call(input, weight, bias, stride, padding, dilation, groups, scale, shift, residual,
                               activation, algo, name)
    return out.squeeze(0) if unbatched else out


def conv2d_prologue(input, in_scale, in_shift, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
                    in_activation: str = "relu", scale=None, shift=None, residual=None,
                    activation: str = "identity") -> torch.Tensor:
    """conv2d_fused(in_activation(input * in_scale[c] + in_shift[c]), weight, ...): the conv's input rebuilt per
    input channel c from the previous block's pre-BatchNorm output `input` (in_scale / in_shift: that block's
    BatchNorm folded). On the Triton backend x is never materialised (forward or backward); the other backends
    build it with PyTorch ops (fastconv.ops.conv2d_prologue). Gradients flow to input, in_scale and in_shift."""
    input, residual, unbatched = _batched(input, residual)
    _, name, geometry, _ = _conv_call("conv2d", conv_ops.CONV2D_BACKENDS, input, weight, bias, stride, padding,
                                      dilation, groups)
    if geometry is None:  # 'auto' chose PyTorch: the op composes PyTorch ops
        args = ConvArgs(input, weight, bias, stride, padding, dilation, groups)
        geometry = (as_list(args.stride), as_list(args.padding), as_list(args.dilation), args.out_hw)
        name = "torch"
    stride, padding, dilation, _ = geometry
    out = prologue_ops.conv2d_prologue_op(input, in_scale, in_shift, in_activation, weight, bias, stride, padding,
                                          dilation, groups, scale, shift, residual, activation, name)
    return out.squeeze(0) if unbatched else out


def conv_bn_act(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, *, stride=1, padding=0,
                dilation=1, groups: int = 1, training: bool = False, momentum=0.1, eps: float = 1e-5,
                activation: str = "relu", residual=None, algo: str = "implicit",
                num_batches_tracked: torch.Tensor | None = None) -> torch.Tensor:
    """act(F.batch_norm(F.conv2d(input, weight, bias, ...), running_mean, running_var, bn_weight, bn_bias,
    training, momentum, eps) + residual) with F.batch_norm's semantics: batch statistics when `training`
    or when there are no running statistics, and then (when training) running_mean / running_var are
    updated in place with `momentum` as the exponential factor (unbiased variance, as PyTorch). `momentum`
    may be a 0-dim tensor (the cumulative average of momentum=None, 1 / num_batches_tracked: no host sync).
    `num_batches_tracked` (nn.BatchNorm2d's counter), when given with a training update of the running
    statistics, is incremented by the op (on Triton by the statistics finalize: no launch of its own).

    Batch statistics: one conv kernel whose epilogue also reduces per-channel statistics, a finalize,
    and one normalize+affine+activation pass. Running statistics (eval): BatchNorm folds into the conv
    epilogue's per-channel scale/shift (a few per-channel ops on C values, then one conv kernel)."""
    requested, name, geometry, replays = _conv_call("conv_bn_act", cba_ops.SUPPORTED_BACKENDS, input, weight, bias,
                                                    stride, padding, dilation, groups)
    if geometry is None:  # 'auto' chose PyTorch: exactly nn.Sequential(nn.Conv2d, nn.BatchNorm2d, act)
        if training and running_mean is not None and not isinstance(momentum, torch.Tensor) and (
                num_batches_tracked is not None):
            num_batches_tracked.add_(1)  # (with a tensor momentum the caller counted: ops.conv_bn_act.counted_here)
        if isinstance(momentum, torch.Tensor):
            momentum = float(momentum)  # F.batch_norm takes a float (nn.BatchNorm2d syncs here too)
        z = F.conv2d(input, weight, bias, stride, padding, dilation, groups)
        y = F.batch_norm(z, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
        if residual is None and activation in _activations.INPLACE:
            # y is this call's own temporary (BatchNorm's backward does not read it): activated in place, as
            # nn.ReLU(inplace=True) does after a BatchNorm2d in the models convert() fuses
            return _activations.INPLACE[activation](y)
        return conv_ops.torch_conv_epilogue(y, None, None, residual, activation)
    input, residual, unbatched = _batched(input, residual)
    *geometry, out_hw = geometry
    geometry = (*geometry, groups)
    use_batch_stats = training or running_mean is None or running_var is None
    if use_batch_stats:
        per_channel = input.shape[0] * out_hw[0] * out_hw[1]
        if training and per_channel <= 1:
            _one_value_per_channel(input.shape[0], weight.shape[0], out_hw, running_mean, running_var, momentum,
                                   num_batches_tracked)
        # With running statistics the op also updates them in place (on Triton in the statistics finalize's
        # last pass); a tensor momentum is read on the device.
        running = (_running_args(running_mean, running_var, momentum, num_batches_tracked) if training
                   else (None, None, 0.0, None, None))
        out = None
        if replays is not None and algo == "implicit" and _fastpath.eager_uncompiled(input):
            # the Triton training node of replays (ops.conv_bn_act.TritonBlockTrain), kept per call signature
            out = cba_ops.triton_train_eager(replays, input, weight, bias, bn_weight, bn_bias, residual, *geometry,
                                             float(eps), activation, *running)
        y, z, mean, var = out if out is not None else cba_ops.conv_bn_act_train_call(
            input, weight, bias, bn_weight, bn_bias, residual, *geometry, float(eps), activation, algo, name,
            *running)
        if y.requires_grad and not torch.compiler.is_compiling():
            _mark_producer(y, z, mean, var, bn_weight, bn_bias, residual, eps, activation)
    else:
        # Fold: ((z - mean) * invstd) * gamma + beta == z * scale + shift, z = conv + bias (Triton: bias folded in)
        triton = name == "triton"
        folded_bias, scale, shift = cba_ops.eval_fold(running_mean, running_var, bn_weight, bn_bias, eps,
                                                      bias if triton else None)
        if triton:
            bias = folded_bias
        y = None
        if replays is not None:
            y = _replayed(replays, input, weight, bias, scale, shift, residual, activation, algo, geometry[:3],
                          groups)
        if y is None:
            y = conv_ops.conv2d_op(input, weight, bias, *geometry, scale, shift, residual, activation, algo, name)
    return y.squeeze(0) if unbatched else y


class PendingBlock(NamedTuple):
    """A training-mode fused conv + BatchNorm + activation block stopped before its normalize pass: its output
    y = activation((z - mean) / sqrt(var + eps) * bn_weight + bn_bias) is virtual. conv_bn_stats takes one as
    its input (reading y through the next conv's operand prologue); bn_act makes y."""
    z: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor
    bn_weight: torch.Tensor | None
    bn_bias: torch.Tensor | None
    eps: float
    activation: str
    # the BatchNorm folded per channel, bn(z) = z * scale + shift (from the statistics op, no launches of their
    # own on Triton): the next conv's prologue coefficients
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    # y's layout were it nn.Conv2d's output (channels_last or not; None: like z): what the chain end lays its
    # output out as, Triton's z being channels_last whatever the model's layout
    out_channels_last: bool | None = None


def conv_bn_stats(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, *, stride=1, padding=0,
                  dilation=1, groups: int = 1, momentum=0.1, eps: float = 1e-5, activation: str = "relu",
                  algo: str = "implicit", num_batches_tracked: torch.Tensor | None = None) -> PendingBlock:
    """Training-mode conv_bn_act (batch statistics; running statistics updated as F.batch_norm does) without
    the normalize pass: returns the block's PendingBlock. `input` is a 4-D tensor or the previous block's
    PendingBlock, whose output is then read through this conv's prologue and never materialised (Triton
    backend; the others compute it with PyTorch ops). bn_act(block) gives the block's output."""
    prev = input if isinstance(input, PendingBlock) else None
    x = prev.z if prev is not None else input
    if x.dim() != 4:
        raise ValueError(f"fastconv.conv_bn_stats: expected a 4-D input, got {x.dim()}-D")
    _, name, geometry, _ = _conv_call("conv_bn_act", cba_ops.SUPPORTED_BACKENDS, x, weight, bias, stride, padding,
                                   dilation, groups)
    if geometry is None:  # 'auto' chose PyTorch (which has no such op): PyTorch ops through the same op
        args = ConvArgs(x, weight, bias, stride, padding, dilation, groups)
        geometry = (as_list(args.stride), as_list(args.padding), as_list(args.dilation), args.out_hw)
    stride, padding, dilation, out_hw = geometry
    per_channel = x.shape[0] * out_hw[0] * out_hw[1]
    if per_channel <= 1:
        _one_value_per_channel(x.shape[0], weight.shape[0], out_hw, running_mean, running_var, momentum,
                               num_batches_tracked)
    prologue = ((prev.mean, prev.var, prev.bn_weight, prev.bn_bias, float(prev.eps), prev.activation)
                if prev is not None else (None, None, None, None, 0.0, "identity"))
    *running, count = _running_args(running_mean, running_var, momentum, num_batches_tracked)
    z, mean, var, scale, shift = chain_ops.conv_bn_stats_train_op(
        x, weight, bias, *prologue, stride, padding, dilation, groups, algo, name, *running, bn_weight, bn_bias,
        float(eps), *((prev.scale, prev.shift) if prev is not None else (None, None)), count)
    # nn.Conv2d's rule, applied to the virtual input: channels_last out if the input or the weight is
    in_fmt = memory_format_as(x, prev.out_channels_last if prev is not None else None)
    out_cl = torch.channels_last in (in_fmt, memory_format_of(weight))
    return PendingBlock(z, mean, var, bn_weight, bn_bias, float(eps), activation, scale, shift, out_cl)


def _one_value_per_channel(batch, channels, out_hw, running_mean, running_var, momentum, num_batches_tracked):
    """Raise F.batch_norm's training error for one value per channel, leaving num_batches_tracked as nn.BatchNorm2d
    does: it counts the batch before F.batch_norm raises (with a tensor momentum fastconv's caller has counted)."""
    if (running_mean is not None and running_var is not None and num_batches_tracked is not None
            and not isinstance(momentum, torch.Tensor)):
        num_batches_tracked.add_(1)
    size = torch.Size([batch, channels, *out_hw])
    raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def _running_args(running_mean, running_var, momentum, num_batches_tracked=None):
    """(running_mean, running_var, momentum, momentum_tensor, num_batches_tracked) for a training op that updates
    running statistics (None, None, 0.0, None, None without them): a tensor momentum is read on the device (no
    host sync)."""
    if running_mean is None or running_var is None:
        return None, None, 0.0, None, None
    if isinstance(momentum, torch.Tensor):
        return running_mean, running_var, 0.0, momentum, num_batches_tracked
    return running_mean, running_var, float(momentum), None, num_batches_tracked


def bn_act(block: PendingBlock, residual: torch.Tensor | None = None) -> torch.Tensor:
    """The output of a PendingBlock: activation(bn(z) [+ residual]) with its batch statistics, differentiable
    with respect to z (BatchNorm's training-mode gradient), bn_weight, bn_bias and residual."""
    z = block.z
    _, name = _backend.choose("conv_bn_act", z.device, cba_ops.SUPPORTED_BACKENDS, z.dtype)
    y, _ = chain_ops.batch_norm_act_train_op(z, block.mean, block.var, block.bn_weight, block.bn_bias, residual,
                                             block.eps, block.activation, name, block.out_channels_last)
    if y.requires_grad and not torch.compiler.is_compiling():
        _mark_producer(y, z, block.mean, block.var, block.bn_weight, block.bn_bias, residual, block.eps,
                       block.activation)
    return y


def bn_act_max_pool(block: PendingBlock, kernel_size, stride=None, padding=0, dilation=1,
                    ceil_mode: bool = False) -> torch.Tensor:
    """max_pool2d(bn_act(block), kernel_size, stride, padding, dilation, ceil_mode) (F.max_pool2d's arguments
    and checks) without the block's output ever existing: on Triton one kernel pools the normalised values as
    it reads z, and the backward gathers the pool's gradient inside BatchNorm's (ops.batch_norm_act_pool).
    Differentiable with respect to z, bn_weight and bn_bias."""
    z = block.z
    _, name = _backend.choose("conv_bn_act", z.device, cba_ops.SUPPORTED_BACKENDS, z.dtype)
    geo = tuple(map(list, _pool_geometry(z, kernel_size, stride, padding, dilation, ceil_mode, "max_pool2d")))
    out, _ = bn_pool_ops.batch_norm_act_pool_train_op(z, block.mean, block.var, block.bn_weight, block.bn_bias,
                                                      block.eps, block.activation, *geo, ceil_mode, name,
                                                      block.out_channels_last)
    return out


def _mark_producer(y, z, mean, var, bn_weight, bn_bias, residual, eps, activation):
    detach = lambda t: t.detach() if t is not None else None  # noqa: E731 - references, not graph edges
    setattr(y, cba_ops.PRODUCER_ATTR, cba_ops.Producer(z, mean, var, detach(bn_weight), detach(bn_bias),
                                                       detach(residual), float(eps), activation, y._version))


def conv_bn_relu(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, **kwargs) -> torch.Tensor:
    """conv_bn_act with activation='relu'."""
    return conv_bn_act(input, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                       **{"activation": "relu", **kwargs})


def _pool_ints(value, arg: str, position: int, fname: str) -> list[int]:
    """PyTorch's argument parser for an int[2] argument: a single int (broadcast to 2) or a sequence of ints
    (kept as given; ATen checks its length). Same TypeError messages."""
    import operator

    def as_int(v, top_level):  # a bare bool is refused, a bool inside a tuple counts as 0 / 1
        if (top_level and isinstance(v, bool)) or (
                isinstance(v, torch.Tensor) and (v.dim() != 0 or v.is_floating_point())):
            raise TypeError
        return operator.index(v)

    try:
        v = as_int(value, True)
        return [v, v]
    except TypeError:
        pass
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{fname}(): argument '{arg}' (position {position}) must be tuple of ints, "
                        f"not {type(value).__name__}")
    out = []
    for i, v in enumerate(value):
        try:
            out.append(as_int(v, False))
        except TypeError:
            raise TypeError(f"{fname}(): argument '{arg}' failed to unpack the object at pos {i + 1} with error "
                            f"\"type must be tuple of ints,but got {type(v).__name__}\"") from None
    return out


def max_pool2d(input: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False,
               return_indices: bool = False):
    """Exactly F.max_pool2d (int/tuple arguments, stride None = kernel_size, unbatched 3-D input, batch 0,
    same errors, same output memory format; return_indices gives PyTorch's int64 indices) on fastconv's
    kernels. Autograd saves only the compact argmax (int8 for windows up to 11x11), never the input."""
    fname = "max_pool2d_with_indices" if return_indices else "max_pool2d"
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{fname}(): argument 'input' (position 1) must be Tensor, not {type(input).__name__}")
    key = None
    if not torch.compiler.is_compiling():  # worked out once per call signature, as conv's _conv_call
        if type(kernel_size) is int and type(stride) is int and type(padding) is int and type(dilation) is int:
            parts = (kernel_size, stride, padding, dilation)  # a layer's usual arguments, without _arg_key's calls
        else:
            parts = (_arg_key(kernel_size), _arg_key(stride), _arg_key(padding), _arg_key(dilation))
        if _NO_KEY not in parts and type(ceil_mode) is bool:
            key = (_backend.current(), _backend.planning(), input.shape, input.dtype, input.device, *parts,
                   ceil_mode)
            found = _POOL_GEOMETRY.get(key)
            if found is not None:
                return _pool_call(input, found, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
    requested, name = _backend.choose("max_pool2d", input.device, _pool_ops.SUPPORTED_BACKENDS, input.dtype)
    geo = None
    if not (name == "torch" and requested == "auto"):
        geo = tuple(map(list, _pool_geometry(input, kernel_size, stride, padding, dilation, ceil_mode, fname)))
    # the direct kernel only in eager mode (key: not compiling); a traced call takes the custom op
    plan = (name, geo, _pool_ops.forward_kernel(name, geo, ceil_mode) if key is not None and geo and input.dim() == 4
            else None)
    if key is not None and len(_POOL_GEOMETRY) < _GEOMETRY_MAX:
        _POOL_GEOMETRY[key] = plan
    return _pool_call(input, plan, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def _pool_call(input, plan, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
    """max_pool2d by its plan (see _POOL_GEOMETRY)."""
    name, geo, direct = plan
    if geo is None:  # 'auto' chose PyTorch: what nn.MaxPool2d runs
        return F.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode,
                            return_indices=return_indices)
    # a plan has a direct kernel only where max_pool2d found is_compiling() False in this call (its key)
    if (direct is not None and not return_indices and not (input.requires_grad and torch.is_grad_enabled())
            and _fastpath.eager_uncompiled(input)):
        return direct[0](input, *direct[1])  # no autograd, no taps: the kernel alone
    return _max_pool2d(input, geo, ceil_mode, return_indices, name)


# (backend, ..., input shape, dtype, device, arguments) -> (backend name, validated geometry or None for
# PyTorch's own op, the (kernel function, arguments) of a plain no-grad eager call of a 4-D input or None): the
# second call of a max-pool layer skips argument parsing, backend resolution and the custom op's layers.
_POOL_GEOMETRY: dict = {}


def _pool_geometry(input, kernel_size, stride, padding, dilation, ceil_mode, fname):
    """F.max_pool2d's argument parsing and ATen's checks -> (kernel, stride, padding, dilation) pairs."""
    kernel = _pool_ints(kernel_size, "kernel_size", 2, fname)
    stride = [] if stride is None else _pool_ints(stride, "stride", 3, fname)
    padding = _pool_ints(padding, "padding", 4, fname)
    dilation = _pool_ints(dilation, "dilation", 5, fname)
    if not isinstance(ceil_mode, bool):
        raise TypeError(f"{fname}(): argument 'ceil_mode' (position 6) must be bool, not {type(ceil_mode).__name__}")
    # ATen's max_pool2d_with_indices meta function, in its order
    if len(kernel) not in (1, 2):
        raise RuntimeError("max_pool2d: kernel_size must either be a single int, or a tuple of two ints")
    kernel = (kernel[0], kernel[-1])
    if len(stride) not in (0, 1, 2):
        raise RuntimeError("max_pool2d: stride must either be omitted, a single int, or a tuple of two ints")
    stride = kernel if not stride else (stride[0], stride[-1])
    if len(padding) not in (1, 2):
        raise RuntimeError("max_pool2d: padding must either be a single int, or a tuple of two ints")
    padding = (padding[0], padding[-1])
    if len(dilation) not in (1, 2):
        raise RuntimeError("max_pool2d: dilation must be either a single int, or a tuple of two ints")
    dilation = (dilation[0], dilation[-1])
    if input.dim() not in (3, 4):
        raise RuntimeError("non-empty 3D or 4D (batch mode) tensor expected for input")
    geo = (kernel, stride, padding, dilation)
    _pool_ops.check_pool_args(input.shape, *geo, ceil_mode)
    return geo


def _max_pool2d(input, geo, ceil_mode, return_indices, name):
    """geo: validated (kernel, stride, padding, dilation) lists."""
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    out, offsets = _pool_ops.max_pool2d_op(x, *geo, ceil_mode, name)
    indices = _pool_ops.offsets_to_indices(offsets, x.shape, *geo) if return_indices else None
    if unbatched:  # PyTorch's unbatched outputs are contiguous
        out = out.squeeze(0).contiguous()
        indices = indices.squeeze(0).contiguous() if return_indices else None
    return (out, indices) if return_indices else out
