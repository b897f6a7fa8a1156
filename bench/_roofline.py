"""Work per row (FLOPs, compulsory bytes) and the roofline it is judged against.

Peaks are measured once per session on the device itself: a large matmul per dtype (FLOP/s) and a large
device-to-device copy (bytes/s, read + write). % of roofline = achieved / min(peak FLOP/s, intensity × peak
bandwidth) = max(FLOP/s / peak FLOP/s, bytes/s / peak bytes/s), with intensity from compulsory traffic (each
input, weight and output moved once), so a row at 100 % could not go faster on this device.

FLOPs count multiply and add separately (2 per MAC). Max-pool "FLOPs" are window comparisons; it is judged
by bandwidth.
"""
from __future__ import annotations

import time

import torch

from . import _inputs

ELEMENT = {"fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2}
GPU_MATMUL, CPU_MATMUL = 8192, 1024
GPU_COPY_BYTES, CPU_COPY_BYTES = 2 * 2**30, 128 * 2**20


def work(op: str, mode: str, problem, dtype: str) -> tuple[float, float]:
    """(FLOPs, compulsory bytes) of one call."""
    L, N, e = problem.layer, problem.N, ELEMENT[dtype]
    OH, OW = L.out_hw
    x, y = N * L.C * L.H * L.W, N * L.K * OH * OW
    if op == "max_pool2d":
        flops = N * L.C * OH * OW * L.R * L.S
        fwd, bwd = (x + y) * e, (y + x) * e
    else:
        w = L.K * (L.C // L.groups) * L.R * L.S
        flops = 2.0 * N * L.K * OH * OW * (L.C // L.groups) * L.R * L.S
        fwd = (x + w + y) * e
        bwd = (y + x + w + x + w) * e  # read dy, x, w; write dx, dw
    passes = {"fwd": 1, "eval": 1, "train-fwd": 1, "bwd": 2, "train-bwd": 2, "fwd+bwd": 3, "train-fwd+bwd": 3}[mode]
    traffic = {1: fwd, 2: bwd, 3: fwd + bwd}[passes]
    if op == "max_pool2d":  # the backward scatters, it compares nothing
        return (0.0 if passes == 2 else flops), traffic
    return flops * passes, traffic  # backward = dgrad + wgrad, each the forward's FLOPs


def _best_s(fn, device, repeats=40) -> float:
    """Fastest of several timed calls: a peak is what the device can do, so noise is dropped, not averaged."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            from ._timing import device_median_ms

            return device_median_ms(fn)[0] / 1e3
        return do_bench(fn, warmup=25, rep=200, return_mode="min") / 1e3
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure_peaks(device: torch.device, dtypes) -> dict:
    """{"flops": {dtype: FLOP/s}, "bytes_per_s": B/s, "how": text}, measured now on `device`."""
    n = GPU_MATMUL if device.type == "cuda" else CPU_MATMUL
    flops = {}
    for name in dtypes:
        a = torch.randn(n, n, device=device, dtype=_inputs.DTYPES[name])
        b = torch.randn(n, n, device=device, dtype=_inputs.DTYPES[name])
        with _inputs.tf32(name == "tf32"):
            flops[name] = 2.0 * n ** 3 / _best_s(lambda: torch.mm(a, b), device)  # noqa: B023
    size = GPU_COPY_BYTES if device.type == "cuda" else CPU_COPY_BYTES
    src = torch.empty(size // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    bw = 2.0 * size / _best_s(lambda: dst.copy_(src), device)
    how = (f"fastest of repeated torch.mm {n}×{n}×{n} per dtype and copies of {size / 2**20:.0f} MiB "
           f"(read + write counted)")
    return {"flops": flops, "bytes_per_s": bw, "how": how}


def higher(a: dict, b: dict) -> dict:
    """The higher of two peak measurements, per figure."""
    return {"flops": {k: max(v, b["flops"].get(k, 0.0)) for k, v in a["flops"].items()},
            "bytes_per_s": max(a["bytes_per_s"], b["bytes_per_s"]),
            "how": a["how"] + "; measured at the start and the end of the session, the higher kept"}


def metrics(flops: float, nbytes: float, ms: float, dtype: str, peaks: dict) -> dict:
    s = ms / 1e3
    f, b = flops / s, nbytes / s
    peak_f = peaks["flops"].get(dtype) or peaks["flops"].get("fp32")
    util = max(f / peak_f if peak_f else 0.0, b / peaks["bytes_per_s"])
    return {"tflops": f / 1e12, "gbps": b / 1e9, "roofline_pct": 100.0 * util}
