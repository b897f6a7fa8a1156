"""Timing one benchmark row.

pytest-benchmark is the harness: every row goes through the `benchmark` fixture's pedantic mode, so its
statistics table and --benchmark-json/--benchmark-compare keep working. Which number is the figure of record:

* CPU: the pedantic median itself (time.perf_counter around each call; one warm-up round).
* GPU: a host clock around an asynchronous launch measures the launch, not the kernel, so pytest-benchmark
  times a *synchronized* call (a host-side figure, kept as host_median_ms), and the figure of record is
  triton.testing.do_bench's median: CUDA events around each call, warm-up, the L2 cache flushed before
  every call (it zeroes a buffer larger than L2), gradients reset via grad_to_none. Without triton, CUDA
  events around each call with the same warm-up and median (inputs rotate through sets larger than L2, see
  _inputs.py, so the L2 holds no previous call's data).
"""
from __future__ import annotations

import os
import statistics

import torch

GPU_WARMUP_MS = int(os.environ.get("FASTCONV_BENCH_WARMUP_MS", "25"))
GPU_REP_MS = int(os.environ.get("FASTCONV_BENCH_REP_MS", "100"))
HOST_ROUNDS_GPU = 5


def cpu_rounds() -> int:
    return int(os.environ.get("FASTCONV_BENCH_CPU_ROUNDS", "3"))


def _cuda_events_median_ms(fn, grad_to_none=()) -> float:
    def reset():
        for t in grad_to_none:
            t.grad = None

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 3, 1e-3)
    for _ in range(max(1, int(GPU_WARMUP_MS / estimate))):
        fn()
    times = []
    for _ in range(max(5, int(GPU_REP_MS / estimate))):
        reset()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def device_median_ms(fn, grad_to_none=()) -> tuple[float, str]:
    """Median device time of fn() on the current CUDA device, and a description of how it was taken."""
    try:
        from triton.testing import do_bench
    except ImportError:
        return (_cuda_events_median_ms(fn, grad_to_none),
                "CUDA events per call, warm-up, median; inputs rotate through >2×L2 (triton not importable)")
    ms = do_bench(fn, warmup=GPU_WARMUP_MS, rep=GPU_REP_MS, grad_to_none=list(grad_to_none) or None,
                  return_mode="median")
    return ms, "triton.testing.do_bench: CUDA events per call, L2 flushed before each call, warm-up, median"


def measure(benchmark, fn, device: torch.device, grad_to_none=()) -> dict:
    """Time fn() for one row through pytest-benchmark; returns median_ms (figure of record) and how."""
    if device.type == "cuda":
        def synced():
            fn()
            torch.cuda.synchronize()

        benchmark.pedantic(synced, rounds=HOST_ROUNDS_GPU, warmup_rounds=2, iterations=1)
        host_ms = benchmark.stats.stats.median * 1e3
        ms, how = device_median_ms(fn, grad_to_none)
        return {"median_ms": ms, "host_median_ms": host_ms, "timer": how}
    rounds = cpu_rounds()
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
    return {"median_ms": benchmark.stats.stats.median * 1e3, "host_median_ms": None,
            "timer": f"pytest-benchmark pedantic: time.perf_counter per call, 1 warm-up, median of {rounds}"}
