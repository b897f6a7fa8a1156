"""The classic teaching CNNs as plain PyTorch modules, buildable plain or on fastconv's kernels.

    fastconv.models.names()                      -> the architecture names
    fastconv.models.build(name, num_classes=10)  -> fastconv.convert(<plain model>) (fastconv=False: plain)
    fastconv.models.input_size(name)             -> (C, H, W) the model expects

A converted model keeps the plain model's state_dict keys, so checkpoints load into either.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .alexnet import AlexNet
from .resnet import ResidualBlock, ResNet18
from .tutorial import LeNet5, NeuralNet, SimpleCNN, SimpleCNNBN
from .vgg import CIFAR10CNN, VGG16

__all__ = [
    "CIFAR10CNN",
    "VGG16",
    "AlexNet",
    "LeNet5",
    "NeuralNet",
    "ResNet18",
    "ResidualBlock",
    "SimpleCNN",
    "SimpleCNNBN",
    "build",
    "input_size",
    "names",
]

# name -> (class, input size (C, H, W))
_REGISTRY: dict[str, tuple[Callable[..., nn.Module], tuple[int, int, int]]] = {
    "neuralnet": (NeuralNet, (3, 32, 32)),
    "simple_cnn": (SimpleCNN, (3, 32, 32)),
    "simple_cnn_bn": (SimpleCNNBN, (3, 32, 32)),
    "cifar10_cnn": (CIFAR10CNN, (3, 32, 32)),
    "resnet": (ResNet18, (3, 32, 32)),
    "alexnet": (AlexNet, (3, 227, 227)),
    "lenet5": (LeNet5, (3, 32, 32)),
    "vgg16": (VGG16, (3, 32, 32)),
}


def names() -> list[str]:
    """The architecture names `build` accepts."""
    return list(_REGISTRY)


def _entry(name: str):
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(_REGISTRY)}") from None


def input_size(name: str) -> tuple[int, int, int]:
    """(channels, height, width) of the images model `name` is defined for (its classifier's input size
    depends on it)."""
    return _entry(name)[1]


def build(name: str, num_classes: int = 10, fastconv: bool = True, **kw) -> nn.Module:
    """Model `name` with `num_classes` outputs, freshly initialised. With `fastconv` it is returned
    through fastconv.convert() (convs, max-pools and conv-BN-ReLU chains on fastconv's kernels; keyword
    `backend` pins a backend); otherwise the plain PyTorch model. Other keywords go to the model's class."""
    cls = _entry(name)[0]
    convert_kw = {k: kw.pop(k) for k in ("backend", "fuse") if k in kw}
    if convert_kw and not fastconv:
        raise ValueError(f"{', '.join(convert_kw)} only apply with fastconv=True")
    model = cls(num_classes=num_classes, **kw)
    if not fastconv:
        return model
    from ..convert import convert

    return convert(model, inplace=True, **convert_kw)
