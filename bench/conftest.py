"""`pytest bench --benchmark`: fastconv's throughput benchmarks (pytest-benchmark is the harness).

Without --benchmark every test here is skipped (the repository's plain `pytest` collects tests/ only). The
flag is an exact option, so argparse never confuses it with pytest-benchmark's own --benchmark-* options.
The benchmark set comes from FASTCONV_BENCH_SET (see _cases.py); results are written when the session ends
(see _report.py).
"""
from __future__ import annotations

import os

import pytest
import torch

import fastconv

from bench import _cases, _inputs, _providers, _report, _roofline, _timing

FLAG = "--benchmark"
THREADS_ENV = "FASTCONV_BENCH_THREADS"  # torch CPU threads (an oversubscribed machine times better with 1)
SKIP_REASON = "benchmarks run only with `pytest bench --benchmark`"
RECORDER = pytest.StashKey[_report.Recorder]()


def pytest_addoption(parser):
    parser.addoption(FLAG, action="store_true", default=False,
                     help="run fastconv's throughput benchmarks in bench/ and write bench/results/<device>/")


def pytest_collect_file(file_path, parent):
    # a file named on the command line is collected by pytest's python plugin already
    if (file_path.name.startswith("bench_") and file_path.suffix == ".py"
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _enabled(config) -> bool:
    return bool(config.getoption(FLAG))


def _notes(device: torch.device, set_name: str) -> list[str]:
    notes = [f"Set `{set_name}` ({_cases.ENV_VAR}): {_cases.SETS[set_name]}."]
    if device.type == "cpu":
        notes.append(f"CPU mode: no GPU here ({_providers.NO_GPU}), so GPU providers were skipped and only CPU "
                     f"providers ran, at the REDUCED sizes of set `{set_name}` (not the GPU sizes); these figures say "
                     f"nothing about GPU speed. torch CPU threads: {torch.get_num_threads()}"
                     f"{f' (set by {THREADS_ENV})' if os.environ.get(THREADS_ENV) else ''}.")
    notes.append("TF32: fp32 rows run with torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 "
                 "= False (true fp32, cuDNN and fastconv alike); tf32 rows with both True (PyTorch's default for "
                 "cuDNN convolutions is allow_tf32=True, so PyTorch's default fp32 conv corresponds to the tf32 rows).")
    notes.append("conv_bn_relu rows: fp32 parameters, fp16/bf16 through torch.autocast (AMP); conv2d and max_pool2d "
                 "rows run on tensors of the row's dtype.")
    notes.append("Speed-ups are torch-eager (resp. torch-compile) median time / this row's median time, same shape, "
                 "mode, dtype and layout.")
    return notes


def pytest_configure(config):
    if not _enabled(config):
        return
    if os.environ.get(THREADS_ENV):
        torch.set_num_threads(int(os.environ[THREADS_ENV]))
    device = _cases.device()
    set_name = _cases.set_name()
    rec = _report.Recorder(device, set_name, _report.command_line(list(config.invocation_params.args)),
                           _notes(device, set_name))
    rec.providers_skipped = dict(_providers.for_device(device)[1])
    config.stash[RECORDER] = rec


def pytest_collection_modifyitems(config, items):
    if _enabled(config):
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if "bench" in item.path.parts and item.path.name.startswith("bench_"):
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    rec = session.config.stash.get(RECORDER, None)
    if rec is None or hasattr(session.config, "workerinput"):  # an xdist worker: rows are per worker, write nothing
        return
    if rec.overhead_rows:
        rec.overhead_written_to = rec.write_overhead()
    if not rec.has_set_rows():
        return
    if rec.peaks is not None:  # measured again at the end: the higher figure of the two is the peak
        again = _roofline.measure_peaks(rec.device, tuple(rec.peaks["flops"]))
        rec.peaks = _roofline.higher(rec.peaks, again)
        for row in rec.rows:
            row.update(_roofline.metrics(row["flops"], row["bytes"], row["median_ms"], row["dtype"], rec.peaks))
    rec.written_to = rec.write()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rec = config.stash.get(RECORDER, None)
    if rec is None:
        return
    tr = terminalreporter
    tr.section("fastconv benchmarks")
    tr.write_line(f"set {rec.set_name} on {_report.device_name(rec.device)}: {len(rec.rows)} op rows, "
                  f"{len(rec.model_rows)} model rows, {len(rec.memory_rows)} memory rows, "
                  f"{len(rec.overhead_rows)} host-overhead rows")
    for note in rec.notes[:2]:
        tr.write_line(note)
    for prov, why in rec.providers_skipped.items():
        tr.write_line(f"provider {prov} skipped: {why}")
    for (op, prov, why), n in sorted(rec.skipped.items()):
        tr.write_line(f"{op}: {n} {prov} rows skipped: {why}")
    if getattr(rec, "written_to", None):
        tr.write_line(f"results written to {rec.written_to}/{rec.set_name}.{{json,md}} and {rec.set_name}-*.png")
    if getattr(rec, "overhead_written_to", None):
        missed = [r for r in rec.overhead_rows if r.get("goal_met") is False]
        with_goal = sum(r.get("goal") is not None for r in rec.overhead_rows)
        tr.write_line(f"host overhead written to {rec.overhead_written_to}/overhead.{{json,md}} (goal missed in "
                      f"{len(missed)} of the {with_goal} rows that have one; reported, not enforced)")


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return _cases.device()


@pytest.fixture(scope="session")
def recorder(pytestconfig) -> _report.Recorder:
    rec = pytestconfig.stash.get(RECORDER, None)
    if rec is None:
        pytest.skip(SKIP_REASON)
    return rec


@pytest.fixture(scope="session")
def peaks(recorder, bench_device) -> dict:
    """Roofline peaks, measured on first use (and again when the session ends, keeping the higher)."""
    if recorder.peaks is None:
        dtypes = _cases.GPU_DTYPES if bench_device.type == "cuda" else ("fp32",)
        recorder.peaks = _roofline.measure_peaks(bench_device, dtypes)
    return recorder.peaks


@pytest.fixture
def bench_row(benchmark, bench_device, recorder, peaks):
    """run(case, build): time one case. build(case, device) -> (fn, grad_to_none) sets the row up; a
    provider that cannot run it raises fastconv.BackendNotSupported, and the row is skipped with its reason."""
    if benchmark.disabled:
        pytest.skip("pytest-benchmark is disabled (--benchmark-disable or xdist); nothing would be timed")

    def run(case: _cases.Case, build) -> dict:
        if case.provider == "torch-compile":
            torch._dynamo.reset()  # a fresh cache: no recompile limit reached, no silent fallback to eager
        with _inputs.tf32(case.dtype == "tf32"):
            try:
                fn, grad_to_none = build(case, bench_device)
                fn()  # first call: compiles / autotunes, and tells whether the provider can run it
            except fastconv.BackendNotSupported as e:
                recorder.skip(case.op, case.provider, str(e))
                pytest.skip(f"{case.provider}: {e}")
            timing = _timing.measure(benchmark, fn, bench_device, grad_to_none)
        flops, nbytes = _roofline.work(case.op, case.mode, case.problem, case.dtype)
        row = {"op": case.op, "shape": case.problem.label, "models": list(case.models), "provider": case.provider,
               "mode": case.mode, "dtype": case.dtype, "layout": case.layout, "tf32": case.dtype == "tf32",
               "flops": flops, "bytes": nbytes, **timing,
               **_roofline.metrics(flops, nbytes, timing["median_ms"], case.dtype, peaks)}
        benchmark.extra_info.update(row)
        recorder.rows.append(row)
        return row

    return run
