"""fastconv.triton.launch's direct launch: after a key's first launch through Triton's `kernel[grid](...)`, the
compiled kernel is called directly (launch._Direct). On CPU, against Triton's own binder (the generated function
JITFunction.run binds and specializes with, for an sm_90 target): for every launch of a training step, a
max-pool and an eval forward, the arguments handed to the compiled kernel are exactly Triton's bound arguments,
the options Triton's, and the key never joins two launches Triton would specialize differently; the launch path
itself on a stand-in compiled kernel. On a GPU: direct launches happen and equal Triton's path.
"""
from __future__ import annotations

import contextlib
import inspect

import pytest
import torch
import triton

import fastconv
from bench._launch_binding import triton_binder, triton_view
from fastconv import _backend, _ext
from fastconv.triton import launch

from .helpers import assert_close, generator, randn

needs_ext = pytest.mark.skipif(not _ext.load(), reason="the direct launch keys come from the C++ extension")


def _captured_launches():
    """(kernel, grid, args, kwargs) of every Triton launch of a fused conv+BN+ReLU training step (channels_last,
    fp16), a plain conv's forward and backward with a bias, a max-pool's forward and backward and a fused
    block's eval forward; the launches are captured, not run. They take the GPU's path (the interpreter's
    check off, the heuristic tile: FASTCONV_AUTOTUNE=0), where a tuned launch's grid and keyword arguments come
    from its launch plan (TunedKernel's `fixed`)."""
    calls = []

    def capture(kernel, grid, args, kwargs, device):
        calls.append((triton_view(kernel), tuple(grid), args, dict(kwargs)))

    g = generator()
    with pytest.MonkeyPatch.context() as mp, fastconv.backend("triton"), _backend.planning_mode():
        mp.setattr(launch, "launch", capture)
        mp.setattr(launch, "interpreting", lambda: False)
        mp.setenv("FASTCONV_AUTOTUNE", "0")
        block = fastconv.ConvBNReLU2d(5, 6, 3, padding=1).to(memory_format=torch.channels_last)
        x = randn((2, 5, 7, 9), torch.float32, "cpu", g).to(memory_format=torch.channels_last).requires_grad_()
        block(x).sum().backward()
        conv = fastconv.Conv2d(3, 4, 3, stride=2, bias=True).half()
        xh = randn((1, 3, 9, 8), torch.float16, "cpu", g).requires_grad_()
        conv(xh).float().sum().backward()
        pool = fastconv.MaxPool2d(3, stride=2, padding=1)
        xp = randn((2, 3, 7, 7), torch.float32, "cpu", g).requires_grad_()
        pool(xp).sum().backward()
        block.eval()
        with torch.no_grad():
            block(x)
    assert len({c[0].fn for c in calls}) >= 6, "expected the launches of at least six different kernels"
    return calls


@pytest.fixture(scope="module")
def launches():
    return _captured_launches()


def _triton_binding(kernel, args, kwargs):
    """Triton's own (bound arguments, specialization key, options) for this call on an sm_90 target."""
    bound, spec, options = triton_binder(kernel)(*args, **kwargs)
    return list(bound.values()), (tuple(spec), str(options)), options


def _ours(kernel, args, kwargs):
    """(bound arguments, option values, key) of fastconv's direct launch for this call on device 0."""
    keyed = launch._Direct(kernel).key(args, kwargs, 0, launch._launch_key_fn())
    assert keyed is not None, kernel.fn.__name__
    key, full = keyed
    return full, key[2 + len(full):], key


def test_binding_table_is_tritons(launches):
    """The binding table a direct launch keeps per call shape (parameters after the positional ones, their
    defaults, the option names) gives exactly the bound arguments and options of this Triton version's binder
    (no extension needed: this runs on the oldest stack's Triton too)."""
    for kernel, _, args, kwargs in launches:
        bound, _, options = _triton_binding(kernel, args, kwargs)
        tail, defaults, option_names = launch._Direct(kernel)._bind(len(args), tuple(kwargs))
        full = args + tuple(kwargs[n] if n in kwargs else defaults[n] for n in tail)
        name = kernel.fn.__name__
        assert len(full) == len(bound) and all(a is b for a, b in zip(full, bound)), name
        assert option_names == tuple(options), name


@needs_ext
def test_direct_launch_binds_like_triton(launches):
    for kernel, _, args, kwargs in launches:
        bound, _, options = _triton_binding(kernel, args, kwargs)
        full, opts, key = _ours(kernel, args, kwargs)
        name = kernel.fn.__name__
        assert len(full) == len(bound), name
        assert all(a is b for a, b in zip(full, bound)), name
        assert len(opts) == len(options), name  # each option value is keyed: == and the same kind
        assert all(type(a) is type(b) and a == b for a, b in zip(opts, options.values())), name
        assert key is not None, name


def _variants(args, kwargs):
    """The call with fresh tensors (same dtype and alignment), and one argument changed at a time the ways
    Triton may specialize on: a tensor misaligned by one element, an int set to 1, 16, 17, 2**33 or turned into
    the equal float, a bool flipped."""
    def fresh(a):
        return torch.empty_like(a) if isinstance(a, torch.Tensor) else a

    base = (tuple(fresh(a) for a in args), {k: fresh(v) for k, v in kwargs.items()})
    out = [("fresh", *base)]
    items = [(i, a) for i, a in enumerate(args)] + [(k, v) for k, v in kwargs.items()]
    for where, a in items:
        if isinstance(a, torch.Tensor):
            shifted = torch.empty(a.numel() + 1, dtype=a.dtype)[1:]
            changes = [shifted] if a.element_size() < 16 else []
        elif isinstance(a, bool):
            changes = [not a]
        elif isinstance(a, int):
            changes = [1, 16, 17, 2**33, float(a)]
        else:
            changes = []
        for new in changes:
            if isinstance(where, int):
                out.append((f"arg{where}={type(new).__name__}", args[:where] + (new,) + args[where + 1:], kwargs))
            else:
                out.append((f"{where}={new!r}"[:40], args, {**kwargs, where: new}))
    return out


@needs_ext
def test_direct_launch_key_never_joins_what_triton_specializes_apart(launches):
    """For each launch and each variant: Triton's specialization differs => our key differs; and fresh tensors of
    the same dtype and alignment keep the key (the direct launch is taken again)."""
    checked = 0
    for kernel, _, args, kwargs in launches:
        _, spec0, _ = _triton_binding(kernel, args, kwargs)
        key0 = _ours(kernel, args, kwargs)[2]
        for what, a, kw in _variants(args, kwargs):
            _, spec, _ = _triton_binding(kernel, a, kw)
            key = _ours(kernel, a, kw)[2]
            if what == "fresh":
                assert spec == spec0 and key == key0, kernel.fn.__name__
            elif spec != spec0:
                assert key != key0, f"{kernel.fn.__name__}: {what}"
                checked += 1
    assert checked > 50  # the variants do reach Triton's specialization (alignment, 1, 16)


class _Compiled:
    def __init__(self):
        self.run_calls = []
        self.function, self.packed_metadata = 0xF00, ("metadata",)

    def run(self, *a):
        self.run_calls.append(a)


class _StandIn:
    """A real kernel's parameters; `[grid](...)` (Triton's path) records and returns a stand-in compiled kernel."""

    def __init__(self, kernel):
        self.params, self.pre_run_hooks, self.fn = kernel.params, [], kernel.fn
        self.compiled, self.jit_calls = _Compiled(), []

    def __getitem__(self, grid):
        def jit(*args, **kwargs):
            self.jit_calls.append((grid, args, kwargs))
            return self.compiled
        return jit


@contextlib.contextmanager
def _fake_cuda(monkeypatch):
    monkeypatch.setattr(launch, "device_guard", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(launch, "_current_stream", lambda index: 1000 + index)
    yield torch.device("cuda", 1)


@needs_ext
def test_direct_launch_calls_the_compiled_kernel(launches, monkeypatch):
    """First launch of a key: Triton's path; the next with fresh tensors: the compiled kernel's launcher with
    the grid padded to 3, the device's stream, its function and metadata, no launch metadata or hooks, and
    Triton's bound arguments; a misaligned tensor, FASTCONV_DIRECT_LAUNCH=0 or a launch hook: Triton's path."""
    kernel, grid, args, kwargs = next(c for c in launches if any(isinstance(a, torch.Tensor) and a.element_size() < 16
                                                                  for a in c[2]))
    k = _StandIn(kernel)
    before = dict(launch.LAUNCHES)
    with _fake_cuda(monkeypatch) as dev:
        launch.launch(k, grid, args, kwargs, dev)
        assert len(k.jit_calls) == 1 and not k.compiled.run_calls
        (fresh, a2, kw2), = [v for v in _variants(args, kwargs) if v[0] == "fresh"]
        launch.launch(k, grid, a2, kw2, dev)
        assert len(k.jit_calls) == 1 and len(k.compiled.run_calls) == 1
        bound, _, _ = _triton_binding(kernel, a2, kw2)
        call = k.compiled.run_calls[0]
        g = tuple(grid) + (1,) * (3 - len(grid))
        assert call[:9] == (*g, 1001, 0xF00, ("metadata",), None, None, None)
        assert len(call) == 9 + len(bound) and all(x is y for x, y in zip(call[9:], bound))
        assert launch.LAUNCHES["direct"] == before["direct"] + 1
        assert launch.LAUNCHES["triton"] == before["triton"] + 1

        i = next(i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.element_size() < 16)
        shifted = torch.empty(args[i].numel() + 1, dtype=args[i].dtype)[1:]
        launch.launch(k, grid, args[:i] + (shifted,) + args[i + 1:], kwargs, dev)
        assert len(k.jit_calls) == 2, "a misaligned pointer is a new key: Triton's path"

        monkeypatch.setenv("FASTCONV_DIRECT_LAUNCH", "0")
        launch.launch(k, grid, a2, kw2, dev)
        assert len(k.jit_calls) == 3 and len(k.compiled.run_calls) == 1
        monkeypatch.delenv("FASTCONV_DIRECT_LAUNCH")

        hook = lambda metadata: None  # noqa: E731
        triton.knobs.runtime.launch_enter_hook.add(hook)
        try:
            launch.launch(k, grid, a2, kw2, dev)
        finally:
            triton.knobs.runtime.launch_enter_hook.remove(hook)
        assert len(k.jit_calls) == 4 and len(k.compiled.run_calls) == 1, "a launch hook: Triton's path"
        launch.launch(k, grid, a2, kw2, dev)
        assert len(k.compiled.run_calls) == 2


@needs_ext
def test_unkeyable_and_unbindable_calls_take_tritons_path_every_time(launches, monkeypatch):
    """A call missing a parameter (Triton raises for it), or with an argument the key cannot hold (a list), goes
    through Triton's path on every launch; past DIRECT_CAP keys a kernel's keys are dropped and relearned."""
    kernel, grid, args, kwargs = launches[0]
    with _fake_cuda(monkeypatch) as dev:
        k = _StandIn(kernel)
        required = {p.name for p in kernel.params if p.default is inspect.Parameter.empty}
        missing = next(n for n in kwargs if n in required)  # a keyword parameter without a default, left out
        short = {n: v for n, v in kwargs.items() if n != missing}
        for _ in range(2):
            launch.launch(k, grid, args, short, dev)
        listed = (args[0], [1, 2]) + args[2:]
        for _ in range(2):
            launch.launch(k, grid, listed, kwargs, dev)
        assert len(k.jit_calls) == 4 and not k.compiled.run_calls

        monkeypatch.setattr(launch, "DIRECT_CAP", 2)
        k = _StandIn(kernel)
        for i in range(3):  # three keys: the third finds the table full, clears it and keeps only itself
            launch.launch(k, grid, args, {**kwargs, "num_warps": 1 << i}, dev)
        assert len(launch._DIRECT[id(k)].compiled) == 1
        launch.launch(k, grid, args, {**kwargs, "num_warps": 4}, dev)
        launch.launch(k, grid, args, {**kwargs, "num_warps": 1}, dev)
        assert len(k.compiled.run_calls) == 1 and len(k.jit_calls) == 4


@needs_ext
def test_cpu_tensors_and_stand_ins_take_tritons_path(launches, monkeypatch):
    """The interpreter's launches (CPU tensors) and kernels without Triton's parameters never go direct."""
    kernel, grid, args, kwargs = launches[0]
    k = _StandIn(kernel)
    for _ in range(2):
        launch.launch(k, grid, args, kwargs, torch.device("cpu"))
    assert len(k.jit_calls) == 2 and not k.compiled.run_calls

    class Bare:
        calls = 0

        def __getitem__(self, grid):
            def jit(*a, **kw):
                Bare.calls += 1
            return jit

    with _fake_cuda(monkeypatch) as dev:
        for _ in range(2):
            launch.launch(Bare(), grid, args, kwargs, dev)
    assert Bare.calls == 2


def _key_of(*values):
    """The key entries fastconv._C._triton_launch_key gives a call of positional `values` alone."""
    found = launch._launch_key_fn()(values, {}, {(len(values), ()): ((), {}, ())}, 0)
    return None if found is None else found[0][2:]


@needs_ext
def test_launch_key_unkeyable_arguments():
    """Objects other than tensors, ints, floats, bools, None, str and triton dtypes (tensor-like objects,
    containers, torch dtypes) make a launch unkeyable (Triton's path); each kind of argument only equals its own
    kind; a triton dtype is keyed by identity."""
    class PointerLike:
        def data_ptr(self):
            return 0

    assert _key_of(PointerLike()) is None and _key_of([1]) is None and _key_of((1, 2)) is None
    assert _key_of(torch.float32) is None  # not a registered constant type
    t = torch.empty(4)
    kinds = [t, 1, 1.0, True, None, "1", triton.language.float32]
    keys = [_key_of(k) for k in kinds]
    assert len(set(keys)) == len(kinds)
    assert _key_of(torch.empty(8)) == keys[0] and _key_of(t[1:]) != keys[0] and _key_of(t.double()) != keys[0]
    assert _key_of(2.5) == keys[2] and _key_of(False) != keys[3]
    assert _key_of(triton.language.float32) == keys[6] and _key_of(triton.language.float16) != keys[6]
    assert launch._launch_key_fn()((1,), {}, {}, 0) is False  # an unbound call shape
    assert launch._launch_key_fn()((1,), {}, {(1, ()): None}, 0) is None  # a call shape Triton binds


@needs_ext
@pytest.mark.gpu
def test_direct_launches_equal_tritons_path_on_gpu(monkeypatch):
    """A fused block's training steps on the GPU: launches after the first go direct, and every output, gradient
    and running statistic equals the same steps with FASTCONV_DIRECT_LAUNCH=0."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: direct launches call compiled kernels")
    torch.manual_seed(0)
    block = fastconv.ConvBNReLU2d(8, 16, 3, padding=1).cuda()
    xs = [torch.randn(4, 8, 12, 10, device="cuda") for _ in range(3)]

    def steps(direct: bool):
        monkeypatch.setenv("FASTCONV_DIRECT_LAUNCH", "1" if direct else "0")
        b = block.__class__(8, 16, 3, padding=1).cuda()
        b.load_state_dict(block.state_dict())
        outs = []
        with fastconv.backend("triton"):
            for x in xs:
                x = x.clone().requires_grad_()
                y = b(x)
                y.square().sum().backward()
                outs += [y.detach(), x.grad, b.conv.weight.grad.clone()]
        torch.cuda.synchronize()
        return outs + [b.bn.running_mean, b.bn.running_var]

    before = launch.LAUNCHES["direct"]
    direct = steps(True)
    assert launch.LAUNCHES["direct"] > before
    for i, (a, b) in enumerate(zip(direct, steps(False))):
        assert_close(a, b, torch.float32, f"output {i}")


@needs_ext
@pytest.mark.gpu
def test_no_grad_replays_equal_the_python_path_on_gpu(monkeypatch):
    """No-grad Conv2d (NCHW and channels_last, with and without a bias) and MaxPool2d calls on the GPU: repeats are
    replayed in C++ (fastconv/triton/replay.py) and equal, bit for bit, the same calls with
    FASTCONV_DIRECT_LAUNCH=0 (Triton's own launch path, no replay); a replay captured in a CUDA graph replays
    equal too."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: replays call compiled kernels")
    torch.manual_seed(0)
    modules = [fastconv.Conv2d(8, 16, 3, padding=1).cuda(), fastconv.Conv2d(8, 8, 3, stride=2, bias=False).cuda(),
               fastconv.MaxPool2d(3, stride=2, padding=1)]
    xs = [torch.randn(4, 8, 12, 10, device="cuda"),
          torch.randn(4, 8, 12, 10, device="cuda").to(memory_format=torch.channels_last)]

    def calls(replay: bool):
        monkeypatch.setenv("FASTCONV_DIRECT_LAUNCH", "1" if replay else "0")
        with fastconv.backend("triton"), torch.no_grad():
            outs = [m(x) for _ in range(3) for m in modules for x in xs]
        torch.cuda.synchronize()
        return outs

    before = launch.LAUNCHES["replay"]
    replayed = calls(True)
    assert launch.LAUNCHES["replay"] - before >= 2 * len(modules) * len(xs)
    for i, (a, b) in enumerate(zip(replayed, calls(False))):
        assert torch.equal(a, b), f"output {i}"
    monkeypatch.setenv("FASTCONV_DIRECT_LAUNCH", "1")
    x, fresh = xs[0].clone(), torch.randn_like(xs[0])
    with fastconv.backend("triton"), torch.no_grad():
        want = modules[1](modules[0](fresh))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            modules[1](modules[0](x))  # warm-up on the capture stream
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = modules[1](modules[0](x))
    x.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)


@needs_ext
@pytest.mark.gpu
def test_training_node_equals_the_python_path_on_gpu(monkeypatch):
    """Conv2d training steps on the GPU (NCHW and channels_last): the C++ node of replays
    (fastconv._C._triton_conv2d_train) gives, bit for bit, the op's Python autograd path's output and gradients,
    and its repeats are replays."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: replays call compiled kernels")
    from fastconv import functional

    torch.manual_seed(0)
    for fmt in (torch.contiguous_format, torch.channels_last):
        conv = fastconv.Conv2d(8, 16, 3, padding=1).cuda().to(memory_format=fmt)
        xs = [torch.randn(4, 8, 12, 10, device="cuda").to(memory_format=fmt) for _ in range(3)]

        def steps(node: bool):
            outs = []
            with monkeypatch.context() as m, fastconv.backend("triton"):
                if not node:
                    m.setattr(functional, "_trained", lambda *args: None)
                for x in xs:
                    x = x.clone().requires_grad_()
                    y = conv(x)
                    outs += [y, *torch.autograd.grad(y, [x, conv.weight, conv.bias], torch.ones_like(y))]
            torch.cuda.synchronize()
            return outs

        before = launch.LAUNCHES["replay"]
        ours = steps(True)
        assert launch.LAUNCHES["replay"] - before >= 2 * 3  # the last two steps: forward, dgrad, wgrad replayed
        for i, (a, b) in enumerate(zip(ours, steps(False))):
            assert torch.equal(a, b), f"{fmt} output {i}"


@needs_ext
@pytest.mark.gpu
def test_fused_training_node_equals_the_python_path_on_gpu(monkeypatch):
    """Fused conv + BatchNorm + ReLU training steps on the GPU (NCHW and channels_last, a chain of two blocks, so the
    second keeps its producer): the C++ node of replays (fastconv._C._triton_conv_bn_act_train) gives, bit for bit,
    the op's Python autograd path's outputs, gradients and running statistics, and its repeats are replays."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: replays call compiled kernels")
    import copy

    from fastconv.ops import conv_bn_act as cba_ops

    torch.manual_seed(0)
    for fmt in (torch.contiguous_format, torch.channels_last):
        model = torch.nn.Sequential(fastconv.ConvBNReLU2d(8, 16, 3, padding=1),
                                    fastconv.ConvBNReLU2d(16, 8, 3, padding=1, bias=False))
        model = model.cuda().to(memory_format=fmt)
        xs = [torch.randn(4, 8, 12, 10, device="cuda").to(memory_format=fmt) for _ in range(3)]

        def steps(node: bool):
            m_ = copy.deepcopy(model)
            outs = []
            with monkeypatch.context() as m, fastconv.backend("triton"):
                if not node:
                    m.setattr(cba_ops, "triton_train_eager", lambda *args: None)
                for x in xs:
                    x = x.clone().requires_grad_()
                    y = m_(x)
                    outs += [y, *torch.autograd.grad(y, [x, *m_.parameters()], torch.ones_like(y))]
            torch.cuda.synchronize()
            return outs + list(m_.state_dict().values())

        before = launch.LAUNCHES["replay"]
        ours = steps(True)
        assert launch.LAUNCHES["replay"] - before >= 2 * 2 * 2  # the last two steps: each block's fwd, bwd replayed
        for i, (a, b) in enumerate(zip(ours, steps(False))):
            assert torch.equal(a, b), f"{fmt} result {i}"
