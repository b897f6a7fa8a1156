"""The launch plan: every kernel one training (or eval) step launches, with its cost, computed without a GPU.

    python -m fastconv.launch_plan --model resnet [--batch 256] [--dtype bf16] [--train|--eval] [--gpu H100]
                                   [--layer N,C,H,W,K,R,S,stride,pad,groups] [--layout channels_last|nchw]
                                   [--compare-eager] [--json]

The step runs on meta tensors (no memory, no compute) through fastconv's own launchers: Triton launches are
recorded by fastconv.triton.launch (kernel, tile as the FASTCONV_AUTOTUNE=0 heuristic picks it for the named
GPU, grid, longest per-program serial loop, FLOPs, compulsory bytes); every other kernel the step would launch
(PyTorch ops inside and around fastconv's ops: layout copies, partial sums, the classifier, the loss) is
recorded by a dispatch mode from the ATen op and its tensors. `--compare-eager` runs the plain PyTorch model
(cuDNN conv, BatchNorm, ReLU as separate ops) through the same accounting. Roofline time per kernel =
max(FLOPs / peak FLOP/s, bytes / peak bandwidth) from the GPU's datasheet peaks (GPUS).

Compulsory bytes count each distinct tensor a kernel touches once (read or written), which is what a kernel
must move at the least; re-reads through L2 are not counted.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import _backend
from .triton import launch as tlaunch

# Datasheet peaks (dense, no sparsity): NVIDIA H100 SXM5 and H200 SXM (nvidia.com/h100, /h200 datasheets),
# A100 SXM4 80 GB (A100 datasheet). FLOP/s per operand kind; bandwidth in bytes/s.
GPUS = {
    "H100": dict(arch="sm_90", sms=132, bandwidth=3.35e12, flops={"half": 989e12, "tf32": 494e12, "fp32": 67e12}),
    "H200": dict(arch="sm_90", sms=132, bandwidth=4.8e12, flops={"half": 989e12, "tf32": 494e12, "fp32": 67e12}),
    "A100": dict(arch="sm_80", sms=108, bandwidth=2.039e12, flops={"half": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# ATen ops that launch no kernel: allocations, views and metadata.
_NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias",
              "lift_fresh", "_unsafe_view", "set_", "resize_", "size", "stride", "sym_size", "sym_stride",
              "is_same_size", "_has_compatible_shallow_copy_type"}


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _aten_flops(name: str, args, out) -> float:
    """Multiply-adds (x2) of the ATen ops that do GEMM work; 0 for the rest (bandwidth-bound)."""
    if name == "convolution":
        w, y = args[1], out
        return 2.0 * y.numel() * w.shape[1] * w[0, 0].numel()  # w: [K, C/groups, R, S]
    if name == "convolution_backward":
        grad, w = args[0], args[2]
        return 2 * 2.0 * grad.numel() * w.shape[1] * w[0, 0].numel()
    if name in ("mm", "addmm", "bmm"):
        a, b = args[-2], args[-1]
        return 2.0 * a.numel() * b.shape[-1]
    return 0.0


@dataclasses.dataclass
class Row:
    op: str
    launch: tlaunch.Launch


class _PlanMode(TorchDispatchMode):
    """Sees every ATen op of the step and every fastconv op; fastconv ops run their real implementation (on
    meta tensors) under this mode again, so what they launch is recorded with the fastconv op's name."""

    def __init__(self, launches: list):
        super().__init__()
        self.launches = launches
        self.rows: list[Row] = []
        self.stack: list[str] = []

    def _flush(self):
        """Attribute the Triton launches recorded since the last op to the fastconv op now running."""
        while len(self.rows) < len(self.launches):
            self.rows.append(Row(self.stack[-1] if self.stack else "-", self.launches[len(self.rows)]))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._flush()
        if func.namespace == "fastconv":
            self.stack.append(func._opname)
            try:
                with self:
                    out = func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
                self._flush()
                return out
            finally:
                self.stack.pop()
        name = func._opname
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        schema = func._schema
        writes = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
        fresh = any(r.alias_info is None for r in schema.returns)
        if name not in _NO_KERNEL and (writes or fresh) and any(True for _ in _tensors(out)):
            ts = list(_tensors((args, kwargs))) + list(_tensors(out))
            self.launches.append(tlaunch.Launch(f"aten.{name}", None, (1,), 1, False,
                                                _aten_flops(name, args, out), tlaunch.tensor_bytes(*ts)))
            self._flush()
        return out


@contextlib.contextmanager
def _target(gpu: str):
    """Tile tables and grids of the named GPU (FASTCONV_ARCH / FASTCONV_SM_COUNT) while planning."""
    spec = GPUS[gpu]
    with _backend.environment(FASTCONV_ARCH=spec["arch"], FASTCONV_SM_COUNT=str(spec["sms"])):
        yield


def record_step(model: torch.nn.Module, x: torch.Tensor, train: bool, gpu: str = "H100",
                backend: str | None = "triton") -> list[Row]:
    """Rows of one step of `model` on input x (meta tensors): forward, and with `train` the backward from a
    given gradient of the output (the loss itself is not the model's). `backend` pins fastconv's backend (None: plain PyTorch model, nothing pinned)."""
    from .triton import _common

    model.train(train)
    # A step of a running training loop: the ticket counters (allocated zeroed once per device and stream, then
    # reset by the kernels themselves) already exist, so their allocation is not a launch of this step. Their
    # default size: launch bytes count whole tensors, and kernels touch only the counters they need.
    _common.ticket_counters(x.device, 1)
    with _target(gpu), tlaunch.recording() as launches, (
            _backend.backend(backend) if backend else contextlib.nullcontext()):
        mode = _PlanMode(launches)
        with mode:
            if train:
                out = model(x)
                out.backward(torch.empty_like(out))  # the loss's gradient: no kernel of the model's
            else:
                with torch.no_grad():
                    model(x)
        mode._flush()
    return mode.rows


# --layout: the memory format of the model's parameters and input (channels_last: what fast GPU training uses;
# nchw: PyTorch's default, where the Triton GEMMs read their NCHW operands through channels_last copies).
LAYOUTS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}


def build(name: str, batch: int, dtype: torch.dtype, fastconv: bool, layout: str = "channels_last"):
    """(model, input) on the meta device, in `layout` (LAYOUTS) and `dtype`."""
    from . import models

    fmt = LAYOUTS[layout]
    model = models.build(name, fastconv=fastconv).to(device="meta", dtype=dtype, memory_format=fmt)
    c, h, w = models.input_size(name)
    x = torch.empty((batch, c, h, w), device="meta", dtype=dtype).contiguous(memory_format=fmt)
    return model, x


def layer_model(spec: str, dtype: torch.dtype, layout: str = "channels_last"):
    """--layer N,C,H,W,K,R,S,stride,pad,groups: one fused conv+BN+ReLU block on that problem, as inside a
    network (its input needs a gradient)."""
    from .modules import ConvBNReLU2d

    N, C, H, W, K, R, S, stride, pad, groups = (int(v) for v in spec.split(","))
    fmt = LAYOUTS[layout]
    block = ConvBNReLU2d(C, K, (R, S), stride=stride, padding=pad, groups=groups)
    block = block.to(device="meta", dtype=dtype, memory_format=fmt)
    x = torch.empty((N, C, H, W), device="meta", dtype=dtype).contiguous(memory_format=fmt)
    return block, x.requires_grad_()  # a block inside a network: its input gradient is computed too


def autotune_runs(name: str, batch: int, dtype: torch.dtype, gpu: str = "H100",
                  train_images: int = 50_000, test_images: int = 10_000) -> dict:
    """Autotune runs of a whole training of model `name` on a CIFAR-sized data set: each epoch trains on full
    batches plus one short last batch and evaluates likewise, and every later epoch repeats those shapes, so
    the runs are the distinct tuned keys of those four steps, whatever the number of epochs."""
    keys, launches = set(), 0
    steps = [(b, True) for b in {batch, train_images % batch} - {0}]
    steps += [(b, False) for b in {batch, test_images % batch} - {0}]
    for b, train in steps:
        model, x = build(name, b, dtype, fastconv=True)
        rows = record_step(model, x, train, gpu)
        tuned = [r.launch.key for r in rows if r.launch.key]
        keys.update(tuned)
        launches += len(tuned)
    return {"runs": len(keys), "tuned_launches_in_those_steps": launches,
            "steps": [f"{'train' if t else 'eval'} batch {b}" for b, t in steps]}


def roofline_us(launch: tlaunch.Launch, gpu: str, kind: str) -> float:
    spec = GPUS[gpu]
    return 1e6 * max(launch.flops / spec["flops"][kind], launch.bytes / spec["bandwidth"])


def summarize(rows: list[Row], gpu: str, kind: str) -> dict:
    """Totals of a plan: launches, bytes, FLOPs, roofline time, the longest serial loop outside GEMM K loops."""
    latency = [r.launch.loop for r in rows if not r.launch.gemm_loop]
    return {
        "launches": len(rows),
        "triton_launches": sum(1 for r in rows if not r.launch.kernel.startswith("aten.")),
        "bytes": sum(r.launch.bytes for r in rows),
        "flops": sum(r.launch.flops for r in rows),
        "roofline_us": sum(roofline_us(r.launch, gpu, kind) for r in rows),
        "max_serial_loop": max(latency, default=0),
    }


def _kind(dtype: torch.dtype) -> str:
    from .triton._common import dot_precision
    from .triton.configs import operand_kind

    return operand_kind(dtype, dot_precision(dtype))


def _table(rows: list[Row], gpu: str, kind: str) -> str:
    lines = [f"{'#':>4} {'op':<26} {'kernel':<36} {'tile':<20} {'programs':>9} {'loop':>6} "
             f"{'GFLOP':>8} {'MB':>9} {'µs':>8}"]
    for i, r in enumerate(rows):
        L = r.launch
        tile = "x".join(str(v) for v in L.tile) if L.tile else "-"
        loop = f"{L.loop}{'*' if L.gemm_loop else ''}"
        lines.append(f"{i:>4} {r.op[:26]:<26} {L.kernel[:36]:<36} {tile:<20} {L.programs:>9} {loop:>6} "
                     f"{L.flops / 1e9:>8.2f} {L.bytes / 1e6:>9.2f} {roofline_us(L, gpu, kind):>8.1f}")
    lines.append("loop: longest serial loop of one program (iterations); * a GEMM's K loop (MMA work per step)")
    return "\n".join(lines)


def _summary_line(label: str, s: dict) -> str:
    return (f"{label}: {s['launches']} launches ({s['triton_launches']} Triton), {s['bytes'] / 1e6:,.1f} MB, "
            f"{s['flops'] / 1e9:,.1f} GFLOP, roofline {s['roofline_us']:,.0f} µs, "
            f"longest non-GEMM serial loop {s['max_serial_loop']}")


def main(argv=None) -> int:
    from . import models

    ap = argparse.ArgumentParser(prog="python -m fastconv.launch_plan", description=__doc__.split("\n\n")[0])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", choices=models.names())
    what.add_argument("--layer", help="N,C,H,W,K,R,S,stride,pad,groups: one fused conv+BN+ReLU block")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--train", dest="train", action="store_true", default=True)
    mode.add_argument("--eval", dest="train", action="store_false")
    ap.add_argument("--gpu", choices=list(GPUS), default="H100")
    ap.add_argument("--layout", choices=list(LAYOUTS), default="channels_last",
                    help="memory format of the parameters and the input (default channels_last)")
    ap.add_argument("--compare-eager", action="store_true", help="also account plain PyTorch eager's step")
    ap.add_argument("--autotune-runs", action="store_true",
                    help="count the autotune runs of a whole CIFAR-10 training of --model at --batch")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    dtype = DTYPES[args.dtype]
    kind = _kind(dtype)
    if args.model:
        model, x = build(args.model, args.batch, dtype, fastconv=True, layout=args.layout)
    else:
        model, x = layer_model(args.layer, dtype, args.layout)
    rows = record_step(model, x, args.train, args.gpu)
    result = {"fastconv": {**summarize(rows, args.gpu, kind), "rows": [
        {"op": r.op, **dataclasses.asdict(r.launch), "programs": r.launch.programs,
         "roofline_us": roofline_us(r.launch, args.gpu, kind)} for r in rows]}}
    if args.autotune_runs:
        if not args.model:
            ap.error("--autotune-runs needs --model")
        result["autotune"] = autotune_runs(args.model, args.batch, dtype, args.gpu)
    if args.compare_eager:
        if not args.model:
            ap.error("--compare-eager needs --model")
        plain, x = build(args.model, args.batch, dtype, fastconv=False, layout=args.layout)
        eager = record_step(plain, x, args.train, args.gpu, backend=None)
        result["eager"] = summarize(eager, args.gpu, kind)
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        print()
        return 0
    what = f"--model {args.model}" if args.model else f"--layer {args.layer}"
    print(f"launch plan: {what}, batch {args.batch}, {args.dtype} {args.layout}, "
          f"{'train' if args.train else 'eval'} step, "
          f"{args.gpu} ({GPUS[args.gpu]['arch']}, {GPUS[args.gpu]['sms']} SMs)")
    print(_table(rows, args.gpu, kind))
    print(_summary_line("fastconv", result["fastconv"]))
    if "autotune" in result:
        a = result["autotune"]
        print(f"autotune runs for a whole training (any number of epochs): {a['runs']} "
              f"({', '.join(a['steps'])}; {a['tuned_launches_in_those_steps']} tuned launches in those steps)")
    if "eager" in result:
        e = result["eager"]
        print(_summary_line("eager", e))
        f = result["fastconv"]
        print(f"fastconv / eager: bytes {f['bytes'] / e['bytes']:.2f}x, launches {f['launches'] / e['launches']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
