"""A training-mode BatchNorm + activation followed by a max-pool as one op (fastconv/ops/batch_norm_act_pool.py,
functional.bn_act_max_pool, FusedSequential and convert()'s fx rewrite), whose normalised output never exists:

* against PyTorch in float64 (F.batch_norm with batch statistics, the activation, F.max_pool2d): output and the
  gradients of z, the BatchNorm weight and bias; overlapping windows (ResNet's 3x3 stride 2 pad 1), 2x2,
  dilation, ceil_mode, channel counts crossing the 32-wide tiles, NCHW / channels_last, affine=False, batch 1;
* against the unfused composition (bn_act, then max_pool2d) in the same dtype, bit for bit (fp16 / bf16 too,
  where the argmax of rounded values decides the gradient's position): outputs, argmax taps, NaNs and ties;
* NaN-poisoned outputs and scratch; opcheck; gradcheck; torch.compile(fullgraph) training; the Triton kernels
  through the interpreter without a GPU, 'torch' and 'cpu' composing fastconv's ops.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastconv
import fastconv.ops.batch_norm_act_pool as bnp_ops
import fastconv.ops.conv2d as conv_ops
import fastconv.triton.conv2d as tconv
from fastconv import functional as FC, modules
from fastconv.triton import launch

from .backends import skip_unless_runnable
from .helpers import assert_close, generator, nan_alloc, nan_workspace, randn

ACTS = {"relu": F.relu, "silu": F.silu, "identity": lambda t: t, "hardswish": F.hardswish}

# (kernel, stride, padding, dilation, ceil_mode)
POOLS = {
    "2x2": ((2, 2), (2, 2), (0, 0), (1, 1), False),
    "resnet_stem_3x3_s2_p1": ((3, 3), (2, 2), (1, 1), (1, 1), False),
    "3x2_s1_dil2_ceil": ((3, 2), (1, 2), (1, 1), (2, 1), True),
    "2x2_s2_ceil": ((2, 2), (2, 2), (0, 0), (1, 1), True),
}
CASES = {
    "nchw_fp64_relu": dict(shape=(2, 5, 9, 7), dtype=torch.float64, cl=False, act="relu", affine=True),
    "cl_fp32_silu_tiles": dict(shape=(2, 37, 11, 10), dtype=torch.float32, cl=True, act="silu", affine=True),
    "cl_fp64_identity_no_affine_batch1": dict(shape=(1, 6, 8, 9), dtype=torch.float64, cl=True, act="identity",
                                              affine=False),
    "nchw_fp32_hardswish": dict(shape=(3, 4, 7, 13), dtype=torch.float32, cl=False, act="hardswish", affine=True),
}


def _stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _inputs(case, dtype, device, salt):
    """z (requires grad), its batch mean / biased var, BatchNorm weight / bias (None without affine)."""
    gen = generator("bn-act-pool", salt, repr(case))
    z = randn(case["shape"], torch.float64, "cpu", gen, 2.0) + 0.3
    if case["cl"]:
        z = z.contiguous(memory_format=torch.channels_last)
    z = z.to(device=device, dtype=dtype).requires_grad_()
    C = case["shape"][1]
    sd = _stat_dtype(dtype)
    gamma = beta = None
    if case["affine"]:  # negative gammas: the pooled maximum comes from the other end of the distribution
        gamma = (torch.rand(C, generator=gen, dtype=torch.float64) * 3 - 1.5).to(device=device, dtype=sd)
        beta = randn((C,), torch.float64, "cpu", gen).to(device=device, dtype=sd)
        gamma.requires_grad_(), beta.requires_grad_()
    return z, gamma, beta


def _block(z, gamma, beta, act, eps=1e-5):
    zs = z.detach().to(_stat_dtype(z.dtype))
    mean, var = zs.mean((0, 2, 3)), zs.var((0, 2, 3), unbiased=False)
    return FC.PendingBlock(z, mean, var, gamma, beta, eps, act)


def _reference(z, gamma, beta, act, pool, eps=1e-5):
    """float64 PyTorch: batch-statistics BatchNorm (its gradient through the statistics included), act, pool."""
    zd = z.detach().double().requires_grad_()
    gd = gamma.detach().double().requires_grad_() if gamma is not None else None
    bd = beta.detach().double().requires_grad_() if beta is not None else None
    y = ACTS[act](F.batch_norm(zd, None, None, gd, bd, True, 0.0, eps))
    return F.max_pool2d(y, *pool), [t for t in (zd, gd, bd) if t is not None]


# Triton: every case with two of the pools, every pool with two cases; 'torch' and 'cpu' (which compose fastconv's
# batch_norm_act and max_pool2d ops, tested on their own) two of each.
MATRIX = [("triton", c, p) for i, c in enumerate(CASES) for p in list(POOLS)[i % 2::2]] + [
    (b, c, p) for b in ("torch", "cpu") for c in ("nchw_fp64_relu", "cl_fp32_silu_tiles")
    for p in ("2x2", "resnet_stem_3x3_s2_p1")]


@pytest.mark.parametrize("backend,case,pool", MATRIX)
def test_matches_float64(backend, case, pool, device):
    skip_unless_runnable(backend)
    if backend != "triton":
        device = torch.device("cpu")
    cfg = CASES[case]
    z, gamma, beta = _inputs(cfg, cfg["dtype"], device, pool)
    out_ref, wrt_ref = _reference(z, gamma, beta, cfg["act"], POOLS[pool])
    g = randn(tuple(out_ref.shape), torch.float64, "cpu", generator("bn-act-pool-grad", case, pool))
    wrt = [t for t in (z, gamma, beta) if t is not None]
    with fastconv.backend(backend):
        out = FC.bn_act_max_pool(_block(z, gamma, beta, cfg["act"]), *POOLS[pool])
        grads = torch.autograd.grad(out, wrt, g.to(device=device, dtype=cfg["dtype"]))
    grads_ref = torch.autograd.grad(out_ref, wrt_ref, g)
    what = f"{backend} {case} {pool}"
    assert out.dtype == cfg["dtype"] and out.stride() == F.max_pool2d(z.detach(), *POOLS[pool]).stride(), what
    assert_close(out, out_ref, cfg["dtype"], f"{what} output")
    for got, want, name in zip(grads, grads_ref, ["z", "weight", "bias"]):
        assert got.dtype == (cfg["dtype"] if name == "z" else _stat_dtype(cfg["dtype"])), (what, name, got.dtype)
        assert_close(got, want, cfg["dtype"], f"{what} grad {name}")


def _unfused(block, pool):
    return F.max_pool2d(FC.bn_act(block), *pool)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pool,act", [("2x2", "relu"), ("resnet_stem_3x3_s2_p1", "silu")])
def test_same_as_unfused_composition(dtype, pool, act, device, triton_backend, monkeypatch):
    """Bit for bit the output, argmax taps and gradients of bn_act followed by max_pool2d (each candidate is
    rounded to the output dtype before the comparison, so ties between rounded values keep the first tap), with
    NaNs in z (SiLU keeps them: the last NaN of a window wins) and whole windows of ties (ReLU's zeros too);
    outputs and scratch NaN-poisoned."""
    monkeypatch.setattr(bnp_ops, "alloc", nan_alloc)
    monkeypatch.setattr(conv_ops, "alloc", nan_alloc)
    monkeypatch.setattr(tconv, "workspace", nan_workspace)
    cfg = dict(CASES["cl_fp32_silu_tiles"], act=act)
    z, gamma, beta = _inputs(cfg, dtype, device, "unfused")
    with torch.no_grad():
        z[0, :, :4, :4] = 0.25  # ties over whole windows
        z[1, 3, 2, 2] = float("nan")
        z[1, 3, 3, 3] = float("nan")
    zs = z.detach().to(torch.float32)
    mean = torch.nan_to_num(zs, nan=0.0).mean((0, 2, 3))  # finite statistics: only the NaN pixels are NaN
    var = torch.nan_to_num(zs, nan=0.0).var((0, 2, 3), unbiased=False)
    block = FC.PendingBlock(z, mean, var, gamma, beta, 1e-5, act)
    geo = tuple(map(list, POOLS[pool][:4]))
    out, offsets = bnp_ops.batch_norm_act_pool_train_op(z, mean, var, gamma, beta, 1e-5, act, *geo, False,
                                                        "triton")
    y = FC.bn_act(block)
    ref, ref_off = torch.ops.fastconv.max_pool2d(y, *geo, False, "triton")
    assert torch.equal(out.isnan(), ref.isnan()) and (out.isnan().any() or act == "relu")
    assert torch.equal(torch.nan_to_num(out), torch.nan_to_num(ref)) and torch.equal(offsets, ref_off)
    g = randn(tuple(out.shape), torch.float64, "cpu", generator("unfused-grad", pool)).to(device=device, dtype=dtype)
    got = torch.autograd.grad(out, [z, gamma, beta], g)
    want = torch.autograd.grad(F.max_pool2d(FC.bn_act(block), *POOLS[pool]), [z, gamma, beta], g)
    for a, b, name in zip(got, want, ["z", "weight", "bias"]):
        finite = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), finite), name
        assert_close(a[finite], b[finite], dtype, f"{dtype} {pool} grad {name} vs unfused")


def test_no_normalized_output_and_no_pool_kernels(device, triton_backend):
    """Forward: one fused kernel (no normalize, no max-pool kernel); backward: BatchNorm's passes only."""
    cfg = CASES["cl_fp32_silu_tiles"]
    z, gamma, beta = _inputs(cfg, cfg["dtype"], device, "launches")
    with launch.recording() as launches:
        out = FC.bn_act_max_pool(_block(z, gamma, beta, "relu"), 2)
        out.backward(torch.ones_like(out))
    kernels = [rec.kernel for rec in launches]
    assert kernels[0] == "_batch_norm_act_pool_fwd_kernel", kernels
    assert not any("max_pool2d" in k or "batch_norm_act_fwd" in k for k in kernels), kernels
    assert [k for k in kernels[1:] if "reduce" in k or "apply" in k] == [
        "_batch_norm_act_bwd_reduce_kernel", "_batch_norm_act_bwd_apply_kernel"], kernels


def test_bad_pool_arguments_raise_like_pytorch(device, triton_backend):
    cfg = CASES["nchw_fp64_relu"]
    z, gamma, beta = _inputs(cfg, cfg["dtype"], device, "errors")
    block = _block(z, gamma, beta, "relu")
    for args, kwargs in [((3,), dict(padding=2)), ((0,), {}), ((2,), dict(stride=0)), ((20,), {})]:
        with pytest.raises(RuntimeError) as ours:
            FC.bn_act_max_pool(block, *args, **kwargs)
        with pytest.raises(RuntimeError) as theirs:
            F.max_pool2d(z.detach(), *args, **kwargs)
        assert str(ours.value) == str(theirs.value)


def _stage_model(salt) -> nn.Sequential:
    """A CIFAR-CNN stage: (conv-BN-ReLU) x 2, max-pool, conv-BN-SiLU, max-pool 3x3 s2 p1; float64, random affine
    parameters and running statistics."""
    torch.manual_seed(generator("pool-stage", salt).initial_seed() % 2**31)
    layers = [nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1),
              nn.BatchNorm2d(5), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Conv2d(5, 7, 3, padding=1),
              nn.BatchNorm2d(7, momentum=None), nn.SiLU(), nn.MaxPool2d(3, 2, 1)]
    model = nn.Sequential(*layers).double().train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(-1.5, 1.5)
                m.bias.uniform_(-1, 1)
    return model


def _kernels_of_step(model, x):
    """The Triton kernels a training step of (a copy of) model on x launches (recorded, not run)."""
    model = copy.deepcopy(model)
    with launch.recording() as launches:
        y = model(x)
        y.backward(torch.ones_like(y))
    return [rec.kernel for rec in launches]


def _running(model):
    return [b for name, b in model.named_buffers() if "running" in name or "num_batches" in name]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_fused_sequential_pools_pending_blocks(layout, device, triton_backend, monkeypatch):
    """convert() of a stage ending in max-pools: both pools take the block's output virtually (no normalize and
    no max-pool kernel in training); output, every gradient and the running statistics match the plain model
    over two steps; eval runs the plain fused path."""
    ref = _stage_model(layout)
    model = fastconv.convert(copy.deepcopy(ref)).to(device=device, dtype=torch.float32)
    assert type(model) is modules.FusedSequential
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    gen = generator("pool-stage-step", layout)
    for step in range(2):
        x = randn((2, 3, 10, 9), torch.float64, "cpu", gen).requires_grad_()
        y_ref = ref(x)
        g = randn(tuple(y_ref.shape), torch.float64, "cpu", gen)
        grads_ref = torch.autograd.grad(y_ref, [x, *ref.parameters()], g)
        xk = x.detach().to(device=device, dtype=torch.float32).contiguous(memory_format=fmt).requires_grad_()
        kernels = _kernels_of_step(model, xk)
        assert kernels.count("_batch_norm_act_pool_fwd_kernel") == 2, kernels
        assert not any("max_pool2d" in k or "batch_norm_act_fwd" in k for k in kernels), kernels
        y = model(xk)
        assert y.is_contiguous(memory_format=fmt)  # nn's layout (the blocks' z is channels_last on Triton)
        grads = torch.autograd.grad(y, [xk, *model.parameters()], g.to(device=device, dtype=torch.float32))
        assert_close(y, y_ref, torch.float32, f"step {step} output")
        for (name, _), got, want in zip([("input", None), *ref.named_parameters()], grads, grads_ref):
            if name.endswith(".bias") and isinstance(ref[int(name.split(".")[0])], nn.Conv2d):
                continue  # 0 up to rounding (BatchNorm removes the mean): tests/test_conv_bn_chain.py
            assert_close(got, want, torch.float32, f"step {step} grad {name}")
    for got, want in zip(_running(model), _running(ref)):
        assert_close(got.double(), want.double(), torch.float32, "running statistics")
    ref.eval(), model.eval()
    with torch.no_grad():
        x = randn((2, 3, 10, 9), torch.float64, "cpu", gen)
        assert_close(model(x.to(device=device, dtype=torch.float32)), ref(x), torch.float32, "eval")


def test_hooked_pool_is_not_fused(device, triton_backend):
    """A forward hook on the pool must see its input: the block's output is then materialised as in nn."""
    ref = _stage_model("hooked")
    model = fastconv.convert(copy.deepcopy(ref)).to(device=device)
    seen = []
    model[6].register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    x = randn((2, 3, 10, 9), torch.float64, "cpu", generator("hooked-pool"))
    y = model(x.to(device))
    assert seen == [torch.Size([2, 5, 10, 9])]
    assert _kernels_of_step(model, x.to(device)).count("_batch_norm_act_pool_fwd_kernel") == 1
    assert_close(y, ref(x), torch.float64, "hooked")


class _Stem(nn.Module):
    """torchvision ResNet's stem, written out in forward (fx-traced by convert())."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5, stride=2, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.maxpool(self.relu(self.bn1(self.conv1(x)))))


def test_fx_traced_stem_pools_virtually(device, triton_backend):
    torch.manual_seed(generator("fx-stem").initial_seed() % 2**31)
    ref = _Stem().double().train()
    model = fastconv.convert(copy.deepcopy(ref)).to(device)
    assert "pool_start" in model.forward.code
    gen = generator("fx-stem-step")
    for step in range(2):
        x = randn((2, 3, 15, 13), torch.float64, "cpu", gen).requires_grad_()
        y_ref = ref(x)
        g = randn(tuple(y_ref.shape), torch.float64, "cpu", gen)
        grads_ref = torch.autograd.grad(y_ref, [x, *ref.parameters()], g)
        xk = x.detach().to(device).requires_grad_()
        assert "_batch_norm_act_pool_fwd_kernel" in _kernels_of_step(model, xk)
        y = model(xk)
        grads = torch.autograd.grad(y, [xk, *model.parameters()], g.to(device))
        assert_close(y, y_ref, torch.float64, f"step {step} output")
        for got, want in zip(grads, grads_ref):
            assert_close(got, want, torch.float64, f"step {step} grads")
    for got, want in zip(_running(model), _running(ref)):
        assert_close(got.double(), want.double(), torch.float64, "running statistics")
    with fastconv.backend("torch"):  # not Triton: the plain calls
        x = randn((2, 3, 15, 13), torch.float64, "cpu", gen)
        assert_close(model.cpu()(x), ref(x), torch.float64, "torch backend")


def test_emulated_autotune(device, triton_backend, monkeypatch):
    """FASTCONV_INTERPRET_AUTOTUNE=1 (every conv tile runs on the same buffers first): the pooled stage is still
    right."""
    if not launch.interpreting():
        pytest.skip("autotune emulation runs under the Triton interpreter; on a GPU the real autotuner runs")
    monkeypatch.setenv("FASTCONV_INTERPRET_AUTOTUNE", "1")
    ref = _stage_model("autotune")
    model = fastconv.convert(copy.deepcopy(ref)).to(device)
    x = randn((2, 3, 6, 7), torch.float64, "cpu", generator("pool-autotune")).requires_grad_()
    y_ref = ref(x)
    xk = x.detach().to(device).requires_grad_()
    y = model(xk)
    assert_close(y, y_ref, torch.float64, "output")
    g = torch.ones_like(y_ref)
    for got, want in zip(torch.autograd.grad(y, [xk, *model.parameters()], g.to(device)),
                         torch.autograd.grad(y_ref, [x, *ref.parameters()], g)):
        assert_close(got, want, torch.float64, "grads")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_opcheck(backend, device):
    from torch.library import opcheck

    skip_unless_runnable(backend)
    if backend != "triton":
        device = torch.device("cpu")
    cfg = CASES["cl_fp32_silu_tiles"]
    z, gamma, beta = _inputs(cfg, torch.float32, device, "opcheck")
    blk = _block(z, gamma, beta, "silu")
    for pool in ("2x2", "resnet_stem_3x3_s2_p1", "3x2_s1_dil2_ceil"):
        geo = tuple(map(list, POOLS[pool][:4]))
        opcheck(torch.ops.fastconv.batch_norm_act_pool_train.default,
                (z, blk.mean, blk.var, gamma, beta, 1e-5, "silu", *geo, POOLS[pool][4], backend))
    geo = tuple(map(list, POOLS["2x2"][:4]))
    opcheck(torch.ops.fastconv.batch_norm_act_pool_train.default,
            (z, blk.mean, blk.var, None, None, 1e-5, "relu", *geo, False, backend))
    for cl in (False, True):  # the chain's nn layout for out and offsets, whatever z's
        opcheck(torch.ops.fastconv.batch_norm_act_pool_train.default,
                (z, blk.mean, blk.var, gamma, beta, 1e-5, "relu", *geo, False, backend, cl))
        out, off = torch.ops.fastconv.batch_norm_act_pool_train(z.detach(), blk.mean, blk.var, gamma.detach(),
                                                               beta.detach(), 1e-5, "relu", *geo, False, backend, cl)
        fmt = torch.channels_last if cl else torch.contiguous_format
        assert out.is_contiguous(memory_format=fmt) and off.is_contiguous(memory_format=fmt)
        ref, ref_off = torch.ops.fastconv.batch_norm_act_pool_train(z.detach(), blk.mean, blk.var, gamma.detach(),
                                                                   beta.detach(), 1e-5, "relu", *geo, False, backend)
        assert torch.equal(out, ref) and torch.equal(off, ref_off)
    out, off = torch.ops.fastconv.batch_norm_act_pool_train(z.detach(), blk.mean, blk.var, gamma.detach(),
                                                           beta.detach(), 1e-5, "silu", *geo, False, backend)
    opcheck(torch.ops.fastconv.batch_norm_act_pool_backward.default,
            (torch.randn_like(out), off, z.detach(), blk.mean, blk.var, gamma.detach(), beta.detach(), 1e-5, "silu",
             *geo, False, backend))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gradcheck(backend, device):
    """gradcheck in float64 of conv_bn_stats -> bn_act_max_pool (BatchNorm's training gradient through the
    pool's argmax), overlapping windows."""
    skip_unless_runnable(backend)
    if backend != "triton":
        device = torch.device("cpu")
    gen = generator("pool-gradcheck", backend)
    f64 = torch.float64
    x = randn((2, 2, 5, 4), f64, device, gen).requires_grad_()
    w = randn((3, 2, 3, 3), f64, device, gen, 0.5).requires_grad_()
    g1, b1 = (randn((3,), f64, device, gen).requires_grad_() for _ in range(2))

    def fn(x, w, g1, b1):
        with fastconv.backend(backend):
            p = FC.conv_bn_stats(x, w, None, g1, b1, None, None, padding=1, activation="silu")
            return FC.bn_act_max_pool(p, 3, 2, 1)

    # fast_mode (random projections of the Jacobian, as the other ops' gradchecks): the full Jacobian took ~10 min
    # of interpreter time
    assert torch.autograd.gradcheck(fn, (x, w, g1, b1), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_compile_fullgraph_training(device, triton_backend):
    """torch.compile(fullgraph=True, aot_eager) of a converted stage with fused pools: same output, gradients
    and running statistics as eager."""
    eager = fastconv.convert(_stage_model("compile")).to(device)
    compiled_model = copy.deepcopy(eager)
    x = randn((2, 3, 8, 8), torch.float64, device, generator("pool-compile"))
    y_e = eager(x)
    g_e = torch.autograd.grad(y_e.square().sum(), list(eager.parameters()))
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    y_c = compiled(x)
    g_c = torch.autograd.grad(y_c.square().sum(), list(compiled_model.parameters()))
    assert_close(y_c, y_e, torch.float64, "compiled output")
    for a, b in zip(g_c, g_e):
        assert_close(a, b, torch.float64, "compiled grad")
    for a, b in zip(_running(compiled_model), _running(eager)):
        assert_close(a.double(), b.double(), torch.float64, "compiled running statistics")

