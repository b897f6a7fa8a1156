"""The benchmark suite itself (bench/): `pytest bench --benchmark` runs a tiny CPU subset end to end and
writes well-formed results; without the flag every benchmark is skipped; the layer tables match the
documented architectures; the FLOP counts match PyTorch's own counter; the host-overhead benchmark writes
every row, and its no-op C++ kernels allocate like the real ones."""
from __future__ import annotations

import collections
import contextlib
import importlib.util
import json
import math
import os
import pathlib
import re
import subprocess
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip's vendored copy of the same parser
    from pip._vendor import tomli as tomllib

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import _overhead, _report, _roofline, _shapes

ROOT = pathlib.Path(__file__).resolve().parent.parent
LABEL = re.compile(r"^\d+,\d+,\d+,\d+→(\d+,\d+×\d+,\d+,\d+,\d+|pool \d+×\d+,\d+,\d+)$")
ROW_KEYS = {"op", "shape", "models", "provider", "mode", "dtype", "layout", "tf32", "flops", "bytes", "median_ms",
            "timer", "tflops", "gbps", "roofline_pct", "speedup_vs_eager", "speedup_vs_compile"}
ENV_KEYS = {"device", "torch", "triton", "cuda", "git_commit", "date_utc"}
OPS = ("conv2d", "conv_bn_relu", "max_pool2d")


def _run_bench(tmp_path, *args, **env):
    environ = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTEST_XDIST_WORKER")}
    environ.update(PYTHONPATH=str(ROOT), FASTCONV_BENCH_SET="tiny", FASTCONV_BENCH_OUT=str(tmp_path / "results"),
                   FASTCONV_BENCH_THREADS="1", FASTCONV_BENCH_CPU_ROUNDS="2", **env)
    cmd = [sys.executable, "-m", "pytest", "bench", *args, "-p", "no:xdist", "-p", "no:cacheprovider", "-q", "-rs"]
    return subprocess.run(cmd, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=240)


GPU = torch.cuda.is_available()
# what the tiny run times on this machine, and what it must say it skipped
PROVIDERS = ("torch-eager", "fastconv-cpu") if not GPU else (
    "torch-eager", "torch-compile", "fastconv-triton-implicit", "fastconv-triton-im2col", "fastconv-cuda")
NOT_RUN = ({"fastconv-cuda", "fastconv-triton-implicit", "fastconv-triton-im2col", "torch-compile"} if not GPU
           else {"fastconv-cpu"})


def test_benchmark_flag_runs_tiny_set_and_writes_results(tmp_path):
    proc = _run_bench(tmp_path, "--benchmark", FASTCONV_BENCH_MODELS_MODULE="tests._bench_models_stub")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "ambiguous" not in out
    for prov in NOT_RUN:
        assert f"provider {prov} skipped: " in out

    res = tmp_path / "results"
    doc = json.loads((res / "tiny.json").read_text())
    assert ENV_KEYS <= doc["environment"].keys() and doc["environment"]["torch"] == torch.__version__
    assert doc["set"] == "tiny" and "--benchmark" in doc["command"]
    assert GPU or any("CPU mode" in n and "skipped" in n for n in doc["notes"])
    assert NOT_RUN == set(doc["providers_skipped"])
    assert doc["peaks"]["flops"]["fp32"] > 0 and doc["peaks"]["bytes_per_s"] > 0

    rows = doc["rows"]
    assert {r["op"] for r in rows} == set(OPS)
    for r in rows:
        assert ROW_KEYS <= r.keys(), r
        assert LABEL.match(r["shape"]), r["shape"]
        assert r["median_ms"] > 0 and math.isfinite(r["median_ms"])
        s = r["median_ms"] / 1e3
        assert r["tflops"] == pytest.approx(r["flops"] / s / 1e12, rel=1e-9)
        assert r["gbps"] == pytest.approx(r["bytes"] / s / 1e9, rel=1e-9)
        assert r["roofline_pct"] > 0
        if r["provider"] == "torch-eager":
            assert r["speedup_vs_eager"] == pytest.approx(1.0)
    # every CPU provider of every op was either timed or skipped with its reason, never silently dropped
    timed = {(r["op"], r["provider"]) for r in rows}
    skipped = {(s["op"], s["provider"]): s["reason"] for s in doc["skipped"]}
    for op in OPS:
        for prov in PROVIDERS:
            assert (op, prov) in timed or skipped.get((op, prov)), (op, prov)

    models = doc["models"]
    plain = {m["phase"]: m for m in models if m["variant"] == "plain"}
    assert set(plain) == {"train", "infer"}
    assert all(m["images_per_s"] > 0 and m["batch"] == 2 for m in models)
    assert all(m["host_median_ms"] is not None for m in models) == GPU
    assert plain["train"]["saved_bytes"] > 0 and plain["infer"]["saved_bytes"] is None
    for variant in {m["variant"] for m in models} - {"plain"}:
        assert variant.startswith("fastconv-")
    fastconv_variants = ("fastconv-triton", "fastconv-cuda") if GPU else ("fastconv-cpu",)
    for variant in fastconv_variants:
        assert any(m["variant"] == variant for m in models) or skipped.get(("models", variant)), variant

    (mem,) = doc["memory"]
    assert mem["model"] == "lenet5" and mem["plain_bytes"] > 0 and mem["fastconv_bytes"] > 0
    assert mem["ratio"] == pytest.approx(mem["fastconv_bytes"] / mem["plain_bytes"])

    md = (res / "tiny.md").read_text()
    assert doc["environment"]["device"] in md and "| median ms |" in md
    assert all(r["shape"] in md for r in rows) and "bytes saved for backward per training step" in md
    for op in OPS + ("models",):
        assert (res / f"tiny-{op}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_flag_every_benchmark_is_skipped(tmp_path):
    proc = _run_bench(tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "benchmarks run only with `pytest bench --benchmark`" in out
    assert re.search(r"\d+ skipped", out) and "passed" not in out, out[-2000:]
    assert not (tmp_path / "results").exists()


def test_plain_pytest_collects_only_tests():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert config["testpaths"] == ["tests"]
    assert not [p.name for p in (ROOT / "bench").glob("test_*.py")]


def test_label_format():
    layer = _shapes.conv(64, 56, 128, 3, stride=2)
    assert layer.at(64).label == "64,64,56,56→128,3×3,2,1,1"
    assert _shapes.pool(64, 112, 3, 2, 1).at(8).label == "8,64,112,112→pool 3×3,2,1"
    assert layer.out_hw == (28, 28)


# The documented classifier input of each architecture (issue 5): flattened features after the last layer.
FLATTENED = {"neuralnet": 1024, "simple_cnn": 1024, "simple_cnn_bn": 2048, "cifar10_cnn": 4096, "alexnet": 9216,
             "lenet5": 400, "vgg16": 512}


@pytest.mark.parametrize("name", sorted(FLATTENED))
def test_cifar_table_chains_to_documented_features(name):
    layers = _shapes.CIFAR_ARCHITECTURES[name]
    for a, b in zip(layers, layers[1:]):
        assert (a.K, *a.out_hw) == (b.C, b.H, b.W), (a, b)
    last = layers[-1]
    assert last.K * last.out_hw[0] * last.out_hw[1] == FLATTENED[name]


def test_alexnet_walkthrough():
    sizes = [227] + [layer.out_hw[0] for layer in _shapes.CIFAR_ARCHITECTURES["alexnet"]]
    assert sizes == [227, 55, 27, 27, 13, 13, 13, 13, 6]


def test_resnet_table_stages():
    convs = _shapes.CIFAR_ARCHITECTURES["resnet"]
    assert len(convs) == 20  # stem + 8 blocks × 2 + 3 projections, as torchvision's ResNet-18
    assert collections.Counter((c.K, c.out_hw[0]) for c in convs if c.R == 3) == {
        (64, 32): 5, (128, 16): 4, (256, 8): 4, (512, 4): 4}


def test_imagenet_layers_come_from_torchvision():
    import torchvision

    archs = _shapes.imagenet_architectures()
    for name, layers in archs.items():
        with torch.device("meta"):
            model = getattr(torchvision.models, name)(weights=None)
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        pools = [m for m in model.modules() if isinstance(m, torch.nn.MaxPool2d)]
        assert [lay.kind for lay in layers].count("conv") == len(convs)
        assert [lay.kind for lay in layers].count("pool") == len(pools)
        assert [(lay.C, lay.K, lay.R, lay.stride) for lay in layers if lay.kind == "conv"] == [
            (m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0]) for m in convs]
    assert archs["resnet18"][0].at(1).label == "1,3,224,224→64,7×7,2,3,1"


def test_trace_sees_functional_calls():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding="same")

        def forward(self, x):
            return torch.nn.functional.max_pool2d(self.conv(x), 2)

    assert _shapes.trace_layers(Net(), (3, 16, 16)) == [_shapes.conv(3, 16, 8, 3), _shapes.pool(8, 16)]


@pytest.mark.skipif(importlib.util.find_spec("fastconv.models") is None,
                    reason="fastconv.models (issue 5) is not in this checkout: nothing to cross-check the table with")
def test_cifar_table_matches_models():
    from fastconv import models

    assert set(_shapes.CIFAR_ARCHITECTURES) <= set(models.names())
    for name, table in _shapes.CIFAR_ARCHITECTURES.items():
        traced = _shapes.trace_layers(models.build(name, num_classes=10, fastconv=False), models.input_size(name))
        assert collections.Counter(traced) == collections.Counter(table), name


# torch's FlopCounterMode counts a grouped conv's backward as 4× its forward (its weight-gradient formula
# ignores groups), so the backward is compared on an ungrouped conv only.
@pytest.mark.parametrize("groups, mode", [(3, "fwd"), (1, "fwd"), (1, "fwd+bwd")])
def test_conv_flops_match_torch_flop_counter(groups, mode):
    layer = _shapes.Layer("conv", 6, 13, 11, 9, 3, 3, 2, 1, groups)
    x = torch.randn(2, 6, 13, 11, requires_grad=True, dtype=torch.float64)
    w = torch.randn(9, 6 // groups, 3, 3, requires_grad=True, dtype=torch.float64)
    with FlopCounterMode(display=False) as counter:
        y = torch.nn.functional.conv2d(x, w, stride=2, padding=1, groups=groups)
        if mode == "fwd+bwd":
            y.backward(torch.randn_like(y))
    assert _roofline.work("conv2d", mode, layer.at(2), "fp32")[0] == counter.get_total_flops()


def test_speedups_pair_rows_by_shape_mode_dtype_layout():
    rec = _report.Recorder(torch.device("cpu"), "tiny", "pytest bench --benchmark", [])
    base = {"op": "conv2d", "shape": "s", "mode": "fwd", "dtype": "fp32", "layout": "nchw"}
    rec.rows = [{**base, "provider": "torch-eager", "median_ms": 2.0},
                {**base, "provider": "torch-compile", "median_ms": 1.0},
                {**base, "provider": "fastconv-cuda", "median_ms": 0.5},
                {**base, "layout": "channels_last", "provider": "fastconv-cuda", "median_ms": 0.5}]
    got = rec.with_speedups()
    assert (got[2]["speedup_vs_eager"], got[2]["speedup_vs_compile"]) == (4.0, 2.0)
    assert got[3]["speedup_vs_eager"] is None and got[3]["speedup_vs_compile"] is None


# ---------------------------------------------------------------------------------------------------------
# bench_overhead.py / bench/_overhead.py: host overhead per call against the nn modules (issue 16)

def _ext_loaded() -> bool:
    from fastconv import _ext

    return _ext.load()


def test_overhead_benchmark_writes_every_row(tmp_path):
    proc = _run_bench(tmp_path, "--benchmark", "-k", "overhead", FASTCONV_BENCH_OVERHEAD_ROUNDS="2",
                      FASTCONV_BENCH_OVERHEAD_CALLS="2")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    res = tmp_path / "results"
    assert "host overhead written to" in out
    # only the overhead files: a `-k overhead` run leaves the set's throughput results alone
    assert sorted(p.name for p in res.iterdir()) == ["overhead.json", "overhead.md"]
    doc = json.loads((res / "overhead.json").read_text())
    assert ENV_KEYS <= doc["environment"].keys() and "--benchmark" in doc["command"]
    device = torch.device("cuda" if GPU else "cpu")
    expected = _overhead.cases(device)
    assert len(expected) == 5 * len(_overhead.providers(device))
    rows = {(r["op"], r["mode"], r["provider"]): r for r in doc["rows"]}
    assert len(rows) == len(doc["rows"]) and set(rows) == {(c.op, c.mode, c.provider) for c in expected}
    md = (res / "overhead.md").read_text()
    assert "| median µs | nn median µs | ratio |" in md
    for c in expected:
        r = rows[(c.op, c.mode, c.provider)]
        assert f"| {c.op} | {c.mode} | {r['module']} | {c.provider} |" in md
        if "skipped" in r:  # only a backend this machine cannot run, with its reason
            assert r["skipped"] and (c.backend == "cuda" or (c.backend == "cpu" and not _ext_loaded())), r
            continue
        assert r["rounds"] == 2 and r["calls"] == 2
        for k in ("median_us", "nn_median_us", "ratio", "wall_median_us", "nn_wall_median_us"):
            assert math.isfinite(r[k]) and r[k] > 0, (k, r)
        assert r["ratio"] == pytest.approx(r["median_us"] / r["nn_median_us"])
        if c.backend == "torch":
            assert r["goal"] is None and r["goal_met"] is None and r["kernel_calls"] is None
        else:
            assert isinstance(r["kernel_calls"], int) and r["kernel_calls"] >= 1
            goal = _overhead.GOALS.get((c.op, c.mode))
            assert r["goal"] == goal and r["goal_met"] == (None if goal is None else r["ratio"] <= goal)
    if not GPU and _ext_loaded():
        assert not any("skipped" in r for r in doc["rows"])
        assert doc["ext_op_call_us"] > 0


@pytest.mark.parametrize("op, mode", list(_overhead.OPS))
def test_overhead_noop_kernels_allocate_like_the_real_ones(op, mode):
    """In the C++ dry run the ext ops give the op layer outputs (and gradients) of the real ops' shapes, dtypes
    and strides, as many calls are made, and the dry run is off afterwards."""
    import fastconv
    from fastconv.ops import conv2d as conv_ops

    if not _ext_loaded():
        pytest.skip("needs the C++ extension fastconv._C")
    real_ext_ops = conv_ops.ext_ops

    def outputs(ctx):
        fc, _, params = _overhead._modules(op, torch.device("cpu"))
        grad = mode.endswith("fwd+bwd")
        fc.train(grad)
        x = torch.randn(2, _overhead.C, 7, 5, requires_grad=grad).to(memory_format=torch.channels_last)
        with fastconv.backend("cpu"), ctx as counter, torch.set_grad_enabled(grad):
            y = fc(x)
            got = [y] + (list(torch.autograd.grad(y, [x, *params(fc)], torch.randn_like(y))) if grad else [])
        return [(t.shape, t.dtype, t.stride()) for t in got], counter.calls

    @contextlib.contextmanager
    def dry_run_counted():
        with _overhead.noop_kernels(), _overhead.counting_kernels() as counter:
            yield counter

    real, noop = outputs(_overhead.counting_kernels()), outputs(dry_run_counted())
    assert real == noop and real[1] >= 1
    assert conv_ops.ext_ops is real_ext_ops
    from fastconv import _C

    assert not _C._dry_run()


def test_overhead_measure_standalone():
    """bench._overhead.measure(): rows for the lead's quick checks, TRITON_INTERPRET (set by tests/conftest.py
    on CPU) and the thread count restored afterwards."""
    interp, threads = os.environ.get("TRITON_INTERPRET"), torch.get_num_threads()
    rows = _overhead.measure(rounds=1, calls=1, ops=["max_pool2d"], warmup=0)
    assert os.environ.get("TRITON_INTERPRET") == interp and torch.get_num_threads() == threads
    device = torch.device("cuda" if GPU else "cpu")
    assert [r["provider"] for r in rows] == list(_overhead.providers(device))
    for r in rows:
        assert "skipped" in r or (r["ratio"] > 0 and math.isfinite(r["ratio"]))
    assert "| max_pool2d | fwd |" in "\n".join(_overhead.table(rows))


def test_overhead_row_that_cannot_run_leaves_the_backend_as_it_was(monkeypatch):
    """A row whose context raises on entry (the C++ dry run without the extension) is reported as not
    supported, and the backend it had already selected is restored: a leaked backend('cpu') made every later
    row of the run fail."""
    import fastconv

    @contextlib.contextmanager
    def no_dry_run():
        raise fastconv.BackendNotSupported("no C++ dry run in this test")
        yield

    monkeypatch.setattr(_overhead, "noop_kernels", no_dry_run)
    case = _overhead.Case("conv2d", "eval-fwd", "fastconv-cpu-noop")
    before = fastconv.current_backend()
    with pytest.raises(fastconv.BackendNotSupported, match=r"no C\+\+ dry run") as raised:
        _overhead.build(case, torch.device("cpu"))
    # checked while the traceback (which holds the frames, as pytest's skip report did) is still alive
    assert raised.tb is not None and fastconv.current_backend() == before


@pytest.mark.slow
def test_instruction_counts_of_an_overhead_row():
    """bench._instructions (callgrind counts of one loop per side of an overhead row): both sides counted, the
    counts growing with the calls counted (so they cover the loop, not a fixed start-up), a finite ratio.
    Several minutes: valgrind runs the interpreter and torch's import, four times here."""
    import shutil

    from bench import _instructions

    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        pytest.skip("needs valgrind and callgrind_control on PATH")
    if not _ext_loaded():
        pytest.skip("needs the C++ extension fastconv._C (the row's provider is fastconv-cpu-noop)")
    case = _overhead.Case("max_pool2d", "fwd", "fastconv-cpu-noop")
    few, many = (_instructions.count(case, "fastconv", n) for n in (10, 40))
    assert 0 < few < many, (few, many)
    per_call = (many - few) / 30  # the loop's instructions per call, without what a loop costs once
    assert 5_000 < per_call < 1_000_000, per_call
    rows = _instructions.measure(["max_pool2d"], ["fastconv-cpu-noop"], calls=10)
    assert len(rows) == 1 and rows[0]["fastconv_instructions"] > 0 and rows[0]["nn_instructions"] > 0
    assert math.isfinite(rows[0]["ratio"]) and rows[0]["goal"] == 1.5
    assert "| max_pool2d | fwd | fastconv-cpu-noop |" in _instructions.table(rows)


def test_launch_binding_rows_cover_every_triton_launch(tmp_path, monkeypatch):
    """bench._launch_binding: one row per overhead op/mode on the Triton path, one entry per Triton launch of the
    row (the launch plan's count), both paths timed, and the files written."""
    if not _ext_loaded():
        pytest.skip("needs the C++ extension fastconv._C (the direct launch keys)")
    from bench import _launch_binding
    from fastconv.triton import launch

    monkeypatch.setenv("FASTCONV_BENCH_OUT", str(tmp_path))
    # what other tests of this process launched (test_launch_direct's stand-in kernels) stays as it was
    before = ({k: len(d.compiled) for k, d in launch._DIRECT.items()}, dict(launch.LAUNCHES))
    rows = _launch_binding.measure(["conv2d", "max_pool2d"], calls=3)
    assert [(r["op"], r["mode"]) for r in rows] == [("conv2d", "eval-fwd"), ("conv2d", "fwd+bwd"),
                                                     ("max_pool2d", "fwd")]
    for r in rows:
        case = _overhead.Case(r["op"], r["mode"], "fastconv-triton-dryrun")
        pair = _overhead.build(case, torch.device("cpu"))
        assert len(r["launches"]) == pair.kernel_calls, r
        assert all(k["triton_us"] > 0 and k["direct_us"] > 0 and k["arguments"] > 10 for k in r["launches"])
    assert _launch_binding.main(["--op", "max_pool2d", "--calls", "2", "--write"]) == 0
    assert "| max_pool2d | fwd | 1 |" in (tmp_path / "launch_binding.md").read_text()
    # nothing launched: no launch counted, no compiled kernel kept
    assert dict(launch.LAUNCHES) == before[1]
    assert all(len(d.compiled) == before[0].get(k, 0) for k, d in launch._DIRECT.items())


def test_overhead_jit_provider_switches_direct_launches_off():
    """The GPU-only fastconv-triton-jit rows run every launch through Triton's kernel[grid](...): the row's
    contexts set FASTCONV_DIRECT_LAUNCH=0 and restore it; the row is a comparison, held to no goal."""
    from fastconv.triton import launch

    assert "fastconv-triton-jit" in _overhead.GPU_PROVIDERS
    case = _overhead.Case("max_pool2d", "fwd", "fastconv-triton-jit")
    before = os.environ.get("FASTCONV_DIRECT_LAUNCH")
    with _overhead._contexts(case, torch.device("cpu"), grad=False):
        assert not launch.direct_enabled()
    assert os.environ.get("FASTCONV_DIRECT_LAUNCH") == before
    row = _overhead.row(_overhead.Pair(case, None, None, 1), [2e-6] * 3, [1e-6] * 3, 1, torch.device("cpu"),
                        [2e-6] * 3, [1e-6] * 3)
    assert row["goal"] is None and row["goal_met"] is None and "comparison" in row["goal_text"]
