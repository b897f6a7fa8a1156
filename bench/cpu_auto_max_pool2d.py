"""CPU max-pool: fastconv's C++ twin (backend 'cpu', fastconv._C) against PyTorch's own CPU kernel.

    python bench/cpu_auto_max_pool2d.py [--threads 1 2] [--dtype float32]

Times forward (values + argmax) and backward (grad_input from the argmax) with torch.utils.benchmark on
[32, 64, 32, 32] inputs, NCHW and channels_last, for 3x3/2 (pad 1) and 2x2/2 windows; prints one row per case
with the median times and ours / PyTorch. These are the figures behind the 'auto' choice on CPU tensors.
"""
from __future__ import annotations

import argparse

import torch
from torch.utils import benchmark

import fastconv
from fastconv.ops import max_pool2d as pool_ops

CASES = {"3x3/2 p1": ([3, 3], [2, 2], [1, 1]), "2x2/2": ([2, 2], [2, 2], [0, 0])}


def _median(stmt, env, min_run_time=0.5) -> float:
    return benchmark.Timer(stmt=stmt, globals=env).blocked_autorange(min_run_time=min_run_time).median


def run(threads: int, dtype: torch.dtype, shape=(32, 64, 32, 32)) -> list[dict]:
    torch.set_num_threads(threads)
    ops = pool_ops.ext_ops()
    rows = []
    for layout in ("nchw", "channels_last"):
        x = torch.randn(shape, dtype=dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        cl = layout == "channels_last"
        for name, (k, s, p) in CASES.items():
            geo = (k, s, p, [1, 1])
            y, off = ops.ext_max_pool2d(x, *geo, False)
            ry, idx = torch.ops.aten.max_pool2d_with_indices(x, *geo, False)
            g = torch.randn_like(y)
            env = dict(ops=ops, x=x, geo=geo, torch=torch, off=off, idx=idx, g=g, cl=cl, shape=list(x.shape))
            ours_f = _median("ops.ext_max_pool2d(x, *geo, False)", env)
            theirs_f = _median("torch.ops.aten.max_pool2d_with_indices(x, *geo, False)", env)
            ours_b = _median("ops.ext_max_pool2d_input_grad(g, off, shape, *geo, False, cl)", env)
            theirs_b = _median("torch.ops.aten.max_pool2d_with_indices_backward(g, x, *geo, False, idx)", env)
            rows.append(dict(layout=layout, window=name, threads=threads, fwd_ours=ours_f, fwd_torch=theirs_f,
                             bwd_ours=ours_b, bwd_torch=theirs_b))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, fastconv {fastconv.__version__ if hasattr(fastconv, '__version__') else ''}, "
          f"{args.dtype}, input [32, 64, 32, 32], CPU: {torch.backends.cpu.get_cpu_capability()}")
    print(f"{'layout':14} {'window':9} {'thr':>3} {'fwd ours':>10} {'fwd torch':>10} {'ratio':>6} "
          f"{'bwd ours':>10} {'bwd torch':>10} {'ratio':>6}")
    for threads in args.threads:
        for r in run(threads, getattr(torch, args.dtype)):
            print(f"{r['layout']:14} {r['window']:9} {threads:>3} {r['fwd_ours'] * 1e3:8.3f}ms {r['fwd_torch'] * 1e3:8.3f}ms "
                  f"{r['fwd_ours'] / r['fwd_torch']:6.2f} {r['bwd_ours'] * 1e3:8.3f}ms {r['bwd_torch'] * 1e3:8.3f}ms "
                  f"{r['bwd_ours'] / r['bwd_torch']:6.2f}")


if __name__ == "__main__":
    main()
