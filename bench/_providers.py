"""Who runs each op: fastconv's kernels through fastconv.backend(...), PyTorch eager (cuDNN on a GPU, ATen on
CPU) and torch.compile (Inductor, default mode), and which of them a device can time."""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch import nn

import fastconv
from fastconv import functional as FC

# provider -> (fastconv backend, conv algorithm); the C++ family is an im2col GEMM
FASTCONV = {
    "fastconv-triton-implicit": ("triton", "implicit"),
    "fastconv-triton-im2col": ("triton", "im2col"),
    "fastconv-cuda": ("cuda", "im2col"),
    "fastconv-cpu": ("cpu", "im2col"),
}
GPU = ("fastconv-triton-implicit", "fastconv-triton-im2col", "fastconv-cuda", "torch-eager", "torch-compile")
CPU = ("fastconv-cpu", "torch-eager")
CPU_COMPILE_ENV = "FASTCONV_BENCH_CPU_COMPILE"
NO_GPU = "no CUDA device is visible to torch (torch.cuda.is_available() is False)"


def for_device(device: torch.device) -> tuple[tuple[str, ...], dict[str, str]]:
    """(providers timed on `device`, {provider skipped on it: why})."""
    if device.type == "cuda":
        return GPU, {"fastconv-cpu": "the C++ CPU twin runs CPU tensors; this run times the GPU"}
    skipped = {p: NO_GPU for p in GPU if p not in CPU}
    skipped["fastconv-triton-implicit"] = skipped["fastconv-triton-im2col"] = (
        NO_GPU + "; Triton kernels run on CPU only through the interpreter, a correctness tool whose timings mean "
        "nothing")
    if os.environ.get(CPU_COMPILE_ENV) == "1":
        skipped.pop("torch-compile")
        return CPU + ("torch-compile",), skipped
    skipped["torch-compile"] = (f"CPU mode skips torch.compile (its C++ code generation takes minutes on a "
                                f"small machine); set {CPU_COMPILE_ENV}=1 to include it")
    return CPU, skipped


def context(provider: str):
    """The backend selection a provider's forward runs under."""
    if provider in FASTCONV:
        return fastconv.backend(FASTCONV[provider][0])
    return contextlib.nullcontext()


def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def conv2d(provider: str, layer):
    """f(x, w, b) computing the layer's convolution on `provider`."""
    geo = dict(stride=layer.stride, padding=layer.pad, groups=layer.groups)
    if provider in FASTCONV:
        algo = FASTCONV[provider][1]
        return lambda x, w, b: FC.conv2d(x, w, b, algo=algo, **geo)
    eager = lambda x, w, b: F.conv2d(x, w, b, **geo)  # noqa: E731
    return _compiled(eager) if provider == "torch-compile" else eager


def conv_bn_relu(provider: str, layer, device: torch.device) -> tuple[nn.Module, list[torch.Tensor]]:
    """conv (no bias, as before a BatchNorm) → BatchNorm2d → ReLU as run by `provider`, fp32 parameters
    (low precision comes from autocast, as in AMP training), and its parameters."""
    conv = nn.Conv2d(layer.C, layer.K, (layer.R, layer.S), layer.stride, layer.pad, groups=layer.groups, bias=False,
                     device=device)
    bn = nn.BatchNorm2d(layer.K, device=device)
    if provider in FASTCONV:
        module = fastconv.ConvBNReLU2d.from_modules(conv, bn, "relu", algo=FASTCONV[provider][1])
    else:
        module = nn.Sequential(conv, bn, nn.ReLU())
        if provider == "torch-compile":
            module = _compiled(module)
    return module, [conv.weight, bn.weight, bn.bias]


def max_pool2d(provider: str, layer):
    """f(x) computing the layer's max-pool on `provider`."""
    geo = dict(kernel_size=(layer.R, layer.S), stride=layer.stride, padding=layer.pad)
    if provider in FASTCONV:
        return lambda x: FC.max_pool2d(x, **geo)
    eager = lambda x: F.max_pool2d(x, **geo)  # noqa: E731
    return _compiled(eager) if provider == "torch-compile" else eager
