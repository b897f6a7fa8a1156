"""Whole-model throughput of the documented architectures (fastconv.models, issue 5): training images/s (one
SGD step: forward, cross-entropy, backward, optimizer step) and inference images/s (eval, no_grad), plain
PyTorch vs converted to fastconv kernels, and the bytes autograd saves for backward per training step
(fastconv.memory.saved_bytes). A synthetic batch stays on the device: data loading is not timed."""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os

import pytest
import torch
import torch.nn.functional as F

import fastconv
from fastconv.memory import saved_bytes
from bench import _cases, _shapes, _timing

MODELS_ENV = "FASTCONV_BENCH_MODELS_MODULE"  # another module with the same interface (the tests use a stub)
MODELS_MODULE = os.environ.get(MODELS_ENV, "fastconv.models")
try:
    models = importlib.import_module(MODELS_MODULE)
    MISSING = None
except ModuleNotFoundError as e:
    if e.name != MODELS_MODULE:
        raise
    models, MISSING = None, f"{MODELS_MODULE} is not in this checkout (issue 5 adds it), so no model can be built"

DEVICE = _cases.device()
SET = _cases.set_name()
NAMES = tuple(models.names()) if models else tuple(_shapes.CIFAR_ARCHITECTURES)
# variant -> fastconv backend (None: the plain PyTorch model)
# (fastconv-auto: the default backend; on CPU tensors it must run exactly what the plain model runs, issue 16)
VARIANTS = ({"plain": None, "fastconv-triton": "triton", "fastconv-cuda": "cuda"} if DEVICE.type == "cuda"
            else {"plain": None, "fastconv-auto": "auto", "fastconv-cpu": "cpu"})
SELECTION = {"full": NAMES, "quick": ("simple_cnn_bn", "cifar10_cnn", "resnet"), "cpu": NAMES, "tiny": ("lenet5",),
             "check": ("cifar10_cnn",)}
BATCH = {"full": 128, "quick": 128, "cpu": 8, "tiny": 2, "check": 128}[SET]
DTYPE, LAYOUT = ("bf16", "channels_last") if DEVICE.type == "cuda" else ("fp32", "nchw")


@dataclasses.dataclass(frozen=True)
class ModelCase:
    model: str
    variant: str
    phase: str  # "train" or "infer"

    @property
    def id(self) -> str:
        return f"{self.model}|{self.phase}|{self.variant}"


CASES = [ModelCase(m, v, p) for m in NAMES if m in SELECTION[SET] for p in ("train", "infer") for v in VARIANTS]


def _setup(name: str, converted: bool, backend: str | None):
    model = models.build(name, num_classes=10, fastconv=converted).to(DEVICE)
    x = torch.randn(BATCH, *models.input_size(name), device=DEVICE)
    y = torch.randint(0, 10, (BATCH,), device=DEVICE)
    if LAYOUT == "channels_last":
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    amp = torch.bfloat16 if DTYPE == "bf16" else None

    @contextlib.contextmanager
    def ctx():
        with (fastconv.backend(backend) if backend else contextlib.nullcontext()), \
                torch.autocast(DEVICE.type, amp, enabled=amp is not None):
            yield

    return model, x, y, ctx


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_model(case, benchmark, recorder):
    if MISSING:
        recorder.skip("models", case.variant, MISSING)
        pytest.skip(MISSING)
    backend = VARIANTS[case.variant]
    model, x, y, ctx = _setup(case.model, backend is not None, backend)
    saved = None
    if case.phase == "train":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def fn():
            with ctx():
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        model.eval()

        def fn():
            with ctx(), torch.no_grad():
                model(x)
    try:
        fn()
        if case.phase == "train":
            with ctx():
                saved = saved_bytes(model, x)
    except fastconv.BackendNotSupported as e:
        recorder.skip("models", case.variant, str(e))
        pytest.skip(f"{case.variant}: {e}")
    timing = _timing.measure(benchmark, fn, DEVICE)
    row = {"model": case.model, "variant": case.variant, "phase": case.phase, "batch": BATCH, "dtype": DTYPE,
           "layout": LAYOUT, **timing, "images_per_s": BATCH / (timing["median_ms"] / 1e3), "saved_bytes": saved}
    benchmark.extra_info.update(row)
    recorder.model_rows.append(row)


# What a converted model saves does not depend on which kernels run (the fused ops' autograd decides it), so
# this is measured on every device, with backend 'auto' (Triton on a GPU, PyTorch's kernels behind fastconv's
# ops on CPU), even where a fastconv backend cannot be timed.
@pytest.mark.parametrize("name", [m for m in NAMES if m in SELECTION[SET]])
def test_model_saved_bytes(name, recorder):
    if MISSING:
        recorder.skip("models-memory", "plain vs fastconv", MISSING)
        pytest.skip(MISSING)
    saved = {}
    for variant, converted in (("plain", False), ("fastconv", True)):
        model, x, _, ctx = _setup(name, converted, "auto" if converted else None)
        with ctx():
            saved[variant] = saved_bytes(model.train(), x)
    recorder.memory_rows.append({
        "model": name, "batch": BATCH, "dtype": DTYPE, "layout": LAYOUT,
        "fastconv_backend": "triton" if DEVICE.type == "cuda" else "torch (PyTorch kernels behind fastconv's ops)",
        "plain_bytes": saved["plain"], "fastconv_bytes": saved["fastconv"],
        "ratio": saved["fastconv"] / saved["plain"]})
