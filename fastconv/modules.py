"""Drop-in modules: subclasses of the torch.nn classes with identical constructors, parameters and
state_dict, whose forward runs fastconv ops."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import _activations, functional as FC

__all__ = ["Conv2d", "ConvBNReLU2d", "MaxPool2d", "fused_conv_bn_forward"]


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
        return fused_conv_bn_forward(self.conv, self.bn, self.activation, x, residual)

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


def fused_conv_bn_forward(conv: nn.Conv2d, bn: nn.BatchNorm2d, activation: str, x: torch.Tensor,
                          residual: torch.Tensor | None = None) -> torch.Tensor:
    """nn.BatchNorm2d.forward's bookkeeping (num_batches_tracked, momentum=None, bn_training) around
    functional.conv_bn_act. Shared by ConvBNReLU2d and fastconv.convert()."""
    if x.dim() != 4:  # what nn.BatchNorm2d says about the conv's output of an unbatched input
        raise ValueError(f"expected 4D input (got {x.dim()}D input)")
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative average, as a tensor: no host sync (CUDA graphs, torch.compile)
            factor = 1.0 / bn.num_batches_tracked
    bn_training = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    padding = conv.padding
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    return FC.conv_bn_act(
        x, conv.weight, conv.bias, bn.weight, bn.bias,
        bn.running_mean if track else None, bn.running_var if track else None,
        stride=conv.stride, padding=padding, dilation=conv.dilation, groups=conv.groups,
        training=bn_training, momentum=factor, eps=bn.eps, activation=activation, residual=residual,
        algo=getattr(conv, "algo", "implicit"),
    )


class MaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d on fastconv kernels: same constructor, attributes, repr and (empty) state_dict. Its
    backward keeps only the compact argmax (int8 per output element for windows up to 11x11), not the
    input and int64 indices that nn.MaxPool2d keeps."""

    def forward(self, input: torch.Tensor):
        return FC.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                             ceil_mode=self.ceil_mode, return_indices=self.return_indices)
