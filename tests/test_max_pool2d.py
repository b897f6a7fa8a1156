"""fastconv max_pool2d at the op / functional / module level, against torch.nn.functional.max_pool2d.

Triton kernel numerics (NaN, ties, -inf, every geometry, int64 indexing) are covered by
test_triton_max_pool2d.py; the same numerics of the C++ kernels (backends 'cpu' and 'cuda', through
torch.ops.fastconv.ext_max_pool2d) are the test_ext_* cases at the end of this file. Here, for every kernel
backend (`kernel_backend`: triton, cpu, cuda): the custom ops (schemas, fake kernels, autograd, opcheck),
F.max_pool2d's argument semantics and errors, return_indices, memory formats, the 'torch' backend agreeing
with the kernels, poisoned outputs, the drop-in module, and what autograd saves (the compact offsets,
never the input). Without a GPU the Triton kernels run through the interpreter, so shapes are small;
'cpu' cases skip (with the reason) where fastconv._C is not built, 'cuda' cases where there is no GPU.
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

from .backends import EXT_BACKENDS, skip_unless_runnable, tensor_device
from .helpers import generator



@pytest.fixture(autouse=True)
def _triton_backend():
    with fastconv.backend("triton"):
        yield


@pytest.fixture(params=EXT_BACKENDS)
def ext_backend(request):
    """The C++ kernels only (their numerics; Triton's are test_triton_max_pool2d.py's)."""
    skip_unless_runnable(request.param)
    with fastconv.backend(request.param):
        yield request.param


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
def test_matches_pytorch(name, kdevice):
    """Forward (exact), indices (exact), grad_input and memory formats as F.max_pool2d, in float64."""
    shape, layout, cfg = CONFIGS[name]
    x = _input(shape, layout, kdevice)
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


def test_unbatched_hwc_view_gives_contiguous_output(kdevice):
    """A 3-D input that is an HWC buffer seen as CHW: PyTorch's output is contiguous; so is ours."""
    x = _input((1, 8, 9, 4), "contiguous", kdevice)[0].permute(2, 0, 1)
    y = max_pool2d(x, 2)
    assert y.is_contiguous() and torch.equal(y.cpu(), F.max_pool2d(x.cpu(), 2))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous"])
def test_no_grad_calls_write_no_taps(layout, kernel_backend, kdevice, monkeypatch):
    """A layer's repeated no-grad call (eval, inference) runs its kernel directly, without the argmax taps that
    only a backward reads (functional.max_pool2d's per-signature cache: forward_kernel), and gives exactly
    F.max_pool2d's output and memory format; a call whose input needs a gradient still saves the taps."""
    x = _input((2, 3, 9, 8), layout, kdevice)
    cfg = dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)
    ref = F.max_pool2d(x.cpu(), **cfg)
    with torch.no_grad():
        max_pool2d(x, **cfg)  # resolves and caches the call signature
        taps = []
        if kernel_backend == "triton":
            from fastconv.triton import max_pool2d as tpool

            real = tpool.max_pool2d_forward
            monkeypatch.setattr(tpool, "max_pool2d_forward",
                                lambda *a, **k: taps.append(a[6] if len(a) > 6 else True) or real(*a, **k))
        monkeypatch.setattr(pool_ops, "_max_pool2d_checked", None)  # the op's own path is not taken
        fastconv.functional._POOL_GEOMETRY.clear()
        max_pool2d(x, **cfg)  # resolves again: its kernel function is looked up now, under the patch
        y = max_pool2d(x, **cfg)
    assert torch.equal(y.cpu(), ref) and _is_cl(y) == _is_cl(ref)
    if kernel_backend == "triton":
        assert taps == [False, False]
    monkeypatch.undo()
    xg = x.detach().requires_grad_()
    yg = max_pool2d(xg, **cfg)
    (dx,) = torch.autograd.grad(yg, xg, torch.ones_like(yg))
    xr = x.cpu().requires_grad_()
    (rdx,) = torch.autograd.grad(F.max_pool2d(xr, **cfg), xr, torch.ones_like(ref))
    assert torch.equal(dx.cpu(), rdx)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous"])
def test_no_grad_torch_backend_runs_pytorchs_pool(layout, monkeypatch):
    """Backend 'torch': a layer's repeated no-grad call is PyTorch's max_pool2d itself, without the indices its
    composition turns into taps (the op's own path is not taken), with F.max_pool2d's output and layout."""
    x = _input((2, 3, 9, 8), layout, torch.device("cpu"))
    x[0, 1, 2, 3] = float("nan")
    cfg = dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)
    ref = F.max_pool2d(x, **cfg)
    with fastconv.backend("torch"), torch.no_grad():
        fastconv.functional._POOL_GEOMETRY.clear()
        monkeypatch.setattr(pool_ops, "_max_pool2d_checked", None)
        y = max_pool2d(x, **cfg)
        y2 = max_pool2d(x, **cfg)
    for out in (y, y2):
        assert torch.allclose(out, ref, rtol=0, atol=0, equal_nan=True) and _is_cl(out) == _is_cl(ref)


def test_ext_forward_without_offsets(ext_backend, poisoned):
    """ext_max_pool2d(..., offsets=False): the same output, an empty offsets tensor (nothing written)."""
    pool_ops.ext_ops()
    x = _input((2, 3, 9, 8), "channels_last", ext_backend)
    geo = ([3, 3], [2, 2], [1, 1], [1, 1], True)
    y, off = torch.ops.fastconv.ext_max_pool2d(x, *geo)
    y2, none = torch.ops.fastconv.ext_max_pool2d(x, *geo, False)
    assert torch.equal(y, y2) and y2.stride() == y.stride() and none.numel() == 0 and off.numel() == y.numel()
    from torch.library import opcheck

    opcheck(torch.ops.fastconv.ext_max_pool2d.default, (x, *geo, False))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous"])
@pytest.mark.parametrize("geo", [([3, 3], [2, 2], [1, 1], [1, 1], True), ([2, 3], [1, 2], [0, 1], [2, 1], False)])
def test_ext_planned_forward(geo, layout, ext_backend, poisoned):
    """fastconv._C.ext_max_pool2d_planned(x, PoolGeometry(...)) -- the no-grad layer call's entry point, its
    geometry converted once -- is ext_max_pool2d(x, *geometry, offsets=False)'s y: values, dtype and strides."""
    from fastconv import _C

    pool_ops.ext_ops()
    x = _input((2, 3, 9, 8), layout, ext_backend, dtype=torch.float32)
    y = _C.ext_max_pool2d_planned(x, _C.PoolGeometry(*geo))
    ref, _ = torch.ops.fastconv.ext_max_pool2d(x, *geo, False)
    assert torch.equal(y, ref) and y.stride() == ref.stride() and y.dtype == ref.dtype
    assert torch.equal(y, F.max_pool2d(x, *geo[:4], ceil_mode=geo[4]))
    with pytest.raises(TypeError):
        _C.PoolGeometry([3, 3], [2, 2], [1, 1], [1, 1])  # ceil_mode is required


def test_forward_kernel_with_an_extension_built_before_the_planned_entry(monkeypatch):
    """An extension without ext_max_pool2d_planned: the no-grad kernel is ext_max_pool2d(..., offsets=False)'s
    y, its geometry passed per call."""
    calls = []

    class OldExtension:
        @staticmethod
        def ext_max_pool2d(x, *args):
            calls.append(args)
            return "y", "offsets"

    monkeypatch.setattr(pool_ops, "ext_ops", lambda: OldExtension)
    geo = ([3, 3], [2, 2], [1, 1], [1, 1])
    fn, args = pool_ops.forward_kernel("cpu", geo, True)
    assert fn("x", *args) == "y" and calls == [(*geo, True, False)]


def test_backward_is_deterministic(kdevice):
    x = _input((2, 3, 11, 11), "channels_last", kdevice).requires_grad_()
    y = max_pool2d(x, 3, 1, 1)  # overlapping windows: up to 9 gradients land on one element
    g = torch.randn(y.shape, generator=generator("det"), dtype=torch.float64).to(kdevice)
    (a,) = torch.autograd.grad(y, x, g, retain_graph=True)
    (b,) = torch.autograd.grad(y, x, g)
    assert torch.equal(a, b)


@pytest.mark.parametrize("cfg", [
    ((2, 3, 9, 10), "channels_last", dict(kernel_size=3, stride=2, ceil_mode=True)),
    ((1, 2, 5, 3), "contiguous", dict(kernel_size=2, stride=1, padding=1, dilation=4)),  # windows in the padding
    ((2, 2, 7, 7), "ties", dict(kernel_size=3, stride=1, padding=1)),
], ids=["cl_ceil", "window_in_padding", "ties"])
def test_torch_backend_agrees_with_kernels(cfg, kernel_backend, kdevice):
    """Same outputs, offsets (bit for bit: the fake kernels' dtype rule holds for both), indices, grads."""
    device = kdevice
    shape, layout, kw = cfg
    if layout == "ties":  # few distinct values: the first maximum of each window must win in both
        x = torch.randint(0, 3, shape, generator=generator("ties")).double().to(device)
    else:
        x = _input(shape, layout, device)
    geo = ([kw["kernel_size"]] * 2, [kw.get("stride", kw["kernel_size"])] * 2, [kw.get("padding", 0)] * 2,
           [kw.get("dilation", 1)] * 2, kw.get("ceil_mode", False))
    results = {}
    for backend in (kernel_backend, "torch"):
        xl = x.detach().requires_grad_()
        y, off = torch.ops.fastconv.max_pool2d(xl, *geo, backend)
        g = torch.randn(y.shape, generator=generator("agree"), dtype=torch.float64).to(device)
        (dx,) = torch.autograd.grad(y, xl, g)
        results[backend] = (y, off, dx)
        assert off.dtype == pool_ops.offsets_dtype(geo[0]) and off.stride() == y.stride()
    for a, b in zip(results[kernel_backend], results["torch"]):
        assert a.dtype == b.dtype and a.stride() == b.stride()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    with fastconv.backend("torch"):
        _, idx_torch = max_pool2d(x, **kw, return_indices=True)
    _, idx_kernels = max_pool2d(x, **kw, return_indices=True)
    ry, ridx = F.max_pool2d(x.cpu(), **kw, return_indices=True)
    assert torch.equal(idx_torch.cpu(), ridx) and torch.equal(idx_kernels.cpu(), ridx)
    torch.testing.assert_close(results[kernel_backend][0].cpu(), ry, rtol=0, atol=0)


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


def test_integer_inputs(kernel_backend, kdevice):
    x = torch.randint(-50, 50, (2, 3, 6, 6), generator=generator("int"))
    with pytest.raises(fastconv.BackendNotSupported, match=f"backend '{kernel_backend}'.*floating-point"):
        max_pool2d(x.to(kdevice), 2)
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


@pytest.mark.parametrize("backend", ["triton", "torch", *EXT_BACKENDS])
def test_every_output_element_written(backend, device, monkeypatch):
    """Poisoned (NaN / -1) allocations: the torch backend's through the op's `alloc` hook, the Triton
    launchers' through their module's torch.empty, the C++ ops' at::empty through PyTorch's deterministic
    mode, which fills uninitialized memory (NaN; the dtype's maximum, never a valid tap of a 3x3 window, for
    the int8 offsets). Forward, indices and grad_input must be all real."""
    skip_unless_runnable(backend)
    device = tensor_device(backend, device) if backend != "torch" else device
    monkeypatch.setattr(pool_ops, "alloc", _poison_alloc)
    if backend == "triton":
        tpool = pytest.importorskip("fastconv.triton.max_pool2d")
        monkeypatch.setattr(tpool, "torch", _PoisonTorch())
    cfg = dict(kernel_size=3, stride=2, padding=1)
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        if backend in ("cpu", "cuda"):
            torch.use_deterministic_algorithms(True)
            assert torch.utils.deterministic.fill_uninitialized_memory
            assert torch.empty(4, device=device).isnan().all()  # the poisoning is in force
        for layout in ("contiguous", "channels_last"):
            x = _input((2, 3, 9, 10), layout, device)
            with fastconv.backend(backend):
                y, idx, dx = _pool(max_pool2d, x, cfg)
            ry, ridx, rdx = _pool(F.max_pool2d, x.cpu(), cfg)
            assert not y.isnan().any() and not dx.isnan().any()
            assert torch.equal(y.cpu(), ry) and torch.equal(idx.cpu(), ridx)
            torch.testing.assert_close(dx.cpu(), rdx, rtol=1e-12, atol=1e-12)
    finally:
        torch.use_deterministic_algorithms(deterministic)


def test_fake_kernels_reproduce_shapes_dtypes_strides(kdevice):
    from torch._subclasses.fake_tensor import FakeTensorMode

    cases = [((2, 3, 9, 8), "contiguous", ([3, 3], [2, 2], [1, 1], [1, 1], True)),
             ((2, 3, 9, 8), "channels_last", ([2, 3], [2, 1], [1, 0], [2, 1], False)),
             ((2, 5, 2, 2), "channels_last", ([2, 2], [2, 2], [0, 0], [1, 1], False)),  # 1x1 output
             ((2, 3, 7, 9), "noncontiguous", ([3, 3], [1, 1], [1, 1], [1, 1], False))]
    for shape, layout, geo in cases:
        x = _input(shape, layout, kdevice)
        cl = pool_ops.suggest_memory_format(x) == torch.channels_last
        y, off = torch.ops.fastconv.max_pool2d(x, *geo)
        dx = torch.ops.fastconv.max_pool2d_input_grad(torch.ones_like(y), off, list(x.shape), *geo, cl)
        with FakeTensorMode() as mode:
            fx = mode.from_tensor(x)
            fy, foff = torch.ops.fastconv.max_pool2d(fx, *geo)
            fdx = torch.ops.fastconv.max_pool2d_input_grad(torch.ones_like(fy), foff, list(fx.shape), *geo, cl)
        for real, fake in ((y, fy), (off, foff), (dx, fdx)):
            assert (real.shape, real.dtype, real.stride()) == (fake.shape, fake.dtype, fake.stride()), (shape, layout)


@pytest.mark.parametrize("backend", ["triton", "torch", *EXT_BACKENDS])
def test_opcheck(backend, device):
    from torch.library import opcheck

    skip_unless_runnable(backend)
    device = tensor_device(backend, device) if backend != "torch" else device
    x = _input((2, 3, 7, 6), "channels_last", device).requires_grad_()
    geo = ([3, 2], [2, 1], [1, 1], [1, 2], True)
    opcheck(torch.ops.fastconv.max_pool2d.default, (x, *geo), {"backend": backend})
    y, off = torch.ops.fastconv.max_pool2d(x.detach(), *geo, backend)
    gy = torch.randn(y.shape, generator=generator("opcheck"), dtype=torch.float64).to(device).requires_grad_()
    opcheck(torch.ops.fastconv.max_pool2d_input_grad.default, (gy, off, list(x.shape), *geo, True, backend))


def test_opcheck_ext_ops(ext_backend):
    """The C++ ops themselves: schema, fake kernels (registered in Python) and dispatch, NCHW and
    channels_last, int8 and int16 offsets."""
    from torch.library import opcheck

    pool_ops.ext_ops()  # loads the extension and registers the fakes

    ops = torch.ops.fastconv  # the registered ops (ext_ops() returns their direct entry points)
    device = torch.device(ext_backend)
    for layout, geo in (("channels_last", ([3, 2], [2, 1], [1, 1], [1, 2], True)),
                        ("noncontiguous", ([12, 11], [2, 3], [6, 5], [1, 1], False))):
        x = _input((2, 3, 7, 6) if layout == "channels_last" else (1, 2, 9, 8), layout, device)
        opcheck(ops.ext_max_pool2d.default, (x, *geo))
        y, off = ops.ext_max_pool2d(x, *geo)
        assert off.dtype == pool_ops.offsets_dtype(geo[0])
        gy = torch.randn(y.shape, generator=generator("opcheck-ext"), dtype=torch.float64).to(device)
        cl = pool_ops.suggest_memory_format(x) == torch.channels_last
        opcheck(ops.ext_max_pool2d_input_grad.default, (gy, off, list(x.shape), *geo, cl))


def test_gradcheck(kdevice):
    x = _input((1, 2, 5, 6), "contiguous", kdevice).requires_grad_()
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
def test_errors_match_pytorch(name, kdevice):
    shape, args, kwargs = ERROR_CASES[name]
    x = torch.randn(shape)
    with pytest.raises(Exception) as theirs:
        F.max_pool2d(x, *args, **kwargs)
    with pytest.raises(type(theirs.value)) as ours:
        max_pool2d(x.to(kdevice), *args, **kwargs)
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


def test_module_drop_in(kdevice):
    ref = nn.MaxPool2d(3, 2, padding=1, ceil_mode=True)
    ours = fastconv.MaxPool2d(3, 2, padding=1, ceil_mode=True)
    assert isinstance(ours, nn.MaxPool2d) and "MaxPool2d" in fastconv.__all__
    assert repr(ours) == repr(ref) and ours.state_dict() == {} and list(ours.parameters()) == []
    assert (ours.kernel_size, ours.stride, ours.padding, ours.dilation) == (3, 2, 1, 1)
    assert fastconv.MaxPool2d(2).stride == nn.MaxPool2d(2).stride == 2

    conv = nn.Conv2d(3, 4, 3, padding=1).double().to(kdevice)
    net_ref = nn.Sequential(conv, nn.ReLU(), ref)
    net = nn.Sequential(copy.deepcopy(conv), nn.ReLU(), ours)
    x = _input((2, 3, 8, 9), "channels_last", kdevice)
    y_ref, y = net_ref(x), net(x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    assert _is_cl(y) == _is_cl(y_ref)
    g = torch.randn(y.shape, generator=generator("module"), dtype=torch.float64).to(kdevice)
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


@pytest.mark.parametrize("backend", ["triton", "torch", *EXT_BACKENDS])
def test_saves_only_compact_offsets(backend, device):
    """Autograd keeps only the int8 offsets: never x (nor a tensor sharing its storage), and for a 2x2 pool
    of fp32 1/24 of what F.max_pool2d keeps (x itself and int64 indices). The torch and C++ backends run the
    larger shape of the report (N=8, C=64, 32x32): 131072 bytes against 3145728."""
    skip_unless_runnable(backend)
    device = tensor_device(backend, device) if backend != "torch" else device
    shape = (2, 8, 16, 16) if backend == "triton" else (8, 64, 32, 32)
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


# ----------------------------------------------------------------------------------------------------------
# C++ kernel numerics (backends 'cpu' / 'cuda'): the coverage test_triton_max_pool2d.py gives the Triton
# kernels, through torch.ops.fastconv.max_pool2d / max_pool2d_input_grad with the backend named, on
# outputs poisoned by PyTorch's deterministic mode (at::empty filled with NaN / the integer maximum).

from .test_triton_max_pool2d import GEOMETRIES, _layout  # noqa: E402

NAN, INF = float("nan"), float("inf")


@pytest.fixture
def poisoned():
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was)


def _rand(shape, salt, dtype=torch.float64):
    return torch.randn(shape, generator=generator("ext-pool", salt), dtype=torch.float64).to(dtype)


def _ext_check(backend, x, k, s, p, d, ceil=False, grad_tol=None, grad_out=None, check_grad=True):
    """Forward values (exact, NaN where PyTorch has NaN), indices, layouts, and grad_input against F.max_pool2d
    and autograd on a float64 CPU copy."""
    geo = (list(k), list(s), list(p), list(d))
    y, off = torch.ops.fastconv.max_pool2d(x, *geo, ceil, backend)
    xr = x.detach().to("cpu", torch.float64).requires_grad_()
    ry, ridx = F.max_pool2d(xr, k, s, p, d, ceil_mode=ceil, return_indices=True)
    assert y.dtype == x.dtype and off.dtype == pool_ops.offsets_dtype(k) and off.stride() == y.stride()
    assert _is_cl(y) == _is_cl(ry) and y.is_contiguous() == ry.is_contiguous()
    torch.testing.assert_close(y.cpu().double(), ry.detach(), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(pool_ops.offsets_to_indices(off, x.shape, k, s, p, d).cpu(), ridx)
    if not check_grad:
        return y, off
    g = grad_out if grad_out is not None else _rand(tuple(y.shape), ("g", tuple(x.shape)), x.dtype).to(x.device)
    ry.backward(g.to("cpu", torch.float64))
    cl = pool_ops.suggest_memory_format(x) == torch.channels_last
    dx = torch.ops.fastconv.max_pool2d_input_grad(g, off, list(x.shape), *geo, ceil, cl, backend)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    assert dx.is_contiguous(memory_format=pool_ops.suggest_memory_format(x))
    tol = grad_tol or {}
    torch.testing.assert_close(dx.cpu().double(), xr.grad, rtol=tol.get("rtol", 0), atol=tol.get("atol", 0))
    return y, off


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_ext_geometry(name, ext_backend, poisoned):
    shape, k, s, p, d, ceil = GEOMETRIES[name]
    _ext_check(ext_backend, _rand(shape, name).to(ext_backend), k, s, p, d, ceil)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_ext_dtypes(dtype, ext_backend, poisoned):
    x = _rand((2, 3, 10, 9), "dtype", dtype).to(ext_backend)  # fp16/bf16 rounding makes ties too
    tol = {torch.float16: dict(rtol=1e-3, atol=1e-3), torch.bfloat16: dict(rtol=8e-3, atol=8e-3),
           torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float64: None}[dtype]
    _ext_check(ext_backend, x, (3, 3), (2, 2), (1, 1), (1, 1), True, grad_tol=tol)


@pytest.mark.parametrize(
    "kind", ["channels_last", "channel_slice", "channels_last_slice", "transposed", "permuted", "spatial_slice"]
)
def test_ext_layouts(kind, ext_backend, poisoned):
    x = _layout(_rand((2, 5, 9, 10), kind), kind).to(ext_backend)
    _ext_check(ext_backend, x, (3, 3), (2, 2), (1, 1), (1, 1), True)
    # a strided grad_output (every other column of a wider buffer) and an expanded one (sum().backward())
    y, _ = torch.ops.fastconv.max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], True, ext_backend)
    wide = _rand((2, 5, y.shape[2], 2 * y.shape[3]), "wide").to(ext_backend)
    _ext_check(ext_backend, x, (3, 3), (2, 2), (1, 1), (1, 1), True, grad_out=wide[..., ::2])
    _ext_check(ext_backend, x, (3, 3), (2, 2), (1, 1), (1, 1), True,
               grad_out=torch.ones((), dtype=x.dtype, device=x.device).expand(y.shape))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_ext_nan_ties_and_neg_inf(layout, ext_backend, poisoned):
    """Values from {-1, 0.5, 2} (ties: the first maximum wins), NaNs (the last NaN of a window wins, as in
    PyTorch), and -inf regions with whole -inf windows next to the padding."""
    shape = (2, 3, 10, 11)
    q = torch.randint(0, 3, shape, generator=generator("ext-ties"))
    x = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)[q]
    x[torch.rand(shape, generator=generator("ext-nan")) < 0.08] = NAN
    x[0, 0, 0, 0:3] = NAN
    x[1, :, :3, :3] = -INF
    x[1, 2] = -INF
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(ext_backend)
    for k, s, p, d, ceil in [((3, 3), (2, 2), (1, 1), (1, 1), True), ((2, 3), (1, 2), (0, 1), (1, 1), False),
                             ((2, 2), (1, 1), (1, 1), (2, 2), False)]:
        y, _ = _ext_check(ext_backend, x, k, s, p, d, ceil)
        assert y.isnan().any() and not y.isnan().all()


def test_ext_window_entirely_in_padding(ext_backend, poisoned):
    """The only window reads columns -1 and 3 of a 3-wide input: -inf at PyTorch's starting tap, and no
    gradient anywhere (the window reads no input element)."""
    x = _rand((2, 2, 2, 3), "pad-window").to(ext_backend)
    args = ((1, 2), (1, 1), (0, 1), (1, 4))
    y, off = _ext_check(ext_backend, x, *args, check_grad=False)
    assert torch.isneginf(y).all()
    dx = torch.ops.fastconv.max_pool2d_input_grad(torch.ones_like(y), off, list(x.shape), *map(list, args), False,
                                                  False, ext_backend)
    assert torch.equal(dx, torch.zeros_like(x))


@pytest.mark.parametrize("shape", [(0, 3, 8, 8), (1, 1, 7, 9), (1, 3, 1, 1)])
def test_ext_batch_sizes(shape, ext_backend, poisoned):
    x = _rand(shape, "batch").to(ext_backend)
    k, s, p = ((3, 3), (2, 2), (1, 1)) if shape[2] > 1 else ((1, 1), (1, 1), (0, 0))
    _ext_check(ext_backend, x, k, s, p, (1, 1), True)


def test_ext_ops_reject_bad_input(ext_backend):
    """Direct callers of the C++ ops get clear errors, not crashes."""
    pool_ops.ext_ops()  # loads the extension and registers the fakes
    ops = torch.ops.fastconv  # the registered ops (ext_ops() returns their direct entry points)
    x = _rand((1, 2, 6, 6), "bad").to(ext_backend)
    geo = ([2, 2], [2, 2], [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match="4-D"):
        ops.ext_max_pool2d(x[0], *geo, False)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        ops.ext_max_pool2d(x.to(torch.int32), *geo, False)
    with pytest.raises(RuntimeError, match="stride should be greater than zero"):
        ops.ext_max_pool2d(x, [2, 2], [0, 2], [0, 0], [1, 1], False)
    with pytest.raises(RuntimeError, match="pad should be smaller than or equal to half"):
        ops.ext_max_pool2d(x, [2, 2], [2, 2], [2, 0], [1, 1], False)
    with pytest.raises(RuntimeError, match="Output size is too small"):
        ops.ext_max_pool2d(x, [3, 3], [1, 1], [0, 0], [3, 3], False)
    y, off = ops.ext_max_pool2d(x, *geo, False)
    with pytest.raises(RuntimeError, match="expected grad_output and offsets of shape"):
        ops.ext_max_pool2d_input_grad(y[:, :1], off, list(x.shape), *geo, False, False)
    with pytest.raises(RuntimeError, match="offsets must be int8/int16/int32"):
        ops.ext_max_pool2d_input_grad(y, off.long(), list(x.shape), *geo, False, False)
