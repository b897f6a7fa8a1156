"""The activations fastconv fuses, in one table. A name's position in NAMES is its code in the kernels (the
Triton `ACT` constexpr, the C++ ops' `activation` argument, fastconv/triton/_epilogue.activation and
csrc/include/fastconv/epilogue.h); FUNCTIONS and MODULES are what PyTorch computes for it."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

NAMES = ("identity", "relu", "relu6", "silu", "hardswish")
CODES = {name: code for code, name in enumerate(NAMES)}
FUNCTIONS = {"identity": lambda t: t, "relu": F.relu, "relu6": F.relu6, "silu": F.silu, "hardswish": F.hardswish}
# In-place forms of the activations whose derivative PyTorch takes from the output (nn.ReLU(inplace=True) and
# nn.ReLU6(inplace=True)): applied to a temporary nothing else reads, they skip an activation-sized buffer
INPLACE = {"relu": lambda t: F.relu(t, inplace=True), "relu6": lambda t: F.relu6(t, inplace=True)}
MODULES = {"identity": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "hardswish": nn.Hardswish}
# Activations whose derivative is a 0/1 mask of the pre-activation u (also readable off the output): backward
# passes keep no extra tile live for them (the Triton dgrad's BatchNorm epilogue takes only these).
MASK_ACTIVATIONS = ("identity", "relu", "relu6")


def mask_derivative(v, name: str):
    """act'(u) != 0 as a bool tensor for a mask activation, from u or from the output y = act(u) (0 < y (< 6) iff
    0 < u (< 6)). Written as PyTorch's threshold / hardtanh backward are: a NaN passes the gradient through."""
    if name == "relu":
        return ~(v <= 0)
    if name == "relu6":
        return ~((v <= 0) | (v >= 6))
    raise ValueError(f"fastconv: the derivative of {name!r} is not a 0/1 mask")


# nn activation module class -> name (what convert() fuses; Identity is not an activation there)
BY_MODULE = {cls: name for name, cls in MODULES.items() if name != "identity"}
