"""fastconv conv2d (Triton implicit GEMM and im2col GEMM; the C++ extension's CPU and CUDA kernels) against
F.conv2d evaluated in float64.

Every test taking `device` runs once per backend: triton (both algorithms; the GPU, else the interpreter),
cpu (the C++ CPU twin in fastconv._C) and cuda (the CUDA C++ kernels, marked gpu); a backend that cannot run
here is skipped with the reason. Triton-only tests take `triton_device`.

Forward and every gradient (input, weight, bias), on fresh random configurations whose sizes cross the
kernels' tile boundaries, for both algorithms, NCHW / channels_last / non-contiguous inputs, groups incl.
depthwise, dilation, 'same' / 'valid', bias or not, batch 0 / 1 / unbatched, fp32 / fp16 / bf16 (fp64 for
gradcheck). Without a GPU the real Triton kernels run through the interpreter.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import fastconv.ops.conv2d as conv_ops
import fastconv.triton.conv2d as tconv
from fastconv import _act_bits, _backend
from fastconv.triton._epilogue import pixel_coords, tile_rows
from fastconv.functional import conv2d, conv2d_fused

from .backends import EXT_BACKENDS, skip_unless_runnable
from .helpers import assert_close, generator, nan_alloc, nan_workspace, randn, rng

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "noncontiguous"]


ALGOS = ["implicit", "im2col"]
BACKENDS = ["triton", "cpu", "cuda"]


def pytest_generate_tests(metafunc):
    """Parametrize `device` tests over BACKENDS, and `algo` over ALGOS for triton only (the C++ backends
    have one algorithm, im2col GEMM)."""
    if "device" not in metafunc.fixturenames:
        return
    marks = {"cuda": [pytest.mark.gpu]}
    if "algo" in metafunc.fixturenames:
        combos = [pytest.param(b, a, marks=marks.get(b, []), id=f"{b}-{a}")
                  for b in BACKENDS for a in (ALGOS if b == "triton" else ["implicit"])]
        metafunc.parametrize("conv_backend,algo", combos)
    else:
        metafunc.parametrize("conv_backend", [pytest.param(b, marks=marks.get(b, []), id=b) for b in BACKENDS])


@pytest.fixture
def device(conv_backend, request):
    """The device the backend under test runs on, with that backend selected and TF32 off."""
    import fastconv
    from fastconv import _backend

    if conv_backend == "triton":
        dev = request.getfixturevalue("triton_device")
        yield dev
        return
    dev = torch.device(conv_backend)
    ok, why = _backend.availability(dev.type)[conv_backend]
    if not ok:
        pytest.skip(f"backend {conv_backend!r} unavailable: {why}")
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    with fastconv.backend(conv_backend):
        yield dev
    torch.backends.cudnn.allow_tf32 = old


@pytest.fixture
def triton_device(triton_backend):
    """Where the Triton kernels run (GPU, else the CPU interpreter), with the triton backend selected."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_input(shape, dtype, device, layout, gen):
    N, C, H, W = shape
    if layout == "noncontiguous":
        # a strided view that is neither NCHW- nor NHWC-contiguous: every other column of a wider NHCW buffer
        base = randn((N, H, C, 2 * W), dtype, device, gen)
        x = base[..., ::2].transpose(1, 2)
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
        return x
    x = randn(shape, dtype, device, gen)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def reference(x, w, b, stride, padding, dilation, groups, grad_out):
    """F.conv2d and its gradients in float64 on CPU copies."""
    xd = x.detach().cpu().double().requires_grad_()
    wd = w.detach().cpu().double().requires_grad_()
    bd = b.detach().cpu().double().requires_grad_() if b is not None else None
    y = F.conv2d(xd, wd, bd, stride, padding, dilation, groups)
    y.backward(grad_out.detach().cpu().double())
    return y.detach(), xd.grad, wd.grad, (bd.grad if bd is not None else None)


def check_conv(cfg, device, algo="implicit"):
    """Run fastconv forward+backward for cfg and compare with the float64 reference."""
    gen = generator("conv", repr(cfg))
    N, C, H, W = cfg["input"]
    K, KH, KW, groups = cfg["out_channels"], cfg["kernel"][0], cfg["kernel"][1], cfg["groups"]
    dtype = cfg["dtype"]
    x = make_input((N, C, H, W), dtype, device, cfg["layout"], gen).requires_grad_()
    w = randn((K, C // groups, KH, KW), dtype, device, gen, scale=(C // groups * KH * KW) ** -0.5).requires_grad_()
    b = randn((K,), dtype, device, gen).requires_grad_() if cfg["bias"] else None
    args = (cfg["stride"], cfg["padding"], cfg["dilation"], groups)

    y = conv2d(x, w, b, *args, algo=algo)
    grad_out = randn(y.shape, dtype, device, gen)
    y.backward(grad_out)
    y_ref, dx_ref, dw_ref, db_ref = reference(x, w, b, *args, grad_out)

    assert y.shape == y_ref.shape and y.dtype == dtype
    expected_format = F.conv2d(x.detach().cpu().float(), w.detach().cpu().float(), None, *args)
    assert y.is_contiguous(memory_format=torch.channels_last) == expected_format.is_contiguous(
        memory_format=torch.channels_last), f"output memory format differs from F.conv2d for {cfg}"
    assert_close(y, y_ref, dtype, "forward", cfg)
    assert_close(x.grad, dx_ref, dtype, "grad_input", cfg)
    assert_close(w.grad, dw_ref, dtype, "grad_weight", cfg)
    if b is not None:
        assert_close(b.grad, db_ref, dtype, "grad_bias", cfg)


# Interpreter cost grows with programs x taps x channel blocks; random configs stay under this budget.
_BUDGET = 300


def _cost(cfg) -> int:
    N, C, H, W = cfg["input"]
    KH, KW = cfg["kernel"]
    g = cfg["groups"]
    m = N * H * W
    return -(-m // 32) * -(-(cfg["out_channels"] // g) // 32) * g * KH * KW * -(-(C // g) // 16)


def random_config(r) -> dict:
    while True:
        depthwise = r.random() < 0.15
        if depthwise:
            groups = r.randint(2, 6)
            cin_g, cout_g = 1, r.choice([1, 2])
        else:
            groups = r.choice([1, 1, 1, 2, 3])
            cin_g = r.choice([r.randint(1, 8), r.randint(9, 40)])
            cout_g = r.choice([r.randint(1, 12), r.randint(13, 40)])
        kernel = r.choice([(1, 1), (3, 3), (3, 3), (2, 3), (5, 5), (3, 1), (4, 4)])
        stride = r.choice([1, 1, 2, (2, 1), 3])
        dilation = r.choice([1, 1, 1, 2, (1, 2)])
        padding = r.choice([0, 1, (1, 2), 2, "valid", "same"])
        if padding == "same":
            stride = 1
        d = dilation if isinstance(dilation, tuple) else (dilation, dilation)
        p = padding if isinstance(padding, tuple) else ((padding, padding) if isinstance(padding, int) else (0, 0))
        min_h = max(1, d[0] * (kernel[0] - 1) + 1 - 2 * p[0])
        min_w = max(1, d[1] * (kernel[1] - 1) + 1 - 2 * p[1])
        cfg = {
            "input": (r.choice([1, 2, 3]), cin_g * groups, r.randint(min_h, min_h + 10), r.randint(min_w, min_w + 10)),
            "out_channels": cout_g * groups,
            "kernel": kernel,
            "stride": stride,
            "padding": padding,
            "dilation": dilation,
            "groups": groups,
            "bias": r.random() < 0.6,
            "dtype": r.choice(DTYPES),
            "layout": r.choice(LAYOUTS),
        }
        if _cost(cfg) <= _BUDGET:
            return cfg


@pytest.mark.parametrize("case", range(10))
def test_random_configs(case, algo, device):
    cfg = random_config(rng("random", case, algo))
    check_conv(cfg, device, algo)


def _cfg(**kw):
    base = dict(input=(2, 5, 9, 11), out_channels=7, kernel=(3, 3), stride=1, padding=1, dilation=1, groups=1,
                bias=True, dtype=torch.float32, layout="contiguous")
    base.update(kw)
    return base


NAMED = {
    "batch1": _cfg(input=(1, 3, 8, 8)),
    "tile_crossing_channels": _cfg(input=(2, 37, 7, 6), out_channels=35, dtype=torch.float16),
    "depthwise_channels_last": _cfg(input=(2, 6, 7, 7), out_channels=6, groups=6, layout="channels_last"),
    "grouped_bf16": _cfg(input=(2, 6, 9, 9), out_channels=9, groups=3, dtype=torch.bfloat16),
    "same_even_kernel": _cfg(kernel=(4, 2), padding="same"),
    "same_dilated": _cfg(kernel=(3, 3), padding="same", dilation=2),
    "valid_rectangular": _cfg(kernel=(2, 5), padding="valid", bias=False),
    "strided_dilated_asym": _cfg(input=(2, 6, 15, 12), stride=(3, 2), dilation=(2, 1), padding=(2, 1)),
    "stride_larger_than_kernel": _cfg(kernel=(1, 1), stride=3, padding=0),
    "pointwise_noncontiguous": _cfg(input=(3, 20, 6, 5), out_channels=40, kernel=(1, 1), padding=0,
                                    layout="noncontiguous"),
}


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_configs(name, algo, device):
    check_conv(NAMED[name], device, algo)


def test_batch_zero(algo, device):
    x = torch.randn(0, 4, 6, 6, device=device, requires_grad=True)
    w = torch.randn(5, 4, 3, 3, device=device, requires_grad=True)
    b = torch.randn(5, device=device, requires_grad=True)
    y = conv2d(x, w, b, padding=1, algo=algo)
    assert y.shape == (0, 5, 6, 6)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_unbatched_input(device):
    gen = generator("unbatched")
    x = randn((4, 7, 6), torch.float32, device, gen).requires_grad_()
    w = randn((3, 4, 3, 3), torch.float32, device, gen).requires_grad_()
    y = conv2d(x, w, None, 1, 1)
    assert y.shape == (3, 7, 6)
    y.backward(torch.ones_like(y))
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    F.conv2d(xd, wd, None, 1, 1).backward(torch.ones(3, 7, 6, dtype=torch.double))
    assert_close(y, F.conv2d(xd, wd, None, 1, 1), torch.float32, "unbatched forward")
    assert_close(x.grad, xd.grad, torch.float32, "unbatched grad_input")
    assert_close(w.grad, wd.grad, torch.float32, "unbatched grad_weight")


def test_every_output_element_written(algo, device, monkeypatch):
    """Outputs and scratch buffers start as NaN; the kernels must overwrite every element."""
    monkeypatch.setattr(conv_ops, "alloc", nan_alloc)
    monkeypatch.setattr(tconv, "workspace", nan_workspace)
    import fastconv.triton.im2col as tim2col

    monkeypatch.setattr(tim2col, "workspace", nan_workspace)
    cfg = _cfg(input=(2, 6, 13, 10), out_channels=9, kernel=(3, 2), stride=(2, 3), padding=(1, 2),
               dilation=(2, 1), groups=3)
    check_conv(cfg, device, algo)


def test_gemm_operands_channels_contiguous(triton_device, monkeypatch):
    """The implicit-GEMM kernels get channel-contiguous activations, weights and grad_out whatever the caller's
    layout (the launchers copy NCHW operands to channels_last, as cuDNN does for tensor-core convs), while
    the output keeps the caller's NCHW layout and is stored in two channel halves (SPLIT_N). An NCHW grad_out is
    copied once for dgrad and wgrad together (the same tensor reaches both), so dx is channels_last inside the
    graph; the leaf's .grad is NCHW like the leaf."""
    seen = {}

    def spy(name, kernel):
        def call(grid, *args, **kwargs):
            seen[name] = ([a for a in args if isinstance(a, torch.Tensor)], kwargs)
            return kernel(grid, *args, **kwargs)
        return call

    for name in ("_fwd", "_dgrad", "_wgrad"):
        monkeypatch.setattr(tconv, name, spy(name, getattr(tconv, name)))
    gen = generator("channels_contiguous")
    x = randn((2, 5, 7, 6), torch.float32, triton_device, gen).requires_grad_()
    w = randn((4, 5, 3, 3), torch.float32, triton_device, gen).requires_grad_()
    y = conv2d(x, w, None, 1, 1, algo="implicit")
    dy = randn(y.shape, torch.float32, triton_device, gen)
    y.backward(dy)
    assert y.is_contiguous() and x.grad.is_contiguous()
    (fx, fw, fy, *_), fkw = seen["_fwd"]
    (gdy, gw, gdx, *_), gkw = seen["_dgrad"]
    (wdy, wx, *_), _ = seen["_wgrad"]
    assert all(t.stride(1) == 1 for t in (fx, fw, gdy, gw, wdy, wx))
    assert fy.is_contiguous() and fkw["SPLIT_N"]
    assert gdy is wdy and gdx.is_contiguous(memory_format=torch.channels_last) and not gkw["SPLIT_N"]
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    yd = F.conv2d(xd, wd, None, 1, 1)
    yd.backward(dy.double())
    assert_close(y, yd, torch.float32, "NCHW forward")
    assert_close(x.grad, xd.grad, torch.float32, "NCHW grad_input")
    assert_close(w.grad, wd.grad, torch.float32, "NCHW grad_weight")
    # a frozen weight: the dgrad alone reads the NCHW grad_out (its own copy) and stores dx NCHW in two halves
    seen.clear()
    x.grad = None
    conv2d(x, w.detach(), None, 1, 1, algo="implicit").backward(dy)
    (gdy, gw, gdx, *_), gkw = seen["_dgrad"]
    assert "_wgrad" not in seen and gdy.stride(1) == 1 and gdx.is_contiguous() and gkw["SPLIT_N"]
    assert_close(x.grad, xd.grad, torch.float32, "NCHW grad_input, frozen weight")


@pytest.mark.parametrize("activation", ["identity", "relu", "relu6", "silu", "hardswish"])
def test_fused_epilogue(activation, algo, device):
    """y = act((conv + bias) * scale + shift + residual) in one kernel, residual in another memory format."""
    gen = generator("epilogue", activation, algo)
    dtype = torch.float16 if activation in ("silu", "relu") else torch.float32
    x = randn((2, 10, 9, 9), dtype, device, gen).contiguous(memory_format=torch.channels_last)
    w = randn((36, 10, 3, 3), dtype, device, gen, scale=0.3)
    b, scale, shift = randn((36,), dtype, device, gen), randn((36,), dtype, device, gen), randn((36,), dtype, device, gen)
    residual = randn((2, 36, 5, 5), dtype, device, gen, scale=2.0)
    y = conv2d_fused(x, w, b, 2, 1, scale=scale, shift=shift, residual=residual, activation=activation, algo=algo)
    d = lambda t: t.detach().cpu().double()  # noqa: E731
    z = F.conv2d(d(x), d(w), d(b), 2, 1) * d(scale)[:, None, None] + d(shift)[:, None, None] + d(residual)
    act = {"identity": lambda t: t, "relu": F.relu, "relu6": F.relu6, "silu": F.silu, "hardswish": F.hardswish}
    assert_close(y, act[activation](z), dtype, f"fused {activation}")


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("res_layout", ["like_y", "other_format", "strided_view"])
def test_residual_read_in_output_layout(res_layout, algo, triton_device, monkeypatch):
    """The epilogue reads the residual through y's offsets: a residual in y's layout goes to the kernel as is,
    any other (another memory format, a strided view) is copied to y's strides first; the result is right."""
    from fastconv.triton import im2col as tim2col

    target = (tconv, "_fwd") if algo == "implicit" else (tim2col, "_gemm")
    seen = []

    def spy(grid, *args, **kwargs):
        seen.append((args[2], args[6]))  # y, residual
        return kernel(grid, *args, **kwargs)

    kernel = getattr(*target)
    monkeypatch.setattr(*target, spy)
    gen = generator("residual_layout", res_layout, algo)
    x = randn((2, 6, 9, 7), torch.float32, triton_device, gen).contiguous(memory_format=torch.channels_last)
    w = randn((20, 6, 3, 3), torch.float32, triton_device, gen, scale=0.3)
    res = {"like_y": lambda: randn((2, 20, 9, 7), torch.float32, triton_device, gen).contiguous(
               memory_format=torch.channels_last),
           "other_format": lambda: randn((2, 20, 9, 7), torch.float32, triton_device, gen),
           "strided_view": lambda: randn((2, 40, 9, 8), torch.float32, triton_device, gen)[:, ::2, :, 1:]}[res_layout]()
    y = conv2d_fused(x, w, None, 1, 1, residual=res, activation="relu", algo=algo)
    ky, kres = seen[0]
    assert kres.stride() == ky.stride() == y.stride()
    assert (kres.data_ptr() == res.data_ptr()) == (res_layout == "like_y")
    d = lambda t: t.detach().cpu().double()  # noqa: E731
    assert_close(y, F.relu(F.conv2d(d(x), d(w), None, 1, 1) + d(res)), torch.float32, f"residual {res_layout}")


def test_residual_like_ignores_strides_of_size_one_dims():
    from fastconv.triton._epilogue import residual_like

    y = torch.empty(1, 8, 4, 1)
    same = torch.empty_strided((1, 8, 4, 1), (999, 4, 1, 77))
    assert residual_like(same, y) is same
    other = torch.randn(1, 4, 8, 1, dtype=torch.float64).transpose(1, 2)  # (1, 8, 4, 1), channels at stride 1
    copy = residual_like(other, y)
    assert copy.stride() == y.stride() and copy.dtype == torch.float64 and torch.equal(copy, other)
    assert residual_like(None, y) is None


GRADCHECK_SHAPES = dict(x=(1, 4, 5, 4), w=(6, 2, 2, 3), groups=2, stride=(2, 1), padding=(1, 2), dilation=(2, 1))


def test_gradcheck_conv2d(algo, device):
    gen = generator("gradcheck", algo)
    s = GRADCHECK_SHAPES
    x = randn(s["x"], torch.float64, device, gen).requires_grad_()
    w = randn(s["w"], torch.float64, device, gen).requires_grad_()
    b = randn((6,), torch.float64, device, gen).requires_grad_()
    fn = lambda x, w, b: conv2d(x, w, b, s["stride"], s["padding"], s["dilation"], s["groups"], algo=algo)  # noqa
    assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=True)


@pytest.mark.parametrize("activation", ["relu", "silu", "hardswish"])
def test_gradcheck_fused(activation, device):
    gen = generator("gradcheck-fused", activation)
    x = randn((1, 3, 4, 4), torch.float64, device, gen).requires_grad_()
    w = randn((4, 3, 3, 3), torch.float64, device, gen).requires_grad_()
    b, scale, shift = (randn((4,), torch.float64, device, gen).requires_grad_() for _ in range(3))
    res = randn((1, 4, 2, 2), torch.float64, device, gen).requires_grad_()
    fn = lambda *a: conv2d_fused(a[0], a[1], a[2], 2, 1, scale=a[3], shift=a[4], residual=a[5],  # noqa: E731
                                 activation=activation)
    assert torch.autograd.gradcheck(fn, (x, w, b, scale, shift, res), fast_mode=True)


def test_opcheck(device, conv_backend):
    from torch.library import opcheck

    gen = generator("opcheck")
    x = randn((2, 4, 6, 5), torch.float32, device, gen).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = randn((6, 2, 3, 3), torch.float32, device, gen).requires_grad_()
    b = randn((6,), torch.float32, device, gen).requires_grad_()
    geo = ([2, 1], [1, 1, 0, 1], [1, 2], 2)
    opcheck(torch.ops.fastconv.conv2d.default, (x, w, b, *geo), {"backend": conv_backend})
    opcheck(torch.ops.fastconv.conv2d.default, (x, w, None, *geo),
            {"shift": b.detach(), "activation": "relu", "algo": "im2col", "backend": conv_backend})
    y = torch.ops.fastconv.conv2d(x, w, b, *geo, backend=conv_backend)
    gy = torch.randn_like(y)
    opcheck(torch.ops.fastconv.conv2d_input_grad.default, (gy, w.detach(), list(x.shape), *geo, conv_backend))
    opcheck(torch.ops.fastconv.conv2d_weight_grad.default,
            (gy, x.detach(), list(w.shape), *geo, True, conv_backend))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous"])
@pytest.mark.parametrize("epilogue", [False, True])
def test_torch_backend_ops(layout, epilogue):
    """Backend 'torch' (not in BACKENDS: PyTorch's own kernels), whose conv and input gradient return PyTorch's
    result without a copy where it already has nn's layout: values against float64 F.conv2d and its autograd,
    nn.Conv2d's output layout, no output aliasing an input; opcheck of the three ops, symmetric and asymmetric
    padding (the latter's input gradient is a slice, copied into a dx in grad_output's layout)."""
    from torch.library import opcheck

    gen = generator("torch-backend", layout, epilogue)
    x = randn((2, 4, 7, 6), torch.float32, "cpu", gen)
    x = {"contiguous": x, "channels_last": x.contiguous(memory_format=torch.channels_last),
         "noncontiguous": x.transpose(2, 3).contiguous().transpose(2, 3)[:, :, :, :5]}[layout]
    w = randn((6, 4, 3, 3), torch.float32, "cpu", gen)
    b = randn((6,), torch.float32, "cpu", gen)
    shift = randn((6,), torch.float32, "cpu", gen) if epilogue else None
    for padding in ([1, 1, 1, 1], [0, 1, 1, 0]):
        geo = ([1, 1], padding, [1, 1], 1)
        y = torch.ops.fastconv.conv2d(x, w, b, *geo, shift=shift, activation="relu" if epilogue else "identity",
                                      backend="torch")
        x64 = F.pad(x.double(), (padding[2], padding[3], padding[0], padding[1]))
        ref = F.conv2d(x64, w.double(), b.double())
        if epilogue:
            ref = torch.relu(ref + shift.double()[:, None, None])
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
        nn_layout = conv_ops.memory_format_of(F.conv2d(x, w, b, padding=1))
        assert y.is_contiguous(memory_format=nn_layout), (layout, padding, y.stride())
        for t in (x, w, b):
            assert y.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
        gy = torch.randn(y.shape, generator=gen).to(memory_format=torch.channels_last if layout == "channels_last"
                                                    else torch.contiguous_format)
        dx = torch.ops.fastconv.conv2d_input_grad(gy, w, list(x.shape), *geo, "torch")
        x64r = x.double().requires_grad_()
        out = F.conv2d(F.pad(x64r, (padding[2], padding[3], padding[0], padding[1])), w.double())
        (rdx,) = torch.autograd.grad(out, x64r, gy.double())
        torch.testing.assert_close(dx.double(), rdx, rtol=1e-5, atol=1e-5)
        assert dx.is_contiguous(memory_format=conv_ops.memory_format_of(gy)), (layout, padding, dx.stride())
        assert dx.untyped_storage().data_ptr() != gy.untyped_storage().data_ptr()
        xg, wg, bg = (t.detach().requires_grad_() for t in (x, w, b))
        opcheck(torch.ops.fastconv.conv2d.default, (xg, wg, bg, *geo), {"shift": shift, "backend": "torch"})
        opcheck(torch.ops.fastconv.conv2d_input_grad.default, (gy, w, list(x.shape), *geo, "torch"))


BAD_CALLS = {
    "padding_string": (dict(), dict(padding="foo")),
    "same_strided": (dict(), dict(padding="same", stride=2)),
    "negative_padding": (dict(), dict(padding=-1)),
    "zero_stride": (dict(), dict(stride=0)),
    "zero_dilation": (dict(), dict(dilation=0)),
    "zero_groups": (dict(), dict(groups=0)),
    "channel_mismatch": (dict(w=(2, 3, 3, 3)), dict()),
    "groups_not_dividing_out": (dict(w=(3, 2, 3, 3)), dict(groups=2)),
    "kernel_too_large": (dict(x=(1, 4, 2, 2)), dict()),
    "bias_shape": (dict(b=(3,)), dict()),
    "input_2d": (dict(x=(4, 5)), dict()),
    "stride_length": (dict(), dict(stride=(1, 1, 1))),
}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_errors_match_pytorch(name, device):
    shapes, kwargs = BAD_CALLS[name]
    x = torch.randn(shapes.get("x", (1, 4, 5, 5)), device=device)
    w = torch.randn(shapes.get("w", (2, 4, 3, 3)), device=device)
    b = torch.randn(shapes["b"], device=device) if "b" in shapes else None
    with pytest.raises(Exception) as theirs:
        F.conv2d(x, w, b, **kwargs)
    with pytest.raises(type(theirs.value)) as ours:
        conv2d(x, w, b, **kwargs)
    assert str(ours.value).strip() != ""
    if name not in ("stride_length",):
        assert str(ours.value) == str(theirs.value), f"{name}: {ours.value!r} vs {theirs.value!r}"


def test_dtype_mismatch_raises(device):
    x = torch.randn(1, 4, 5, 5, device=device)
    with pytest.raises(RuntimeError, match="weight type"):
        conv2d(x, torch.randn(2, 4, 3, 3, device=device, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="bias type"):
        conv2d(x, torch.randn(2, 4, 3, 3, device=device), torch.randn(2, device=device, dtype=torch.float64))


def test_unknown_algo_and_activation(device):
    x, w = torch.randn(1, 2, 4, 4, device=device), torch.randn(2, 2, 3, 3, device=device)
    with pytest.raises(ValueError, match="unknown algo"):
        conv2d(x, w, algo="winograd")
    with pytest.raises(ValueError, match="unknown activation"):
        conv2d_fused(x, w, activation="gelu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_matches_nn_conv2d(dtype, triton_backend):
    """Under CPU autocast nn.Conv2d computes in the autocast dtype; so does fastconv (the dtype is read at
    call time, fp16 or bf16, not fixed at registration)."""
    conv = torch.nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 7, 7)
    with torch.autocast("cpu", dtype=dtype):
        expected = conv(x)
        got = conv2d(x, conv.weight, conv.bias, 1, 1)
    assert got.dtype == expected.dtype == dtype
    assert_close(got, expected.double(), dtype, "autocast forward")


def test_tf32_follows_cudnn_flag():
    from fastconv.triton._common import dot_precision

    torch.backends.cudnn.allow_tf32 = True
    assert dot_precision(torch.float32) == "tf32"
    torch.backends.cudnn.allow_tf32 = False
    assert dot_precision(torch.float32) == "ieee"
    assert dot_precision(torch.float16) == "ieee"


_TF32_SETTINGS = (("generic", "all"), ("cuda", "all"), ("cuda", "conv"), ("cuda", "rnn"))


@pytest.fixture
def tf32_settings():
    """PyTorch's TF32 settings (the per-op API of torch >= 2.9), restored afterwards."""
    getter = getattr(torch._C, "_get_fp32_precision_getter", None)
    if getter is None:
        pytest.skip(f"torch {torch.__version__} has no per-op fp32_precision API")
    saved = [(b, o, getter(b, o)) for b, o in _TF32_SETTINGS]
    legacy = torch._C._get_cudnn_allow_tf32()
    yield torch._C._set_fp32_precision_setter
    torch._C._set_cudnn_allow_tf32(legacy)
    for backend, op, value in saved:
        torch._C._set_fp32_precision_setter(backend, op, value)


@pytest.mark.parametrize("settings, want", [
    # the per-op API setting the conv apart from the RNN: torch.backends.cudnn.allow_tf32 itself raises there
    ({("cuda", "conv"): "ieee", ("cuda", "rnn"): "tf32"}, "ieee"),
    ({("cuda", "conv"): "tf32", ("cuda", "rnn"): "ieee"}, "tf32"),
    # "none" inherits: cuDNN's setting, then the global one
    ({("cuda", "conv"): "none", ("cuda", "rnn"): "tf32", ("cuda", "all"): "ieee"}, "ieee"),
    ({("cuda", "conv"): "none", ("cuda", "rnn"): "ieee", ("cuda", "all"): "none", ("generic", "all"): "tf32"},
     "tf32"),
])
def test_tf32_follows_the_per_op_api(tf32_settings, settings, want):
    """nn.Conv2d reads cuDNN's conv setting (ATen's allowTF32CuDNN("conv")), which the per-op API may set apart
    from the RNN's; fastconv then reads the same setting instead of raising from torch.backends.cudnn.allow_tf32."""
    from fastconv.triton._common import dot_precision

    for (backend, op), value in settings.items():
        tf32_settings(backend, op, value)
    assert _backend.conv_tf32_allowed() is (want == "tf32")
    assert dot_precision(torch.float32) == want
    assert dot_precision(torch.bfloat16) == "ieee"


def test_tf32_flag_reaches_cached_launch_plans():
    """The conv launchers' per-signature plans key on the dot precision: flipping cudnn.allow_tf32 between two
    calls of one fp32 signature changes every launch's PRECISION (forward, dgrad, wgrad); other dtypes ignore
    the flag."""
    from fastconv.triton import conv2d as tconv, launch

    x, w = torch.randn(2, 4, 7, 7), torch.randn(6, 4, 3, 3)
    g = torch.randn(2, 6, 7, 7)
    keys = {}
    before = torch.backends.cudnn.allow_tf32
    try:
        for flag in (True, False, True):
            torch.backends.cudnn.allow_tf32 = flag
            with launch.recording() as launches:
                tconv.conv2d_forward(x, w, None, (1, 1), (1, 1), (1, 1), 1)
                tconv.conv2d_input_grad(g, w, tuple(x.shape), (1, 1), (1, 1), (1, 1), 1)
                tconv.conv2d_weight_grad(g, x, tuple(w.shape), (1, 1), (1, 1), (1, 1), 1)
            assert len(launches) >= 3
            want = "PRECISION=tf32" if flag else "PRECISION=ieee"
            assert all(want in r.key for r in launches if r.key), (flag, [r.key for r in launches])
            keys[flag] = [r.key for r in launches]
        with launch.recording() as launches:
            tconv.conv2d_forward(x.half(), w.half(), None, (1, 1), (1, 1), (1, 1), 1)
        assert "PRECISION=ieee" in launches[0].key
    finally:
        torch.backends.cudnn.allow_tf32 = before
    assert keys[True] != keys[False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 numerics need a GPU with tensor cores")
def test_tf32_numerics_gpu(triton_device):
    device = triton_device
    torch.backends.cudnn.allow_tf32 = True
    x, w = torch.randn(4, 64, 16, 16, device=device), torch.randn(64, 64, 3, 3, device=device)
    expected = F.conv2d(x.double(), w.double(), None, 1, 1)
    got = conv2d(x, w, None, 1, 1)
    assert (got.double() - expected).abs().max() / expected.abs().max() < 5e-3


@pytest.mark.sanitize_overflow
@pytest.mark.parametrize("kernel", ["fwd", "im2col", "fwd-fused", "im2col-fused", "dgrad", "wgrad"])
def test_int64_indexing_path(kernel, triton_device):
    """The int64 index path (taken automatically past 2**31 elements) computes the same result; the fused
    variants run its epilogue (residual, scale/shift, SiLU) too."""
    device = triton_device
    from fastconv.triton import im2col as tim2col

    gen = generator("int64", kernel)
    x = randn((2, 6, 9, 8), torch.float32, device, gen)
    w = randn((8, 3, 3, 3), torch.float32, device, gen)
    geo = ((2, 1), (1, 1), (1, 2), 2)
    ref = F.conv2d(x.double().cpu(), w.double().cpu(), None, *geo)
    launch = {"fwd": tconv.conv2d_forward, "im2col": tim2col.conv2d_im2col}
    if kernel in launch:
        got = launch[kernel](x, w, None, *geo, force_int64=True)
    elif kernel.endswith("-fused"):
        scale, shift = randn((8,), torch.float32, device, gen), randn((8,), torch.float32, device, gen)
        res = randn(tuple(ref.shape), torch.float32, device, gen)
        got = launch[kernel.split("-")[0]](x, w, None, *geo, scale=scale, shift=shift, residual=res,
                                           activation="silu", force_int64=True)
        ref = F.silu(ref * scale.double().cpu()[:, None, None] + shift.double().cpu()[:, None, None]
                     + res.double().cpu())
    else:
        gy = randn(ref.shape, torch.float32, device, gen)
        xd, wd = x.double().cpu().requires_grad_(), w.double().cpu().requires_grad_()
        F.conv2d(xd, wd, None, *geo).backward(gy.double().cpu())
        if kernel == "dgrad":
            got, ref = tconv.conv2d_input_grad(gy, w, tuple(x.shape), *geo, force_int64=True), xd.grad
        else:
            got, ref = tconv.conv2d_weight_grad(gy, x, tuple(w.shape), *geo, force_int64=True)[0], wd.grad
    assert_close(got, ref, torch.float32, f"int64 {kernel}")


@triton.jit
def _tile_rows_probe(out_ptr, first, M, OH, OW, BLOCK: tl.constexpr):
    rows, valid = tile_rows(first, BLOCK, M, True)
    n, oh, ow = pixel_coords(rows, OH, OW, True)
    lane = tl.arange(0, BLOCK)
    tl.store(out_ptr + lane * 4, rows, mask=valid)
    tl.store(out_ptr + lane * 4 + 1, n, mask=valid)
    tl.store(out_ptr + lane * 4 + 2, oh, mask=valid)
    tl.store(out_ptr + lane * 4 + 3, ow, mask=valid)


@pytest.mark.sanitize_overflow
def test_tile_rows_at_the_int32_limit(triton_device):
    """On the IDX64 path the last tile of an int32 M just below 2**31 has lanes past 2**31 - 1: tile_rows
    clamps them (invalid, never wrapping to negative rows that `rows < M` would let through) and
    pixel_coords gives the valid rows exact int64 coordinates."""
    OH, OW = 7, 5
    M = 2**31 - 5  # rows of a (N, 7, 5) grid, the last image partial
    first = M - 11
    out = torch.full((32, 4), -1, dtype=torch.int64, device=triton_device)
    _tile_rows_probe[(1,)](out, first, M, OH, OW, BLOCK=32)
    out = out.cpu()
    rows = torch.arange(first, first + 11)
    want = torch.stack([rows, rows // (OH * OW), rows // OW % OH, rows % OW], 1)
    assert first + 32 > 2**31 - 1
    assert torch.equal(out[:11], want) and (out[11:] == -1).all()


def test_int64_selected_past_2_31_elements():
    from fastconv.triton._common import needs_int64

    small = torch.empty(4, 4)
    assert not needs_int64(small)
    huge = torch.empty(1).expand(2**31 + 5)  # numel past the limit without the memory
    assert needs_int64(huge)
    # a tile of rows may run a block past the end: int32 math needs that headroom below 2**31
    assert needs_int64(torch.empty(1).expand(2**31 - 100))
    assert not needs_int64(torch.empty(1).expand(2**30))
    wide = torch.empty_strided((2, 2), (2**31, 1), device="meta")  # offsets past the limit
    assert needs_int64(wide)
    # dense tensors (the shortcut: span == numel) either side of the limit, and a non-dense permutation
    cl = lambda *shape: torch.empty(shape, device="meta").contiguous(memory_format=torch.channels_last)  # noqa: E731
    assert not needs_int64(cl(1, 8, 2**13, 2**13)) and needs_int64(cl(2, 8, 2**14, 2**13))
    assert needs_int64(torch.empty((4, 2**30), device="meta").t()[:2])  # 8 elements, span > 2**31


def test_split_k_wgrad_matches_single_split(triton_device):
    device = triton_device
    gen = generator("splitk")
    x = randn((3, 5, 12, 11), torch.float32, device, gen)
    gy = randn((3, 4, 12, 11), torch.float32, device, gen)
    one, db1 = tconv.conv2d_weight_grad(gy, x, (4, 5, 3, 3), (1, 1), (1, 1), (1, 1), 1, bias_grad=True, splits=1)
    many, dbm = tconv.conv2d_weight_grad(gy, x, (4, 5, 3, 3), (1, 1), (1, 1), (1, 1), 1, bias_grad=True, splits=5)
    xd = x.double().cpu().requires_grad_()
    wd = torch.zeros(4, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    F.conv2d(xd, wd, None, 1, 1).backward(gy.double().cpu())
    assert_close(one, wd.grad, torch.float32, "wgrad 1 split")
    assert_close(many, wd.grad, torch.float32, "wgrad 5 splits")
    assert_close(dbm, gy.double().cpu().sum((0, 2, 3)), torch.float32, "bias grad 5 splits")


def _layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """t's values in another layout: NCHW, channels_last, or a strided view into a larger buffer."""
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "strided":
        big = torch.full((*t.shape[:3], 2 * t.shape[3]), float("nan"), dtype=t.dtype, device=t.device)
        big[..., ::2] = t
        return big[..., ::2]
    return t.contiguous()


def _tensors_in(obj, seen=None) -> list:
    """Tensors reachable from a launch plan (tuples, lists, dicts, closures of its functions)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.keys()) + list(obj.values())
    if callable(obj) and getattr(obj, "__closure__", None):
        obj = [c.cell_contents for c in obj.__closure__]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _tensors_in(item, seen)]
    return []


def test_launch_plans_follow_the_call_signature(triton_device):
    """The launchers' per-signature plans (strides, copies, integer arguments) are keyed on every layout, not on
    shapes alone: one shape in alternating layouts of x, weight, grad_out, residual and out, forward and both
    gradients, each call against float64. The plans hold no tensor (no output kept alive by a cache)."""
    device = triton_device
    gen = generator("plans")
    x0 = randn((2, 6, 9, 7), torch.float32, device, gen)
    w0 = randn((4, 3, 3, 3), torch.float32, device, gen)
    g0 = randn((2, 4, 5, 4), torch.float32, device, gen)
    r0 = randn((2, 4, 5, 4), torch.float32, device, gen)
    stride, padding, dilation, groups = (2, 2), (1, 1, 1, 1), (1, 1), 2
    xd, wd = x0.double().cpu().requires_grad_(), w0.double().cpu().requires_grad_()
    ref = F.conv2d(xd, wd, None, stride, 1, dilation, groups)
    dx_ref, dw_ref = torch.autograd.grad(ref, (xd, wd), g0.double().cpu())
    ref = (ref + r0.double().cpu()).relu()
    kinds = ["contiguous", "channels_last", "strided"]
    for i in range(4):  # every tensor in each layout, then round 0's signature again
        x, w, g, r = (_layout(t, kinds[(i + j) % 3]) for j, t in enumerate((x0, w0, g0, r0)))
        out = _layout(torch.full_like(r0, float("nan")), "channels_last") if i == 2 else None
        y = tconv.conv2d_forward(x, w, None, stride, padding, dilation, groups, residual=r, activation="relu",
                                 out=out)
        assert out is None or y is out
        assert_close(y, ref, torch.float32, f"forward, round {i}")
        dx = tconv.conv2d_input_grad(g, w, tuple(x.shape), stride, padding, dilation, groups)
        assert_close(dx, dx_ref, torch.float32, f"dgrad, round {i}")
        for cl in (False, True):
            dw, _ = tconv.conv2d_weight_grad(g, x, tuple(w.shape), stride, padding, dilation, groups,
                                             channels_last=cl)
            assert dw.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
            assert_close(dw, dw_ref, torch.float32, f"wgrad, round {i}, channels_last={cl}")
    for plans in (tconv._FWD_PLANS, tconv._DGRAD_PLANS, tconv._WGRAD_PLANS):
        assert len(plans) > 0
        assert _tensors_in(plans._plans) == []


def test_wgrad_plan_follows_the_sm_count(triton_device, monkeypatch):
    """The wgrad's split count fills one wave of the GPU's SMs: a plan made for one SM count is not reused for
    another (the launch plan simulates several GPUs in one process through FASTCONV_SM_COUNT)."""
    from fastconv.triton import launch

    gen = generator("plans-sms")
    x = randn((4, 8, 16, 16), torch.float32, triton_device, gen)
    g = randn((4, 8, 16, 16), torch.float32, triton_device, gen)
    grids = {}
    for sms in ("2", "512", "2"):
        monkeypatch.setenv("FASTCONV_SM_COUNT", sms)
        with launch.recording() as launches:
            tconv.conv2d_weight_grad(g, x, (8, 8, 3, 3), (1, 1), (1, 1), (1, 1), 1)
        grids.setdefault(sms, set()).add(launches[0].grid)
    assert len(grids["2"]) == 1  # the same plan twice
    assert grids["2"] != grids["512"]  # more SMs, more splits


def test_plan_cache_is_bounded():
    from fastconv.triton._common import PlanCache

    plans = PlanCache(limit=3)
    for i in range(5):
        assert plans.get(i) is None and plans.put(i, (i,)) == (i,)
    assert len(plans) == 3 and plans.get(4) is None and plans.get(2) == (2,)


def _add_operand(shape, kind, dtype, device, gen):
    """t for conv2d_input_grad's add: channels_last, NCHW, or an expanded view (stride 0 over H and W)."""
    if kind == "expanded":
        t = randn((shape[0], shape[1], 1, 1), dtype, device, gen).expand(shape)
        assert t.stride()[2:] == (0, 0)
        return t
    return make_input(shape, dtype, device, "channels_last" if kind == "channels_last" else "contiguous", gen)


def _dgrad_add_reference(gy, w, shape, geo, t, mask):
    """dgrad(gy, w) + t (* mask) in float64 on CPU."""
    if w.shape[0] == 0:  # no output channels: a zero dgrad
        ref = torch.zeros(shape, dtype=torch.float64)
    else:
        ref = torch.nn.grad.conv2d_input(shape, w.detach().cpu().double(), gy.detach().cpu().double(), *geo)
    t = t.detach().cpu().double()
    return ref + (t if mask is None else torch.where(mask.cpu(), t, 0.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
# out: None (a new NCHW dx) or a NaN-poisoned tensor (never t itself: see test_dgrad_add_errors)
@pytest.mark.parametrize("t_kind,out_kind", [(t, o) for t in ("channels_last", "NCHW", "expanded")
                                             for o in ("new", "nan")])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("bits", [False, True], ids=["add", "add_bits"])
def test_dgrad_add_epilogue(bits, stride, groups, t_kind, out_kind, dtype, triton_device, monkeypatch):
    """conv2d_input_grad(add=(t, bits)): dx = dgrad + t (* act' bits) in the dgrad's own store, against float64,
    t in any layout (read through its strides: an expanded t is passed as is, never copied), dx new (NCHW: the
    split store) or a NaN-poisoned `out` in t's layout; rows and (groups 1) channels cross
    the interpreter's 32-wide tiles, odd sizes, both stride phases' tails."""
    seen = {}
    dgrad = tconv._dgrad

    def spy(grid, *args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        return dgrad(grid, *args, **kwargs)

    monkeypatch.setattr(tconv, "_dgrad", spy)
    gen = generator("dgrad-add", bits, stride, groups, t_kind, out_kind, str(dtype))
    cin_g = 37 if groups == 1 else 5
    N, C, H, W = shape = (3, cin_g * groups, 7, 9)
    w = randn((3 * groups, cin_g, 3, 3), dtype, triton_device, gen, scale=(cin_g * 9) ** -0.5)
    geo = ((stride, stride), (1, 1), (1, 1), groups)
    OH, OW = (H + 2 - 3) // stride + 1, (W + 2 - 3) // stride + 1
    gy = randn((N, 3 * groups, OH, OW), dtype, triton_device, gen)
    t = _add_operand(shape, t_kind, dtype, triton_device, gen)
    mask = torch.rand(shape, generator=gen) > 0.5 if bits else None
    packed = _act_bits.pack(mask).to(triton_device) if bits else None
    ref = _dgrad_add_reference(gy, w, shape, geo, t, mask)
    t_before = t.clone()
    out = {"new": None, "nan": torch.full_like(t, float("nan")) if t_kind != "expanded"
           else torch.full(shape, float("nan"), dtype=dtype, device=triton_device)}[out_kind]
    dx = tconv.conv2d_input_grad(gy, w, shape, *geo, out=out, add=(t, packed))
    assert dx.shape == shape and dx.dtype == dtype
    assert dx is out if out is not None else dx.is_contiguous()
    assert_close(dx, ref, dtype, "dgrad + add", (bits, stride, groups, t_kind, out_kind))
    assert torch.equal(t, t_before)  # t itself untouched
    args, kwargs = seen["args"], seen["kwargs"]
    at = tconv._conv2d_dgrad_kernel.arg_names.index("add_ptr")
    assert args[at] is t, "t reached the kernel as a copy"
    assert tuple(args[at + 1:at + 5]) == t.stride() and (args[at + 5] is packed or not bits)  # t's own strides
    assert kwargs["ADD"] == (2 if bits else 1) and kwargs["SPLIT_N"] == (dx.stride(1) != 1)


def test_dgrad_add_cache_key_and_plain_call(triton_device):
    """The launch plan follows the add (its strides, whether bits come with it): the same signature without the
    add, then with t in two layouts and with bits, each call against float64."""
    gen = generator("dgrad-add-plans")
    shape, geo = (2, 6, 5, 7), ((1, 1), (1, 1), (1, 1), 1)
    w = randn((4, 6, 3, 3), torch.float32, triton_device, gen, scale=54 ** -0.5)
    gy = randn((2, 4, 5, 7), torch.float32, triton_device, gen)
    t0 = randn(shape, torch.float32, triton_device, gen)
    mask = torch.rand(shape, generator=gen) > 0.5
    bits = _act_bits.pack(mask).to(triton_device)
    plain = torch.nn.grad.conv2d_input(shape, w.double().cpu(), gy.double().cpu(), *geo)
    for t, b in [(None, None), (t0, None), (t0.contiguous(memory_format=torch.channels_last), None), (t0, bits),
                 (None, None)]:
        dx = tconv.conv2d_input_grad(gy, w, shape, *geo, add=None if t is None else (t, b))
        want = plain if t is None else plain + t0.double().cpu() * (1.0 if b is None else mask.double())
        assert_close(dx, want, torch.float32, f"plan with add {t is not None}, bits {b is not None}")


@pytest.mark.parametrize("bits", [False, True], ids=["add", "add_bits"])
@pytest.mark.parametrize("case", ["no_cout", "no_tap_phase"])
def test_dgrad_add_where_dgrad_is_zero(case, bits, triton_device):
    """Where no output pixel reaches (part of) the input, dx there is t (where the act' bit is set): the
    launcher's zero path (no output channels: PyTorch ops, no launch) and a stride phase no tap reaches (1x1
    kernel, stride 2: the kernel's own store of a zero dgrad), into a NaN-poisoned out. With
    bits, t is NaN where its bit is 0: the add selects (0 there, as PyTorch's threshold backward), not multiplies."""
    gen = generator("dgrad-add-zero", case, bits)
    shape = (2, 4, 5, 7)
    if case == "no_cout":
        w, gy, geo = (randn((0, 4, 3, 3), torch.float32, triton_device, gen),
                      randn((2, 0, 5, 7), torch.float32, triton_device, gen), ((1, 1), (1, 1), (1, 1), 1))
    else:
        w, gy, geo = (randn((3, 4, 1, 1), torch.float32, triton_device, gen),
                      randn((2, 3, 3, 4), torch.float32, triton_device, gen), ((2, 2), (0, 0), (1, 1), 1))
    mask = torch.rand(shape, generator=gen) > 0.5 if bits else None
    packed = _act_bits.pack(mask).to(triton_device) if bits else None
    t = randn(shape, torch.float32, triton_device, gen).contiguous(memory_format=torch.channels_last)
    if bits:
        t[~mask.to(triton_device)] = float("nan")
    ref = _dgrad_add_reference(gy, w, shape, geo, t, mask)
    assert torch.isfinite(ref).all()
    out = torch.full(shape, float("nan"), device=triton_device)
    dx = tconv.conv2d_input_grad(gy, w, shape, *geo, out=out, add=(t, packed))
    assert dx is out
    assert_close(dx, ref, torch.float32, f"{case} dgrad + add")
    if case == "no_tap_phase":  # the odd rows, which no tap reaches: t (where the bit is set) exactly
        assert torch.equal(dx[:, :, 1::2, :].double().cpu(), ref[:, :, 1::2, :])


@pytest.mark.sanitize_overflow
def test_dgrad_add_int64_indexing(triton_device):
    """The add on the int64 index path (force_int64: the add runs after the dgrad, with PyTorch ops, the IDX64
    add epilogue having spilled in the kernel report): t expanded (stride 0) and act' bits, stride 2, groups 2
    against float64; and the add's own tensor decides the index width (a t whose offsets pass 2**31)."""
    gen = generator("dgrad-add-int64")
    shape, geo = (2, 6, 9, 8), ((2, 1), (1, 1), (1, 2), 2)
    w = randn((8, 3, 3, 3), torch.float32, triton_device, gen, scale=27 ** -0.5)
    OH, OW = F.conv2d(torch.zeros(shape), w.cpu(), None, *geo).shape[2:]
    gy = randn((2, 8, OH, OW), torch.float32, triton_device, gen)
    t = randn((2, 6, 1, 1), torch.float32, triton_device, gen).expand(shape)
    mask = torch.rand(shape, generator=gen) > 0.5
    dx = tconv.conv2d_input_grad(gy, w, shape, *geo, force_int64=True,
                                 add=(t, _act_bits.pack(mask).to(triton_device)))
    assert_close(dx, _dgrad_add_reference(gy, w, shape, geo, t, mask), torch.float32, "int64 dgrad + add")
    far = torch.empty_strided(shape, (2**31, 1, 8 * 6, 6), device="meta")  # offsets past 2**31, 6 * 9 * 8 * 2 elements
    plan = lambda add: tconv._input_grad_plan(gy, w, shape, *geo, None, None, False, add)[4]  # noqa: E731
    assert not plan(None)["IDX64"] and plan((far, None))["IDX64"] and plan((far, None))["ADD"] == 1


def test_dgrad_add_errors(triton_device):
    """add with bn is refused (precise reason); a t or bits of the wrong shape / dtype too."""
    gen = generator("dgrad-add-errors")
    shape, geo = (2, 4, 5, 5), ((1, 1), (1, 1), (1, 1), 1)
    w = randn((3, 4, 3, 3), torch.float32, triton_device, gen)
    gy = randn((2, 3, 5, 5), torch.float32, triton_device, gen)
    z = randn(shape, torch.float32, triton_device, gen).contiguous(memory_format=torch.channels_last)
    stats = (torch.zeros(4, device=triton_device), torch.ones(4, device=triton_device), None, None, 1e-5)
    t = randn(shape, torch.float32, triton_device, gen)
    with pytest.raises(ValueError, match="add is not supported together with bn because"):
        tconv.conv2d_input_grad(gy, w, shape, *geo, bn=(z, *stats, "relu"), add=(t, None))
    with pytest.raises(ValueError, match="add's tensor must have the input's shape"):
        tconv.conv2d_input_grad(gy, w, shape, *geo, add=(t[:, :2], None))
    with pytest.raises(ValueError, match="add's tensor must have"):
        tconv.conv2d_input_grad(gy, w, shape, *geo, add=(t.half(), None))
    with pytest.raises(ValueError, match="add's bits must be"):
        tconv.conv2d_input_grad(gy, w, shape, *geo, add=(t, torch.zeros(2, 4, dtype=torch.int64)))
    with pytest.raises(ValueError, match="must not share memory with add's tensor"):  # the autotuner would repeat it
        tconv.conv2d_input_grad(gy, w, shape, *geo, out=t, add=(t, None))


@pytest.mark.parametrize("backend", EXT_BACKENDS)
@pytest.mark.parametrize("case", [
    dict(),
    dict(bias=True, stride=2, padding=1, channels_last=True),
    dict(groups=2, dilation=2, bias=True),
    dict(padding="same", kernel=4, dtype=torch.float32),
], ids=["plain", "bias_s2_cl", "groups_dilation", "same_even_kernel_fp32"])
def test_c_node_equals_the_op(backend, case):
    """On backends cpu / cuda in eager mode a conv without an epilogue is one C++ autograd node
    (fastconv._C.conv2d_train, csrc/conv2d.cpp) running this op's own ext ops: the output, every gradient and
    their layouts equal the Python autograd path's (conv2d_op) exactly; without a gradient there is no node. Empty
    tensors NaN-poisoned (deterministic mode)."""
    from fastconv import _ext

    skip_unless_runnable(backend)
    if not hasattr(conv_ops.ext_ops(), "conv2d_train"):
        pytest.skip(f"fastconv._C predates conv2d_train: rebuild the extension ({_ext.build_info()})")
    import fastconv

    case = dict(case)
    dtype, cl = case.pop("dtype", torch.float64), case.pop("channels_last", False)
    kernel, bias = case.pop("kernel", 3), case.pop("bias", False)
    device = torch.device(backend)
    gen = generator("conv_c_node", str(case))
    x0 = randn((3, 4, 9, 8), dtype, device, gen)
    g0 = None

    def step(use_node):
        nonlocal g0
        torch.manual_seed(0)
        m = fastconv.Conv2d(4, 6, kernel, bias=bias, **case).to(device, dtype)
        x = (x0.contiguous(memory_format=torch.channels_last) if cl else x0.clone()).requires_grad_()
        call = conv_ops.conv2d_call if use_node else conv_ops.conv2d_op
        with fastconv.backend(backend), pytest.MonkeyPatch.context() as mp:
            mp.setattr(conv_ops, "conv2d_call", call)
            y = m(x)
            if g0 is None:
                g0 = randn(y.shape, dtype, device, gen)
            grads = torch.autograd.grad(y, [x, *m.parameters()], g0)
            with torch.no_grad():
                y_ng = m(x)
        return [y, *grads, y_ng], type(y.grad_fn).__name__, y_ng.grad_fn

    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # at::empty's memory filled with NaN: unwritten elements show
    try:
        ours, node, ng_fn = step(True)
        ref, ref_node, _ = step(False)
    finally:
        torch.use_deterministic_algorithms(was)
    assert node == "CppFunction" and ref_node != "CppFunction" and ng_fn is None, (node, ref_node)
    for i, (o, e) in enumerate(zip(ours, ref)):
        assert o.dtype == e.dtype and o.shape == e.shape and o.stride() == e.stride(), (i, o.stride(), e.stride())
        assert torch.equal(o, e), (i, (o - e).abs().max())
