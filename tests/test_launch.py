"""What the interpreter alone cannot see, made visible on CPU (fastconv.triton.launch):

* autotuning: FASTCONV_INTERPRET_AUTOTUNE=1 runs every tile the GPU autotuner could try on the same arguments
  and buffers before the final launch; each autotuned kernel (conv forward plain and fused, dgrad, split-K
  wgrad, im2col GEMM, the training conv+BN+act block) must still match float64 PyTorch;
* grids and split counts that depend on the GPU's SM count, at several simulated counts;
* the BatchNorm finalize tree over many partial rows;
* the device guard every launch runs under, the tile choice (forced / heuristic / tuned and cached);
* the launch plan: no long serial loop outside GEMM K loops on any benchmarked layer at batch 256.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastconv
from fastconv import launch_plan
from fastconv.functional import conv2d_fused
from fastconv.triton import batch_norm as tbn, configs, launch

from .helpers import assert_close, generator, randn

pytestmark = pytest.mark.usefixtures("triton_backend")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def emulate(monkeypatch):
    """FASTCONV_INTERPRET_AUTOTUNE=1, and a record of every tile launched (tile -> count)."""
    if not launch.interpreting():
        pytest.skip("autotune emulation runs under the Triton interpreter; on a GPU the real autotuner runs")
    monkeypatch.setenv("FASTCONV_INTERPRET_AUTOTUNE", "1")
    tiles: list = []
    real = launch._meta

    def spy(tile, maxnreg=None):
        tiles.append(tuple(tile))
        return real(tile, maxnreg)

    monkeypatch.setattr(launch, "_meta", spy)
    return tiles


def _table_tiles(family, kind, fused):
    return {t[:3] for arch in ("sm_80", "sm_90") for t, _ in configs.tiles(family, arch, kind, fused)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_emulated_autotune_fused_forward(emulate, device, dtype):
    """Plain and fused (bias -> scale/shift, residual, SiLU, NCHW output stored in channel halves) forward."""
    gen = generator("emulate-fwd", dtype)
    x = randn((2, 6, 9, 11), dtype, device, gen)
    w = randn((12, 3, 3, 3), dtype, device, gen, 0.3)
    b, s, t = (randn((12,), dtype, device, gen) for _ in range(3))
    r = randn((2, 12, 5, 6), dtype, device, gen)
    y = conv2d_fused(x, w, b, 2, 1, 1, 2, scale=s, shift=t, residual=r, activation="silu")
    ref = F.silu((F.conv2d(x.double(), w.double(), b.double(), 2, 1, 1, 2) * s.double().view(1, -1, 1, 1)
                  + t.double().view(1, -1, 1, 1)) + r.double())
    assert_close(y, ref, dtype, "fused forward after every tile")
    kind = configs.operand_kind(dtype, "ieee")
    assert {t[:3] for t in emulate} >= _table_tiles("conv2d_fwd", kind, fused=True)


def test_emulated_autotune_dgrad_wgrad(emulate, device):
    """dgrad over stride phases and split-K wgrad with the bias gradient, after every tile of both tables."""
    dtype = torch.float64
    gen = generator("emulate-bwd")
    x = randn((3, 5, 13, 12), dtype, device, gen).requires_grad_()
    w = randn((7, 5, 3, 3), dtype, device, gen, 0.3).requires_grad_()
    b = randn((7,), dtype, device, gen).requires_grad_()
    y = fastconv.functional.conv2d(x, w, b, stride=2, padding=1)
    g = randn(y.shape, dtype, device, gen)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), g)
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = torch.autograd.grad(F.conv2d(xr, wr, br, 2, 1), (xr, wr, br), g.double())
    for got, want, what in zip((gx, gw, gb), ref, ("dx", "dw", "db")):
        assert_close(got, want, dtype, what)
    launched = {t[:3] for t in emulate}
    assert launched >= _table_tiles("conv2d_dgrad", "fp32", False) | _table_tiles("conv2d_wgrad", "fp32", False)


def test_emulated_autotune_im2col(emulate, device):
    dtype = torch.float64
    gen = generator("emulate-im2col")
    x = randn((2, 4, 10, 7), dtype, device, gen)
    w = randn((9, 4, 3, 2), dtype, device, gen)
    y = fastconv.functional.conv2d(x, w, None, 1, 1, algo="im2col")
    assert_close(y, F.conv2d(x.double(), w.double(), None, 1, 1), dtype, "im2col after every tile")
    assert {t[:3] for t in emulate} >= _table_tiles("im2col_gemm", "fp32", fused=True)  # NCHW y: SPLIT_N


@pytest.mark.parametrize("algo,momentum", [("implicit", 0.1), ("im2col", 0.1), ("implicit", None)])
def test_emulated_autotune_training_block(emulate, monkeypatch, device, algo, momentum):
    """The issue's hazard: a 32-row config runs before a larger winner on the same arguments. The winner here
    is the table's largest-BLOCK_M tile, so any statistics row left by an earlier config would be merged. Two
    steps: the running statistics (updated once per step, in the finalize after the tuned conv) must follow
    nn's, with a float momentum and with momentum=None's cumulative average. 19 channels: a partial tile."""
    monkeypatch.setattr(launch, "heuristic_pick", lambda tiles, p, sms: max(tiles, key=lambda t: (t[0], t[1])))
    dtype = torch.float64
    gen = generator("emulate-train", algo, str(momentum))
    ref = nn.Sequential(nn.Conv2d(5, 19, 3, padding=1), nn.BatchNorm2d(19, momentum=momentum), nn.ReLU()).double()
    ours = fastconv.ConvBNReLU2d(5, 19, 3, padding=1, algo=algo, momentum=momentum).double()
    ours.conv.load_state_dict(ref[0].state_dict())
    ours.bn.load_state_dict(ref[1].state_dict())
    ref, ours = ref.to(device), ours.to(device)
    for step in range(2):
        emulate.clear()
        x = randn((3, 5, 11, 9), dtype, device, gen)
        xr = x.clone().requires_grad_()
        x.requires_grad_()
        y, y_ref = ours(x), ref(xr)
        g = randn(y.shape, dtype, device, gen)
        y.backward(g)
        y_ref.backward(g)
        what = f"step {step}"
        assert_close(y, y_ref, dtype, f"{what} y")
        assert_close(ours.bn.running_mean, ref[1].running_mean, torch.float32, f"{what} running_mean")
        assert_close(ours.bn.running_var, ref[1].running_var, torch.float32, f"{what} running_var")
        assert_close(x.grad, xr.grad, dtype, f"{what} dx")
        assert_close(ours.conv.weight.grad, ref[0].weight.grad, dtype, f"{what} dw")
        assert_close(ours.bn.weight.grad, ref[1].weight.grad, dtype, f"{what} dgamma")
        assert len(set(emulate)) > 3
        for p in list(ref.parameters()) + list(ours.parameters()):
            p.grad = None


@pytest.mark.parametrize("sms", [1, 7, 108, 132])
def test_simulated_sm_counts(monkeypatch, device, sms):
    """wgrad's split-K count and the BatchNorm backward's pixel splits follow the SM count; results must not."""
    monkeypatch.setenv("FASTCONV_SM_COUNT", str(sms))
    assert launch.sm_count(torch.device("cpu")) == sms
    dtype = torch.float64
    gen = generator("sms", sms)
    block = fastconv.ConvBNReLU2d(4, 6, 3, padding=1).double().to(device)
    ref = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()).double().to(device)
    ref[0].load_state_dict(block.conv.state_dict())
    ref[1].load_state_dict(block.bn.state_dict())
    x = randn((4, 4, 19, 17), dtype, device, gen)  # 1292 pixels: several wgrad and reduction splits
    y = block(x)
    g = randn(y.shape, dtype, device, gen)
    y.backward(g)
    ref(x).backward(g)
    assert_close(block.conv.weight.grad, ref[0].weight.grad, dtype, "dw")
    assert_close(block.bn.weight.grad, ref[1].weight.grad, dtype, "dgamma")


def test_split_counts_bound_serial_loops(monkeypatch):
    for sms in (1, 108, 132):
        monkeypatch.setenv("FASTCONV_SM_COUNT", str(sms))
        for P in (1, 1000, 256 * 32 * 32, 256 * 112 * 112, 2**31 - 1):
            for C in (1, 64, 2048):
                splits = tbn.reduce_splits(P, C, torch.device("cpu"))
                assert splits >= 1 and -(-P // splits) <= tbn.REDUCE_MAX_STEPS * tbn.BLOCK_P


@pytest.mark.parametrize("rows", [1, 700, 5000, 70000])
def test_finalize_tree_matches_float64(device, rows):
    """Partials of real data with uneven counts (some empty) through 1-3 levels of the combine tree."""
    gen = generator("finalize", rows)
    C = 3
    counts = torch.randint(0, 9, (rows,), generator=gen)
    counts[0] = max(int(counts[0]), 1)
    data = [torch.randn((int(n), C), generator=gen, dtype=torch.float64) * 3 + 100 for n in counts]
    cnt = counts.double()[:, None].expand(rows, C).contiguous()
    mean = torch.stack([d.mean(0) if len(d) else torch.zeros(C, dtype=torch.float64) for d in data])
    m2 = torch.stack([((d - d.mean(0)) ** 2).sum(0) if len(d) else torch.zeros(C, dtype=torch.float64)
                      for d in data])
    bias = torch.randn(C, generator=gen, dtype=torch.float64)
    got_mean, got_var = tbn.finalize(tuple(t.to(device) for t in (cnt, mean, m2)), C, bias.to(device))
    allv = torch.cat(data)
    assert_close(got_mean, allv.mean(0) + bias, torch.float64, "mean")
    assert_close(got_var, allv.var(0, unbiased=False), torch.float64, "var")


@pytest.mark.parametrize("rows", [1, 5000])
@pytest.mark.parametrize("buffers", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("momentum", [0.25, "tensor"])
def test_finalize_tree_updates_running_statistics(device, rows, buffers, momentum, monkeypatch):
    """The running-statistics update in the combine tree's last pass, after 1 or 2 levels, over 37 channels (a
    partial second channel tile): lerp with the unbiased variance, in the buffers' dtype, with a float momentum
    or a 0-dim tensor read in the kernel. Tree scratch NaN-poisoned."""
    from .helpers import nan_workspace

    monkeypatch.setattr(fastconv.triton.conv2d, "workspace", nan_workspace)
    gen = generator("finalize-running", rows, str(buffers), momentum)
    C = 37
    counts = torch.randint(2, 9, (rows,), generator=gen)  # >= 2 values: an unbiased variance exists
    data = [torch.randn((int(n), C), generator=gen, dtype=torch.float64) * 3 + 10 for n in counts]
    cnt = counts.double()[:, None].expand(rows, C).contiguous()
    mean = torch.stack([d.mean(0) for d in data])
    m2 = torch.stack([((d - d.mean(0)) ** 2).sum(0) for d in data])
    rm = (torch.randn(C, generator=gen, dtype=torch.float64)).to(buffers).to(device)
    rv = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).to(buffers).to(device)
    want_m, want_v = rm.double().cpu().clone(), rv.double().cpu().clone()
    m = 0.25 if momentum != "tensor" else torch.tensor(1 / 3, device=device)
    running = (rm, rv, m, None) if momentum != "tensor" else (rm, rv, 0.0, m)
    got_mean, got_var = tbn.finalize(tuple(t.to(device) for t in (cnt, mean, m2)), C, None, running)
    allv = torch.cat(data)
    f = float(m)
    assert_close(got_mean, allv.mean(0), torch.float64, "mean")
    assert_close(got_var, allv.var(0, unbiased=False), torch.float64, "var")
    assert_close(rm, ((1 - f) * want_m + f * allv.mean(0)).to(buffers), buffers, "running_mean")
    assert_close(rv, ((1 - f) * want_v + f * allv.var(0, unbiased=True)).to(buffers), buffers, "running_var")


@pytest.mark.parametrize("splits", [1, 3, 70])
def test_bn_backward_split_sums_by_the_last_program(device, splits, monkeypatch):
    """The BatchNorm backward's reduce pass with `splits` programs per channel block: the last one to finish adds
    the partial rows up (no second launch). Sums against float64 over two calls (the ticket counters are back to
    zero after each), 37 channels (two channel blocks), NaN-poisoned scratch."""
    from fastconv.triton import _common

    from .helpers import nan_workspace

    monkeypatch.setattr(fastconv.triton.conv2d, "workspace", nan_workspace)
    gen = generator("split-sums", splits)
    for call in range(2):
        z = torch.randn((3, 37, 9, 11), generator=gen, dtype=torch.float64)
        dy = torch.randn(z.shape, generator=gen, dtype=torch.float64)
        mean, var = z.mean((0, 2, 3)), z.var((0, 2, 3), unbiased=False)
        with launch.recording() as launches:
            tbn.batch_norm_act_backward(dy, z, mean, var, None, None, 1e-5, "identity", splits=splits)
        assert [r.kernel for r in launches] == ["_batch_norm_act_bwd_reduce_kernel",
                                                "_batch_norm_act_bwd_apply_kernel"]
        _, sum_g, sum_gx, _ = tbn.batch_norm_act_backward(dy.to(device), z.to(device), mean.to(device),
                                                          var.to(device), None, None, 1e-5, "identity", splits=splits)
        xhat = (z - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + 1e-5)
        assert_close(sum_g, dy.sum((0, 2, 3)), torch.float64, f"call {call} sum g")
        assert_close(sum_gx, (dy * xhat).sum((0, 2, 3)), torch.float64, f"call {call} sum g*xhat")
        counters = [t for t in _common._TICKETS.values() if t.device.type != "meta"]
        assert counters and all(int(t.abs().max()) == 0 for t in counters), "ticket counters left non-zero"


def test_every_triton_launch_goes_through_the_launch_module():
    """No `kernel[grid](...)` call outside fastconv/triton/launch.py: the device guard, the recorder and the
    tile choice live there only."""
    pattern = re.compile(r"\b_\w+_kernel\[")
    offenders = [f"{p.name}:{i + 1}" for p in (ROOT / "fastconv").rglob("*.py") if p.name != "launch.py"
                 for i, line in enumerate(p.read_text().splitlines()) if pattern.search(line)]
    assert not offenders, offenders


class _FakeKernel:
    """Stands in for a JITFunction: records the device current at each launch."""

    def __init__(self):
        self.calls = []
        self.fn = self._fake_kernel

    def _fake_kernel(self):
        pass

    def __getitem__(self, grid):
        return lambda *a, **k: self.calls.append((grid, launch_guard_log[-1] if launch_guard_log else None, k))


launch_guard_log: list = []


def test_launches_run_under_the_tensors_device(monkeypatch):
    """Both launch paths enter torch.cuda.device(<the tensors' device>) around the launch where it is not the
    current device (mocked: no GPU)."""
    import contextlib

    @contextlib.contextmanager
    def fake_device(dev):
        launch_guard_log.append(dev)
        yield

    current = [0]
    monkeypatch.setattr(torch.cuda, "device", fake_device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    monkeypatch.setenv("FASTCONV_AUTOTUNE", "0")
    monkeypatch.setenv("FASTCONV_SM_COUNT", "132")
    dev = torch.device("cuda", 1)
    k = _FakeKernel()
    launch.run(k, (3,), torch.empty(2), device=dev, FLAG=True)
    tk = launch.TunedKernel(_FakeKernel(), "conv2d_fwd")
    tk(lambda meta: (5,), torch.empty(2), problem=launch.Problem(100, 16, 8), device=dev)
    assert launch_guard_log == [dev, dev]
    assert k.calls[0][0] == (3,) and tk.kernel.calls[0][0] == (5,)
    # the tensors' device current already (or no index: the current one): no guard, same launch
    current[0] = 1
    launch.run(k, (3,), torch.empty(2), device=dev, FLAG=True)
    launch.run(k, (3,), torch.empty(2), device=torch.device("cuda"), FLAG=True)
    assert launch_guard_log == [dev, dev] and len(k.calls) == 3


def test_forced_tile_and_heuristic():
    p = launch.Problem(256 * 32 * 32, 128, 128, 9, 1)
    tiles = [t for t, _ in configs.tiles("conv2d_fwd", "sm_90", "half")]
    pick = launch.heuristic_pick(tiles, p, 132)
    assert pick in tiles and pick == launch.heuristic_pick(tiles, p, 132)
    small = launch.heuristic_pick(tiles, launch.Problem(64, 16, 16, 9, 1), 132)
    assert small[0] * small[1] <= pick[0] * pick[1]  # a tiny problem gets a tile no larger
    tk = launch.TunedKernel(_FakeKernel(), "conv2d_fwd")
    with launch.forced((64, 32, 32, 2, 5)):
        meta, _ = tk(lambda m: (1,), torch.empty(1), problem=p, device=torch.device("cpu"))
    assert (meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"], meta["num_warps"]) == (64, 32, 32, 2)


def test_autotune_keys_are_bucketed_and_cached_across_processes(monkeypatch, tmp_path):
    """GPU path with a fake kernel and timer: one tuning per bucketed key; the JSON cache serves a new process."""
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    monkeypatch.setattr(launch, "device_guard", lambda device: __import__("contextlib").nullcontext())
    monkeypatch.setenv("FASTCONV_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FASTCONV_AUTOTUNE", "1")
    timed = []

    def fake_bench(fn):
        fn()
        timed.append(1)
        return float(len(timed) % 5)  # some tile wins

    monkeypatch.setattr(launch, "_bench_ms", fake_bench)
    monkeypatch.setattr(launch, "CACHE", launch._DiskCache())
    monkeypatch.setattr(launch, "TUNING_RUNS", {})
    tk = launch.TunedKernel(_FakeKernel(), "conv2d_fwd")
    dev = torch.device("cpu")
    x = torch.empty(1, dtype=torch.float16)
    for batch in (128, 100, 65, 512):  # 131072, 102400, 66560 pixels: one power-of-two bucket; 512: capped
        tk(lambda m: (1,), x, problem=launch.Problem(batch * 1024, 64, 64, 9, 1), device=dev)
    assert len(launch.TUNING_RUNS) == 1 and len(timed) == len(configs.tiles("conv2d_fwd", "sm_80", "half"))
    files = list(tmp_path.rglob("*.json"))
    assert len(files) == 1 and len(json.loads(files[0].read_text())) == 1
    monkeypatch.setattr(launch, "CACHE", launch._DiskCache())  # a new process: only the file remains
    tk(lambda m: (1,), x, problem=launch.Problem(90 * 1024, 64, 64, 9, 1), device=dev)
    assert len(launch.TUNING_RUNS) == 1
    tk(lambda m: (1,), x, problem=launch.Problem(9 * 1024, 64, 64, 9, 1), device=dev)  # 16384: a new bucket
    assert len(launch.TUNING_RUNS) == 2
    monkeypatch.setenv("FASTCONV_AUTOTUNE", "0")
    tk(lambda m: (1,), x, problem=launch.Problem(7, 64, 64, 9, 1), device=dev)
    assert len(launch.TUNING_RUNS) == 2  # the heuristic tunes nothing


def _conv_layers():
    from bench._shapes import CIFAR_ARCHITECTURES, imagenet_architectures, unique

    return list(unique({**CIFAR_ARCHITECTURES, **imagenet_architectures()}, "conv"))


def test_launch_plan_has_no_long_serial_loops():
    """Every conv layer the benchmarks time, as a fused conv+BN+ReLU block at batch 256 (train step, H100 and
    A100 tables): no kernel's serial loop passes 1,024 iterations except a GEMM's own K loop."""
    worst = {}
    for layer in _conv_layers():
        spec = f"256,{layer.C},{layer.H},{layer.W},{layer.K},{layer.R},{layer.S},{layer.stride},{layer.pad}," \
               f"{layer.groups}"
        for gpu in ("H100", "A100"):
            rows = launch_plan.record_step(*launch_plan.layer_model(spec, torch.bfloat16), True, gpu)
            for r in rows:
                if not r.launch.gemm_loop:
                    worst[r.launch.kernel] = max(worst.get(r.launch.kernel, 0), r.launch.loop)
    assert worst and max(worst.values()) <= 1024, worst


def test_launch_plan_fused_block_launches():
    """One fused conv+BN+ReLU block (input needing its gradient): train step = conv with statistics,
    finalize, normalize+act, BN backward reduce and apply, dgrad, split-K wgrad; eval = one conv kernel."""
    model, x = launch_plan.layer_model("8,16,8,8,16,3,3,1,1,1", torch.bfloat16)
    rows = launch_plan.record_step(model, x, True)
    triton = [r.launch.kernel for r in rows if not r.launch.kernel.startswith("aten.")]
    assert triton == ["_conv2d_fwd_kernel", "_batch_norm_combine_kernel", "_batch_norm_act_fwd_kernel",
                      "_batch_norm_act_bwd_reduce_kernel",
                      "_batch_norm_act_bwd_apply_kernel", "_conv2d_dgrad_kernel", "_conv2d_wgrad_kernel"
                      ], triton  # 512 pixels: 2 splits, added up by the reduce pass's and wgrad's last programs
    # no ATen op at all after the forward: parameter-gradient casts and wgrad's split sum / cast are in kernels
    aten_bwd = [r.launch.kernel for r in rows[[r.op for r in rows].index("batch_norm_act_backward"):]
                if r.launch.kernel.startswith("aten.")]
    assert not aten_bwd, aten_bwd
    # the running statistics and num_batches_tracked are updated in the finalize: no ATen op in the forward either
    aten_fwd = [r.launch.kernel for r in rows[:[r.op for r in rows].index("batch_norm_act_backward")]
                if r.launch.kernel.startswith("aten.")]
    assert aten_fwd == [], aten_fwd
    assert not [r for r in rows if r.op in ("conv_bn_act_train", "batch_norm_act_backward")
                and r.launch.kernel.startswith("aten.")]
    # the finalize touches the two bf16 running buffers exactly when they are tracked
    combine = next(r.launch for r in rows if r.launch.kernel == "_batch_norm_combine_kernel")
    model.bn.track_running_stats, model.bn.running_mean, model.bn.running_var = False, None, None
    untracked = launch_plan.record_step(model, x, True)
    plain = next(r.launch for r in untracked if r.launch.kernel == "_batch_norm_combine_kernel")
    # (and num_batches_tracked, int64, which it counts)
    assert combine.bytes - plain.bytes == 2 * 16 * 2 + 8, (combine.bytes, plain.bytes)
    model, x = launch_plan.layer_model("8,16,8,8,16,3,3,1,1,1", torch.bfloat16)
    rows = launch_plan.record_step(model, x, False)
    assert [r.launch.kernel for r in rows if not r.launch.kernel.startswith("aten.")] == ["_conv2d_fwd_kernel"]


def test_launch_plan_cli_json(capsys):
    assert launch_plan.main(["--model", "cifar10_cnn", "--batch", "4", "--compare-eager", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for side in ("fastconv", "eager"):
        assert out[side]["bytes"] > 0 and out[side]["launches"] > 0
    assert out["fastconv"]["max_serial_loop"] <= 1024
    assert all(r["programs"] >= 1 for r in out["fastconv"]["rows"])


def test_launch_plan_layout_nchw(capsys):
    """--layout nchw plans the model with PyTorch's default memory format: the same conv kernels, plus the
    channels_last copies of NCHW GEMM operands as ATen copies (--layout channels_last has one: the flatten before
    the classifier); an NCHW z also keeps the BatchNorm backward's reduce pass out of the dgrad epilogue."""
    plans = {}
    for layout in ("channels_last", "nchw"):
        assert launch_plan.main(["--model", "cifar10_cnn", "--batch", "4", "--compare-eager", "--json",
                                 "--layout", layout]) == 0
        plans[layout] = json.loads(capsys.readouterr().out)
    cl, nchw = plans["channels_last"]["fastconv"], plans["nchw"]["fastconv"]
    triton = [[r["kernel"] for r in p["rows"] if r["kernel"].startswith("_conv2d_")] for p in (cl, nchw)]
    assert triton[0] == triton[1]
    copies = [sum(r["kernel"] in ("aten.clone", "aten.copy_") for r in p["rows"]) for p in (cl, nchw)]
    assert copies[1] > copies[0]
    assert nchw["bytes"] > cl["bytes"]
    model, x = launch_plan.build("cifar10_cnn", 2, torch.bfloat16, True, layout="nchw")
    assert x.is_contiguous() and all(p.is_contiguous() for p in model.parameters())


def _int32_overflow_launch():
    """A kernel that multiplies an int32 2**30 by 4: wraps on a GPU, an assertion in the checked interpreter."""
    import triton
    import triton.language as tl

    @triton.jit
    def times_four(ptr):
        tl.store(ptr, tl.load(ptr) * 4)

    x = torch.full((1,), 2**30, dtype=torch.int32)
    times_four[(1,)](x)
    return x


@pytest.mark.sanitize_overflow
def test_interpreter_checks_int32_overflow_where_marked():
    """conftest runs the tests marked sanitize_overflow (the IDX64 tests, the max-pool geometries) with the
    interpreter's int32 overflow checks really asserting (Triton's defaults compute them and never assert): there an
    overflowing index computation fails."""
    if not launch.interpreting():
        pytest.skip("the overflow checks are the Triton interpreter's; a GPU kernel wraps silently")
    with pytest.raises(Exception, match="overflow"):
        _int32_overflow_launch()


def test_interpreter_overflow_checks_off_elsewhere():
    if not launch.interpreting():
        pytest.skip("the overflow checks are the Triton interpreter's; a GPU kernel wraps silently")
    assert int(_int32_overflow_launch()) == 0  # 2**32 wrapped to int32, as on a GPU


def test_repeated_tuned_launches_keep_their_own_grid(monkeypatch):
    """A conv launcher's repeated launch reuses the grid and keyword arguments kept in its launch plan
    (TunedKernel's `fixed`). Two wgrad call signatures whose Problems are equal (3x3, groups 1 and 1x3, groups 3:
    the same GEMM sizes and autotune memo) still launch their own grids, every time, equal to what the plan's
    grid function gives; and each call passes its own tensors. Launches are mocked (no GPU): the GPU path's
    tile choice with FASTCONV_AUTOTUNE=0."""
    calls = []
    monkeypatch.setattr(launch, "launch", lambda kernel, grid, args, kwargs, device: calls.append(
        (kernel, grid, args, dict(kwargs))))
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    monkeypatch.setenv("FASTCONV_AUTOTUNE", "0")
    monkeypatch.setenv("FASTCONV_SM_COUNT", "132")
    from fastconv.triton import conv2d as tconv

    gen = generator("fixed-launch")
    n, oh, ow = 2, 5, 7
    cases = {"3x3": ((3, 3), 1, 4, 4), "1x3 groups 3": ((1, 3), 3, 12, 12)}  # kernel, groups, C_in, C_out
    grids, plans = {}, {}
    for name, ((kh, kw), groups, c_in, c_out) in cases.items():
        x = randn((n, c_in, oh + kh - 1, ow + kw - 1), torch.float32, "cpu", gen).contiguous(
            memory_format=torch.channels_last)
        known = set(tconv._WGRAD_PLANS._plans)
        for repeat in range(3):
            g = randn((n, c_out, oh, ow), torch.float32, "cpu", gen).contiguous(memory_format=torch.channels_last)
            calls.clear()
            tconv.conv2d_weight_grad(g, x, (c_out, c_in // groups, kh, kw), (1, 1), (0, 0), (1, 1), groups,
                                     bias_grad=True, channels_last=True)
            (kernel, grid, args, kwargs), = calls
            assert args[0] is g and args[1] is x
            if name not in plans:  # the call signature's plan: the one its first call added
                new = set(tconv._WGRAD_PLANS._plans) - known
                assert len(new) == 1
                plans[name] = tconv._WGRAD_PLANS._plans[new.pop()]
            meta = {k: kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
            assert grid == tuple(plans[name][3](meta)), (name, repeat)
            grids.setdefault(name, grid)
            assert grid == grids[name]
    assert grids["3x3"] != grids["1x3 groups 3"]
    # the two signatures' Problems and autotune memos are the same: only a per-plan cache tells their grids apart
    first, second = plans.values()
    assert first[1] == second[1] and first[5] == second[5]
