"""The layers the benchmarks time: every conv / max-pool layer of the documented architectures (issue 5) at
their documented input size, and the ResNet-18 / VGG-16 ImageNet layers (traced from torchvision).

A layer is batch-free (`Layer`); `at(batch)` gives the timed problem (`Problem`), labelled
"N,C,H,W→K,R×S,stride,pad,groups" (pools: "N,C,H,W→pool R×S,stride,pad").
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode


@dataclasses.dataclass(frozen=True)
class Layer:
    kind: str  # "conv" or "pool"
    C: int
    H: int
    W: int
    K: int  # output channels (== C for a pool)
    R: int
    S: int
    stride: int
    pad: int
    groups: int = 1

    @property
    def out_hw(self) -> tuple[int, int]:
        return ((self.H + 2 * self.pad - self.R) // self.stride + 1,
                (self.W + 2 * self.pad - self.S) // self.stride + 1)

    def at(self, batch: int) -> "Problem":
        return Problem(self, batch)


@dataclasses.dataclass(frozen=True)
class Problem:
    layer: Layer
    N: int

    @property
    def label(self) -> str:
        L = self.layer
        head = f"{self.N},{L.C},{L.H},{L.W}→"
        if L.kind == "pool":
            return head + f"pool {L.R}×{L.S},{L.stride},{L.pad}"
        return head + f"{L.K},{L.R}×{L.S},{L.stride},{L.pad},{L.groups}"

    @property
    def ident(self) -> str:
        """ASCII form of the label for pytest ids."""
        return self.label.replace("→", "->").replace("×", "x").replace(" ", "")


def conv(C, H, K, R, stride=1, pad=None, groups=1) -> Layer:
    """A square conv layer on an H×H input; pad defaults to 'same' for odd kernels at stride 1."""
    return Layer("conv", C, H, H, K, R, R, stride, R // 2 if pad is None else pad, groups)


def pool(C, H, R=2, stride=None, pad=0) -> Layer:
    return Layer("pool", C, H, H, C, R, R, stride or R, pad)


# Derived by hand from the layer lists in issue 5 (input 3×32×32 unless stated); checked against
# fastconv.models by tests/test_bench.py::test_cifar_table_matches_models when that package exists.
CIFAR_ARCHITECTURES: dict[str, list[Layer]] = {
    "neuralnet": [conv(3, 32, 16, 5, pad=2), pool(16, 32), conv(16, 16, 32, 3), pool(32, 16),
                  conv(32, 8, 64, 3), pool(64, 8)],
    "simple_cnn": [conv(3, 32, 16, 3), pool(16, 32), conv(16, 16, 32, 3), pool(32, 16),
                   conv(32, 8, 64, 3), pool(64, 8)],
    "simple_cnn_bn": [conv(3, 32, 32, 3), pool(32, 32), conv(32, 16, 64, 3), pool(64, 16),
                      conv(64, 8, 128, 3), pool(128, 8)],
    "cifar10_cnn": [conv(3, 32, 64, 3), conv(64, 32, 64, 3), pool(64, 32),
                    conv(64, 16, 128, 3), conv(128, 16, 128, 3), pool(128, 16),
                    conv(128, 8, 256, 3), conv(256, 8, 256, 3), pool(256, 8)],
    # CIFAR ResNet-18: 3×3 stem, no stem pool, stages 64/128/256/512 of two blocks, 1×1 stride-2 projections
    "resnet": [conv(3, 32, 64, 3)]
    + [conv(64, 32, 64, 3)] * 4
    + [conv(64, 32, 128, 3, stride=2), conv(128, 16, 128, 3), conv(64, 32, 128, 1, stride=2, pad=0)]
    + [conv(128, 16, 128, 3)] * 2
    + [conv(128, 16, 256, 3, stride=2), conv(256, 8, 256, 3), conv(128, 16, 256, 1, stride=2, pad=0)]
    + [conv(256, 8, 256, 3)] * 2
    + [conv(256, 8, 512, 3, stride=2), conv(512, 4, 512, 3), conv(256, 8, 512, 1, stride=2, pad=0)]
    + [conv(512, 4, 512, 3)] * 2,
    # 227×227 input (its documented size): 227→55→27→27→13→13→13→13→6
    "alexnet": [conv(3, 227, 96, 11, stride=4, pad=0), pool(96, 55, 3, 2), conv(96, 27, 256, 5, pad=2),
                pool(256, 27, 3, 2), conv(256, 13, 384, 3), conv(384, 13, 384, 3), conv(384, 13, 256, 3),
                pool(256, 13, 3, 2)],
    "lenet5": [conv(3, 32, 6, 5, pad=0), pool(6, 28), conv(6, 14, 16, 5, pad=0), pool(16, 10)],
    "vgg16": [conv(3, 32, 64, 3), conv(64, 32, 64, 3), pool(64, 32),
              conv(64, 16, 128, 3), conv(128, 16, 128, 3), pool(128, 16),
              conv(128, 8, 256, 3), conv(256, 8, 256, 3), conv(256, 8, 256, 3), pool(256, 8),
              conv(256, 4, 512, 3), conv(512, 4, 512, 3), conv(512, 4, 512, 3), pool(512, 4),
              conv(512, 2, 512, 3), conv(512, 2, 512, 3), conv(512, 2, 512, 3), pool(512, 2)],
}
CIFAR_BATCHES = (128, 256)
IMAGENET_BATCH = 64


def _pair(v) -> int:
    return v[0] if isinstance(v, (tuple, list)) else v


def _bind(names, defaults, args, kwargs) -> dict:
    out = dict(defaults)
    out.update(zip(names, args))
    out.update(kwargs)
    return out


class _LayerTrace(TorchFunctionMode):
    """Records every conv2d / max_pool2d call, whether made by a module or functionally in a forward.
    Square kernels/strides/paddings are assumed (as in every model here)."""

    CONV = (("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
            {"stride": 1, "padding": 0, "groups": 1})
    POOL = (("input", "kernel_size", "stride", "padding"), {"stride": None, "padding": 0})

    def __init__(self):
        super().__init__()
        self.layers: list[Layer] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.conv2d, F.conv2d):
            a = _bind(*self.CONV[:1], self.CONV[1], args, kwargs)
            _, C, H, W = a["input"].shape
            K, _, R, S = a["weight"].shape
            pad = a["padding"]
            if isinstance(pad, str):
                pad = R // 2 if pad == "same" else 0
            self.layers.append(Layer("conv", C, H, W, K, R, S, _pair(a["stride"]), _pair(pad), a["groups"]))
        elif func in (F.max_pool2d, torch.max_pool2d, F.max_pool2d_with_indices):
            a = _bind(*self.POOL[:1], self.POOL[1], args, kwargs)
            _, C, H, W = a["input"].shape
            k = _pair(a["kernel_size"])
            self.layers.append(Layer("pool", C, H, W, C, k, k, _pair(a["stride"]) or k, _pair(a["padding"])))
        return func(*args, **kwargs)


def trace_layers(model: nn.Module, input_size: tuple[int, int, int]) -> list[Layer]:
    """The conv / max-pool layers `model` runs on one input of `input_size`, in call order, traced on a
    meta-device copy (no memory, no compute)."""
    trace = _LayerTrace()
    model = model.to("meta").eval()
    with torch.no_grad(), trace:
        model(torch.empty(1, *input_size, device="meta"))
    return trace.layers


@functools.cache
def imagenet_architectures() -> dict[str, list[Layer]]:
    """ResNet-18 and VGG-16 at 224×224, from torchvision's definitions (built on the meta device)."""
    import torchvision

    out = {}
    for name in ("resnet18", "vgg16"):
        with torch.device("meta"):
            model = getattr(torchvision.models, name)(weights=None)
        out[name] = trace_layers(model, (3, 224, 224))
    return out


def unique(layers_by_model: dict[str, list[Layer]], kind: str) -> dict[Layer, list[str]]:
    """Distinct layers of one kind, each with where it occurs ("model×count")."""
    out: dict[Layer, list[str]] = {}
    for model, layers in layers_by_model.items():
        for layer in dict.fromkeys(layers):
            if layer.kind == kind:
                count = layers.count(layer)
                out.setdefault(layer, []).append(model if count == 1 else f"{model}×{count}")
    return out
