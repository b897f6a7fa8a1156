"""Drop-in modules: subclasses of the torch.nn classes with identical constructors, parameters and
state_dict, whose forward runs fastconv ops."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import functional as FC

__all__ = ["Conv2d"]


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
            return FC.conv2d(input, weight, bias, self.stride, 0, self.dilation, self.groups, algo=self.algo)
        return FC.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups, algo=self.algo)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", algo={self.algo}"
