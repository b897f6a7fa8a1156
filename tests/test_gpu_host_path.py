"""The host path a GPU takes, with the kernels still run by the Triton interpreter.

Under the interpreter fastconv.triton.launch takes branches a GPU never takes (the small interpreter tiles, no
per-plan fixed launch, no direct launch), so host code only a GPU runs would otherwise be checked by nothing
but a GPU session. Here the launch module is told it is not interpreting: tuned launches choose their tile as
on a GPU (the heuristic of the sm_80 / sm_90 tables: FASTCONV_AUTOTUNE=0, large tiles and pinned registers
included), repeated launches take their grid and keyword arguments from the launch plan (TunedKernel's
`fixed`), and each launch is handed to `launch.launch` exactly as on a GPU; that one function then runs the
kernel in the interpreter (`kernel[grid](*args, **kwargs)` with the GPU-only options dropped). No-grad layer calls
are replayed in C++ (fastconv/triton/replay.py) with a stand-in for the compiled kernel's launcher that interprets
it. Results are
checked against PyTorch in float64, twice per call signature (the second call is the repeated launch).
"""
from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastconv
from fastconv import _backend
from fastconv.triton import launch, replay

from .helpers import assert_close, generator, randn

pytestmark = pytest.mark.skipif(not (_backend.interpreting() and _backend.availability("cpu")["triton"][0]),
                                reason="needs the Triton interpreter (TRITON_INTERPRET=1) to run the kernels")

GPU_ONLY_OPTIONS = ("num_warps", "num_stages", "maxnreg", "num_ctas")


@pytest.fixture(params=["sm_80", "sm_90"])
def gpu_host_path(request, monkeypatch):
    """launch.py on its GPU branches; launches recorded (kernel name, grid, keyword arguments other than
    tensors) and interpreted."""
    launches = []

    def interpreted(kernel, grid, args, kwargs, device):
        launches.append((kernel.fn.__name__, tuple(grid),
                         {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}))
        kernel[grid](*args, **{k: v for k, v in kwargs.items() if k not in GPU_ONLY_OPTIONS})

    def compiled(kernel, args, kwargs, device, dry):
        """replay.compiled_launcher for CPU tensors: every bound argument (the interpreter's kernels have no Triton
        binder: Python's, with the defaults) and a stand-in launcher that records and interprets the replay."""
        signature = inspect.signature(kernel.fn)
        call = signature.bind(*args, **{k: v for k, v in kwargs.items() if k in signature.parameters})
        call.apply_defaults()
        names, full = list(call.arguments), tuple(call.arguments.values())

        def run(gx, gy, gz, stream, function, metadata, launch_metadata, enter, leave, *full):
            assert stream == 0 and function is metadata is launch_metadata is enter is leave is None
            bound = dict(zip(names, full, strict=True))
            launches.append((f"replay:{kernel.fn.__name__}", (gx, gy, gz),
                             {k: v for k, v in bound.items() if not isinstance(v, torch.Tensor)}))
            kernel[(gx, gy, gz)](**bound)

        return (None, None, None, full) if dry else (run, None, None, full)

    monkeypatch.setattr(launch, "interpreting", lambda: False)
    monkeypatch.setattr(launch, "launch", interpreted)
    monkeypatch.setattr(replay, "compiled_launcher", compiled)
    monkeypatch.setenv("FASTCONV_AUTOTUNE", "0")
    monkeypatch.setenv("FASTCONV_ARCH", request.param)
    # replays learned here call this test's stand-in launcher: none from another test, none left for the next
    fastconv.functional._GEOMETRY.clear()
    fastconv.functional._POOL_GEOMETRY.clear()
    replay.poison(True)  # replayed outputs start as NaN: an element the kernel does not write shows
    try:
        with fastconv.backend("triton"):
            yield launches
    finally:
        replay.poison(False)
        fastconv.functional._GEOMETRY.clear()
        fastconv.functional._POOL_GEOMETRY.clear()


def _twice(fn):
    """fn() twice (a call signature's first launch, then its repeat); both results."""
    return fn(), fn()


def _same_launch(first, repeat) -> bool:
    """Whether `repeat` (a launch or its replay, as the fixture records them) launches what `first` did: the same
    kernel, grid and keyword arguments (a replay records every parameter, its grid padded to 3)."""
    if not repeat[0].startswith("replay:"):
        return repeat == first
    return (repeat[0] == f"replay:{first[0]}" and repeat[1] == (tuple(first[1]) + (1, 1))[:3]
            and all(repeat[2][k] == v for k, v in first[2].items() if k not in GPU_ONLY_OPTIONS))


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_block_training_step(gpu_host_path, channels_last):
    """conv -> BatchNorm -> ReLU, forward and backward (7 launches), and the running statistics, twice."""
    gen = generator("gpu-host-fused", channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    block = fastconv.ConvBNReLU2d(5, 6, 3, padding=1).to(memory_format=fmt)
    ref = nn.Sequential(nn.Conv2d(5, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()).double()
    ref[0].load_state_dict(block.conv.state_dict())
    ref[1].load_state_dict(block.bn.state_dict())
    for step in range(2):
        x = randn((3, 5, 9, 7), torch.float32, "cpu", gen).to(memory_format=fmt).requires_grad_()
        g = randn((3, 6, 9, 7), torch.float32, "cpu", gen)
        y = block(x)
        grads = _grads(y, [x, block.conv.weight, block.conv.bias, block.bn.weight, block.bn.bias], g)
        xd = x.detach().double().requires_grad_()
        yd = ref(xd)
        want = _grads(yd, [xd, ref[0].weight, ref[0].bias, ref[1].weight, ref[1].bias], g.double())
        assert_close(y, yd, torch.float32, f"y, step {step}")
        for name, a, e in zip(("dx", "dw", "db", "dgamma", "dbeta"), grads, want):
            assert_close(a, e, torch.float32, f"{name}, step {step}")
        assert_close(block.bn.running_mean, ref[1].running_mean, torch.float32, "running_mean")
        assert_close(block.bn.running_var, ref[1].running_var, torch.float32, "running_var")
    assert int(block.bn.num_batches_tracked) == 2
    launches = list(gpu_host_path)
    assert len(launches) == 14, [name for name, _, _ in launches]
    if _replay_available():  # the second step is the training node's two replays (forward, backward)
        assert all(_same_launch(a, b) and b[0].startswith("replay:") for a, b in zip(launches[:7], launches[7:]))
    else:
        assert [name for name, _, _ in launches[:7]] == [name for name, _, _ in launches[7:]]


@pytest.mark.parametrize("groups, stride, dilation, algo, batch", [
    (1, 1, 1, "implicit", 2), (2, 2, 1, "implicit", 2), (1, 1, 2, "implicit", 1), (1, 2, 1, "im2col", 2)])
def test_conv_forward_backward(gpu_host_path, groups, stride, dilation, algo, batch):
    """Conv2d with a bias (forward, dgrad, wgrad with its split-K reduction) twice, against float64."""
    gen = generator("gpu-host-conv", groups, stride, dilation, algo, batch)
    conv = fastconv.Conv2d(4, 6, 3, stride=stride, padding=1, dilation=dilation, groups=groups, algo=algo)
    for step in range(2):
        x = randn((batch, 4, 11, 9), torch.float32, "cpu", gen).requires_grad_()
        y = conv(x)
        g = randn(y.shape, torch.float32, "cpu", gen)
        dx, dw, db = _grads(y, [x, conv.weight, conv.bias], g)
        xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, conv.weight, conv.bias))
        yd = F.conv2d(xd, wd, bd, stride, 1, dilation, groups)
        want = _grads(yd, [xd, wd, bd], g.double())
        assert_close(y, yd, torch.float32, f"y, step {step}")
        for name, a, e in zip(("dx", "dw", "db"), (dx, dw, db), want):
            assert_close(a, e, torch.float32, f"{name}, step {step}")
    half = len(gpu_host_path) // 2
    first, repeat = gpu_host_path[:half], gpu_host_path[half:]  # the repeat: same kernels, grids, keyword arguments
    assert len(first) == len(repeat) and all(_same_launch(a, b) for a, b in zip(first, repeat)), (first, repeat)
    if algo == "implicit" and replay._replay_fn():  # the repeat: one C++ node whose forward, dgrad, wgrad replay
        assert [name for name, _, _ in repeat] == [f"replay:{name}" for name, _, _ in first], repeat


def test_fused_block_autocast_and_residual(gpu_host_path):
    """A fused block (SiLU) under fp16 autocast with a residual added before the activation and momentum=None (the
    cumulative average, a 0-dim tensor factor), twice: every result within fp16's tolerance of the float64 truth
    or at most 2x as far from it as PyTorch's own autocast run (test_conv_bn_act's low-precision rule; SiLU, whose
    derivative has no jump for a rounding step to cross). bf16 is left out as there: the interpreter truncates
    its stores, which BatchNorm's backward amplifies."""
    from .helpers import TOL, rel_err

    gen = generator("gpu-host-amp")
    block = fastconv.ConvBNReLU2d(4, 4, 3, padding=1, momentum=None, activation="silu")
    refs = {}
    for name, dtype in (("truth", torch.float64), ("torch", torch.float32)):
        conv, bn = nn.Conv2d(4, 4, 3, padding=1).to(dtype), nn.BatchNorm2d(4, momentum=None).to(dtype)
        conv.load_state_dict(block.conv.state_dict())
        bn.load_state_dict(block.bn.state_dict())
        refs[name] = (conv, bn)
    for step in range(2):
        x = randn((2, 4, 7, 6), torch.float32, "cpu", gen)
        r = randn((2, 4, 7, 6), torch.float16, "cpu", gen)
        g = randn((2, 4, 7, 6), torch.float16, "cpu", gen)
        results = {}
        for name in ("ours", "torch", "truth"):
            xi = (x.double() if name == "truth" else x).clone().requires_grad_()
            if name == "ours":
                with torch.autocast("cpu", dtype=torch.float16):
                    y = block(xi, r)
                weight, bn = block.conv.weight, block.bn
            else:
                conv, bn = refs[name]
                with torch.autocast("cpu", dtype=torch.float16, enabled=name == "torch"):
                    y = F.silu(bn(conv(xi)) + (r.double() if name == "truth" else r))
                weight = conv.weight
            dx, dw = _grads(y, [xi, weight], g.to(y.dtype))
            results[name] = dict(y=y, dx=dx, dw=dw, running_var=bn.running_var.clone())
        assert results["ours"]["y"].dtype == torch.float16
        for key, truth in results["truth"].items():
            ours_err, torch_err = rel_err(results["ours"][key], truth), rel_err(results["torch"][key], truth)
            assert ours_err <= max(TOL[torch.float16], 2 * torch_err), (step, key, ours_err, torch_err)


def test_empty_batch(gpu_host_path):
    """Batch 0 on the GPU branch: empty outputs and zero parameter gradients, no launch."""
    conv, pool = fastconv.Conv2d(3, 4, 3, padding=1), fastconv.MaxPool2d(2)
    x = torch.randn(0, 3, 6, 6, requires_grad=True)
    y = conv(x)
    assert y.shape == (0, 4, 6, 6) and pool(y).shape == (0, 4, 3, 3)
    dw, db = _grads(y, [conv.weight, conv.bias], torch.randn(0, 4, 6, 6))
    assert torch.equal(dw, torch.zeros_like(dw)) and torch.equal(db, torch.zeros_like(db))


def test_conv_eval_and_max_pool(gpu_host_path):
    """An eval forward of a fused block (BatchNorm folded into the conv's epilogue) and a max-pool's forward
    (with and without a gradient) and backward, twice."""
    gen = generator("gpu-host-eval-pool")
    block = fastconv.ConvBNReLU2d(3, 4, 3, padding=1).eval()
    with torch.no_grad():
        block.bn.running_mean.copy_(randn((4,), torch.float32, "cpu", gen))
        block.bn.running_var.copy_(randn((4,), torch.float32, "cpu", gen).abs() + 0.5)
    pool = fastconv.MaxPool2d(3, stride=2, padding=1)
    x = randn((2, 3, 8, 10), torch.float32, "cpu", gen)
    with torch.no_grad():
        ys = _twice(lambda: block(x))
    bn = block.bn
    z = F.conv2d(x.double(), block.conv.weight.double(), block.conv.bias.double(), padding=1)
    want = F.relu(F.batch_norm(z, bn.running_mean.double(), bn.running_var.double(), bn.weight.double(),
                               bn.bias.double(), False, 0.0, bn.eps))
    for y in ys:
        assert_close(y, want, torch.float32, "eval y")
    with torch.no_grad():
        for p in _twice(lambda: pool(x)):
            assert torch.equal(p, F.max_pool2d(x, 3, 2, 1))
    xg = x.clone().requires_grad_()
    for _ in range(2):
        p = pool(xg)
        g = randn(p.shape, torch.float32, "cpu", gen)
        (dx,) = _grads(p, [xg], g)
        xd = xg.detach().clone().requires_grad_()
        (want_dx,) = _grads(F.max_pool2d(xd, 3, 2, 1), [xd], g)
        assert torch.equal(p, F.max_pool2d(x, 3, 2, 1))
        assert_close(dx, want_dx, torch.float32, "max-pool dx")


def test_chain_and_residual_block_training_step(gpu_host_path):
    """fastconv.convert of conv-BN-ReLU blocks chained into a max-pool (operand prologue, BatchNorm-gradient dgrad
    epilogue, normalize-and-pool pass) and of a residual block with a projection shortcut (one op), forward and
    backward twice, against the nn model in float64."""
    gen = generator("gpu-host-chain")

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8)
            self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.shortcut = nn.Sequential(nn.Conv2d(6, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))

        def forward(self, x):
            return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))

    def build():
        return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
                             nn.Conv2d(5, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                             Residual())

    torch.manual_seed(0)
    plain = build()
    ref = build().double()
    ref.load_state_dict(plain.state_dict())
    model = fastconv.convert(plain)
    for step in range(2):
        x = randn((2, 3, 12, 10), torch.float32, "cpu", gen).requires_grad_()
        y = model(x)
        g = randn(y.shape, torch.float32, "cpu", gen)
        params = [p for p in model.parameters()]
        grads = _grads(y, [x] + params, g)
        xd = x.detach().double().requires_grad_()
        yd = ref(xd)
        want = _grads(yd, [xd] + list(ref.parameters()), g.double())
        assert_close(y, yd, torch.float32, f"y, step {step}")
        for i, (a, e) in enumerate(zip(grads, want)):
            assert_close(a, e, torch.float32, f"gradient {i}, step {step}")
    # what the chain and the residual block launch: a conv reading the previous block's z through its operand
    # prologue, the pool fused into the normalize pass, dgrads with the BatchNorm-gradient and the add epilogues
    kernels = [(name, kw) for name, _, kw in gpu_host_path]
    assert any(n == "_conv2d_fwd_kernel" and kw["PROLOGUE"] for n, kw in kernels)
    assert any(n == "_batch_norm_act_pool_fwd_kernel" for n, _ in kernels)
    assert any(n == "_conv2d_dgrad_kernel" and kw["BN_GRAD"] for n, kw in kernels)
    assert any(n == "_conv2d_dgrad_kernel" and kw["ADD"] for n, kw in kernels)


def _replays(launches) -> list:
    return [entry for entry in launches if entry[0].startswith("replay:")]


def _replay_available() -> bool:
    return bool(replay._replay_fn())


def _needs_replay():
    if not _replay_available():
        pytest.skip("needs the C++ extension fastconv._C (the replay runs in it)")


def test_no_grad_layer_calls_replay(gpu_host_path):
    """No-grad calls of Conv2d (groups, stride, dilation, 'same', with and without a bias) and MaxPool2d (ceil_mode)
    on NCHW, channels_last and unaligned inputs (a view one element into its storage): the first call of each
    signature runs the op's Python path, the repeats are replayed in C++ with the same launch; every output
    against float64 and in nn's memory format. An input whose strides differ from the replay's takes the Python
    path and is learned anew."""
    _needs_replay()
    gen = generator("gpu-host-replay")
    conv = fastconv.Conv2d(4, 6, 3, stride=(2, 1), padding=1, dilation=(1, 2), groups=2)
    conv_nb = fastconv.Conv2d(4, 5, (1, 3), padding="same", bias=False)
    pool = fastconv.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
    wide = randn((2, 4, 9, 12), torch.float32, "cpu", gen)
    inputs = {"nchw": randn((2, 4, 9, 11), torch.float32, "cpu", gen),
              "channels_last": randn((2, 4, 9, 11), torch.float32, "cpu", gen).to(memory_format=torch.channels_last),
              "unaligned": wide[..., 1:]}
    assert inputs["unaligned"].data_ptr() % 16 != 0
    refs = {
        "conv": lambda x: F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), (2, 1), 1, (1, 2), 2),
        "conv_nb": lambda x: F.conv2d(x.double(), conv_nb.weight.double(), None, 1, "same"),
        "pool": lambda x: F.max_pool2d(x.double(), 3, 2, 1, ceil_mode=True),
    }
    nn_modules = {"conv": nn.Conv2d(4, 6, 3, (2, 1), 1, (1, 2), 2), "conv_nb": nn.Conv2d(4, 5, (1, 3), padding="same"),
                  "pool": nn.MaxPool2d(3, 2, 1, ceil_mode=True)}
    before = launch.LAUNCHES["replay"]
    with torch.no_grad():
        for name, module in (("conv", conv), ("conv_nb", conv_nb), ("pool", pool)):
            for layout, x in inputs.items():
                start = len(gpu_host_path)
                for call in range(3):
                    y = module(x)
                    assert_close(y, refs[name](x), torch.float32, f"{name} {layout} call {call}")
                    assert y.stride() == nn_modules[name](x).stride(), (name, layout)
                first, *repeats = gpu_host_path[start:]
                assert not first[0].startswith("replay:") and len(repeats) == 2, (name, layout, gpu_host_path[start:])
                for r in repeats:  # the replayed launch is the first call's: kernel, grid, keyword arguments
                    assert r[0].startswith("replay:") and _same_launch(first, r), (first, r)
    assert launch.LAUNCHES["replay"] - before == 18


def test_replay_only_where_it_holds(gpu_host_path, monkeypatch):
    """The replay steps aside (the op's Python path runs, with the same result) where it would be wrong or
    unseen: a launch hook (proton), FASTCONV_DIRECT_LAUNCH=0, a forced tile, the launch plan recording, the
    profiler, a TorchFunctionMode, a tensor subclass. A replaced weight is read; a weight whose strides change is
    learned anew; a dry run replays without launching; a call that needs a gradient is one C++ node whose
    forward is replayed too."""
    _needs_replay()
    import triton

    gen = generator("gpu-host-replay-guards")
    conv = fastconv.Conv2d(3, 4, 3, padding=1)
    x = randn((2, 3, 7, 6), torch.float32, "cpu", gen)

    def check(label, replayed, grad=False):
        before, start = launch.LAUNCHES["replay"], len(gpu_host_path)
        with torch.set_grad_enabled(grad):
            y = conv(x)
        want = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
        assert_close(y, want, torch.float32, label)
        assert (launch.LAUNCHES["replay"] - before, len(_replays(gpu_host_path[start:]))) == (
            (1, 1) if replayed else (0, 0)), label
        return y

    with torch.no_grad():
        conv(x)  # learned
    check("repeat", True)
    assert check("gradient needed: learned", False, grad=True).requires_grad
    assert check("gradient needed: one C++ node, its forward replayed", True, grad=True).requires_grad
    with monkeypatch.context() as m:
        m.setattr(triton.knobs.runtime, "launch_enter_hook", lambda *args: None)
        check("launch hook", False)
    with monkeypatch.context() as m:
        m.setenv("FASTCONV_DIRECT_LAUNCH", "0")
        check("direct launch off", False)
    with launch.forced((16, 16, 16, 4, 2)):
        check("forced tile", False)
    with torch.profiler.profile():
        check("profiler", False)

    class Passthrough(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough():
        check("torch function mode", False)

    class Subclass(torch.Tensor):
        pass

    before = launch.LAUNCHES["replay"]
    with torch.no_grad():
        y = conv(x.as_subclass(Subclass))
    assert launch.LAUNCHES["replay"] == before
    assert_close(y, F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1), torch.float32, "subclass")
    with torch.no_grad(), launch.recording() as recorded:
        conv(x)
    assert len(recorded) == 1 and not _replays(gpu_host_path[-1:])
    check("after the detours", True)
    with torch.no_grad():
        conv.weight = nn.Parameter(randn(tuple(conv.weight.shape), torch.float32, "cpu", gen))
    check("replaced weight", True)
    conv.weight.data = conv.weight.data.to(memory_format=torch.channels_last)
    check("weight strides changed", False)
    check("learned again", True)
    before, start = launch.LAUNCHES["replay"], len(gpu_host_path)
    with torch.no_grad(), launch.dry_run():
        for _ in range(3):
            assert conv(x).shape == (2, 4, 7, 6)
    assert launch.LAUNCHES["replay"] == before and gpu_host_path[start:] == []


@pytest.mark.parametrize("bias, activation, residual", [(True, "relu", False), (False, "silu", True)])
def test_eval_block_replays_and_refolds(gpu_host_path, bias, activation, residual):
    """A fused block in eval under no_grad: BatchNorm folded once (ops.conv_bn_act.eval_fold) and the conv with its
    epilogue replayed; an in-place change of a running statistic, load_state_dict, a `.data` swap of the BatchNorm
    weight and a new eps each make a new fold that the next call reads (still replayed). With a gradient needed
    nothing is kept or replayed and the gradient reaches the BatchNorm parameters."""
    _needs_replay()
    gen = generator("gpu-host-eval-replay", bias, activation, residual)
    block = fastconv.ConvBNReLU2d(4, 6, 3, padding=1, bias=bias, activation=activation).eval()
    bn = block.bn
    with torch.no_grad():
        bn.running_mean.copy_(randn((6,), torch.float32, "cpu", gen))
        bn.running_var.copy_(randn((6,), torch.float32, "cpu", gen).abs() + 0.5)
        bn.weight.copy_(randn((6,), torch.float32, "cpu", gen))
    x = randn((2, 4, 7, 9), torch.float32, "cpu", gen)
    r = randn((2, 6, 7, 9), torch.float32, "cpu", gen) if residual else None
    act = {"relu": F.relu, "silu": F.silu}[activation]

    def want():
        z = F.conv2d(x.double(), block.conv.weight.double(), None if not bias else block.conv.bias.double(),
                     padding=1)
        u = F.batch_norm(z, bn.running_mean.double(), bn.running_var.double(), bn.weight.double(),
                         bn.bias.double(), False, 0.0, bn.eps)
        return act(u + r.double() if residual else u)

    def call(label, replayed=True):
        before = launch.LAUNCHES["replay"]
        with torch.no_grad():
            y = block(x, r)
        assert_close(y, want(), torch.float32, label)
        assert launch.LAUNCHES["replay"] - before == int(replayed), label

    with torch.no_grad():
        block(x, r)  # learned
    call("repeat")
    with torch.no_grad():
        bn.running_var.mul_(1.7)
    call("running_var changed in place")
    state = {k: v.clone() for k, v in block.state_dict().items()}
    state["bn.running_mean"] += 0.25
    block.load_state_dict(state)
    call("load_state_dict")
    bn.weight.data = randn((6,), torch.float32, "cpu", gen)
    call("bn weight .data swapped")
    bn.eps = 1e-2
    call("eps")
    xg = x.clone().requires_grad_()
    before = launch.LAUNCHES["replay"]
    y = block(xg, r)
    (dgamma,) = _grads(y.sum(), [bn.weight], None)
    assert launch.LAUNCHES["replay"] == before and dgamma.abs().sum() > 0


@pytest.mark.parametrize("bias, wants, channels_last, grad_channels_last", [
    (True, "x,w,b", False, False), (False, "x,w", True, True), (True, "x", False, True), (True, "w,b", True, False),
    (True, "b", False, False)])
def test_training_calls_are_one_node_of_replays(gpu_host_path, monkeypatch, bias, wants, channels_last,
                                                grad_channels_last):
    """Conv2d training calls (groups 2, stride 2) as one C++ autograd node whose forward, dgrad and wgrad are
    replays (fastconv._C._triton_conv2d_train): outputs and every wanted gradient (an input, weight or bias that
    does not need one gets none) equal, bit for bit, the op's Python autograd path on the same launches, for NCHW
    and channels_last inputs and output gradients, step after step; the repeats replay all three launches."""
    _needs_replay()
    from fastconv import functional

    gen = generator("gpu-host-train-node", bias, wants, channels_last, grad_channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    conv = fastconv.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=bias).to(memory_format=fmt)
    conv.weight.requires_grad_("w" in wants)
    if bias:
        conv.bias.requires_grad_("b" in wants)

    def step(x, g, node: bool):
        with monkeypatch.context() as m:
            if not node:
                m.setattr(functional, "_trained", lambda *args: None)  # the op's Python autograd Function
            xi = x.clone().requires_grad_("x" in wants)
            y = conv(xi)
            params = [t for t in (xi, conv.weight, conv.bias) if t is not None and t.requires_grad]
            return [y, *torch.autograd.grad(y, params, g.to(memory_format=torch.channels_last)
                                            if grad_channels_last else g)]

    for i in range(3):
        x = randn((2, 4, 9, 7), torch.float32, "cpu", gen).to(memory_format=fmt)
        g = randn((2, 6, 5, 4), torch.float32, "cpu", gen)
        start = len(gpu_host_path)
        ours = step(x, g, node=True)
        replays = [name for name, _, _ in gpu_host_path[start:] if name.startswith("replay:")]
        want = step(x, g, node=False)
        assert len(ours) == len(want) == 1 + len(wants.split(","))
        for j, (a, b) in enumerate(zip(ours, want)):
            assert torch.equal(a, b) and a.stride() == b.stride(), (i, j)
        assert_close(ours[0], F.conv2d(x.double(), conv.weight.double(), conv.bias.double() if bias else None, 2, 1,
                                       1, 2), torch.float32, f"y, step {i}")
        if i:  # learned in the first step
            want_launches = 1 + ("x" in wants) + ("w" in wants or "b" in wants)
            assert len(replays) == want_launches, replays


def test_training_node_with_a_stand_in_trainer():
    """fastconv._C._triton_conv2d_train with a stand-in trainer: the node calls fwd / dgrad / wgrad / wgrad_bias with
    the tensors its backward mirrors (the output gradient cast to x's dtype and copied channels_last once when both
    dgrad and wgrad read an NCHW one), returns their results as the gradients, and passes a trainer's Python
    exception on as itself, from forward and from backward."""
    _needs_replay()
    import fastconv._C as ext

    calls = []

    class Trainer:
        def fwd(self, x, w, b=None):
            calls.append(("fwd", x.stride(), b is not None))
            return (F.conv2d(x, w, b, padding=1),)

        def dgrad(self, g, w):
            calls.append(("dgrad", g.dtype, g.is_contiguous(memory_format=torch.channels_last)))
            return (torch.full((2, 3, 5, 5), 2.0),)

        def wgrad(self, g, x, w):
            calls.append(("wgrad", g.is_contiguous(memory_format=torch.channels_last)))
            return (torch.full(w.shape, 3.0),)

        def wgrad_bias(self, g, x, w):
            return (torch.full(w.shape, 3.0), torch.full((4,), 4.0))

    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    y = ext._triton_conv2d_train(x, w, b, Trainer())
    assert torch.allclose(y, F.conv2d(x, w, b, padding=1)) and y.requires_grad
    dx, dw, db = torch.autograd.grad(y, [x, w, b], torch.randn(2, 4, 5, 5, dtype=torch.float64).float())
    assert torch.equal(dx, torch.full_like(dx, 2.0)) and torch.equal(dw, torch.full_like(dw, 3.0))
    assert torch.equal(db, torch.full_like(db, 4.0))
    assert calls[:2] == [("fwd", x.stride(), True), ("dgrad", torch.float32, True)]  # NCHW grad: one CL copy
    calls.clear()
    y = ext._triton_conv2d_train(x, w.detach(), None, Trainer())
    (dx,) = torch.autograd.grad(y, [x], torch.randn(2, 4, 5, 5))
    assert [c[0] for c in calls] == ["fwd", "dgrad"] and calls[1][2] is False  # dgrad alone reads it as it is

    class Failing(Trainer):
        def dgrad(self, g, w):
            raise ValueError("stand-in dgrad failed")

    y = ext._triton_conv2d_train(x, w, None, Failing())
    with pytest.raises(ValueError, match="stand-in dgrad failed"):
        torch.autograd.grad(y, [x], torch.randn(2, 4, 5, 5))

    class Bad(Trainer):
        def fwd(self, x, w, b=None):
            return F.conv2d(x, w, b, padding=1)  # not a tuple

    with pytest.raises(RuntimeError, match="must return a tuple of tensors"):
        ext._triton_conv2d_train(x, w, None, Bad())


def test_training_node_with_an_expanded_output_gradient(gpu_host_path, monkeypatch):
    """y.sum()'s backward hands the conv a stride-0 (expanded) gradient: the node's replays read it as the Python
    path does (dx, dw, db bit for bit, with only dx wanted as well as with all three), step after step."""
    _needs_replay()
    from fastconv import functional

    gen = generator("gpu-host-train-expanded")
    conv = fastconv.Conv2d(3, 4, 3, padding=1)
    for wants_w in (True, False, True):
        conv.weight.requires_grad_(wants_w)
        conv.bias.requires_grad_(wants_w)
        x = randn((2, 3, 6, 5), torch.float32, "cpu", gen)
        results = []
        for node in (True, False):
            with monkeypatch.context() as m:
                if not node:
                    m.setattr(functional, "_trained", lambda *args: None)
                xi = x.clone().requires_grad_()
                params = [xi] + ([conv.weight, conv.bias] if wants_w else [])
                results.append(torch.autograd.grad(conv(xi).sum(), params))
        for a, b in zip(*results):
            assert torch.equal(a, b) and a.stride() == b.stride()


@pytest.mark.parametrize("pytorch_write", [False, True])
def test_replay_never_learns_an_output_a_pytorch_op_also_wrote(gpu_host_path, pytorch_write):
    """A Replay learns a launch only when the launch alone writes its outputs: one zeroed by PyTorch first (a
    version counter above 0) keeps the call on its Python path (a replay would leave that write out)."""
    _needs_replay()
    from fastconv.triton import conv2d as tconv

    gen = generator("gpu-host-replay-written", pytorch_write)
    x = randn((1, 3, 5, 5), torch.float32, "cpu", gen).to(memory_format=torch.channels_last)
    w = randn((4, 3, 3, 3), torch.float32, "cpu", gen).to(memory_format=torch.channels_last)

    def compute(x, w):
        y = torch.empty((1, 4, 5, 5))
        if pytorch_write:
            y.zero_()
        tconv.conv2d_forward(x, w, None, (1, 1), (1, 1, 1, 1), (1, 1), 1, out=y)
        return (y,), (x, w)

    r = replay.Replay(compute)
    for _ in range(2):
        assert_close(r(x, w), F.conv2d(x.double(), w.double(), padding=1), torch.float32, "y")
    assert (r.entry is None) == pytorch_write


def test_replay_never_learns_an_output_a_pytorch_op_made(gpu_host_path):
    """An output that a PyTorch op made (here y * 2 next to the launch's y) is no launch's: a replay would return it
    unwritten, so such a call stays on its Python path; a call of two launches, the second reading the first's
    output, is learned and replayed (the buffer between them allocated once per replay)."""
    _needs_replay()
    from fastconv.triton import conv2d as tconv
    from fastconv.triton._common import noted

    gen = generator("gpu-host-replay-made")
    x = randn((1, 3, 5, 5), torch.float32, "cpu", gen).to(memory_format=torch.channels_last)
    w = randn((4, 3, 3, 3), torch.float32, "cpu", gen).to(memory_format=torch.channels_last)
    w2 = randn((2, 4, 1, 1), torch.float32, "cpu", gen).to(memory_format=torch.channels_last)

    def made(x, w):
        y = torch.empty((1, 4, 5, 5)).to(memory_format=torch.channels_last)
        tconv.conv2d_forward(x, w, None, (1, 1), (1, 1, 1, 1), (1, 1), 1, out=y)
        return (y, y * 2), (x, w)

    def two(x, w, w2):
        y = noted("scratch", torch.empty((1, 4, 5, 5), memory_format=torch.channels_last))
        tconv.conv2d_forward(x, w, None, (1, 1), (1, 1, 1, 1), (1, 1), 1, out=y)
        out = torch.empty((1, 2, 5, 5)).to(memory_format=torch.channels_last)
        tconv.conv2d_forward(y, w2, None, (1, 1), (0, 0, 0, 0), (1, 1), 1, out=out)
        return (out,), (x, w, w2)

    r_made, r_two = replay.Replay(made, single=False), replay.Replay(two)
    want = F.conv2d(x.double(), w.double(), padding=1)
    for _ in range(2):
        y, y2 = r_made(x, w)
        assert_close(y2, 2 * want, torch.float32, "y * 2")
        assert_close(r_two(x, w, w2), F.conv2d(want, w2.double()), torch.float32, "two launches")
    assert r_made.entry is None and r_two.entry is not None and len(r_two.entry[0]) == 2


def test_eval_after_training_steps_reads_the_new_running_statistics(gpu_host_path):
    """Training steps update the running statistics inside Triton kernels (the finalize's last pass: a fused block,
    a chain of blocks, a residual block); each op bumps their version counters as the dispatcher would, so the eval
    fold kept from an earlier eval call (ops.conv_bn_act.eval_fold) is made again: eval outputs after each step
    equal the nn model's in float64 with the same state."""
    _needs_replay()
    gen = generator("gpu-host-train-then-eval")

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(5, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5)
            self.conv2, self.bn2 = nn.Conv2d(5, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5)

        def forward(self, x):
            return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + x)

    def build():
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), Residual())

    torch.manual_seed(0)
    plain = build()
    model = fastconv.convert(build())
    model.load_state_dict(plain.state_dict())
    ref = build().double()
    x = randn((2, 3, 8, 6), torch.float32, "cpu", gen)
    for step in range(3):
        model.eval()
        with torch.no_grad():
            for _ in range(2):  # the second call reuses the fold and replays the convs
                y = model(x)
        ref.load_state_dict(model.state_dict())
        with torch.no_grad():
            want = ref.eval()(x.double())
        assert_close(y, want, torch.float32, f"eval after {step} training steps")
        model.train()
        xt = randn((4, 3, 8, 6), torch.float32, "cpu", gen).requires_grad_()
        model(xt).square().sum().backward()


def _node_and_python(gpu_host_path, monkeypatch, run) -> dict:
    """run(path) through the fused block's training node ("node"), then through the op's Python autograd path
    ("python": the node's entry switched off): {path: (what run returned, the launches it made)}."""
    from fastconv.ops import conv_bn_act as cba_ops

    out = {}
    for path in ("node", "python"):
        with monkeypatch.context() as m:
            if path == "python":
                m.setattr(cba_ops, "triton_train_eager", lambda *args: None)
            start = len(gpu_host_path)
            result = run(path)
            out[path] = (result, gpu_host_path[start:])
    return out


def _all_replayed(launches) -> bool:
    return bool(launches) and _replays(launches) == list(launches)


# fused block cases: (bias, affine, residual, activation, momentum (None: a 0-dim tensor factor), running statistics,
# wanted gradients (x, w, b, g: bn weight, beta: bn bias, r: residual), channels_last)
BLOCK_CASES = [
    (True, True, False, "relu", 0.1, True, "x,w,b,g,beta", False),
    (False, True, True, "relu", None, True, "x,w,g,beta,r", True),
    (True, False, True, "identity", 0.1, False, "w,b,r", False),
    (False, True, False, "silu", 0.3, True, "x", True),
    (True, True, True, "relu", 0.1, True, "g", False),
]


@pytest.mark.parametrize("bias, affine, residual, activation, momentum, running, wants, channels_last", BLOCK_CASES)
def test_fused_training_calls_are_one_node_of_replays(gpu_host_path, monkeypatch, bias, affine, residual, activation,
                                                      momentum, running, wants, channels_last):
    """Fused conv + BatchNorm + activation training calls (stride 2) as one C++ autograd node whose forward and
    backward are a replay each (fastconv._C._triton_conv_bn_act_train): y, every wanted gradient (a tensor that
    does not need one gets none), the running statistics and num_batches_tracked equal, bit for bit, those of the
    op's Python autograd path on the same launches, step after step, for NCHW and channels_last inputs; the
    repeats replay every launch the Python path makes."""
    _needs_replay()
    gen = generator("gpu-host-block-node", bias, affine, residual, activation, momentum, running, wants)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    params = {
        "w": randn((6, 4, 3, 3), torch.float32, "cpu", gen).to(memory_format=fmt),
        "b": randn((6,), torch.float32, "cpu", gen) if bias else None,
        "g": randn((6,), torch.float32, "cpu", gen) if affine else None,
        "beta": randn((6,), torch.float32, "cpu", gen) if affine else None,
    }
    for name, t in params.items():
        if t is not None:
            t.requires_grad_(name in wants)
    # each path its own copy of the same running statistics
    initial = (randn((6,), torch.float32, "cpu", gen), randn((6,), torch.float32, "cpu", gen).abs() + 0.5,
               torch.tensor(3, dtype=torch.int64))
    stats = {path: tuple(t.clone() for t in initial) if running else (None, None, None)
             for path in ("node", "python")}

    for i in range(3):
        x = randn((3, 4, 9, 7), torch.float32, "cpu", gen).to(memory_format=fmt)
        r = randn((3, 6, 5, 4), torch.float32, "cpu", gen)
        g = randn((3, 6, 5, 4), torch.float32, "cpu", gen)

        def step(path):
            xi = x.clone().requires_grad_("x" in wants)
            ri = r.clone().requires_grad_("r" in wants) if residual else None
            rm, rv, nbt = stats[path]
            mom = momentum
            if momentum is None and running:  # momentum=None: nn counts first, then reads 1 / num_batches_tracked
                nbt.add_(1)
                mom = 1.0 / nbt
            y = fastconv.functional.conv_bn_act(
                xi, params["w"], params["b"], params["g"], params["beta"], rm, rv, stride=2, padding=1,
                training=True, momentum=mom if mom is not None else 0.1, eps=1e-3, activation=activation,
                residual=ri, num_batches_tracked=nbt)
            needing = [t for t in (xi, params["w"], params["b"], params["g"], params["beta"], ri)
                       if t is not None and t.requires_grad]
            return [y, *torch.autograd.grad(y, needing, g)]

        both = _node_and_python(gpu_host_path, monkeypatch, step)
        (ours, node_launches), (want, python_launches) = both["node"], both["python"]
        assert len(ours) == len(want) == 1 + len(wants.split(","))
        for j, (a, b) in enumerate(zip(ours, want)):
            assert torch.equal(a, b) and a.stride() == b.stride(), (i, j)
        for a, b in zip(stats["node"], stats["python"]):
            assert (a is None and b is None) or torch.equal(a, b), i
        if i:  # learned in the first step: the node's launches are the Python path's, replayed
            assert len(node_launches) == len(python_launches) >= 5, node_launches
            assert all(_same_launch(p, n) and n[0].startswith("replay:")
                       for p, n in zip(python_launches, node_launches)), node_launches


def test_fused_node_chain_rebuilds_its_input(gpu_host_path, monkeypatch):
    """Two fused blocks in a row (the second block's input is the first block's output, so its node keeps the
    producer's tensors instead and rebuilds x in its backward replay): outputs, gradients and running statistics
    equal the Python path's bit for bit, step after step, and match the nn model in float64."""
    _needs_replay()
    gen = generator("gpu-host-block-chain")
    torch.manual_seed(0)

    def build():
        return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
                             nn.Conv2d(5, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())

    plain = build()
    blocks = {}
    for path in ("node", "python"):
        b1 = fastconv.ConvBNReLU2d(3, 5, 3, padding=1)
        b2 = fastconv.ConvBNReLU2d(5, 4, 3, padding=1, bias=False)
        for b, (conv, bn) in ((b1, (plain[0], plain[1])), (b2, (plain[3], plain[4]))):
            b.conv.load_state_dict(conv.state_dict())
            b.bn.load_state_dict(bn.state_dict())
        blocks[path] = nn.Sequential(b1, b2)
    ref = build().double()
    ref.load_state_dict(plain.state_dict())
    for i in range(3):
        x = randn((2, 3, 7, 6), torch.float32, "cpu", gen)
        g = randn((2, 4, 7, 6), torch.float32, "cpu", gen)
        def step(path):
            xi = x.clone().requires_grad_()
            y = blocks[path](xi)
            return [y, *_grads(y, [xi, *blocks[path].parameters()], g)]

        both = _node_and_python(gpu_host_path, monkeypatch, step)
        (ours, node_launches), (theirs, _) = both["node"], both["python"]
        if i:  # learned in the first step
            assert _all_replayed(node_launches), node_launches
        for j, (a, b) in enumerate(zip(ours, theirs)):
            assert torch.equal(a, b), (i, j)
        xd = x.double().requires_grad_()
        yd = ref(xd)
        want = [yd, *_grads(yd, [xd, *ref.parameters()], g.double())]
        for j, (a, e) in enumerate(zip(ours, want)):
            assert_close(a, e, torch.float32, f"result {j}, step {i}")
        for a, b in zip(blocks["node"].state_dict().values(), blocks["python"].state_dict().values()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_node_with_an_expanded_output_gradient(gpu_host_path, monkeypatch, dtype):
    """y.sum()'s backward hands the block a stride-0 (expanded) gradient: the node's backward replay reads it as the
    Python path does (every gradient bit for bit), step after step, in fp32 and in fp16 (a half model: its BatchNorm
    parameters and statistics fp16 too)."""
    _needs_replay()
    gen = generator("gpu-host-block-expanded", dtype)
    blocks = {path: fastconv.ConvBNReLU2d(3, 4, 3, padding=1).to(dtype) for path in ("node", "python")}
    blocks["python"].load_state_dict(blocks["node"].state_dict())
    for i in range(3):
        x = randn((2, 3, 6, 5), dtype, "cpu", gen)
        def step(path):
            xi = x.clone().requires_grad_()
            return _grads(blocks[path](xi).sum(), [xi, *blocks[path].parameters()], None)

        both = _node_and_python(gpu_host_path, monkeypatch, step)
        if i:  # learned in the first step
            assert _all_replayed(both["node"][1]), both["node"][1]
        for j, (a, b) in enumerate(zip(both["node"][0], both["python"][0])):
            assert a.dtype == dtype and torch.equal(a, b) and a.stride() == b.stride(), (i, j)
        for a, b in zip(blocks["node"].state_dict().values(), blocks["python"].state_dict().values()):
            assert torch.equal(a, b), i


def test_fused_node_refuses_bad_running_statistics_after_learning(gpu_host_path):
    """The training node checks the running statistics as the op does (F.batch_norm's words) in its forward's
    compute, which a call unlike the learned one reaches: after a learned call, a running_mean of the wrong size
    raises before anything is written, and the next good call is replayed again."""
    _needs_replay()
    gen = generator("gpu-host-block-bad-running")
    w, gamma, beta = (randn(shape, torch.float32, "cpu", gen) for shape in ((4, 3, 3, 3), (4,), (4,)))
    rm, rv, nbt = torch.zeros(4), torch.ones(4), torch.tensor(0, dtype=torch.int64)

    def call(running_mean, running_var):
        x = randn((2, 3, 6, 5), torch.float32, "cpu", gen).requires_grad_()
        return fastconv.functional.conv_bn_act(x, w, None, gamma, beta, running_mean, running_var, padding=1,
                                               training=True, num_batches_tracked=nbt)

    call(rm, rv)
    call(rm, rv)
    before = (rm.clone(), rv.clone(), int(nbt))
    with pytest.raises(RuntimeError, match="running_mean should contain 4 elements not 3"):
        call(torch.zeros(3), rv)
    with pytest.raises(RuntimeError, match="running_var should contain 4 elements not 5"):
        call(rm, torch.ones(5))
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1]) and int(nbt) == before[2]
    start = len(gpu_host_path)
    call(rm, rv)
    assert int(nbt) == before[2] + 1 and _all_replayed(gpu_host_path[start:])


def test_fused_node_leaves_pytorch_updates_of_running_statistics_unlearned(gpu_host_path):
    """Running statistics the finalize kernel cannot index (a strided view) are updated by PyTorch ops: the forward's
    replay never learns such a call (a replay would leave the update out), and every call stays correct."""
    _needs_replay()
    gen = generator("gpu-host-block-strided-running")
    block = fastconv.ConvBNReLU2d(3, 4, 3, padding=1)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).double()
    ref[0].load_state_dict(block.conv.state_dict())
    storage = torch.zeros(8), torch.ones(8)
    block.bn.running_mean, block.bn.running_var = storage[0][::2], storage[1][::2]
    for i in range(3):
        x = randn((2, 3, 6, 5), torch.float32, "cpu", gen)
        assert_close(block(x), ref(x.double()), torch.float32, f"y, step {i}")
        assert_close(block.bn.running_mean, ref[1].running_mean, torch.float32, f"running_mean, step {i}")
        assert_close(block.bn.running_var, ref[1].running_var, torch.float32, f"running_var, step {i}")
    trainers = [t for found in fastconv.functional._GEOMETRY.values() if found[3] for k, t in found[3].items()
                if isinstance(k, tuple) and k[0] == "block"]
    assert trainers and all(t[1].fwd.entry is None for t in trainers)


def test_replay_never_learns_an_autotuning_call(gpu_host_path):
    """A call whose launch autotuned (its candidates' launches are captured too) is not learned."""
    _needs_replay()
    token = launch._capture.set([])
    try:
        launch._mark_tuning()
        captured = launch._capture.get()
    finally:
        launch._capture.reset(token)
    x = torch.randn(2, 3)
    assert captured == [None] and replay.replay_entry(captured, (x,), (x,), (torch.empty(2),)) is None


def test_fused_training_node_with_a_stand_in_trainer():
    """fastconv._C._triton_conv_bn_act_train with a stand-in trainer: the node hands fwd the given tensors and bwd the
    flags and saved tensors its header documents, returns bwd's results as the wanted gradients, bumps the running
    statistics' version counters, passes a trainer's Python exception on as itself and refuses wrong arguments."""
    _needs_replay()
    import fastconv._C as ext

    calls = []

    class Trainer:
        def fwd(self, *tensors):
            calls.append(("fwd", len(tensors)))
            x, w = tensors[:2]
            z = F.conv2d(x, w, padding=1)
            return (z.relu(), z.detach(), torch.zeros(4), torch.ones(4))

        def bwd(self, flags, p_eps, p_act, *tensors):
            calls.append(("bwd", flags, p_eps, p_act, len(tensors)))
            grads = (torch.full((2, 3, 5, 5), 2.0), torch.full((4, 3, 3, 3), 3.0), torch.full((4,), 4.0),
                     torch.full((4,), 5.0), torch.full((4,), 6.0), torch.full((2, 4, 5, 5), 7.0))
            return tuple(t for t, want in zip(grads, flags[:6]) if want)

    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    gamma, beta = torch.randn(4, requires_grad=True), torch.randn(4)
    rm, rv = torch.zeros(4), torch.ones(4)
    versions = rm._version, rv._version
    none6 = (None,) * 6
    y, z, mean, var = ext._triton_conv_bn_act_train(x, w, None, gamma, beta, None, rm, rv, None, None, True, *none6,
                                                    0.0, "identity", Trainer())
    assert y.requires_grad and not z.requires_grad and (rm._version, rv._version) != versions
    dx, dgamma = torch.autograd.grad(y, [x, gamma], torch.randn(2, 4, 5, 5))
    assert torch.equal(dx, torch.full_like(dx, 2.0)) and torch.equal(dgamma, torch.full_like(dgamma, 5.0))
    # fwd: x, w, bn_weight, bn_bias, running_mean, running_var; bwd: grad, z, mean, var, bn_weight, bn_bias, w, x
    assert calls == [("fwd", 6), ("bwd", (True, False, False, True, False, False, True, True, False, False, False,
                                          False, False), 0.0, "identity", 8)]

    class Failing(Trainer):
        def bwd(self, *args):
            raise ValueError("stand-in bwd failed")

    y = ext._triton_conv_bn_act_train(x, w, None, None, None, None, None, None, None, None, False, *none6, 0.0,
                                      "identity", Failing())[0]
    with pytest.raises(ValueError, match="stand-in bwd failed"):
        torch.autograd.grad(y, [x], torch.randn(2, 4, 5, 5))
    with pytest.raises(TypeError, match="_triton_conv_bn_act_train"):
        ext._triton_conv_bn_act_train(x, w, Trainer())
