"""fastconv: Triton and CUDA C++ kernels for convolutional networks in PyTorch."""
from __future__ import annotations

__version__ = "0.1.0"

from . import ops  # noqa: F401  (registers torch.ops.fastconv.*)
from . import functional
from ._backend import BackendNotSupported, backend
from ._backend import current as current_backend
from .convert import convert
from .modules import Conv2d, ConvBNReLU2d, MaxPool2d

__all__ = [
    "BackendNotSupported", "Conv2d", "ConvBNReLU2d", "MaxPool2d", "backend", "convert", "current_backend",
    "functional", "__version__",
]
