"""CPU training-mode BatchNorm + activation: fastconv's C++ twin (backend 'cpu', fastconv._C) against PyTorch.

    python bench/cpu_auto_batch_norm.py [--threads 1 2] [--dtype float32]

On a [32, 64, 32, 32] conv output z (NCHW and channels_last), with affine parameters and ReLU:
    forward   ours: ext_batch_norm_stats + ext_batch_norm_finalize + ext_batch_norm_act
              torch: relu(batch_norm(z, training=True))
    backward  ours: ext_batch_norm_act_backward (grad_z, sum_g, sum_gx)
              torch: autograd backward of the same relu(batch_norm(...)) graph
Median times from torch.utils.benchmark; these are the figures behind the 'auto' choice on CPU tensors.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from fastconv.ops import conv_bn_act as bn_ops


def _median(stmt, env, min_run_time=0.5) -> float:
    return benchmark.Timer(stmt=stmt, globals=env).blocked_autorange(min_run_time=min_run_time).median


def run(threads: int, dtype: torch.dtype, shape=(32, 64, 32, 32)) -> list[dict]:
    torch.set_num_threads(threads)
    ops = bn_ops.ext_ops()
    rows = []
    C = shape[1]
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    for layout in ("nchw", "channels_last"):
        z = torch.randn(shape, dtype=dtype)
        if layout == "channels_last":
            z = z.contiguous(memory_format=torch.channels_last)
        g = torch.randn_like(z)
        cnt, mp, m2 = ops.ext_batch_norm_stats(z)
        mean, var = ops.ext_batch_norm_finalize(cnt, mp, m2, None)
        zt = z.detach().requires_grad_()
        yt = F.relu(F.batch_norm(zt, None, None, w.to(dtype), b.to(dtype), True, 0.1, 1e-5))
        env = dict(ops=ops, z=z, w=w, b=b, g=g, mean=mean, var=var, F=F, torch=torch, zt=zt, yt=yt, dtype=dtype)
        fwd_ours = _median("c, m, q = ops.ext_batch_norm_stats(z); mu, v = ops.ext_batch_norm_finalize(c, m, q, None); "
                           "ops.ext_batch_norm_act(z, mu, v, w, b, None, 1e-5, 'relu')", env)
        fwd_torch = _median("F.relu(F.batch_norm(z, None, None, w.to(dtype), b.to(dtype), True, 0.1, 1e-5))", env)
        bwd_ours = _median("ops.ext_batch_norm_act_backward(g, z, mean, var, w, b, None, 1e-5, 'relu', False)", env)
        bwd_torch = _median("torch.autograd.grad(yt, (zt,), g, retain_graph=True)", env)
        rows.append(dict(layout=layout, fwd_ours=fwd_ours, fwd_torch=fwd_torch, bwd_ours=bwd_ours, bwd_torch=bwd_torch))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {args.dtype}, z [32, 64, 32, 32], relu, CPU: "
          f"{torch.backends.cpu.get_cpu_capability()}")
    print(f"{'layout':14} {'thr':>3} {'fwd ours':>10} {'fwd torch':>10} {'ratio':>6} {'bwd ours':>10} {'bwd torch':>10} "
          f"{'ratio':>6}")
    for threads in args.threads:
        for r in run(threads, getattr(torch, args.dtype)):
            print(f"{r['layout']:14} {threads:>3} {r['fwd_ours'] * 1e3:8.3f}ms {r['fwd_torch'] * 1e3:8.3f}ms "
                  f"{r['fwd_ours'] / r['fwd_torch']:6.2f} {r['bwd_ours'] * 1e3:8.3f}ms {r['bwd_torch'] * 1e3:8.3f}ms "
                  f"{r['bwd_ours'] / r['bwd_torch']:6.2f}")


if __name__ == "__main__":
    main()
