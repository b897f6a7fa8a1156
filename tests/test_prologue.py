"""fastconv::conv2d_prologue (the implicit-GEMM forward and wgrad kernels' PROLOGUE) against PyTorch in float64:

    x = in_act(z * in_scale[c] + in_shift[c]);  y = act((conv(x, w) + bias) * scale + shift + residual)

Forward and every gradient (z, in_scale, in_shift, weight, bias, and the epilogue's), fp32 / fp16 / fp64, NCHW
and channels_last, sizes crossing the interpreter's 32-wide tiles in pixels and in both channel dims, stride 2,
groups (incl. depthwise), dilation, asymmetric padding, batch 1, each activation on both sides; gradcheck and
opcheck; every tile of the autotune tables (FASTCONV_INTERPRET_AUTOTUNE=1); NaN-poisoned outputs and scratch.
The Triton path is checked never to materialise x; 'torch' and 'cpu' (x built with PyTorch ops) against the same
reference. Without a GPU the Triton kernels run through the interpreter (bf16 is left out: the interpreter's
tl.dot on bf16 is wrong).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastconv
import fastconv.ops.conv2d as conv_ops
import fastconv.ops.conv2d_prologue as prologue_ops
import fastconv.triton.conv2d as tconv
from fastconv import _activations
from fastconv.triton import configs, launch

from .backends import skip_unless_runnable
from .helpers import assert_close, generator, nan_alloc, nan_workspace, randn

ACTIVATIONS = list(_activations.NAMES)


@pytest.fixture
def device(triton_backend):
    """Where the Triton kernels run (GPU, else the CPU interpreter), with the triton backend selected."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cfg(**over):
    cfg = dict(input=(2, 6, 9, 11), out_channels=8, kernel=(3, 3), stride=(1, 1), padding=(1, 1, 1, 1),
               dilation=(1, 1), groups=1, in_act="relu", act="identity", epilogue=False, bias=True,
               dtype=torch.float32, layout="nchw", shift_sign=0)
    cfg.update(over)
    return cfg


# Each covers something else; together: every activation on both sides, every dtype, both layouts. Epilogue
# activations with kinks (relu, hardswish) run in fp32 / fp64 only: in fp16 the recomputed pre-activation is rounded
# to fp16, and a derivative flipping at a kink (0 or +-3) against the float64 reference is no kernel error.
CONFIGS = {
    "plain_relu": _cfg(),
    "stride2_groups_dil_asym_batch1_silu": _cfg(
        input=(1, 8, 10, 7), out_channels=12, kernel=(3, 2), stride=(2, 2), padding=(2, 0, 1, 3), dilation=(2, 1),
        groups=2, in_act="silu", act="relu", epilogue=True, layout="channels_last"),
    "channel_tiles_fp16_hardswish": _cfg(
        input=(2, 40, 6, 5), out_channels=36, in_act="hardswish", act="silu", epilogue=True, dtype=torch.float16,
        layout="channels_last"),
    "depthwise_stride2_relu6_fp16": _cfg(
        input=(3, 6, 8, 8), out_channels=6, stride=(2, 2), padding=(0, 1, 1, 0), groups=6, in_act="relu6",
        act="silu", dtype=torch.float16),
    "pointwise_identity_fp64_nobias": _cfg(
        input=(1, 4, 5, 6), out_channels=5, kernel=(1, 1), padding=(0, 0, 0, 0), in_act="identity", bias=False,
        dtype=torch.float64),
    "tall_kernel_fp64_silu_epilogue": _cfg(
        input=(2, 5, 7, 9), out_channels=7, kernel=(5, 3), stride=(1, 2), padding=(2, 2, 1, 1), dilation=(1, 2),
        in_act="silu", act="hardswish", epilogue=True, dtype=torch.float64, layout="channels_last"),
}


def make_inputs(cfg, device, salt):
    """Fresh random z, coefficients, weight, bias and epilogue tensors (all requiring grad)."""
    gen = generator("prologue", salt, repr(cfg))
    N, C, H, W = cfg["input"]
    K, (KH, KW), groups, dtype = cfg["out_channels"], cfg["kernel"], cfg["groups"], cfg["dtype"]
    z = randn((N, C, H, W), dtype, device, gen)
    if cfg["layout"] == "channels_last":
        z = z.contiguous(memory_format=torch.channels_last)
    in_scale = randn((C,), torch.float32 if dtype != torch.float64 else dtype, device, gen)
    in_shift = randn((C,), in_scale.dtype, device, gen)
    if cfg["shift_sign"]:
        in_shift = cfg["shift_sign"] * (in_shift.abs() + 0.5)
    w = randn((K, C // groups, KH, KW), dtype, device, gen, scale=(C // groups * KH * KW) ** -0.5)
    t = dict(z=z, in_scale=in_scale, in_shift=in_shift, w=w,
             b=randn((K,), dtype, device, gen) if cfg["bias"] else None)
    if cfg["epilogue"]:
        t["scale"] = randn((K,), dtype, device, gen)
        t["shift"] = randn((K,), dtype, device, gen)
    return {k: (v.requires_grad_() if v is not None else None) for k, v in t.items()}, gen


def _geometry(cfg):
    return list(cfg["stride"]), list(cfg["padding"]), list(cfg["dilation"]), cfg["groups"]


def run_op(cfg, t, residual=None, backend=None):
    """The op on `backend`, by default the one in force (the op's own 'auto' would not consult it)."""
    backend = backend or fastconv.current_backend()
    return torch.ops.fastconv.conv2d_prologue(
        t["z"], t["in_scale"], t["in_shift"], cfg["in_act"], t["w"], t["b"], *_geometry(cfg),
        scale=t.get("scale"), shift=t.get("shift"), residual=residual, activation=cfg["act"], backend=backend)


def reference(cfg, t, residual=None, mask_z=False):
    """The same in float64 PyTorch ops on CPU copies (leaves of their own, for autograd). mask_z: the wrong
    padding (pad z with zeros, then transform), to show the checks can tell."""
    d = {k: (v.detach().cpu().double().requires_grad_() if v is not None else None) for k, v in t.items()}
    top, bottom, left, right = cfg["padding"]
    act_in = _activations.FUNCTIONS[cfg["in_act"]]
    s, sh = d["in_scale"].view(1, -1, 1, 1), d["in_shift"].view(1, -1, 1, 1)
    if mask_z:
        xp = act_in(F.pad(d["z"], (left, right, top, bottom)) * s + sh)
    else:
        xp = F.pad(act_in(d["z"] * s + sh), (left, right, top, bottom))
    c = F.conv2d(xp, d["w"], d["b"], cfg["stride"], 0, cfg["dilation"], cfg["groups"])
    r = residual.detach().cpu().double() if residual is not None else None
    y = conv_ops.torch_conv_epilogue(c, d.get("scale"), d.get("shift"), r, cfg["act"])
    return y, d


def check(cfg, device, salt="", backend=None):
    t, gen = make_inputs(cfg, device, salt)
    dtype = cfg["dtype"]
    residual = None
    y_ref, d = reference(cfg, t)
    if cfg["epilogue"]:
        residual = randn(y_ref.shape, dtype, device, gen)
        y_ref, d = reference(cfg, t, residual)
    y = run_op(cfg, t, residual, backend)
    assert y.shape == y_ref.shape and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last) == (cfg["layout"] == "channels_last"), cfg
    assert_close(y, y_ref, dtype, "forward", cfg)
    grad_y = randn(y.shape, dtype, device, gen)
    names = [k for k, v in t.items() if v is not None]
    got = torch.autograd.grad(y, [t[k] for k in names], grad_y)
    want = torch.autograd.grad(y_ref, [d[k] for k in names], grad_y.cpu().double())
    for name, g, w in zip(names, got, want):
        assert g.dtype == t[name].dtype, (name, g.dtype)
        assert_close(g, w, dtype, f"grad {name}", cfg)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_and_gradients(name, device):
    check(CONFIGS[name], device, name)


@pytest.mark.parametrize("in_act", ACTIVATIONS)
def test_padding_is_zero_after_the_transform(in_act, device):
    """The conv pads x, not z: in_shift is chosen so that in_act(in_shift) != 0 at every padded position (negative
    for silu / hardswish / identity, where in_act(z*s+t) < 0 at borders too; positive where relu/relu6 would zero a
    negative one), and the reference that pads z instead is shown to differ, so a wrong mask fails."""
    sign = 1 if in_act in ("relu", "relu6") else -1
    cfg = _cfg(input=(1, 3, 5, 4), out_channels=4, padding=(2, 1, 1, 2), in_act=in_act, shift_sign=sign,
               dtype=torch.float64)
    t, _ = make_inputs(cfg, device, "padding")
    y = run_op(cfg, t)
    y_ref, _ = reference(cfg, t)
    y_wrong, _ = reference(cfg, t, mask_z=True)
    assert (y_wrong - y_ref).abs().max() > 1e-2, "the padded-z reference should differ"
    assert_close(y, y_ref, torch.float64, "forward", cfg)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_composed_backends(backend):
    """'torch' and the C++ 'cpu' backend build x with PyTorch ops, then run their own conv."""
    skip_unless_runnable(backend)
    with fastconv.backend(backend):
        check(CONFIGS["stride2_groups_dil_asym_batch1_silu"], torch.device("cpu"), backend, backend)


def test_triton_never_materialises_x(device, monkeypatch):
    """On the Triton backend, forward and backward read z: the PyTorch prologue (x built in memory) never runs."""
    def fail(*args):
        raise AssertionError("x materialised on the Triton path")

    monkeypatch.setattr(prologue_ops, "torch_prologue", fail)
    check(_cfg(input=(2, 3, 6, 5), out_channels=4, in_act="silu", act="silu", epilogue=True, dtype=torch.float64),
          device, "no-x")


def test_functional_entry(device):
    """fastconv.functional.conv2d_prologue: F.conv2d's argument forms (int padding, unbatched input)."""
    gen = generator("prologue-functional")
    z = randn((3, 7, 6), torch.float64, device, gen)
    s, t = randn((3,), torch.float64, device, gen), randn((3,), torch.float64, device, gen)
    w = randn((5, 3, 3, 3), torch.float64, device, gen)
    y = fastconv.functional.conv2d_prologue(z, s, t, w, None, 1, 1, in_activation="hardswish", activation="relu")
    assert y.shape == (5, 7, 6)
    x = F.hardswish(z * s.view(-1, 1, 1) + t.view(-1, 1, 1))
    assert_close(y, F.relu(F.conv2d(x, w, None, 1, 1)), torch.float64, "functional")


def test_coefficients_must_match_input_channels(device):
    t, _ = make_inputs(_cfg(), device, "shape")
    t["in_scale"] = t["in_scale"].detach()[:-1]
    with pytest.raises(ValueError, match="in_scale must have shape"):
        run_op(_cfg(), t)


@pytest.mark.parametrize("in_act,act", [("silu", "hardswish"), ("relu", "silu")])
def test_gradcheck(in_act, act, device):
    gen = generator("prologue-gradcheck", in_act)
    f64 = torch.float64
    z = randn((1, 4, 5, 4), f64, device, gen).requires_grad_()
    s, t = (randn((4,), f64, device, gen).requires_grad_() for _ in range(2))
    w = randn((6, 2, 2, 3), f64, device, gen).requires_grad_()
    b, scale, shift = (randn((6,), f64, device, gen).requires_grad_() for _ in range(3))
    res = randn((1, 6, 2, 5), f64, device, gen).requires_grad_()
    geo = ([2, 1], [1, 0, 2, 1], [2, 1], 2)

    def fn(z, s, t, w, b, scale, shift, res):
        return torch.ops.fastconv.conv2d_prologue(z, s, t, in_act, w, b, *geo, scale, shift, res, act, "triton")

    assert fn(z, s, t, w, b, scale, shift, res).shape == res.shape
    assert torch.autograd.gradcheck(fn, (z, s, t, w, b, scale, shift, res), fast_mode=True)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_opcheck(backend, device):
    from torch.library import opcheck

    skip_unless_runnable(backend)
    gen = generator("prologue-opcheck")
    z = randn((2, 4, 6, 5), torch.float32, device, gen).contiguous(memory_format=torch.channels_last)
    s, t = randn((4,), torch.float32, device, gen), randn((4,), torch.float32, device, gen)
    w = randn((6, 2, 3, 3), torch.float32, device, gen)
    b = randn((6,), torch.float32, device, gen)
    for v in (z, s, t, w, b):
        v.requires_grad_()
    geo = ([2, 1], [1, 1, 0, 1], [1, 2], 2)
    opcheck(torch.ops.fastconv.conv2d_prologue.default, (z, s, t, "silu", w, b, *geo), {"backend": backend})
    opcheck(torch.ops.fastconv.conv2d_prologue.default, (z, s, t, "relu", w, None, *geo),
            {"shift": b.detach(), "activation": "relu", "backend": backend})
    y = torch.ops.fastconv.conv2d_prologue(z, s, t, "silu", w, b, *geo, backend=backend)
    gy = torch.randn_like(y)
    opcheck(torch.ops.fastconv.conv2d_prologue_weight_grad.default,
            (gy, z.detach(), s.detach(), t.detach(), "silu", list(w.shape), *geo, True, backend))


def test_every_output_element_written(device, monkeypatch):
    """Outputs and split-K scratch start as NaN; the prologue kernels must overwrite every element."""
    monkeypatch.setattr(conv_ops, "alloc", nan_alloc)
    monkeypatch.setattr(tconv, "workspace", nan_workspace)
    check(_cfg(input=(2, 6, 13, 10), out_channels=9, kernel=(3, 2), stride=(2, 3), padding=(1, 2, 2, 0),
               dilation=(2, 1), groups=3, in_act="silu", act="relu", epilogue=True), device, "nan")


def test_emulated_autotune(device, monkeypatch):
    """FASTCONV_INTERPRET_AUTOTUNE=1: forward and wgrad with the prologue run on every tile of the (fused) tables,
    in turn, on the same arguments and buffers, and the results still match."""
    if not launch.interpreting():
        pytest.skip("autotune emulation runs under the Triton interpreter; on a GPU the real autotuner runs")
    monkeypatch.setenv("FASTCONV_INTERPRET_AUTOTUNE", "1")
    tiles = []
    real = launch._meta
    monkeypatch.setattr(launch, "_meta", lambda tile, maxnreg=None: (tiles.append(tuple(tile)), real(tile, maxnreg))[1])
    check(_cfg(input=(2, 5, 9, 7), out_channels=6, stride=(2, 2), in_act="hardswish", dtype=torch.float64,
               layout="channels_last"), device, "autotune")
    want = {t[:3] for arch in ("sm_80", "sm_90") for family in ("conv2d_fwd", "conv2d_wgrad")
            for t, _ in configs.tiles(family, arch, "fp32", fused=True, prologue=True)}
    assert {t[:3] for t in tiles} >= want


def test_launch_constexprs_hold_no_tensors(device, monkeypatch):
    """The coefficients travel as positional kernel arguments: keyword arguments of a tuned launch are its
    constexprs, which key the autotune cache and the per-call memo (a tensor there would key every call anew)."""
    seen = []
    real = launch.TunedKernel.__call__

    def spy(self, grid, *args, problem, device, scratch=None, **consts):
        seen.append((self.family, consts))
        return real(self, grid, *args, problem=problem, device=device, scratch=scratch, **consts)

    monkeypatch.setattr(launch.TunedKernel, "__call__", spy)
    check(_cfg(input=(1, 3, 5, 4), out_channels=4, in_act="relu", dtype=torch.float64), device, "consts")
    families = {family for family, consts in seen if consts.get("PROLOGUE")}
    assert families == {"conv2d_fwd", "conv2d_wgrad"}, seen
    assert not any(isinstance(v, torch.Tensor) for _, consts in seen for v in consts.values())


def test_autocast(device):
    """Under autocast z, weight and bias follow the autocast dtype (as nn.Conv2d's); the folded BatchNorm
    coefficients keep fp32."""
    gen = generator("prologue-autocast")
    z = randn((2, 4, 6, 5), torch.float32, device, gen)
    s, t = randn((4,), torch.float32, device, gen), randn((4,), torch.float32, device, gen)
    w, b = randn((6, 4, 3, 3), torch.float32, device, gen, 0.3), randn((6,), torch.float32, device, gen)
    with torch.autocast(device.type, dtype=torch.float16):
        y = torch.ops.fastconv.conv2d_prologue(z, s, t, "silu", w, b, [1, 1], [1, 1, 1, 1], [1, 1], 1,
                                               backend="triton")
    x = F.silu(z.double().half().double() * s.double().view(1, -1, 1, 1) + t.double().view(1, -1, 1, 1))
    ref = F.conv2d(x, w.half().double(), b.half().double(), 1, 1)
    assert y.dtype == torch.float16
    assert_close(y, ref, torch.float16, "autocast forward")


def test_compile_fullgraph(device):
    """torch.compile(fullgraph=True, aot_eager) traces forward and backward through the fake kernels, no graph
    break, and matches eager."""
    gen = generator("prologue-compile")
    f64 = torch.float64
    z = randn((2, 4, 6, 5), f64, device, gen).requires_grad_()
    s, t = (randn((4,), f64, device, gen).requires_grad_() for _ in range(2))
    w = randn((6, 4, 3, 3), f64, device, gen, 0.3).requires_grad_()

    def fn(z, s, t, w):
        y = fastconv.functional.conv2d_prologue(z, s, t, w, None, 2, 1, in_activation="silu", activation="relu")
        return (y * y).sum()

    eager = torch.autograd.grad(fn(z, s, t, w), (z, s, t, w))
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(z, s, t, w), (z, s, t, w))
    for g, e, name in zip(got, eager, ("z", "in_scale", "in_shift", "weight")):
        assert_close(g, e, f64, f"compiled grad {name}")


def test_prologue_tile_limits():
    """configs.PROLOGUE_MAXNREG / PROLOGUE_EXCLUDED name real tiles; a prologue launch's table carries the
    prologue pin and leaves the excluded tiles out (and is a fused launch's table otherwise), while every other
    launch keeps its own pins."""
    for fam, kind, arch, tile in [*configs.PROLOGUE_MAXNREG, *configs.PROLOGUE_EXCLUDED]:
        assert tile in configs.CONFIGS[fam][kind][arch], (fam, kind, arch, tile)
    assert all(p % 8 == 0 or p == 255 for p in configs.PROLOGUE_MAXNREG.values())
    for fam, kinds in configs.CONFIGS.items():
        for kind, arches in kinds.items():
            for arch in arches:
                fused = dict(configs.tiles(fam, arch, kind, fused=True))
                plain = dict(configs.tiles(fam, arch, kind))
                pro = dict(configs.tiles(fam, arch, kind, fused=True, prologue=True))
                assert pro and list(pro)[0] == list(plain)[0]
                assert set(pro) == {t for t in fused if (fam, kind, arch, t) not in configs.PROLOGUE_EXCLUDED}
                for t, p in pro.items():
                    assert p == configs.PROLOGUE_MAXNREG.get((fam, kind, arch, t), plain[t])
                    assert plain[t] == configs.MAXNREG.get((fam, kind, arch, t))
    assert configs.is_fused({"PROLOGUE": True}) and not configs.is_fused({"PROLOGUE": False})


@pytest.mark.sanitize_overflow
def test_int64_indexing(device):
    """The IDX64 path of both prologue kernels (forced; real sizes past 2**31 elements do not fit a test)."""
    cfg = _cfg(input=(2, 5, 7, 6), out_channels=6, stride=(2, 1), padding=(1, 0, 2, 1), groups=1, in_act="silu",
               dtype=torch.float64, layout="channels_last")
    t, gen = make_inputs(cfg, device, "idx64")
    stride, padding, dilation, groups = _geometry(cfg)
    prologue = (t["in_scale"].detach(), t["in_shift"].detach(), cfg["in_act"])
    z, w = t["z"].detach(), t["w"].detach()
    y = tconv.conv2d_forward(z, w, None, stride, padding, dilation, groups, prologue=prologue, force_int64=True)
    y_ref, d = reference(cfg, dict(t, b=None))
    assert_close(y, y_ref, torch.float64, "IDX64 forward", cfg)
    g = randn(y.shape, torch.float64, device, gen)
    dw, db = tconv.conv2d_weight_grad(g, z, tuple(w.shape), stride, padding, dilation, groups, bias_grad=True,
                                      prologue=prologue, force_int64=True)
    assert_close(dw, torch.autograd.grad(y_ref, d["w"], g.double())[0], torch.float64, "IDX64 wgrad", cfg)
    assert_close(db, g.sum((0, 2, 3)), torch.float64, "IDX64 bias grad", cfg)
