"""fastconv max_pool2d at the op / functional / module level, against torch.nn.functional.max_pool2d.

Kernel numerics (NaN, ties, -inf, every geometry, int64 indexing) are covered by test_triton_max_pool2d.py;
here: the custom ops (schemas, fake kernels, autograd, opcheck), F.max_pool2d's argument semantics and
errors, return_indices, memory formats, the 'torch' backend agreeing with 'triton', poisoned outputs, the
drop-in module, and what autograd saves (the compact offsets, never the input). Without a GPU the Triton
kernels run through the interpreter, so shapes are small.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastconv
import fastconv.ops.max_pool2d as pool_ops
from fastconv.functional import max_pool2d

from .helpers import generator


@pytest.fixture(autouse=True)
def _triton_backend():
    with fastconv.backend("triton"):
        yield


def _input(shape, layout="contiguous", device="cpu", dtype=torch.float64, seed=0):
    """Distinct values (a random permutation: no ties, so gradients are unambiguous) in the given layout."""
    gen = generator("maxpool", shape, layout, seed)
    n = 1
    for s in shape:
        n *= s
    if layout == "noncontiguous":  # every other column of a wider NHCW buffer: neither NCHW nor NHWC dense
        N, C, H, W = shape
        base = torch.randperm(N * H * C * 2 * W, generator=gen).to(dtype).reshape(N, H, C, 2 * W) / n
        x = base[..., ::2].transpose(1, 2)
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
        return x.to(device)
    x = (torch.randperm(n, generator=gen).to(dtype).reshape(shape) / n - 0.5).to(device)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _pool(fn, x, cfg, seed=1):
    """(y, indices, grad_input) of fn(x, return_indices=True, **cfg) with a fixed random grad_output."""
    xl = x.detach().requires_grad_()
    y, idx = fn(xl, return_indices=True, **cfg)
    g = torch.randn(y.shape, generator=generator("grad", seed), dtype=torch.float64).to(y.dtype).to(y.device)
    (dx,) = torch.autograd.grad(y, xl, g) if y.numel() else (torch.zeros_like(xl),)
    return y, idx, dx


def _is_cl(t):
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)


CONFIGS = {
    "alexnet_3x3_s2": ((2, 3, 13, 13), "contiguous", dict(kernel_size=3, stride=2)),
    "vgg_2x2_s2": ((2, 4, 8, 10), "contiguous", dict(kernel_size=2)),  # stride None -> kernel_size
    "ceil_mode": ((1, 3, 10, 7), "contiguous", dict(kernel_size=3, stride=2, ceil_mode=True)),
    "pad_dilation": ((2, 2, 9, 11), "contiguous", dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 1),
                                                       dilation=(2, 3))),
    "channels_last": ((2, 5, 9, 8), "channels_last", dict(kernel_size=3, stride=2, padding=1)),
    "noncontiguous": ((2, 3, 7, 9), "noncontiguous", dict(kernel_size=(2, 3), stride=(2, 2), padding=(1, 0))),
    "unbatched": ((3, 9, 9), "contiguous", dict(kernel_size=[3], stride=(2,), padding=1)),
    "batch_zero": ((0, 3, 8, 8), "contiguous", dict(kernel_size=2)),
    "batch_zero_channels_last": ((0, 3, 8, 8), "channels_last", dict(kernel_size=2, stride=1)),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_matches_pytorch(name, device):
    """Forward (exact), indices (exact), grad_input and memory formats as F.max_pool2d, in float64."""
    shape, layout, cfg = CONFIGS[name]
    x = _input(shape, layout, device)
    y, idx, dx = _pool(max_pool2d, x, cfg)
    ry, ridx, rdx = _pool(F.max_pool2d, x.cpu(), cfg)
    assert y.shape == ry.shape and y.dtype == ry.dtype and idx.dtype == torch.int64
    torch.testing.assert_close(y.cpu(), ry, rtol=0, atol=0)
    assert torch.equal(idx.cpu(), ridx)
    torch.testing.assert_close(dx.cpu(), rdx, rtol=1e-12, atol=1e-12)
    assert _is_cl(y) == _is_cl(ry), "output memory format differs from F.max_pool2d"
    assert _is_cl(idx) == _is_cl(ridx), "indices memory format differs from F.max_pool2d"
    assert _is_cl(dx) == _is_cl(rdx), "grad_input memory format differs from PyTorch's"
    if name == "unbatched":
        assert y.is_contiguous() and idx.is_contiguous()


def test_unbatched_hwc_view_gives_contiguous_output(device):
    """A 3-D input that is an HWC buffer seen as CHW: PyTorch's output is contiguous; so is ours."""
    x = _input((1, 8, 9, 4), "contiguous", device)[0].permute(2, 0, 1)
    y = max_pool2d(x, 2)
    assert y.is_contiguous() and torch.equal(y.cpu(), F.max_pool2d(x.cpu(), 2))


def test_backward_is_deterministic(device):
    x = _input((2, 3, 11, 11), "channels_last", device).requires_grad_()
    y = max_pool2d(x, 3, 1, 1)  # overlapping windows: up to 9 gradients land on one element
    g = torch.randn(y.shape, generator=generator("det"), dtype=torch.float64).to(device)
    (a,) = torch.autograd.grad(y, x, g, retain_graph=True)
    (b,) = torch.autograd.grad(y, x, g)
    assert torch.equal(a, b)


@pytest.mark.parametrize("cfg", [
    ((2, 3, 9, 10), "channels_last", dict(kernel_size=3, stride=2, ceil_mode=True)),
    ((1, 2, 5, 3), "contiguous", dict(kernel_size=2, stride=1, padding=1, dilation=4)),  # windows in the padding
    ((2, 2, 7, 7), "ties", dict(kernel_size=3, stride=1, padding=1)),
], ids=["cl_ceil", "window_in_padding", "ties"])
def test_torch_backend_agrees_with_triton(cfg, device):
    """Same outputs, offsets (bit for bit: the fake kernels' dtype rule holds for both), indices, grads."""
    shape, layout, kw = cfg
    if layout == "ties":  # few distinct values: the first maximum of each window must win in both
        x = torch.randint(0, 3, shape, generator=generator("ties")).double().to(device)
    else:
        x = _input(shape, layout, device)
    geo = ([kw["kernel_size"]] * 2, [kw.get("stride", kw["kernel_size"])] * 2, [kw.get("padding", 0)] * 2,
           [kw.get("dilation", 1)] * 2, kw.get("ceil_mode", False))
    results = {}
    for backend in ("triton", "torch"):
        xl = x.detach().requires_grad_()
        y, off = torch.ops.fastconv.max_pool2d(xl, *geo, backend)
        g = torch.randn(y.shape, generator=generator("agree"), dtype=torch.float64).to(device)
        (dx,) = torch.autograd.grad(y, xl, g)
        results[backend] = (y, off, dx)
        assert off.dtype == pool_ops.offsets_dtype(geo[0]) and off.stride() == y.stride()
    for a, b in zip(results["triton"], results["torch"]):
        assert a.dtype == b.dtype and a.stride() == b.stride()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    with fastconv.backend("torch"):
        _, idx_torch = max_pool2d(x, **kw, return_indices=True)
    _, idx_triton = max_pool2d(x, **kw, return_indices=True)
    ry, ridx = F.max_pool2d(x.cpu(), **kw, return_indices=True)
    assert torch.equal(idx_torch.cpu(), ridx) and torch.equal(idx_triton.cpu(), ridx)
    torch.testing.assert_close(results["triton"][0].cpu(), ry, rtol=0, atol=0)


def test_offsets_dtype_and_helpers_match_triton_module(device):
    # the narrowest signed dtype holding every tap kh*KW + kw: int8 up to 128 taps, int16 up to 32768
    for size, dtype in (((1, 1), torch.int8), ((11, 11), torch.int8), ((8, 16), torch.int8),
                        ((129, 1), torch.int16), ((128, 256), torch.int16), ((200, 200), torch.int32)):
        assert pool_ops.offsets_dtype(size) == dtype, size
    tpool = pytest.importorskip("fastconv.triton.max_pool2d")
    x = _input((1, 2, 12, 11), "contiguous", device)
    y, off = torch.ops.fastconv.max_pool2d(x, [12, 11], [12, 11], [0, 0], [1, 1], False)  # 132 taps: int16
    ry, ridx = F.max_pool2d(x.cpu(), (12, 11), return_indices=True)
    assert off.dtype == torch.int16 and torch.equal(y.cpu(), ry)
    assert torch.equal(pool_ops.offsets_to_indices(off, x.shape, (12, 11), (12, 11), (0, 0), (1, 1)).cpu(), ridx)
    geo = ((3, 2), (2, 1), (1, 1), (2, 3))
    x = _input((2, 3, 9, 8), "channels_last", device)
    _, off = torch.ops.fastconv.max_pool2d(x, *map(list, geo), False)
    ours = pool_ops.offsets_to_indices(off, x.shape, *geo)
    theirs = tpool.offsets_to_indices(off, x, *geo)
    assert torch.equal(ours, theirs) and ours.stride() == off.stride()


def test_integer_inputs(device):
    x = torch.randint(-50, 50, (2, 3, 6, 6), generator=generator("int"))
    with pytest.raises(fastconv.BackendNotSupported, match="floating-point"):
        max_pool2d(x.to(device), 2)
    with fastconv.backend("auto"):  # auto: PyTorch's kernels for dtypes the Triton kernels do not pool
        y, idx = max_pool2d(x, 3, 2, return_indices=True)
    ry, ridx = F.max_pool2d(x, 3, 2, return_indices=True)
    assert y.dtype == torch.int64 and torch.equal(y, ry) and torch.equal(idx, ridx)


def _poison_alloc(shape, dtype, device, memory_format):
    t = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)  # -1: never a valid tap


class _PoisonTorch:
    """Stands in for `torch` inside fastconv.triton.max_pool2d (whose launchers allocate their outputs)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        return _poison_alloc(*args, **{k: v for k, v in kwargs.items() if k != "memory_format"},
                             memory_format=kwargs.get("memory_format", torch.contiguous_format))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_every_output_element_written(backend, device, monkeypatch):
    """Poisoned (NaN / -1) allocations: the torch backend's through the op's `alloc` hook, the Triton
    launchers' through their module's torch.empty. Forward, indices and grad_input must be all real."""
    monkeypatch.setattr(pool_ops, "alloc", _poison_alloc)
    if backend == "triton":
        tpool = pytest.importorskip("fastconv.triton.max_pool2d")
        monkeypatch.setattr(tpool, "torch", _PoisonTorch())
    cfg = dict(kernel_size=3, stride=2, padding=1)
    for layout in ("contiguous", "channels_last"):
        x = _input((2, 3, 9, 10), layout, device)
        with fastconv.backend(backend):
            y, idx, dx = _pool(max_pool2d, x, cfg)
        ry, ridx, rdx = _pool(F.max_pool2d, x.cpu(), cfg)
        assert not y.isnan().any() and not dx.isnan().any()
        assert torch.equal(y.cpu(), ry) and torch.equal(idx.cpu(), ridx)
        torch.testing.assert_close(dx.cpu(), rdx, rtol=1e-12, atol=1e-12)


def test_fake_kernels_reproduce_shapes_dtypes_strides(device):
    from torch._subclasses.fake_tensor import FakeTensorMode

    cases = [((2, 3, 9, 8), "contiguous", ([3, 3], [2, 2], [1, 1], [1, 1], True)),
             ((2, 3, 9, 8), "channels_last", ([2, 3], [2, 1], [1, 0], [2, 1], False)),
             ((2, 5, 2, 2), "channels_last", ([2, 2], [2, 2], [0, 0], [1, 1], False)),  # 1x1 output
             ((2, 3, 7, 9), "noncontiguous", ([3, 3], [1, 1], [1, 1], [1, 1], False))]
    for shape, layout, geo in cases:
        x = _input(shape, layout, device)
        cl = pool_ops.suggest_memory_format(x) == torch.channels_last
        y, off = torch.ops.fastconv.max_pool2d(x, *geo)
        dx = torch.ops.fastconv.max_pool2d_input_grad(torch.ones_like(y), off, list(x.shape), *geo, cl)
        with FakeTensorMode() as mode:
            fx = mode.from_tensor(x)
            fy, foff = torch.ops.fastconv.max_pool2d(fx, *geo)
            fdx = torch.ops.fastconv.max_pool2d_input_grad(torch.ones_like(fy), foff, list(fx.shape), *geo, cl)
        for real, fake in ((y, fy), (off, foff), (dx, fdx)):
            assert (real.shape, real.dtype, real.stride()) == (fake.shape, fake.dtype, fake.stride()), (shape, layout)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_opcheck(backend, device):
    from torch.library import opcheck

    x = _input((2, 3, 7, 6), "channels_last", device).requires_grad_()
    geo = ([3, 2], [2, 1], [1, 1], [1, 2], True)
    opcheck(torch.ops.fastconv.max_pool2d.default, (x, *geo), {"backend": backend})
    y, off = torch.ops.fastconv.max_pool2d(x.detach(), *geo, backend)
    gy = torch.randn(y.shape, generator=generator("opcheck"), dtype=torch.float64).to(device).requires_grad_()
    opcheck(torch.ops.fastconv.max_pool2d_input_grad.default, (gy, off, list(x.shape), *geo, True, backend))


def test_gradcheck(device):
    x = _input((1, 2, 5, 6), "contiguous", device).requires_grad_()
    fn = lambda t: max_pool2d(t, 3, 2, 1, ceil_mode=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=True)


ERROR_CASES = {
    "2d_input": ((8, 8), (2,), {}),
    "5d_input": ((1, 1, 1, 8, 8), (2,), {}),
    "pad_gt_half_effective": ((2, 3, 8, 8), (3,), dict(padding=2)),
    "pad_gt_half_w": ((2, 3, 8, 8), ((2, 3), 1, (1, 2)), {}),
    "pad_gt_half_kernel_dilated": ((2, 3, 8, 8), (2,), dict(padding=2, dilation=4)),
    "pad_negative": ((2, 3, 8, 8), (2, 1, (0, -1)), {}),
    "kernel_zero": ((2, 3, 8, 8), (0,), {}),
    "kernel_zero_stride_1": ((2, 3, 8, 8), ((0, 2), 1), {}),
    "kernel_negative": ((2, 3, 8, 8), ((2, -1),), {}),
    "stride_zero": ((2, 3, 8, 8), (2, (1, 0)), {}),
    "stride_negative": ((2, 3, 8, 8), (2, -1), {}),
    "dilation_zero": ((2, 3, 8, 8), (2, 1, 0, (1, 0)), {}),
    "dilation_negative": ((2, 3, 8, 8), (2, 1, 0, -1), {}),
    "output_too_small": ((1, 1, 2, 5), (3,), {}),
    "output_too_small_unbatched": ((3, 2, 2), (3,), {}),
    "output_too_small_dilated": ((1, 1, 4, 4), (2,), dict(dilation=4)),
    "empty_channels": ((2, 0, 8, 8), (2,), {}),
    "empty_width": ((2, 3, 8, 0), (2,), {}),
    "unbatched_empty": ((0, 8, 8), (2,), {}),
    "kernel_3_tuple": ((2, 3, 8, 8), ((2, 2, 2),), {}),
    "kernel_empty": ((2, 3, 8, 8), ((),), {}),
    "stride_3_tuple": ((2, 3, 8, 8), (2, (2, 2, 2)), {}),
    "padding_empty": ((2, 3, 8, 8), (2, 2, ()), {}),
    "dilation_3_tuple": ((2, 3, 8, 8), (2, 2, 0, (1, 1, 1)), {}),
    "kernel_float": ((2, 3, 8, 8), (2.0,), {}),
    "kernel_float_indices": ((2, 3, 8, 8), (2.0,), dict(return_indices=True)),
    "kernel_bool": ((2, 3, 8, 8), (True,), {}),
    "kernel_tuple_with_float": ((2, 3, 8, 8), ((2, 2.0),), {}),
    "stride_float": ((2, 3, 8, 8), (2, 1.0), {}),
    "ceil_mode_int": ((2, 3, 8, 8), (2,), dict(ceil_mode=1)),
}


@pytest.mark.parametrize("name", ERROR_CASES)
def test_errors_match_pytorch(name, device):
    shape, args, kwargs = ERROR_CASES[name]
    x = torch.randn(shape)
    with pytest.raises(Exception) as theirs:
        F.max_pool2d(x, *args, **kwargs)
    with pytest.raises(type(theirs.value)) as ours:
        max_pool2d(x.to(device), *args, **kwargs)
    assert str(ours.value) == str(theirs.value)


def test_accepted_argument_forms_match_pytorch(device):
    """int, 1-tuples, lists, empty stride, numpy / 0-d tensor ints are accepted like F.max_pool2d's."""
    np = pytest.importorskip("numpy")
    x = _input((1, 2, 9, 8), "contiguous", device)
    for args in [((2,), (), 0), ([2, 3], [1], (1,)), (np.int64(3), torch.tensor(2), [1, 1], 1),
                 (torch.Size([2, 3]), None, (1, True))]:
        assert torch.equal(max_pool2d(x, *args).cpu(), F.max_pool2d(x.cpu(), *args)), args
    with pytest.raises(TypeError, match="must be Tensor, not list"):
        max_pool2d([1.0], 2)


def test_module_drop_in(device):
    ref = nn.MaxPool2d(3, 2, padding=1, ceil_mode=True)
    ours = fastconv.MaxPool2d(3, 2, padding=1, ceil_mode=True)
    assert isinstance(ours, nn.MaxPool2d) and "MaxPool2d" in fastconv.__all__
    assert repr(ours) == repr(ref) and ours.state_dict() == {} and list(ours.parameters()) == []
    assert (ours.kernel_size, ours.stride, ours.padding, ours.dilation) == (3, 2, 1, 1)
    assert fastconv.MaxPool2d(2).stride == nn.MaxPool2d(2).stride == 2

    conv = nn.Conv2d(3, 4, 3, padding=1).double().to(device)
    net_ref = nn.Sequential(conv, nn.ReLU(), ref)
    net = nn.Sequential(copy.deepcopy(conv), nn.ReLU(), ours)
    x = _input((2, 3, 8, 9), "channels_last", device)
    y_ref, y = net_ref(x), net(x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    assert _is_cl(y) == _is_cl(y_ref)
    g = torch.randn(y.shape, generator=generator("module"), dtype=torch.float64).to(device)
    y_ref.backward(g)
    y.backward(g)
    torch.testing.assert_close(net[0].weight.grad, net_ref[0].weight.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net[0].bias.grad, net_ref[0].bias.grad, rtol=1e-12, atol=1e-12)

    y, idx = fastconv.MaxPool2d(2, return_indices=True)(x[0])  # unbatched, with indices
    ry, ridx = nn.MaxPool2d(2, return_indices=True)(x[0].cpu())
    assert torch.equal(y.cpu(), ry) and torch.equal(idx.cpu(), ridx)


def _saved_tensors(fn, x):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return saved


def _nbytes(ts):
    return sum(t.numel() * t.element_size() for t in ts)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_saves_only_compact_offsets(backend, device):
    """Autograd keeps only the int8 offsets: never x (nor a tensor sharing its storage), and for a 2x2 pool
    of fp32 1/24 of what F.max_pool2d keeps (x itself and int64 indices). The torch backend runs the
    larger shape of the report (N=8, C=64, 32x32): 131072 bytes against 3145728."""
    shape = (8, 64, 32, 32) if backend == "torch" else (2, 8, 16, 16)
    x = torch.randn(shape, generator=generator("mem")).to(device).requires_grad_()
    with fastconv.backend(backend):
        ours = _saved_tensors(lambda t: max_pool2d(t, 2), x)
    theirs = _saved_tensors(lambda t: F.max_pool2d(t, 2), x.cpu().detach().requires_grad_())
    xs = x.untyped_storage().data_ptr()
    assert ours and all(t.untyped_storage().data_ptr() != xs for t in ours)
    assert [t.dtype for t in ours] == [torch.int8]
    N, C, H, W = shape
    assert _nbytes(ours) == N * C * (H // 2) * (W // 2)  # one byte per output element
    assert _nbytes(theirs) == x.numel() * 4 + x.numel() // 4 * 8  # x (fp32) + int64 indices
    assert _nbytes(ours) * 24 == _nbytes(theirs)
