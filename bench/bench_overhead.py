"""Host overhead per call of fastconv.Conv2d / ConvBNReLU2d / MaxPool2d against nn.Conv2d /
nn.Sequential(Conv2d, BatchNorm2d, ReLU) / nn.MaxPool2d on tiny tensors, per fastconv backend (issue 16).
What is timed and how: bench/_overhead.py. Results: bench/results/<device>/overhead.{json,md} (not the set's
files, so `pytest bench --benchmark -k overhead` leaves the throughput results alone). Goals are reported,
never enforced: a missed goal does not fail the benchmark.

pytest-benchmark times the fastconv loop of each round (its statistics are per round of
FASTCONV_BENCH_OVERHEAD_CALLS calls, by the clock of record: on CPU the thread's CPU time, set as the
fixture's timer for these rows only); the nn module's loop runs, timed, in the round's setup just before it.
"""
from __future__ import annotations

import os
import time

import pytest

import fastconv

from bench import _cases, _overhead

CASES = _overhead.cases(_cases.device())
TINY_ROUNDS, TINY_CALLS = 3, 10  # set `tiny` (the test suite's smoke run) unless the env variables say otherwise


def _rounds_calls() -> tuple[int, int]:
    tiny = _cases.set_name() == "tiny"
    rounds = int(os.environ.get(_overhead.ROUNDS_ENV) or (TINY_ROUNDS if tiny else _overhead.DEFAULT_ROUNDS))
    calls = int(os.environ.get(_overhead.CALLS_ENV) or (TINY_CALLS if tiny else _overhead.DEFAULT_CALLS))
    return rounds, calls


@pytest.fixture
def overhead_row(benchmark, bench_device, recorder):
    """run(case): time one row (fastconv loop through pytest-benchmark, nn loop in each round's setup) and
    record it; a backend that cannot run here is recorded as skipped with its reason."""
    if benchmark.disabled:
        pytest.skip("pytest-benchmark is disabled (--benchmark-disable or xdist); nothing would be timed")

    def run(case: _overhead.Case) -> dict:
        rounds, calls = _rounds_calls()
        with _overhead.timing_environment():
            try:
                pair = _overhead.build(case, bench_device)
            except fastconv.BackendNotSupported as e:
                recorder.overhead_rows.append(_overhead.skipped_row(case, str(e)))
                pytest.skip(f"{case.provider}: {e}")
            for _ in range(2):  # warm-up
                pair.nn_loop(calls)
                pair.fastconv_loop(calls)
            nn_s: list[tuple[float, float]] = []
            fc_wall: list[float] = []

            def setup():
                nn_s.append(_overhead.timed_loop(pair.nn_loop, calls, bench_device))

            def target():
                w0 = time.perf_counter()
                pair.fastconv_loop(calls)
                fc_wall.append((time.perf_counter() - w0) / calls)

            # the clock of record (the thread's CPU time on CPU, see bench/_overhead.py) times the rounds
            benchmark._timer = _overhead.clock(bench_device)
            benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=0, iterations=1)
            fc_s = [t / calls for t in benchmark.stats.stats.data]
        row = _overhead.row(pair, fc_s, [t for t, _ in nn_s], calls, bench_device, fc_wall, [w for _, w in nn_s])
        row["timer"] = ("pytest-benchmark pedantic: " + row["timer"] + "; the nn loop runs in each round's setup")
        benchmark.extra_info.update(row)
        recorder.overhead_rows.append(row)
        return row

    return run


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_overhead(case, overhead_row):
    overhead_row(case)
