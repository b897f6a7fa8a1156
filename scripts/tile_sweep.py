#!/usr/bin/env python3
"""TILE SWEEP: run every tile of every Triton tile table once, forced, and compare with float64 PyTorch.

    python3 scripts/tile_sweep.py --out DIR [--jobs N] [--timeout S] [--family F]... [--kind K]...
                                  [--variant V]... [--max-tiles N] [--shape default|tiny] [--arch sm_80|sm_90]

For the GPU's architecture (fastconv.triton.configs.arch_key; --arch overrides) it takes every family of configs.CONFIGS
(conv2d_fwd, conv2d_dgrad, conv2d_wgrad, im2col_gemm) x operand kind ("half": fp16 and bf16, "tf32": fp32
with TF32 allowed, "fp32": exact fp32) x tile of that table, and runs each variant of the family once inside
`fastconv.triton.launch.forced(tile)` -- every autotuned launch then uses exactly that tile, no autotuning,
the fused-launch tile filter ignored -- on a small problem whose sizes are odd and cross the tile edges:

    conv2d_fwd    plain (conv + bias), fused (bias + scale + shift + residual + SiLU), nchw (NCHW input and
                  output: the launcher's channels_last copy and the SPLIT_N store), bn_stats (the training
                  op fastconv::conv_bn_act_train: BatchNorm statistics reduced in the conv epilogue; y, mean
                  and var are compared)
    conv2d_dgrad  stride1, stride2 (stride phases)
    conv2d_wgrad  bias_grad (weight and bias gradients, split-K)
    im2col_gemm   plain (algo="im2col")

Inputs are quantised to the row's dtype and the reference is PyTorch on those values in float64; the error is
max |out - ref| / max(1, max |ref|) (the test suite's measure), the tolerance the test suite's per dtype (TF32:
5e-3). Outputs and scratch buffers start as NaN (the tests' allocation hooks), so an element a tile never
writes fails the row.

Results: DIR/tile_sweep.json (every row: family, kind, tile, variant, dtype, status, max_err, tol, seconds,
message; a summary per family) and DIR/tile_sweep.md, both rewritten as rows arrive, so a run stopped early
still leaves what it did. --jobs N > 0 runs N worker processes (compiles proceed in parallel; a worker whose
CUDA context broke is restarted and skips the rows it finished), writing DIR/tile_sweep_parts/; --jobs 0 runs
in this process. Exit status: 0 every row passed, 1 a row failed or did not run, 2 the forcing API
fastconv.triton.launch.forced is missing, 3 no GPU (and TRITON_INTERPRET unset).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pathlib
import subprocess
import sys
import time
import traceback
import zlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FAMILY_VARIANTS = {
    "conv2d_fwd": ("plain", "fused", "nchw", "bn_stats"),
    "conv2d_dgrad": ("stride1", "stride2"),
    "conv2d_wgrad": ("bias_grad",),
    "im2col_gemm": ("plain",),
}
KIND_DTYPES = {"half": ("fp16", "bf16"), "tf32": ("fp32",), "fp32": ("fp32",)}
# test-suite tolerances (tests/helpers.TOL), TF32 added
TOL = {"fp16": 6e-3, "bf16": 2.5e-2, "fp32": 2e-4, "tf32": 5e-3}
# N, C_in, H, W, C_out (3x3 kernels, padding 1). default: M = 2*15*13 = 390 pixels (> the largest BLOCK_M 256,
# not a multiple of any block), C_in 136 (crosses BLOCK_K 16/32/64 and BLOCK_N 128 with a remainder of 8),
# C_out 264 (crosses BLOCK_N and wgrad's BLOCK_M 256). tiny: for the CPU interpreter.
SHAPES = {"default": (2, 136, 15, 13, 264), "tiny": (2, 5, 5, 4, 6)}
PARTS = "tile_sweep_parts"
STICKY_CUDA_ERROR = 4  # a worker's exit status after an error that breaks its CUDA context


class ForcingMissing(RuntimeError):
    pass


def forcing_api():
    """fastconv.triton.launch.forced, imported lazily; ForcingMissing with the reason when it is not there."""
    try:
        from fastconv.triton import launch
    except ImportError as e:
        raise ForcingMissing(f"cannot import fastconv.triton.launch ({type(e).__name__}: {e})") from e
    forced = getattr(launch, "forced", None)
    if forced is None:
        raise ForcingMissing("fastconv.triton.launch has no `forced` (the tile-forcing context manager)")
    return forced


def label(tile) -> str:
    bm, bn, bk, warps, stages = tile
    return f"{bm}x{bn}x{bk} w{warps} s{stages}"


def plan(arch: str, families=None, kinds=None, variants=None, max_tiles=None) -> list[dict]:
    """Every (family, kind, tile, variant, dtype) row to run, in execution order: the first tile of every table
    in every variant, then the second tile of each, ... -- so a run cut short has covered every family, kind and
    variant on its leading tiles. `id` is the position in that order; `order` sorts rows for the reports."""
    from fastconv.triton.configs import CONFIGS, KINDS

    rows = []
    for fi, (family, table) in enumerate(CONFIGS.items()):
        if families and family not in families:
            continue
        for ki, kind in enumerate(KINDS):
            if (kinds and kind not in kinds) or kind not in table:
                continue
            tiles = table[kind][arch][:max_tiles] if max_tiles else table[kind][arch]
            for ti, tile in enumerate(tiles):
                for vi, variant in enumerate(FAMILY_VARIANTS.get(family, ("plain",))):
                    if variants and variant not in variants:
                        continue
                    for di, dtype in enumerate(KIND_DTYPES[kind]):
                        rows.append(dict(family=family, kind=kind, tile=list(tile), tile_label=label(tile),
                                         variant=variant, dtype=dtype, order=[fi, ki, ti, vi, di]))
    rows.sort(key=lambda r: (r["order"][2], r["order"][0], r["order"][1], r["order"][3], r["order"][4]))
    for i, r in enumerate(rows):
        r["id"] = i
    return rows


# ------------------------------------------------------------------------------------------ problems


def _torch_dtype(name):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def _rel_err(out, ref) -> float:
    import torch

    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    if ref.numel() == 0:
        return 0.0
    return (out - ref).abs().max().item() / max(1.0, ref.abs().max().item())


class Problems:
    """Inputs and float64 references per (variant, dtype), built once and shared by every tile."""

    def __init__(self, device, shape):
        self.device = device
        self.shape = shape
        self._cache = {}

    def get(self, family, variant, dtype):
        key = (family, variant, dtype)
        if key not in self._cache:
            self._cache[key] = self._build(family, variant, dtype)
        return self._cache[key]

    def _build(self, family, variant, dtype):
        import torch
        import torch.nn.functional as F

        N, C, H, W, K = self.shape
        dt = _torch_dtype(dtype)
        gen = torch.Generator().manual_seed(zlib.crc32(f"{family}/{variant}/{dtype}".encode()))

        def rnd(*shape, scale=1.0):
            return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dt)

        cl = torch.channels_last
        x = rnd(N, C, H, W)
        w = rnd(K, C, 3, 3, scale=(9 * C) ** -0.5)
        b = rnd(K)
        d = self.device

        def f64(t):  # the reference runs in float64 on the same device (cuDNN / ATen), one per problem
            return t.double().to(d)

        xd, wd, bd = f64(x), f64(w), f64(b)
        stride = 2 if variant == "stride2" else 1
        geo = dict(stride=[stride, stride], padding=[1, 1, 1, 1], dilation=[1, 1], groups=1)
        if family in ("conv2d_fwd", "im2col_gemm") and variant in ("plain", "fused", "nchw"):
            scale = shift = res = None
            act = "identity"
            ref = F.conv2d(xd, wd, bd, 1, 1)
            if variant == "fused":
                scale, shift, res = rnd(K).abs() + 0.5, rnd(K), rnd(*ref.shape)
                act = "silu"
                ref = F.silu(ref * f64(scale)[None, :, None, None] + f64(shift)[None, :, None, None] + f64(res))
            fmt = torch.contiguous_format if variant == "nchw" else cl
            algo = "im2col" if family == "im2col_gemm" else "implicit"
            args = [t.to(d).contiguous(memory_format=fmt) if t is not None and t.dim() == 4 else
                    (t.to(d) if t is not None else None) for t in (x, w, b, scale, shift, res)]

            def run(args=args, act=act, algo=algo):
                xx, ww, bb, ss, tt, rr = args
                return [torch.ops.fastconv.conv2d(xx, ww, bb, geo["stride"], geo["padding"], geo["dilation"], 1,
                                                  ss, tt, rr, act, algo, "triton")]

            return run, [ref]
        if variant == "bn_stats":
            gamma, beta = rnd(K).abs() + 0.5, rnd(K)
            z = F.conv2d(xd, wd, bd, 1, 1)
            mean, var = z.mean((0, 2, 3)), z.var((0, 2, 3), unbiased=False)
            y = F.relu((z - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + 1e-5)
                       * f64(gamma)[None, :, None, None] + f64(beta)[None, :, None, None])
            args = [x.to(d).contiguous(memory_format=cl), w.to(d).contiguous(memory_format=cl), b.to(d),
                    gamma.float().to(d), beta.float().to(d)]

            def run(args=args):
                xx, ww, bb, gg, be = args
                yy, _z, mm, vv = torch.ops.fastconv.conv_bn_act_train(
                    xx, ww, bb, gg, be, None, geo["stride"], geo["padding"], geo["dilation"], 1, 1e-5, "relu",
                    # every mutable argument passed (running buffers, num_batches_tracked): torch 2.11's
                    # ADInplaceOrView kernel cannot take omitted or None ones
                    "implicit", "triton",
                    torch.zeros(ww.shape[0], device=xx.device), torch.ones(ww.shape[0], device=xx.device), 0.1, None,
                    torch.zeros((), dtype=torch.long, device=xx.device))
                return [yy, mm, vv]

            return run, [y, mean, var]
        if family == "conv2d_dgrad":
            OH, OW = (H - 1) // stride + 1, (W - 1) // stride + 1
            gy = rnd(N, K, OH, OW)
            ref = torch.nn.grad.conv2d_input(xd.shape, wd, f64(gy), stride, 1)
            args = [gy.to(d).contiguous(memory_format=cl), w.to(d).contiguous(memory_format=cl)]

            def run(args=args):
                g, ww = args
                return [torch.ops.fastconv.conv2d_input_grad(g, ww, [N, C, H, W], geo["stride"], geo["padding"],
                                                             geo["dilation"], 1, "triton")]

            return run, [ref]
        if family == "conv2d_wgrad":
            gy = rnd(N, K, H, W)
            ref_w = torch.nn.grad.conv2d_weight(xd, wd.shape, f64(gy), 1, 1)
            ref_b = f64(gy).sum((0, 2, 3))
            args = [gy.to(d).contiguous(memory_format=cl), x.to(d).contiguous(memory_format=cl)]

            def run(args=args):
                g, xx = args
                dw, db = torch.ops.fastconv.conv2d_weight_grad(g, xx, [K, C, 3, 3], geo["stride"], geo["padding"],
                                                               geo["dilation"], 1, True, "triton")
                return [dw, db]

            return run, [ref_w, ref_b]
        raise ValueError(f"no problem for {family}/{variant}")


@contextlib.contextmanager
def _precision(kind):
    import torch

    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = kind == "tf32"
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@contextlib.contextmanager
def _poisoned():
    """NaN-filled outputs and scratch buffers through the allocation hooks the tests use (where they exist)."""
    import torch

    def nan_alloc(shape, dtype, device, memory_format):
        return torch.full(shape, float("nan"), dtype=dtype, device=device).contiguous(memory_format=memory_format)

    def nan_workspace(shape, device, dtype):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    import importlib

    saved = []
    for module, name, fn in (("fastconv.ops.conv2d", "alloc", nan_alloc),
                             ("fastconv.ops.conv_bn_act", "alloc", nan_alloc),
                             ("fastconv.triton.conv2d", "workspace", nan_workspace),
                             ("fastconv.triton.im2col", "workspace", nan_workspace)):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        if hasattr(mod, name):
            saved.append((mod, name, getattr(mod, name)))
            setattr(mod, name, fn)
    try:
        yield bool(saved)
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def _sticky(exc: BaseException) -> bool:
    """An error after which this process's CUDA context is unusable (every later launch would fail too)."""
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(s in text for s in ("illegal memory access", "illegal instruction", "misaligned address",
                                   "unspecified launch failure", "device-side assert", "cuda error: an illegal"))


def run_row(row, problems, forced, device) -> dict:
    import torch

    t0 = time.time()
    out = dict(row)
    tol = TOL["tf32" if row["kind"] == "tf32" else row["dtype"]]
    out.update(tol=tol, max_err=None, message="")
    try:
        run, refs = problems.get(row["family"], row["variant"], row["dtype"])
        with _precision(row["kind"]), _poisoned(), forced(tuple(row["tile"])):
            outs = run()
            if device.type == "cuda":
                torch.cuda.synchronize()
        errs = [_rel_err(o, r) for o, r in zip(outs, refs)]
        err = max(errs)
        out["max_err"] = err if err != float("inf") else "non-finite"
        out["status"] = "pass" if err <= tol else "FAIL"
        if err == float("inf"):
            out["message"] = "non-finite values (an element never written, or an overflow)"
    except Exception as e:  # noqa: BLE001 - every failure is a row
        out["status"] = "error"
        out["message"] = f"{type(e).__name__}: {e}".splitlines()[0][:400]
        out["traceback"] = traceback.format_exc()[-3000:]
        out["sticky"] = _sticky(e)
    out["seconds"] = round(time.time() - t0, 3)
    return out


# ------------------------------------------------------------------------------------------ reports


def summarize(rows) -> dict:
    fams = {}
    for r in rows:
        s = fams.setdefault(r["family"], {"pass": 0, "fail": 0, "not_run": 0})
        key = "pass" if r.get("status") == "pass" else "not_run" if r.get("status", "not run") == "not run" else "fail"
        s[key] += 1
    return fams


def write_reports(out_dir: pathlib.Path, meta: dict, rows: list[dict]) -> None:
    rows = sorted(rows, key=lambda r: r["order"])  # family, kind, tile, variant, dtype
    summary = summarize(rows)
    doc = dict(meta, rows=[{k: v for k, v in r.items() if k != "traceback"} for r in rows], summary=summary,
               complete=all(r.get("status", "not run") != "not run" for r in rows),
               written=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    tmp = out_dir / "tile_sweep.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(out_dir / "tile_sweep.json")
    lines = [f"# Tile sweep ({meta['arch']}, {meta['device_name']})", "",
             f"torch {meta['torch']}, triton {meta['triton']}, shape N,C_in,H,W,C_out = {meta['shape']}, 3x3 pad 1; "
             f"every tile forced once per variant and dtype, compared with float64 PyTorch "
             f"(error = max|out-ref| / max(1, max|ref|)).", ""]
    if not doc["complete"]:
        lines += ["**Incomplete**: rows marked `not run` never ran (stopped early).", ""]
    lines += ["| family | pass | fail | not run |", "|---|---:|---:|---:|"]
    lines += [f"| {f} | {s['pass']} | {s['fail']} | {s['not_run']} |" for f, s in summary.items()]
    lines += ["", "| family | kind | tile (BM x BN x BK, warps, stages) | variant | dtype | result | max err | tol |",
              "|---|---|---|---|---|---|---:|---:|"]
    for r in rows:
        err = r.get("max_err")
        err = f"{err:.2e}" if isinstance(err, float) else (err or "")
        status = r.get("status", "not run")
        note = f" ({r['message']})" if r.get("message") and status != "pass" else ""
        lines.append(f"| {r['family']} | {r['kind']} | {r['tile_label']} | {r['variant']} | {r['dtype']} | "
                     f"{status}{note.replace('|', '/')} | {err} | {r.get('tol', '')} |")
    tmp = out_dir / "tile_sweep.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out_dir / "tile_sweep.md")


def write_error(out_dir: pathlib.Path, message: str) -> None:
    """The reports of a sweep that could not start, saying why (so the artefacts exist either way)."""
    doc = dict(tool="scripts/tile_sweep.py", error=message, rows=[], summary={}, complete=False)
    (out_dir / "tile_sweep.json").write_text(json.dumps(doc, indent=1))
    (out_dir / "tile_sweep.md").write_text(f"# Tile sweep\n\nNot run: {message}\n")


def _meta(device, arch, shape, args) -> dict:
    import torch
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    return dict(tool="scripts/tile_sweep.py", device=str(device), device_name=name, arch=arch,
                torch=torch.__version__, triton=triton.__version__, shape=list(shape),
                interpreter=os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                command=" ".join([os.path.basename(sys.argv[0])] + list(args)))


# ------------------------------------------------------------------------------------------ driver


def _parser():
    p = argparse.ArgumentParser(prog="python3 scripts/tile_sweep.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (tile_sweep.json, tile_sweep.md)")
    p.add_argument("--jobs", type=int, default=None,
                   help="worker processes (default: min(8, cores) on a GPU, 0 = in this process on CPU)")
    p.add_argument("--timeout", type=float, default=0, help="stop after this many seconds (0: no limit)")
    p.add_argument("--family", action="append", help="only this family (repeatable)")
    p.add_argument("--kind", action="append", choices=sorted(KIND_DTYPES), help="only this operand kind")
    p.add_argument("--variant", action="append", help="only this variant (repeatable)")
    p.add_argument("--max-tiles", type=int, default=None, help="only the first N tiles of each table")
    p.add_argument("--arch", choices=("sm_80", "sm_90"), default=None,
                   help="tile tables of this arch (default: the GPU's, configs.arch_key; sm_80 on CPU)")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="problem size (default: 'default' on a GPU, 'tiny' under the interpreter)")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    return p


NO_GPU = ("no GPU (torch.cuda.is_available() is False) and TRITON_INTERPRET is unset: nothing can run the Triton "
          "kernels here. Run on a GPU, or with TRITON_INTERPRET=1 for a slow CPU check.")


def _setup(args):
    import torch

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        print(f"tile_sweep: {NO_GPU}", file=sys.stderr)
        return None
    import fastconv  # noqa: F401  (registers the ops)
    from fastconv.triton.configs import arch_key

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = SHAPES[args.shape or ("default" if device.type == "cuda" else "tiny")]
    arch = args.arch or arch_key(device)
    rows = plan(arch, args.family, args.kind, args.variant, args.max_tiles)
    return device, shape, arch, rows


def _worker(args, out_dir) -> int:
    setup = _setup(args)
    if setup is None:
        return 3
    device, shape, arch, rows = setup
    forced = forcing_api()
    part = out_dir / PARTS / f"worker-{args.worker}.jsonl"
    done = set()
    if part.exists():
        for line in part.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError):
                done.add(json.loads(line)["id"])
    problems = Problems(device, shape)
    n = args.jobs
    with open(part, "a") as f:
        for row in rows[args.worker::n]:
            if row["id"] in done:
                continue
            res = run_row(row, problems, forced, device)
            f.write(json.dumps({k: v for k, v in res.items()}) + "\n")
            f.flush()
            print(f"[tile_sweep {args.worker}] {res['family']} {res['kind']} {res['tile_label']} {res['variant']} "
                  f"{res['dtype']}: {res['status']} {res.get('max_err')} {res['message']}", flush=True)
            if res.get("sticky"):
                return STICKY_CUDA_ERROR
    return 0


def _merge(rows, out_dir, n) -> list[dict]:
    got = {}
    for i in range(n):
        part = out_dir / PARTS / f"worker-{i}.jsonl"
        if part.exists():
            for line in part.read_text().splitlines():
                with contextlib.suppress(ValueError, KeyError):
                    r = json.loads(line)
                    got[r["id"]] = r
    return [got.get(r["id"], dict(r, status="not run")) for r in rows]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.worker is not None:
        return _worker(args, out_dir)
    t0 = time.time()
    setup = _setup(args)
    if setup is None:
        write_error(out_dir, NO_GPU)
        return 3
    device, shape, arch, rows = setup
    try:
        forced = forcing_api()
    except ForcingMissing as e:
        msg = (f"the tile-forcing API is missing: {e}. The sweep needs `fastconv.triton.launch.forced(tile)` (a "
               "context manager under which every autotuned Triton launch runs exactly `tile` = (BLOCK_M, BLOCK_N, "
               "BLOCK_K, num_warps, num_stages)).")
        print(f"tile_sweep: ERROR: {msg}", file=sys.stderr)
        write_error(out_dir, msg)
        return 2
    meta = _meta(device, arch, shape, argv)
    print(f"tile_sweep: {len(rows)} rows on {meta['device_name']} ({arch}), shape {list(shape)}", flush=True)
    jobs = args.jobs if args.jobs is not None else (min(8, os.cpu_count() or 1) if device.type == "cuda" else 0)
    deadline = t0 + args.timeout if args.timeout else None
    if jobs <= 0:
        problems = Problems(device, shape)
        done = []
        try:
            for row in rows:
                if deadline and time.time() > deadline:
                    break
                done.append(run_row(row, problems, forced, device))
                write_reports(out_dir, dict(meta, seconds=round(time.time() - t0, 1)),
                              done + [dict(r, status="not run") for r in rows[len(done):]])
        except KeyboardInterrupt:  # SIGINT (gpu_check's step timeout): report what ran
            print("tile_sweep: interrupted", flush=True)
        final = done + [dict(r, status="not run") for r in rows[len(done):]]
    else:
        final = _run_workers(args, argv, out_dir, rows, meta, jobs, t0, deadline)
    write_reports(out_dir, dict(meta, seconds=round(time.time() - t0, 1)), final)
    s = summarize(final)
    print("tile_sweep: " + "; ".join(f"{f}: {v['pass']} pass, {v['fail']} fail, {v['not_run']} not run"
                                     for f, v in s.items()), flush=True)
    for r in final:
        if r.get("status") not in ("pass", "not run"):
            print(f"  {r['status']}: {r['family']} {r['kind']} {r['tile_label']} {r['variant']} {r['dtype']} "
                  f"err={r.get('max_err')} {r.get('message', '')}")
    print(f"tile_sweep: wrote {out_dir / 'tile_sweep.json'} and tile_sweep.md in {time.time() - t0:.0f} s")
    return 0 if all(r.get("status") == "pass" for r in final) else 1


def _run_workers(args, argv, out_dir, rows, meta, jobs, t0, deadline) -> list[dict]:
    (out_dir / PARTS).mkdir(exist_ok=True)
    for old in (out_dir / PARTS).glob("worker-*.jsonl"):
        old.unlink()
    base = [sys.executable, str(pathlib.Path(__file__).resolve())] + argv + ["--out", str(out_dir.resolve()),
                                                                            "--jobs", str(jobs)]

    def start(i):
        log = open(out_dir / PARTS / f"worker-{i}.log", "a")
        return subprocess.Popen(base + ["--worker", str(i)], stdout=log, stderr=subprocess.STDOUT)

    procs = {i: start(i) for i in range(jobs)}
    try:
        _watch(args, out_dir, rows, meta, jobs, t0, deadline, procs, start)
    except KeyboardInterrupt:  # SIGINT (gpu_check's step timeout): stop the workers, report what ran
        print("tile_sweep: interrupted", flush=True)
    for p in procs.values():
        p.kill()
    return _merge(rows, out_dir, jobs)


def _watch(args, out_dir, rows, meta, jobs, t0, deadline, procs, start) -> None:
    restarts = {i: 0 for i in range(jobs)}
    seen = -1
    while procs:
        time.sleep(2)
        for i, p in list(procs.items()):
            rc = p.poll()
            if rc is None:
                continue
            del procs[i]
            if rc == STICKY_CUDA_ERROR and restarts[i] < 20:
                restarts[i] += 1
                procs[i] = start(i)
        merged = _merge(rows, out_dir, jobs)
        n_done = sum(r.get("status") != "not run" for r in merged)
        if n_done != seen:
            seen = n_done
            write_reports(out_dir, dict(meta, seconds=round(time.time() - t0, 1)), merged)
        if deadline and time.time() > deadline:
            print(f"tile_sweep: --timeout {args.timeout:.0f} s reached; {n_done}/{len(rows)} rows done", flush=True)
            return


if __name__ == "__main__":
    sys.exit(main())
