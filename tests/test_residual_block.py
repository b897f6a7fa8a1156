"""Residual blocks as one op (fastconv/ops/residual_block.py, modules.residual_block, convert()'s rewrite) against
the plain block in float64:

    y = act(bn2(conv2(act1(bn1(conv1(x))))) + shortcut(x)),  shortcut = identity or bn_s(conv_s(x))

The output, every gradient (input, the three convs' weights and biases, the three BatchNorms' affines) and the
running statistics after two training steps; identity and projection shortcuts, stride, groups, dilation,
conv bias, affine=False, momentum=None, mask and non-mask activations, NCHW and channels_last, fp32 / fp64. The
Triton kernels run through the interpreter without a GPU; 'torch' and 'cpu' run the same op with their kernels.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import fastconv
import fastconv.ops.conv2d as conv_ops
import fastconv.triton.conv2d as tconv
from fastconv import modules
from fastconv.ops import residual_block as rb_ops
from fastconv.triton import launch

from .backends import skip_unless_runnable
from .helpers import TOL, assert_close, generator, nan_alloc, nan_workspace, randn

ACTS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "identity": nn.Identity}


class Block(nn.Module):
    """A residual block with every knob the op takes."""

    def __init__(self, cin, cout, stride=1, groups=1, dilation=1, bias=False, act1="relu", act="relu",
                 affine=True, momentum=0.1, projection=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, dilation, dilation, groups, bias)
        self.bn1 = nn.BatchNorm2d(cout, affine=affine, momentum=momentum)
        self.act1 = ACTS[act1]()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, 1, groups, bias)
        self.bn2 = nn.BatchNorm2d(cout, momentum=momentum)
        if projection if projection is not None else (stride != 1 or cin != cout):
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=bias),
                                          nn.BatchNorm2d(cout, momentum=momentum))
        else:
            self.shortcut = nn.Sequential()
        self.act = ACTS[act]()

    def forward(self, x):
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act(out + self.shortcut(x))


CASES = {
    "identity_relu_cl_fp32": dict(input=(2, 6, 7, 9), dtype=torch.float32, layout="channels_last",
                                  block=dict(cin=6, cout=6)),
    "projection_stride2_nchw_fp32": dict(input=(2, 4, 9, 8), dtype=torch.float32, layout="nchw",
                                         block=dict(cin=4, cout=6, stride=2, bias=True)),
    "identity_silu_groups_dilation_fp64": dict(input=(1, 6, 8, 7), dtype=torch.float64, layout="channels_last",
                                               block=dict(cin=6, cout=6, groups=2, dilation=2, act1="silu",
                                                          act="silu")),
    "projection_identity_act_affine_false_momentum_none_fp64": dict(
        input=(2, 5, 6, 6), dtype=torch.float64, layout="nchw",
        block=dict(cin=5, cout=5, act="identity", act1="relu6", affine=False, momentum=None, projection=True)),
    "identity_relu6_tiles_fp32": dict(input=(2, 36, 5, 6), dtype=torch.float32, layout="channels_last",
                                      block=dict(cin=36, cout=36, act="relu6", bias=True)),
}


def plain_block(cfg, salt) -> Block:
    torch.manual_seed(generator("residual", salt, repr(cfg)).initial_seed() % 2**31)
    block = Block(**cfg["block"])
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.affine:  # negative gammas and shifts: a wrong mask or sign shows up
                    m.weight.uniform_(-1.5, 1.5)
                    m.bias.uniform_(-1, 1)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return block.double().train()


def _layout(t, cfg):
    return t.contiguous(memory_format=torch.channels_last) if cfg["layout"] == "channels_last" else t


def _running(model):
    return [b for name, b in model.named_buffers() if "running" in name or "num_batches" in name]


class _Calls:
    """Counts the block op's calls (through modules.residual_block)."""

    def __init__(self, monkeypatch):
        self.n = 0
        real = rb_ops.residual_block_train_op

        def wrapped(*args):
            self.n += 1
            return real(*args)

        monkeypatch.setattr(rb_ops, "residual_block_train_op", wrapped)


def check_block(cfg, backend, device, salt, model=None, ref=None):
    """Two training steps of the converted block against the plain one in float64."""
    ref = ref if ref is not None else plain_block(cfg, salt)
    model = model if model is not None else fastconv.convert(ref).to(device=device, dtype=cfg["dtype"])
    dtype = cfg["dtype"]
    gen = generator("residual-input", salt, repr(cfg))
    for step in range(2):
        x = randn(cfg["input"], torch.float64, "cpu", gen).requires_grad_()
        y_ref = ref(x)
        g = randn(tuple(y_ref.shape), torch.float64, "cpu", gen)
        grads_ref = torch.autograd.grad(y_ref, [x, *ref.parameters()], g)
        xk = _layout(x.detach().to(device=device, dtype=dtype), cfg).requires_grad_()
        with fastconv.backend(backend):
            y = model(xk)
            grads = torch.autograd.grad(y, [xk, *model.parameters()], _layout(g.to(device=device, dtype=dtype), cfg))
        fmt = torch.channels_last if cfg["layout"] == "channels_last" else torch.contiguous_format
        assert y.is_contiguous(memory_format=fmt), "the block's output keeps nn's layout"
        what = f"{backend} step {step}"
        assert_close(y, y_ref, dtype, f"{what} output", cfg)
        for (name, _), got, want in zip([("input", None), *ref.named_parameters()], grads, grads_ref):
            if name.endswith(".bias") and "conv" in name:
                # a conv bias before batch-statistics BatchNorm has gradient 0 up to rounding (mean removed)
                assert got.abs().max() <= 4 * TOL[dtype] * max(1.0, float(g.abs().max())), (what, name, got)
                continue
            assert_close(got, want, dtype, f"{what} grad {name}", cfg)
        for got, want in zip(_running(model), _running(ref)):
            assert_close(got.double(), want.double(), dtype, f"{what} running statistics", cfg)
    return model


@pytest.mark.parametrize("name", list(CASES))
def test_converted_block_runs_one_op(name, device, triton_backend, monkeypatch):
    """On Triton in training the converted block is one fastconv::residual_block_train per call, equal to the
    plain block (output, all gradients, running statistics); in eval it is the folded fused path."""
    cfg = CASES[name]
    calls = _Calls(monkeypatch)
    model = check_block(cfg, "triton", device, name)
    assert calls.n == 2
    ref = plain_block(cfg, name).eval()
    model.load_state_dict(ref.state_dict())
    model.eval()
    x = randn(cfg["input"], torch.float64, "cpu", generator("residual-eval", name))
    with torch.no_grad():
        assert_close(model(_layout(x.to(device=device, dtype=cfg["dtype"]), cfg)), ref(x), cfg["dtype"], "eval", cfg)
    assert calls.n == 2


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("name", ["projection_stride2_nchw_fp32", "identity_silu_groups_dilation_fp64"])
def test_op_on_every_backend(name, backend, monkeypatch):
    """The op itself on the other backends (their kernels, the add after the dgrad) through the module helper."""
    skip_unless_runnable(backend)
    cfg = CASES[name]
    monkeypatch.setattr(modules, "_chains_on", lambda x: True)  # take the op path off Triton too
    monkeypatch.setattr(modules, "RESIDUAL_BACKEND", backend)
    calls = _Calls(monkeypatch)
    check_block(cfg, backend, torch.device("cpu"), name)
    assert calls.n == 2


def test_torchvision_basic_blocks(device, triton_backend, monkeypatch):
    """torchvision's BasicBlock (in-place add, shared ReLU, downsample Sequential) converts to the same op."""
    torch.manual_seed(generator("tv-block").initial_seed() % 2**31)
    down = nn.Sequential(nn.Conv2d(4, 8, 1, 2, bias=False), nn.BatchNorm2d(8))
    ref = nn.Sequential(torchvision.models.resnet.BasicBlock(4, 8, 2, down),
                        torchvision.models.resnet.BasicBlock(8, 8)).double().train()
    cfg = dict(input=(2, 4, 8, 8), dtype=torch.float32, layout="channels_last")
    calls = _Calls(monkeypatch)
    check_block(cfg, "triton", device, "tv", model=fastconv.convert(ref).to(device=device, dtype=torch.float32),
                ref=ref)
    assert calls.n == 4


def test_block_input_gradients_are_summed_in_the_dgrad(device, triton_backend):
    """Backward of an identity and a projection block adds no activation-sized tensors with PyTorch ops (no
    autograd accumulation of the block input's two gradients, no add after the dgrad): the dgrad's store does."""
    from torch.utils._python_dispatch import TorchDispatchMode

    big = []

    class Adds(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.add, torch.ops.aten.add_) and isinstance(out, torch.Tensor) \
                    and out.dim() == 4:
                big.append(tuple(out.shape))
            return out

    for name in ("identity_relu_cl_fp32", "projection_stride2_nchw_fp32"):
        cfg = CASES[name]
        model = fastconv.convert(plain_block(cfg, "adds")).to(device=device, dtype=torch.float32)
        x = _layout(randn(cfg["input"], torch.float32, device, generator("adds", name)), cfg).requires_grad_()
        y = model(x)
        g = torch.randn_like(y)
        with Adds():
            y.backward(g)
        assert big == [], (name, big)


def test_fallbacks_keep_block_semantics(device, triton_backend, monkeypatch):
    """Where the block cannot be one op it runs the chain it replaces, with the same results: a hook on conv2, a
    shortcut that is not a conv + BatchNorm, a residual of another shape, backend 'torch'."""
    calls = _Calls(monkeypatch)
    cfg = CASES["identity_relu_cl_fp32"]
    ref = plain_block(cfg, "fallback")
    model = fastconv.convert(ref).to(device=device, dtype=cfg["dtype"])
    model.conv2.register_forward_hook(lambda m, i, o: None)
    check_block(cfg, "triton", device, "fallback", model=model, ref=ref)
    ref2 = plain_block(CASES["projection_stride2_nchw_fp32"], "fallback2")
    ref2.shortcut = nn.Sequential(nn.AvgPool2d(2, ceil_mode=True), nn.Conv2d(4, 6, 1)).double()
    check_block(CASES["projection_stride2_nchw_fp32"], "triton", device, "fallback2", ref=ref2,
                model=fastconv.convert(ref2).to(device=device, dtype=torch.float32))
    check_block(cfg, "torch", torch.device("cpu"), "fallback3")
    assert calls.n == 0


def test_every_output_element_written(device, triton_backend, monkeypatch):
    """Outputs, statistics and split-K scratch start as NaN: the op's forward and backward write every element
    they read."""
    monkeypatch.setattr(conv_ops, "alloc", nan_alloc)
    monkeypatch.setattr(tconv, "workspace", nan_workspace)
    check_block(CASES["projection_stride2_nchw_fp32"], "triton", device, "nan")
    check_block(CASES["identity_relu_cl_fp32"], "triton", device, "nan")


def test_emulated_autotune(device, triton_backend, monkeypatch):
    """FASTCONV_INTERPRET_AUTOTUNE=1: every tile runs on the same buffers (the dgrad's in-place add included)
    before the final call, and the block is still right."""
    if not launch.interpreting():
        pytest.skip("autotune emulation runs under the Triton interpreter; on a GPU the real autotuner runs")
    monkeypatch.setenv("FASTCONV_INTERPRET_AUTOTUNE", "1")
    cfg = dict(CASES["identity_relu_cl_fp32"], dtype=torch.float64, input=(2, 6, 5, 6))
    check_block(cfg, "triton", device, "autotune")


def _op_args(device, dtype, projection, running, gen):
    N, C, H, W, K = 2, 4, 6, 5, 4 if not projection else 6
    x = randn((N, C, H, W), dtype, device, gen).contiguous(memory_format=torch.channels_last)
    w1, w2 = randn((K, C, 3, 3), dtype, device, gen), randn((K, K, 3, 3), dtype, device, gen)
    vec = [randn((K,), dtype, device, gen) for _ in range(6)]
    ws = randn((K, C, 1, 1), dtype, device, gen) if projection else None
    stride = [2, 2] if projection else [1, 1]
    geo = [stride, [1, 1, 1, 1], [1, 1], 1, [1, 1], [1, 1, 1, 1], [1, 1], 1, stride, [0, 0, 0, 0], [1, 1], 1]
    args = [x, w1, None, vec[0], vec[1], w2, vec[2], vec[3], vec[4], ws, None,
            vec[5] if projection else None, vec[0].clone() if projection else None, *geo, [1e-5] * 3, [0.1] * 3,
            "relu", "relu", "implicit"]
    stats = []
    if running:
        for i in range(3):
            live = i < 2 or projection
            stats += [randn((K,), dtype, device, gen) if live else None,
                      randn((K,), dtype, device, gen).abs() + 0.5 if live else None,
                      torch.tensor(3, device=device) if live else None, None]
    return args, stats


@pytest.mark.parametrize("projection", [False, True])
def test_opcheck(projection, device, triton_backend):
    from torch.library import opcheck

    gen = generator("residual-opcheck", projection)
    op = torch.ops.fastconv.residual_block_train.default
    for backend in ("triton", "torch"):
        args, stats = _op_args(device if backend == "triton" else "cpu", torch.float32, projection, True, gen)
        opcheck(op, (*args, backend, None, *stats))
        args, _ = _op_args(device if backend == "triton" else "cpu", torch.float32, projection, False, gen)
        opcheck(op, (*args, backend))


def test_compiles_fullgraph(device, triton_backend):
    """torch.compile(fullgraph) of converted blocks on Triton: the op is one opaque custom op (its fake, autograd
    and mutations traced), no graph break, equal to eager over two training steps."""
    torch.manual_seed(generator("residual-compile").initial_seed() % 2**31)
    ref = nn.Sequential(Block(4, 4), Block(4, 6, stride=2)).double().train()
    eager = fastconv.convert(ref).to(device=device, dtype=torch.float64)
    compiled_model = copy.deepcopy(eager)
    torch._dynamo.reset()
    x = randn((2, 4, 6, 6), torch.float64, device, generator("residual-compile-x"))
    assert torch._dynamo.explain(copy.deepcopy(eager))(x).graph_break_count == 0  # (explain runs a step)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    for step in range(2):
        outs = []
        for m in (eager, compiled):
            xk = x.clone().requires_grad_()
            y = m(xk)
            y.square().sum().backward()
            outs.append((y, xk.grad))
        assert_close(outs[1][0], outs[0][0], torch.float64, f"step {step} output")
        assert_close(outs[1][1], outs[0][1], torch.float64, f"step {step} input grad")
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
        assert_close(q.grad, p.grad, torch.float64, f"grad {name}")
    for (name, b), c in zip(eager.named_buffers(), compiled_model.buffers()):
        if b.is_floating_point():
            assert_close(c, b, torch.float64, f"buffer {name}")
        else:
            assert torch.equal(b, c), name
    torch._dynamo.reset()


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_normalize_with_affine_residual(layout, device, triton_backend):
    """The Triton normalize pass reading a projection's z with its BatchNorm folded (RES_AFFINE): y and the act'
    bits against float64, y NaN-poisoned first, C crossing a channel tile."""
    from fastconv import _act_bits
    from fastconv.triton import batch_norm as tbn

    gen = generator("res-affine", layout)
    N, C, H, W = 2, 37, 5, 3
    z, r = (randn((N, C, H, W), torch.float32, device, gen) for _ in range(2))
    if layout == "channels_last":
        z = z.contiguous(memory_format=torch.channels_last)
    mean, gamma, beta, rscale, rshift = (randn((C,), torch.float32, device, gen) for _ in range(5))
    var = randn((C,), torch.float32, device, gen).abs() + 0.2
    y = torch.full((N, C, H, W), float("nan"), device=device)
    bits = _act_bits.empty(z, True)
    tbn.batch_norm_act_forward(z, mean, var, gamma, beta, 1e-5, "relu", r, out=y, act_bits=bits,
                               residual_affine=(rscale, rshift))
    v = lambda t: t.double().cpu().view(1, -1, 1, 1)  # noqa: E731
    u = ((z.double().cpu() - v(mean)) * torch.rsqrt(v(var) + 1e-5) * v(gamma) + v(beta)
         + r.double().cpu() * v(rscale) + v(rshift))
    assert_close(y, torch.relu(u), torch.float32, "y", layout)
    assert torch.equal(_act_bits.unpack(bits.cpu(), z.shape), u > 0)
    with pytest.raises(ValueError, match="residual_affine"):
        tbn.batch_norm_act_forward(z, mean, var, gamma, beta, 1e-5, "relu", None, residual_affine=(rscale, rshift))


@pytest.mark.parametrize("projection", [False, True])
def test_mismatched_shortcut_raises_before_touching_anything(projection, device, triton_backend):
    """A direct op call whose shortcut output cannot be added to the block's (here: stride 2 in conv1 only, so
    the block halves the resolution and the shortcut keeps it) raises ValueError before any running statistic
    or counter changes."""
    gen = generator("residual-mismatch", projection)
    args, stats = _op_args(device, torch.float32, projection, True, gen)
    args[13] = [2, 2] if not projection else [1, 1]  # conv1's stride: the block's and the shortcut's sizes differ
    before = [t.clone() for t in stats if t is not None]
    with pytest.raises(ValueError, match="shortcut's output .* does not match the block's"):
        torch.ops.fastconv.residual_block_train(*args, "triton", None, *stats)
    after = [t for t in stats if t is not None]
    assert all(torch.equal(a, b) for a, b in zip(after, before))
