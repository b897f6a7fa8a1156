"""Triton max_pool2d forward/backward against torch.nn.functional.max_pool2d (float64 reference).

Runs on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1, set before triton is imported),
or on CUDA tensors when a GPU is there and the interpreter is off. Shapes are small but cross the
interpreter's 128-element block boundaries.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastconv.triton import max_pool2d as mp  # noqa: E402
from fastconv.triton._common import interpreting  # noqa: E402

if interpreting():
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip(
        "Triton kernels need a CUDA GPU or the interpreter (TRITON_INTERPRET=1 set before triton is imported)",
        allow_module_level=True,
    )

NAN, INF = float("nan"), float("inf")


class _PoisonTorch:
    """Stands in for the `torch` module inside fastconv.triton.max_pool2d: torch.empty returns NaN-filled
    float tensors and -1-filled integer tensors (never a valid tap), so any element a kernel fails to
    write shows up as a mismatch."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        t = torch.empty(*args, **kwargs)
        return t.fill_(NAN) if t.is_floating_point() else t.fill_(-1)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(mp, "torch", _PoisonTorch())


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(shape, seed, dtype=torch.float64):
    """Fresh normal values, rounded through `dtype` so that the float64 reference sees the same numbers."""
    return torch.randn(shape, generator=_gen(seed), dtype=torch.float64).to(dtype)


def _reference(x, k, s, p, d, ceil, grad_out):
    """F.max_pool2d on a float64 CPU copy: (y, indices, grad_input)."""
    xr = x.detach().to("cpu", torch.float64).clone().requires_grad_(True)
    y, idx = F.max_pool2d(xr, k, s, p, d, ceil_mode=ceil, return_indices=True)
    y.backward(grad_out.to("cpu", torch.float64))
    return y.detach(), idx, xr.grad


def _check(x, k, s, p, d, ceil=False, *, force_int64=False, grad_tol=None, seed=0, check_grad=True):
    """Forward values (exact), indices, output layout, and grad_input vs autograd in float64."""
    y, off = mp.max_pool2d_forward(x, k, s, p, d, ceil, force_int64=force_int64)
    assert y.dtype == x.dtype and off.dtype == mp.offsets_dtype(k)
    g = _rand(tuple(y.shape), seed + 1, x.dtype).to(x.device)
    ref_y, ref_idx, ref_dx = _reference(x, k, s, p, d, ceil, g)
    assert y.shape == ref_y.shape
    # same memory format as PyTorch's output (strides of size-1 dims are irrelevant)
    assert y.is_contiguous(memory_format=torch.channels_last) == ref_y.is_contiguous(
        memory_format=torch.channels_last
    )
    assert y.is_contiguous() == ref_y.is_contiguous()
    # max copies values: exact in every dtype (also for bf16, whose interpreter store truncates)
    torch.testing.assert_close(y.cpu().to(torch.float64), ref_y, rtol=0, atol=0, equal_nan=True)
    idx = mp.offsets_to_indices(off, x, k, s, p, d)
    assert idx.dtype == torch.int64
    assert torch.equal(idx.cpu(), ref_idx)
    if not check_grad:
        return y, off
    dx = mp.max_pool2d_backward(g, x, off, k, s, p, d, ceil, force_int64=force_int64)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    assert dx.is_contiguous(memory_format=mp.suggest_memory_format(x))
    tol = grad_tol or {}
    torch.testing.assert_close(dx.cpu().to(torch.float64), ref_dx, rtol=tol.get("rtol", 0), atol=tol.get("atol", 0))
    return y, off


# (shape, kernel, stride, padding, dilation, ceil_mode)
GEOMETRIES = {
    "2x2s2": ((2, 3, 8, 10), (2, 2), (2, 2), (0, 0), (1, 1), False),
    "rect_k2x3_s1x2_p1x0": ((1, 3, 9, 11), (2, 3), (1, 2), (1, 0), (1, 1), False),
    "rect_k3x1_s2x1_p1x0": ((2, 2, 9, 7), (3, 1), (2, 1), (1, 0), (1, 1), False),
    "overlap_3x3s2": ((2, 3, 11, 9), (3, 3), (2, 2), (0, 0), (1, 1), False),
    "overlap_3x3s2p1": ((2, 3, 10, 9), (3, 3), (2, 2), (1, 1), (1, 1), False),
    "stride_gt_kernel": ((2, 2, 11, 12), (2, 2), (3, 3), (1, 0), (1, 1), False),
    "k1_s2": ((2, 3, 9, 8), (1, 1), (2, 2), (0, 0), (1, 1), False),
    "k3_s1_p1": ((1, 3, 8, 9), (3, 3), (1, 1), (1, 1), (1, 1), False),
    "dilation_2x3": ((2, 2, 11, 13), (3, 2), (1, 2), (1, 1), (2, 3), False),
    "dilation_s3_ceil": ((2, 2, 12, 13), (2, 3), (3, 2), (1, 1), (3, 2), True),
    # ceil_mode adds a partial last window: floor gives 3x3, ceil 4x4 (last window starts at row 6 < 8)
    "ceil_adds_window": ((2, 3, 8, 8), (3, 3), (2, 2), (0, 0), (1, 1), True),
    # ceil_mode's trim rule: the candidate last window would start at 6 >= H + pad = 6, so it is dropped
    "ceil_trim_rule": ((2, 3, 5, 7), (2, 2), (2, 2), (1, 1), (1, 1), True),
    "ceil_rect": ((1, 4, 10, 7), (3, 2), (2, 3), (1, 1), (1, 1), True),
    # YOLO's SPPF pool: 25 taps, the largest fully unrolled window
    "sppf_5x5_s1_p2": ((1, 2, 9, 8), (5, 5), (1, 1), (2, 2), (1, 1), False),
    # 9*15 = 135 taps: int16 offsets and the forward's looped (not unrolled) path
    "large_window_int16": ((1, 2, 11, 17), (9, 15), (3, 2), (4, 7), (1, 1), True),
}


@pytest.mark.sanitize_overflow  # the pool geometries keep the interpreter's int32 overflow checks
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_geometry(name):
    shape, k, s, p, d, ceil = GEOMETRIES[name]
    x = _rand(shape, 1).to(DEVICE)
    _check(x, k, s, p, d, ceil)


def test_ceil_mode_changes_size():
    # make sure the ceil cases really exercise the extra window / the trim rule
    assert mp.pool_output_size(8, 3, 2, 0, 1, False) == 3 and mp.pool_output_size(8, 3, 2, 0, 1, True) == 4
    assert mp.pool_output_size(5, 2, 2, 1, 1, False) == 3 and mp.pool_output_size(5, 2, 2, 1, 1, True) == 3
    assert (5 + 2 - 2 + 1) // 2 + 1 == 4  # the trim rule removed one window there


def test_output_size_matches_pytorch():
    """pool_output_size and the argument checks against F.max_pool2d on meta tensors."""
    for size in range(1, 10):
        x = torch.empty((1, 1, 1, size), device="meta")
        for k in range(1, 5):
            for s in range(1, 4):
                for p in range(0, k // 2 + 2):
                    for d in (1, 2, 3):
                        for ceil in (False, True):
                            args = ((1, k), (1, s), (0, p), (1, d))
                            try:
                                want = F.max_pool2d(x, *args, ceil_mode=ceil).shape[3]
                            except RuntimeError:
                                want = None
                            try:
                                mp._check_args(x.shape, *args)
                                got = mp._output_hw(x.shape, *args, ceil)[1]
                            except RuntimeError:
                                got = None
                            assert got == want, (size, k, s, p, d, ceil)


def test_bad_arguments_raise():
    x = _rand((1, 1, 6, 6), 2).to(DEVICE)
    with pytest.raises(RuntimeError, match="pad should be at most half"):
        mp.max_pool2d_forward(x, (3, 3), (1, 1), (2, 2), (1, 1), False)
    with pytest.raises(RuntimeError, match="Output size is too small"):
        mp.max_pool2d_forward(x, (4, 4), (1, 1), (0, 0), (3, 3), False)
    with pytest.raises(RuntimeError, match="stride"):
        mp.max_pool2d_forward(x, (2, 2), (0, 1), (0, 0), (1, 1), False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(dtype):
    x = _rand((2, 3, 10, 9), 3, dtype).to(DEVICE)  # bf16/fp16 rounding makes some ties too
    tol = {torch.float16: dict(rtol=1e-3, atol=1e-3), torch.bfloat16: dict(rtol=8e-3, atol=8e-3),
           torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float64: None}[dtype]
    _check(x, (3, 3), (2, 2), (1, 1), (1, 1), True, grad_tol=tol)


def _layout(x, kind):
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "channel_slice":  # x[:, ::2] of an NCHW tensor
        return x.repeat_interleave(2, dim=1)[:, ::2]
    if kind == "channels_last_slice":  # still channels_last-like strides: PyTorch answers channels_last
        return x.repeat_interleave(2, dim=1).contiguous(memory_format=torch.channels_last)[:, ::2]
    if kind == "transposed":  # H and W swapped view
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    if kind == "permuted":  # N, W, H, C order in memory: neither format, PyTorch answers contiguous
        return x.permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1)
    if kind == "spatial_slice":
        return torch.cat([x, x], dim=3)[:, :, :, 1::2]
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind", ["channels_last", "channel_slice", "channels_last_slice", "transposed", "permuted", "spatial_slice"]
)
def test_layouts(kind):
    base = _rand((2, 5, 9, 10), 4)
    x = _layout(base, kind).to(DEVICE)
    assert torch.equal(x.cpu(), base if kind != "spatial_slice" else torch.cat([base, base], 3)[:, :, :, 1::2])
    y, off = _check(x, (3, 3), (2, 2), (1, 1), (1, 1), True)
    assert mp.suggest_memory_format(x) == (
        torch.channels_last if kind in ("channels_last", "channels_last_slice") else torch.contiguous_format
    )
    assert off.stride() == y.stride()


def test_layouts_alternating_one_shape_and_no_taps():
    """One shape in every layout, in turn and twice over (the launcher's per-signature plan is keyed on strides,
    not shape alone), with and without the argmax taps: same values, PyTorch's memory format each time."""
    base = _rand((2, 5, 9, 10), 11)
    k, s, p, d = (3, 3), (2, 2), (1, 1), (1, 1)
    ref = F.max_pool2d(base, k, s, p, d, ceil_mode=True)
    for kind in ["channels_last", "transposed", "channels_last", "spatial_slice", "permuted", "transposed"] * 2:
        x = _layout(base, kind).to(DEVICE)
        want = ref if kind != "spatial_slice" else F.max_pool2d(x.cpu(), k, s, p, d, ceil_mode=True)
        y, off = mp.max_pool2d_forward(x, k, s, p, d, True)
        y2, none = mp.max_pool2d_forward(x, k, s, p, d, True, False)
        assert none is None and off.shape == y.shape
        for out in (y, y2):
            assert torch.equal(out.cpu(), want) and out.stride() == y.stride()
            assert out.is_contiguous(memory_format=mp.suggest_memory_format(x))


def test_backward_shape_only_and_strided_grad_out():
    """x given as a shape (format taken from offsets) and a non-contiguous grad_out."""
    x = _rand((2, 4, 9, 8), 5).contiguous(memory_format=torch.channels_last).to(DEVICE)
    k, s, p, d = (3, 3), (2, 2), (1, 1), (1, 1)
    y, off = mp.max_pool2d_forward(x, k, s, p, d, False)
    g_big = _rand((2, 4, y.shape[2], 2 * y.shape[3]), 6).to(DEVICE)
    g = g_big[:, :, :, ::2]
    _, _, ref_dx = _reference(x, k, s, p, d, False, g)
    dx = mp.max_pool2d_backward(g, tuple(x.shape), off, k, s, p, d, False)
    assert dx.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(dx.cpu(), ref_dx, rtol=0, atol=0)
    dx2 = mp.max_pool2d_backward(g, tuple(x.shape), off, k, s, p, d, False, memory_format=torch.contiguous_format)
    assert dx2.is_contiguous()
    assert torch.equal(dx2, dx)
    # an expanded (stride-0) grad_out, as sum().backward() produces
    ones = torch.ones((), dtype=x.dtype, device=x.device).expand(y.shape)
    _, _, ref_ones = _reference(x, k, s, p, d, False, ones)
    torch.testing.assert_close(mp.max_pool2d_backward(ones, x, off, k, s, p, d, False).cpu(), ref_ones, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_nan_and_ties(layout):
    """Values from {-1, 0.5, 2} (ties everywhere) plus injected NaNs, some windows with several NaNs."""
    shape = (2, 3, 10, 11)
    q = torch.randint(0, 3, shape, generator=_gen(7)).to(torch.float64)
    x = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)[q.long()]
    nan_mask = torch.rand(shape, generator=_gen(8)) < 0.08
    x[nan_mask] = NAN
    x[0, 0, 0, 0:3] = NAN  # one window with three NaNs: PyTorch reports the last one
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(DEVICE)
    for k, s, p, ceil in [((3, 3), (2, 2), (1, 1), True), ((2, 3), (1, 2), (0, 1), False)]:
        y, off = _check(x, k, s, p, (1, 1), ceil)
        assert torch.isnan(y).any() and not torch.isnan(y).all()


def test_nan_is_last_nan_and_tie_is_first():
    """The rules themselves, on one hand-made window scanned kh-major: [[1, nan], [3, nan]] -> index 3
    (last NaN); [[2, 1], [2, 2]] -> index 0 (first max)."""
    x = torch.tensor([[[[1.0, NAN], [3.0, NAN]], [[2.0, 1.0], [2.0, 2.0]]]], dtype=torch.float64).to(DEVICE)
    y, off = mp.max_pool2d_forward(x, (2, 2), (2, 2), (0, 0), (1, 1), False)
    idx = mp.offsets_to_indices(off, x, (2, 2), (2, 2), (0, 0), (1, 1))
    assert torch.isnan(y[0, 0, 0, 0]) and y[0, 1, 0, 0].item() == 2.0
    assert idx.flatten().tolist() == [3, 0]
    _check(x, (2, 2), (2, 2), (0, 0), (1, 1))


def test_neg_inf():
    """-inf inputs, including whole windows of -inf next to the padding: the index is the window's first
    in-image tap, like PyTorch, and the gradient goes there."""
    shape = (2, 2, 9, 10)
    x = _rand(shape, 9)
    x[torch.rand(shape, generator=_gen(10)) < 0.3] = -INF
    x[:, :, :3, :3] = -INF  # corner windows entirely -inf (with padding around them)
    x[1, 1] = -INF  # a whole plane
    x = x.to(DEVICE)
    for k, s, p, d, ceil in [((3, 3), (2, 2), (1, 1), (1, 1), True), ((2, 2), (1, 1), (1, 1), (2, 2), False)]:
        _check(x, k, s, p, d, ceil)


def test_window_entirely_in_padding():
    """kernel (1, 2), dilation (1, 4), pad (0, 1), W = 3: the only window reads columns -1 and 3, both
    padding. PyTorch returns -inf with index 3 (outside the plane); so do we. PyTorch's CPU backward then
    writes that window's gradient out of the plane (into the next row / plane); ours drops it, which is
    the true gradient (the window reads no input element)."""
    x = _rand((2, 2, 2, 3), 11).to(DEVICE)
    args = ((1, 2), (1, 1), (0, 1), (1, 4))
    _check(x, *args, check_grad=False)
    y, off = mp.max_pool2d_forward(x, *args, False)
    assert torch.isneginf(y).all()
    dx = mp.max_pool2d_backward(torch.ones_like(y), x, off, *args, False)
    assert torch.equal(dx, torch.zeros_like(x))


@pytest.mark.parametrize("shape", [(0, 3, 8, 8), (1, 1, 7, 9), (1, 3, 1, 1)])
def test_batch_sizes(shape):
    x = _rand(shape, 12).to(DEVICE)
    k, s, p = ((3, 3), (2, 2), (1, 1)) if shape[2] > 1 else ((1, 1), (1, 1), (0, 0))
    _check(x, k, s, p, (1, 1), True)


@pytest.mark.sanitize_overflow
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_force_int64(layout):
    x = _rand((2, 3, 10, 9), 13)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    _check(x.to(DEVICE), (3, 2), (2, 1), (1, 1), (1, 2), True, force_int64=True)


def test_offsets_dtype():
    assert mp.offsets_dtype((3, 3)) == torch.int8
    assert mp.offsets_dtype((11, 11)) == torch.int8
    assert mp.offsets_dtype((9, 15)) == torch.int16
    assert mp.offsets_dtype((200, 200)) == torch.int32


def test_suggest_memory_format_matches_pytorch():
    shapes = [(2, 3, 4, 5), (1, 3, 1, 1), (2, 1, 4, 4), (1, 1, 1, 1), (3, 4, 1, 5)]
    for shape in shapes:
        base = torch.empty(shape)
        views = [base, base.contiguous(memory_format=torch.channels_last), base.transpose(2, 3),
                 base.permute(0, 3, 2, 1), base.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)]
        for v in views:
            assert mp.suggest_memory_format(v) == torch._prims_common.suggest_memory_format(v), (shape, v.stride())


@pytest.mark.skipif(DEVICE != "cpu", reason="AOT compile check runs in a subprocess without the interpreter")
def test_kernels_compile_for_sm80():
    """Both kernels compile to PTX/cubin for sm_80 (fp16, as the launcher would specialise them)."""
    code = textwrap.dedent(
        """
        import triton, triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from fastconv.triton.max_pool2d import _max_pool2d_fwd_kernel as fwd, _max_pool2d_bwd_kernel as bwd, GPU_LAUNCH

        def sig(fn, ptrs, cx):
            s = {n: ("constexpr" if n in cx else ptrs.get(n, "i32")) for n in fn.arg_names}
            return ASTSource(fn, signature=s, constexprs=cx)

        block, warps = GPU_LAUNCH
        opts = {"num_warps": warps, "num_stages": 2}
        target = GPUTarget("cuda", 80, 32)
        k1 = triton.compile(sig(fwd, {"x_ptr": "*fp16", "y_ptr": "*fp16", "off_ptr": "*i8"},
                                dict(KH=3, KW=3, UNROLL=True, CHANNELS_LAST=True, ACC_TYPE=tl.float32,
                                     IDX64=False, BLOCK=block)), target=target, options=opts)
        k2 = triton.compile(sig(bwd, {"dy_ptr": "*fp16", "dx_ptr": "*fp16", "off_ptr": "*i8"},
                                dict(CHANNELS_LAST=False, ACC_TYPE=tl.float32, IDX64=False, BLOCK=block)),
                            target=target, options=opts)
        assert k1.asm["cubin"] and k2.asm["cubin"]
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
