"""Drop-in modules: subclasses of the torch.nn classes with identical constructors, parameters and
state_dict, whose forward runs fastconv ops."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import _activations, _backend, functional as FC
from ._args import conv_output_size, memory_format_of
from .ops import conv_bn_act as cba_ops, residual_block as _rb_ops

__all__ = ["Conv2d", "ConvBNReLU2d", "FusedSequential", "MaxPool2d", "fused_conv_bn_forward"]


class Conv2d(nn.Conv2d):
    """nn.Conv2d on fastconv kernels. Same constructor (plus keyword `algo`: 'implicit' or 'im2col'),
    parameters and state_dict, so it replaces nn.Conv2d in any model and loads its checkpoints."""

    def __init__(self, *args, algo: str = "implicit", **kwargs):
        super().__init__(*args, **kwargs)
        self.algo = algo

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, algo: str = "implicit") -> "Conv2d":
        """A fastconv.Conv2d sharing `conv`'s parameters (no copy)."""
        new = cls.__new__(cls)
        new.__dict__.update(conv.__dict__)
        new.algo = algo
        return new

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return FC.conv2d_fused(input, weight, bias, self.stride, 0, self.dilation, self.groups, algo=self.algo)
        return FC.conv2d_fused(input, weight, bias, self.stride, self.padding, self.dilation, self.groups,
                               algo=self.algo)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # nn.Conv2d.forward, one call shorter
        return self._conv_forward(input, self.weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", algo={self.algo}"


_ACTIVATION_MODULES = _activations.MODULES


class ConvBNReLU2d(nn.Module):
    """conv -> BatchNorm2d -> activation as one fused op, behaving exactly like
    nn.Sequential(nn.Conv2d(...), nn.BatchNorm2d(...), act) in train() and eval(): outputs, gradients,
    running statistics, num_batches_tracked (momentum=None = cumulative average), BatchNorm's errors.

    Submodules `.conv` (fastconv.Conv2d) and `.bn` (nn.BatchNorm2d) hold the parameters, so state_dicts
    read like that Sequential's with '0.'/'1.' renamed 'conv.'/'bn.'. forward(x, residual=None) adds
    `residual` before the activation (ResNet's relu(bn2(conv2(x)) + shortcut)).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 activation="relu", device=None, dtype=None, algo="implicit"):
        super().__init__()
        if activation not in _ACTIVATION_MODULES:
            raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(_ACTIVATION_MODULES)}")
        factory = {"device": device, "dtype": dtype}
        self.conv = Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                           padding_mode, algo=algo, **factory)
        self.bn = nn.BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats, **factory)
        self.activation = activation

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, activation: str = "relu",
                     algo: str = "implicit") -> "ConvBNReLU2d":
        """Fuse existing modules, sharing their parameters and buffers (no copies)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.conv = conv if isinstance(conv, Conv2d) else Conv2d.from_conv(conv, algo)
        new.bn = bn
        new.activation = activation
        return new

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(x, FC.PendingBlock):  # the previous block's virtual output (chain_start)
            return consume_pending(self, x, residual)
        return fused_conv_bn_forward(self.conv, self.bn, self.activation, x, residual)

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


def _bn_call_state(bn: nn.BatchNorm2d):
    """nn.BatchNorm2d.forward's bookkeeping for one call: returns (momentum factor (a 0-dim tensor for
    momentum=None: the cumulative average, no host sync), whether batch statistics are used, the running
    statistics to read or update (None, None when not tracked), num_batches_tracked for the fused op (None when
    not counted)). In training, num_batches_tracked counts the call: with a float momentum the op does it
    (Triton: in its statistics finalize, no launch of its own); momentum=None's factor 1 / num_batches_tracked
    needs the new count first, so it is counted here (the op then leaves it: ops.conv_bn_act.counted_here)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    count = None
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        count = bn.num_batches_tracked
        if bn.momentum is None:  # cumulative average, as a tensor: no host sync (CUDA graphs, torch.compile)
            count.add_(1)
            factor = 1.0 / count
    bn_training = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    return factor, bn_training, (bn.running_mean, bn.running_var) if track else (None, None), count


def fused_conv_bn_forward(conv: nn.Conv2d, bn: nn.BatchNorm2d, activation: str, x: torch.Tensor,
                          residual: torch.Tensor | None = None) -> torch.Tensor:
    """nn.BatchNorm2d.forward's bookkeeping (num_batches_tracked, momentum=None, bn_training) around
    functional.conv_bn_act. Shared by ConvBNReLU2d and fastconv.convert()."""
    if x.dim() != 4:  # what nn.BatchNorm2d says about the conv's output of an unbatched input
        raise ValueError(f"expected 4D input (got {x.dim()}D input)")
    factor, bn_training, running, count = _bn_call_state(bn)
    padding = conv.padding
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    return FC.conv_bn_act(
        x, conv.weight, conv.bias, bn.weight, bn.bias, *running,
        stride=conv.stride, padding=padding, dilation=conv.dilation, groups=conv.groups,
        training=bn_training, momentum=factor, eps=bn.eps, activation=activation, residual=residual,
        algo=getattr(conv, "algo", "implicit"), num_batches_tracked=count,
    )


def fused_conv_bn_pending(conv: nn.Conv2d, bn: nn.BatchNorm2d, activation: str, x) -> FC.PendingBlock:
    """A training-mode fused block stopped before its normalize pass (functional.conv_bn_stats), `x` a tensor
    or the previous block's PendingBlock; same bookkeeping as fused_conv_bn_forward. Callers check
    chain_block(...) first (batch statistics, zero padding)."""
    factor, _, running, count = _bn_call_state(bn)
    return FC.conv_bn_stats(x, conv.weight, conv.bias, bn.weight, bn.bias, *running, stride=conv.stride,
                            padding=conv.padding, dilation=conv.dilation, groups=conv.groups, momentum=factor,
                            eps=bn.eps, activation=activation, algo=getattr(conv, "algo", "implicit"),
                            num_batches_tracked=count)


# ----------------------------------------------------------------------------------------------------------
# Chains: consecutive training-mode fused blocks whose intermediate outputs are never materialised

_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _has_hooks(m: nn.Module) -> bool:
    return any(getattr(m, h, None) for h in _HOOKS)


def _global_hooks() -> bool:
    from torch.nn.modules import module as nn_module

    return any(getattr(nn_module, h, None) for h in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                      "_global_backward_hooks", "_global_backward_pre_hooks"))


def chain_block(m: nn.Module, consumer: bool, any_mode: bool = False):
    """(conv, bn, activation) of `m` if it is a fused block (ConvBNReLU2d, or convert()'s FusedConv2d) that
    can take part in a chain now: batch statistics (unless `any_mode`), zero padding, no hooks; a consumer
    (whose input is virtual) also needs the implicit-GEMM algorithm (the one with an operand prologue).
    Else None."""
    if isinstance(m, ConvBNReLU2d):
        conv, bn = m.conv, m.bn
    elif getattr(m, "_fused_bn", None) is not None:  # convert.FusedConv2d
        conv, bn = m, m._fused_bn
    else:
        return None
    if _has_hooks(m) or conv.padding_mode != "zeros" or not (bn.training or any_mode):
        return None
    if consumer and getattr(conv, "algo", "implicit") != "implicit":
        return None
    return conv, bn, m.activation


def _passes_through(m: nn.Module) -> bool:
    """An identity module a chain may step over: nn.Identity, or a BatchNorm convert() fused into its conv."""
    return (type(m) is nn.Identity or getattr(type(m), "fused_into_conv", False)) and not _has_hooks(m)


def fusable_pool(m: nn.Module) -> bool:
    """A max-pool that can take a fused block's output virtually (functional.bn_act_max_pool): nn.MaxPool2d or
    fastconv.MaxPool2d as they are (no subclass forward), without indices or hooks."""
    return type(m) in (nn.MaxPool2d, MaxPool2d) and not m.return_indices and not _has_hooks(m)


def _next_takes_pending(mods, j: int, any_mode: bool = False) -> bool:
    """Whether the module after the identities from j on can take a PendingBlock: a chain consumer or a
    fusable max-pool."""
    while j < len(mods) and _passes_through(mods[j]):
        j += 1
    return j < len(mods) and (chain_block(mods[j], consumer=True, any_mode=any_mode) is not None
                              or fusable_pool(mods[j]))


def has_chain(mods) -> bool:
    """Whether a fused block of `mods` (a Sequential's modules) is followed by another or by a max-pool,
    whatever their mode."""
    return any(chain_block(m, consumer=False, any_mode=True) is not None and _next_takes_pending(mods, i + 1, True)
               for i, m in enumerate(mods))


class FusedSequential(nn.Sequential):
    """nn.Sequential that runs consecutive training-mode fused conv + BatchNorm + activation blocks as a chain
    (ops/conv_bn_chain): each block's output is read by the next conv through its operand prologue and never
    materialised, in forward or backward; the last block of a chain is normalised once, for whatever follows,
    or, when that is a max-pool, pooled as it is normalised (ops/batch_norm_act_pool: never materialised either).
    Same modules, state_dict and results as nn.Sequential. It chains only on the Triton backend, in training,
    without hooks on the modules involved or global module hooks; otherwise it is exactly nn.Sequential.
    fastconv.convert() makes its nn.Sequentials with such blocks FusedSequentials."""

    def forward(self, input):
        mods = list(self._modules.values())
        if not (self.training and isinstance(input, torch.Tensor) and input.dim() == 4 and _chains_on(input)):
            for m in mods:
                input = m(input)
            return input
        pending = None
        for i, m in enumerate(mods):
            if pending is not None:
                if _passes_through(m):
                    continue
                parts = chain_block(m, consumer=True)
                if parts is not None:
                    pending = fused_conv_bn_pending(*parts, pending)
                    continue
                if fusable_pool(m):
                    input, pending = pool_pending(m, pending), None
                    continue
                input, pending = FC.bn_act(pending), None
            parts = chain_block(m, consumer=False)
            if parts is not None and _next_takes_pending(mods, i + 1):
                pending = fused_conv_bn_pending(*parts, input)
                continue
            input = m(input)
        return FC.bn_act(pending) if pending is not None else input


PendingBlock = FC.PendingBlock


def chain_start(producer: nn.Module, consumer: nn.Module, x):
    """producer(x), where `consumer` is the only user of the result, taking it as its input (convert()'s fx
    rewrite): a PendingBlock (the producer's output left virtual) when the two can chain now (training,
    Triton, no hooks: see FusedSequential), else the producer's output. `x` may itself be a PendingBlock."""
    pending_in = isinstance(x, PendingBlock)
    parts = chain_block(producer, consumer=pending_in)
    if (parts is not None and chain_block(consumer, consumer=True) is not None and producer.training
            and _chains_on(x.z if pending_in else x)):
        return fused_conv_bn_pending(*parts, x)
    return producer(x)


def pool_pending(pool: nn.MaxPool2d, pending: PendingBlock) -> torch.Tensor:
    """pool(the PendingBlock's output), that output never materialised."""
    return FC.bn_act_max_pool(pending, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)


def pool_start(producer: nn.Module, pool: nn.MaxPool2d, x):
    """pool(producer(x)), where `pool` is the only user of the fused block's output (convert()'s fx rewrite):
    the block's output is never materialised when it can be left virtual now (training, Triton, no hooks)."""
    pending_in = isinstance(x, PendingBlock)
    parts = chain_block(producer, consumer=pending_in)
    if parts is not None and fusable_pool(pool) and producer.training and _chains_on(x.z if pending_in else x):
        return pool_pending(pool, fused_conv_bn_pending(*parts, x))
    return pool(producer(x))


def consume_pending(module: nn.Module, pending: PendingBlock, residual=None) -> torch.Tensor:
    """`module`'s forward (a fused block) on the previous block's PendingBlock: as a chain's consumer when it
    can be one, else on the materialised input."""
    parts = chain_block(module, consumer=True)
    if parts is not None and (residual is None or (isinstance(residual, torch.Tensor)
                                                    and residual.dtype == pending.z.dtype)):
        block = fused_conv_bn_pending(*parts, pending)
        if residual is None or residual.shape == block.z.shape:
            return FC.bn_act(block, residual)
        return _activations.FUNCTIONS[parts[2]](FC.bn_act(block._replace(activation="identity")) + residual)
    return module(FC.bn_act(pending), residual) if residual is not None else module(FC.bn_act(pending))


def residual_block(producer: nn.Module, consumer: nn.Module, shortcut: nn.Module | None, x):
    """consumer(chain_start(producer, consumer, x), x if shortcut is None else shortcut(x)): a residual block
    (convert()'s fx rewrite of conv1 -> conv2 + shortcut). In training on Triton, with an identity shortcut or a
    fused conv + BatchNorm one (ResNet's projection), it is one fastconv::residual_block_train: one autograd node
    for both uses of x, whose gradients are then summed in conv1's dgrad store instead of a pass of their own.
    Otherwise (eval, other backends, hooks, other shortcuts) exactly the chain it replaces."""
    fused = _residual_parts(producer, consumer, shortcut, x)
    if fused is not None:
        return _residual_call(x, *fused)
    pending = chain_start(producer, consumer, x)
    return consumer(pending, x if shortcut is None else shortcut(x))


IDENTITY = "identity"  # _shortcut_unit's answer for a shortcut that passes x through


def _shortcut_unit(shortcut: nn.Module):
    """(conv, bn) of a shortcut that is one fused conv + BatchNorm without activation (a FusedConv2d or
    ConvBNReLU2d with activation 'identity', alone or first in an nn.Sequential of it and fused-away
    BatchNorms), that can run in a block now; IDENTITY for an identity (nn.Identity, an empty nn.Sequential);
    else None."""
    if type(shortcut) in (nn.Sequential, FusedSequential):
        if _has_hooks(shortcut):
            return None
        mods = list(shortcut._modules.values())
        if all(_passes_through(m) for m in mods):
            return IDENTITY
        if not all(_passes_through(m) for m in mods[1:]):
            return None
        shortcut = mods[0]
    elif _passes_through(shortcut):
        return IDENTITY
    parts = chain_block(shortcut, consumer=False)
    if parts is None or parts[2] != "identity":
        return None
    return parts[0], parts[1]


def _int_pair_padding(conv: nn.Conv2d):
    """conv's padding as (top, bottom, left, right), or None for a string padding ('same' / 'valid')."""
    if isinstance(conv.padding, str):
        return None
    ph, pw = conv.padding
    return [ph, ph, pw, pw]


def _residual_parts(producer, consumer, shortcut, x):
    """What _residual_call needs when the block can run as one op now, else None."""
    if not (isinstance(x, torch.Tensor) and x.dim() == 4 and producer.training):
        return None
    first, second = chain_block(producer, consumer=False), chain_block(consumer, consumer=True)
    if first is None or second is None or not _chains_on(x):
        return None
    unit = None if shortcut is None else _shortcut_unit(shortcut)
    if unit is IDENTITY:
        unit = None
    elif shortcut is not None and unit is None:
        return None
    convs = [first[0], second[0]] + ([unit[0]] if unit is not None else [])
    paddings = [_int_pair_padding(c) for c in convs]
    if any(p is None for p in paddings):
        return None
    # the block's shapes, checked here so that a block that does not fit takes the chain (and its errors)
    N, C, H, W = x.shape
    shapes = []
    for conv, pad, c_in in zip(convs, paddings, (C, first[0].out_channels, C)):
        h_in, w_in = (H, W) if conv is not second[0] else shapes[0][1:]
        if conv.in_channels != c_in or conv.weight.dtype != x.dtype:
            return None
        (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
        shapes.append((conv.out_channels, conv_output_size(h_in, kh, sh, pad[0], pad[1], dh),
                       conv_output_size(w_in, kw, sw, pad[2], pad[3], dw)))
    residual_shape = shapes[2] if unit is not None else (C, H, W)
    # (a BatchNorm with one value per channel, or an empty output: the chain raises nn's error / handles it)
    if shapes[1] != residual_shape or any(N * h * w <= 1 for _, h, w in shapes):
        return None
    return first, second, unit, paddings


def _residual_call(x, first, second, unit, paddings):
    """fastconv::residual_block_train with the modules' parameters, buffers and nn.BatchNorm2d's bookkeeping."""
    (conv1, bn1, act1), (conv2, bn2, act2) = first, second
    units = [(conv1, bn1), (conv2, bn2)] + ([unit] if unit is not None else [])
    states = [_bn_call_state(bn) for _, bn in units]  # (momentum factor, bn_training, running, count)
    while len(units) < 3:
        units.append((None, None))
        states.append((0.0, True, (None, None), None))
    args = []
    for conv, bn in units:
        args += ([conv.weight, conv.bias, bn.weight, bn.bias] if conv is not None else [None] * 4)
    for conv, pad in zip(units, paddings + [[0, 0, 0, 0]] * 3):
        conv = conv[0]
        args += ([list(conv.stride), pad, list(conv.dilation), conv.groups] if conv is not None
                 else [[1, 1], [0, 0, 0, 0], [1, 1], 1])
    eps = [float(bn.eps) if bn is not None else 1e-5 for _, bn in units]
    momenta, running = [], []
    for factor, _, (rm, rv), count in states:
        tensor = isinstance(factor, torch.Tensor)
        momenta.append(0.0 if tensor else float(factor))
        running += [rm, rv, count if rm is not None else None, factor if tensor and rm is not None else None]
    # nn's layout rule along the block (conv1's output, then conv2's), as chains keep it
    cl = torch.channels_last in (memory_format_of(x), memory_format_of(conv1.weight), memory_format_of(conv2.weight))
    out = _rb_ops.residual_block_train_op(x, *args, eps, momenta, act1, act2, getattr(conv1, "algo", "implicit"),
                                          RESIDUAL_BACKEND, cl, *running)
    return out[0]


# The block op's backend: _residual_parts lets a block through only where _chains_on found the fused blocks on
# Triton (tests point it at the other backends to run the op there)
RESIDUAL_BACKEND = "triton"


def _chains_on(x: torch.Tensor) -> bool:
    """Whether a chain pays off for input x: the fused blocks run on Triton (the only backend whose conv
    has the operand prologue) and no global module hook expects to see every block's output."""
    name = _backend.choose("conv_bn_act", x.device, cba_ops.SUPPORTED_BACKENDS, x.dtype)[1]
    return name == "triton" and not _global_hooks()


class MaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d on fastconv kernels: same constructor, attributes, repr and (empty) state_dict. Its
    backward keeps only the compact argmax (int8 per output element for windows up to 11x11), not the
    input and int64 indices that nn.MaxPool2d keeps."""

    def forward(self, input: torch.Tensor):
        return FC.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                             ceil_mode=self.ceil_mode, return_indices=self.return_indices)
