"""torch.compile(fullgraph=True) of fastconv models, training and eval, against eager: every fastconv.models
architecture and converted torchvision resnet18 / mobilenet_v2, with no graph break — which also proves that
no fastconv op syncs the host or branches on tensor data in the hot path (Dynamo refuses both under
fullgraph). On CPU the compiled graphs run the C++ backend `cpu` (fast, float64) and, for one small model,
the Triton kernels through the interpreter; on a GPU also torch.compile(mode="reduce-overhead") and a CUDA
graph capture of a training step.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastconv
from fastconv import models

from .backends import skip_unless_runnable
from .helpers import assert_close, generator, randn

GPU = torch.cuda.is_available()


def _step(model, x, target, opt):
    """One training step; returns (logits, loss)."""
    opt.zero_grad(set_to_none=True)
    out = model(x)
    loss = F.cross_entropy(out.float(), target)
    loss.backward()
    opt.step()
    return out, loss


def _no_dropout(model):
    """Dropout draws different masks in eager and compiled runs; the comparison needs the same function."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def _compare_training(model, x, target, dtype, backend="cpu", compile_backend="aot_eager", steps=2):
    eager = _no_dropout(model)
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=compile_backend)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9)
    opt_c = torch.optim.SGD(compiled_model.parameters(), lr=0.05, momentum=0.9)
    with fastconv.backend(backend):
        for step in range(steps):
            out_e, loss_e = _step(eager, x, target, opt_e)
            out_c, loss_c = _step(compiled, x, target, opt_c)
            assert_close(out_c, out_e, dtype, f"logits, step {step}")
        for (name, p_e), p_c in zip(eager.named_parameters(), compiled_model.parameters()):
            assert_close(p_c, p_e, dtype, f"parameter {name} after {steps} steps")
        for (name, b_e), b_c in zip(eager.named_buffers(), compiled_model.buffers()):
            if b_e.is_floating_point():
                assert_close(b_c, b_e, dtype, f"buffer {name}")
            else:
                assert torch.equal(b_c, b_e), name
        eager.eval()
        compiled_model.eval()
        with torch.no_grad():
            assert_close(torch.compile(compiled_model, fullgraph=True, backend=compile_backend)(x), eager(x), dtype,
                         "eval logits")


def _graph_breaks(model, x, backend="cpu") -> int:
    torch._dynamo.reset()
    with fastconv.backend(backend):
        explanation = torch._dynamo.explain(model)(x)
    return explanation.graph_break_count


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", models.names())
def test_models_compile_fullgraph_training(name):
    skip_unless_runnable("cpu")
    dtype = torch.float64
    gen = generator("compile", name)
    model = models.build(name).to(dtype)
    x = randn((2, *models.input_size(name)), dtype, "cpu", gen)
    target = torch.randint(0, 10, (2,), generator=gen)
    assert _graph_breaks(model, x) == 0
    model.train()
    _compare_training(model, x, target, dtype)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_converted_torchvision_compiles_fullgraph(name):
    import torchvision

    skip_unless_runnable("cpu")
    dtype = torch.float64
    gen = generator("compile-tv", name)
    model = fastconv.convert(getattr(torchvision.models, name)(num_classes=10)).to(dtype)
    x = randn((2, 3, 32, 32), dtype, "cpu", gen)
    target = torch.randint(0, 10, (2,), generator=gen)
    assert _graph_breaks(model, x) == 0
    model.train()
    _compare_training(model, x, target, dtype, steps=1)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_cumulative_momentum_has_no_host_sync(backend):
    """BatchNorm2d(momentum=None) inside fused blocks: the cumulative factor stays a tensor (fullgraph) down to the
    op, which mutates the running statistics (on Triton the finalize kernel reads the factor on the device)."""
    if backend == "cpu":
        skip_unless_runnable("cpu")
    dtype = torch.float64
    gen = generator("compile-momentum", backend)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=None), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    model = fastconv.convert(plain).to(dtype)
    x = randn((4, 3, 8, 8), dtype, "cpu", gen)
    target = torch.randint(0, 10, (4,), generator=gen)
    model.train()
    assert _graph_breaks(model, x, backend=backend) == 0
    _compare_training(model, x, target, dtype, backend=backend, steps=3)


def test_triton_kernels_compile_fullgraph(device):
    """The Triton ops (interpreter on CPU) as opaque custom ops in a compiled training step."""
    dtype = torch.float64
    gen = generator("compile-triton")
    model = nn.Sequential(fastconv.ConvBNReLU2d(3, 8, 3, padding=1), fastconv.MaxPool2d(2),
                          fastconv.Conv2d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 3 * 3, 10))
    model = model.to(device=device, dtype=dtype)
    x = randn((2, 3, 7, 6), dtype, device, gen)
    target = torch.randint(0, 10, (2,), generator=gen).to(device)
    assert _graph_breaks(model, x, backend="triton") == 0
    _compare_training(model, x, target, dtype, backend="triton", steps=1)


def test_inductor_compiles_around_the_custom_ops():
    """Inductor (the default torch.compile backend) keeps fastconv's ops as extern kernels and compiles the rest."""
    skip_unless_runnable("cpu")
    dtype = torch.float32
    gen = generator("compile-inductor")
    model = models.build("simple_cnn_bn").to(dtype)
    x = randn((2, *models.input_size("simple_cnn_bn")), dtype, "cpu", gen)
    target = torch.randint(0, 10, (2,), generator=gen)
    model.train()
    _compare_training(model, x, target, dtype, compile_backend="inductor", steps=1)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="CUDA graphs need a CUDA device")
def test_cuda_graph_training_step():
    """reduce-overhead (CUDA graphs via Inductor) and a hand-captured torch.cuda.graph of a training step."""
    gen = generator("cuda-graph")
    model = models.build("cifar10_cnn").cuda()
    x = randn((8, 3, 32, 32), torch.float32, "cuda", gen)
    target = torch.randint(0, 10, (8,), generator=gen).cuda()
    _compare_training(model, x, target, torch.float32, backend="triton", compile_backend="inductor")
    static = models.build("cifar10_cnn").cuda()
    opt = torch.optim.SGD(static.parameters(), lr=0.01)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up: autotuning and allocations happen outside the capture
            _step(static, x, target, opt)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        out = static(x)
        loss = F.cross_entropy(out, target)
        loss.backward()
        opt.step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(loss)
    compiled = torch.compile(models.build("cifar10_cnn").cuda(), mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        compiled(x).sum().backward()
