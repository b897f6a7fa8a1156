"""Which rows a run times: the benchmark set (FASTCONV_BENCH_SET) expanded into cases per op.

Sets:
  full   GPU default. Every layer (CIFAR batch 128 and 256, ImageNet batch 64) at the headline
         configuration (bf16, channels_last), plus a sweep of every dtype × layout × mode on a few
         representative layers.
  quick  What scripts/gpu_check.sh runs (sized for its 10-minute budget): a few CIFAR10CNN and ResNet-18
         layers at the headline configuration and a one-layer forward sweep.
  cpu    CPU default, reduced sizes so it ends in a few minutes on 2 cores: every CIFAR layer at batch 8,
         ResNet-18 ImageNet layers at batch 1, fp32, both layouts.
  tiny   The test suite's smoke run: two LeNet-5 layers at batch 2, forward, fp32, NCHW.
  check  What scripts/gpu_check.sh times inside its 6-minute budget: two 3×3 conv layers forward and
         forward+backward, the fused conv+BN+ReLU training block, one whole model, bf16 channels_last.
"""
from __future__ import annotations

import dataclasses
import itertools
import os

import torch

from . import _shapes
from ._shapes import conv, pool

SETS = {
    "full": "every layer (CIFAR batch 128 and 256, ImageNet batch 64) at bf16 channels_last, plus every dtype × "
            "layout × mode on a few representative layers",
    "quick": "three CIFAR10CNN conv layers (batch 128), a ResNet-18 ImageNet 3×3 layer (batch 64) and two pools at "
             "bf16 channels_last, plus a one-layer dtype × layout forward sweep (what scripts/gpu_check.sh runs)",
    "cpu": "every CIFAR layer at batch 8 (fp32, NCHW and channels_last, forward and forward+backward / eval and "
           "train forward+backward) and the ResNet-18 ImageNet layers at batch 1 (channels_last)",
    "tiny": "two LeNet-5 layers at batch 2, forward, fp32, NCHW (the test suite's smoke run)",
    "check": "two 3×3 conv layers (CIFAR10CNN 128 channels 16×16 at batch 128, ResNet-18 64 channels 56×56 at batch "
             "64) forward and forward+backward, the fused conv+BN+ReLU training step (forward+backward) on the CIFAR "
             "layer, bf16 channels_last, and CIFAR10CNN whole-model training and inference at batch 128 "
             "(what scripts/gpu_check.sh runs)",
}
ENV_VAR = "FASTCONV_BENCH_SET"
HEADLINE = ("bf16", "channels_last")
GPU_DTYPES = ("fp32", "tf32", "fp16", "bf16")
CPU_BATCH, CPU_IMAGENET_BATCH = 8, 1
BN_MODELS = ("simple_cnn_bn", "cifar10_cnn", "resnet")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_name() -> str:
    name = os.environ.get(ENV_VAR) or ("full" if device().type == "cuda" else "cpu")
    if name not in SETS:
        raise ValueError(f"{ENV_VAR}={name!r}: choose one of {', '.join(SETS)}")
    return name


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    problem: _shapes.Problem
    models: tuple[str, ...]
    provider: str
    mode: str
    dtype: str
    layout: str

    @property
    def id(self) -> str:
        return f"{self.problem.ident}|{self.mode}|{self.dtype}|{self.layout}|{self.provider}"


def _problems(kind: str, archs: dict, batches) -> list[tuple[_shapes.Problem, tuple[str, ...]]]:
    return [(layer.at(n), tuple(where)) for n in batches for layer, where in _shapes.unique(archs, kind).items()]


def _cifar(names=None) -> dict:
    return {k: v for k, v in _shapes.CIFAR_ARCHITECTURES.items() if names is None or k in names}


def _imagenet(names=("resnet18", "vgg16")) -> dict:
    return {k: v for k, v in _shapes.imagenet_architectures().items() if k in names}


def _only(archs: dict, layers) -> dict:
    """Restrict an architecture table to the given layers (keeps the model attribution)."""
    return {k: [layer for layer in v if layer in layers] for k, v in archs.items()}


def _expand(op, problems, providers, modes, dtypes, layouts) -> list[Case]:
    return [Case(op, p, where, prov, m, d, lay)
            for (p, where), d, lay, m, prov in itertools.product(problems, dtypes, layouts, modes, providers)]


MODES = {
    "conv2d": ("fwd", "bwd", "fwd+bwd"),
    "conv_bn_relu": ("train-fwd", "train-bwd", "train-fwd+bwd", "eval"),
    "max_pool2d": ("fwd", "bwd", "fwd+bwd"),
}
CPU_MODES = {"conv2d": ("fwd", "fwd+bwd"), "conv_bn_relu": ("train-fwd+bwd", "eval"), "max_pool2d": ("fwd", "fwd+bwd")}
HEADLINE_MODES = {"conv2d": ("fwd", "fwd+bwd"), "conv_bn_relu": ("train-fwd+bwd", "eval"),
                  "max_pool2d": ("fwd", "fwd+bwd")}
SWEEP_LAYERS = {  # representative layers for the dtype × layout × mode sweep, with their batch
    "conv2d": [(conv(128, 16, 128, 3), 128), (conv(64, 56, 64, 3), 64), (conv(128, 28, 256, 1, 2, 0), 64),
               (conv(3, 224, 64, 7, 2, 3), 64)],
    "conv_bn_relu": [(conv(128, 16, 128, 3), 128), (conv(64, 56, 64, 3), 64)],
    "max_pool2d": [(pool(64, 32), 128), (pool(64, 112, 3, 2, 1), 64)],
}


def _layer_archs(op: str, which: str) -> dict:
    kind = "pool" if op == "max_pool2d" else "conv"
    if which == "cifar":
        return _cifar(BN_MODELS if op == "conv_bn_relu" else None)
    if which == "imagenet":
        return _imagenet(("resnet18",) if op == "conv_bn_relu" else ("resnet18", "vgg16"))
    raise ValueError(kind)


def cases(op: str, providers: tuple[str, ...]) -> list[Case]:
    name = set_name()
    kind = "pool" if op == "max_pool2d" else "conv"
    dtypes = tuple(d for d in GPU_DTYPES if not (op == "max_pool2d" and d == "tf32"))
    if name == "tiny":
        archs = {"lenet5": _shapes.CIFAR_ARCHITECTURES["lenet5"]}
        if op == "conv_bn_relu":
            archs = {"lenet5": archs["lenet5"][:1]}
        probs = _problems(kind, archs, (2,))[:2]
        mode = "eval" if op == "conv_bn_relu" else "fwd"
        return _expand(op, probs, providers, (mode,), ("fp32",), ("nchw",))
    if name == "cpu":
        probs = _problems(kind, _layer_archs(op, "cifar"), (CPU_BATCH,))
        out = _expand(op, probs, providers, CPU_MODES[op], ("fp32",), tuple(_LAYOUTS))
        if op != "max_pool2d":
            big = _problems(kind, _imagenet(("resnet18",)), (CPU_IMAGENET_BATCH,))
            modes = ("fwd", "fwd+bwd") if op == "conv2d" else ("train-fwd+bwd", "eval")
            out += _expand(op, big, providers, modes, ("fp32",), ("channels_last",))
        return out
    if name == "check":
        if op == "max_pool2d":
            return []
        cifar = _problems(kind, _only(_cifar(("cifar10_cnn",)), {conv(128, 16, 128, 3)}), (128,))
        if op == "conv_bn_relu":
            return _expand(op, cifar, providers, ("train-fwd+bwd",), HEADLINE[:1], HEADLINE[1:])
        imnet = _problems(kind, _only(_imagenet(("resnet18",)), {conv(64, 56, 64, 3)}), (64,))
        return _expand(op, cifar + imnet, providers, ("fwd", "fwd+bwd"), HEADLINE[:1], HEADLINE[1:])
    if name == "quick":
        pick = {conv(64, 32, 64, 3), conv(128, 16, 128, 3), conv(256, 8, 256, 3), pool(64, 32)}
        cifar = _problems(kind, _only(_cifar(("cifar10_cnn",)), pick), (128,))
        r18 = {conv(64, 56, 64, 3), pool(64, 112, 3, 2, 1)}
        imnet = _problems(kind, _only(_imagenet(("resnet18",)), r18), (64,))
        out = _expand(op, cifar + imnet, providers, HEADLINE_MODES[op], HEADLINE[:1], HEADLINE[1:])
        if op == "conv2d":
            layer, n = SWEEP_LAYERS[op][0]
            out += _sweep(op, [(layer.at(n), ("sweep",))], providers, ("fwd",), dtypes)
        return out
    cifar = _problems(kind, _layer_archs(op, "cifar"), _shapes.CIFAR_BATCHES)
    imnet = _problems(kind, _layer_archs(op, "imagenet"), (_shapes.IMAGENET_BATCH,))
    out = _expand(op, cifar + imnet, providers, HEADLINE_MODES[op], HEADLINE[:1], HEADLINE[1:])
    sweep = [(layer.at(n), ("sweep",)) for layer, n in SWEEP_LAYERS[op]]
    return out + _sweep(op, sweep, providers, MODES[op], dtypes)


_LAYOUTS = ("nchw", "channels_last")


def _sweep(op, probs, providers, modes, dtypes) -> list[Case]:
    """Every dtype × layout × mode on `probs`, minus the rows the headline part already has."""
    return [c for c in _expand(op, probs, providers, modes, dtypes, _LAYOUTS)
            if not ((c.dtype, c.layout) == HEADLINE and c.mode in HEADLINE_MODES[op])]
