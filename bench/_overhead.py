"""Host overhead per call of fastconv's drop-in modules against their torch.nn counterparts (issue 16).

Tiny tensors (a 1×4×6×6 input, 4 output channels, 3×3 kernel, padding 1; a 2×2 pool), so kernel time is
negligible and what is timed is the host path: Python glue, custom-op dispatch, autograd, allocation, tile
choice and launch. Rows (op / mode, each per fastconv backend, each against the nn module doing the same):

  conv2d        eval-fwd        fastconv.Conv2d under torch.no_grad()           vs nn.Conv2d
  conv2d        fwd+bwd         forward + torch.autograd.grad(x, weight, bias)  vs nn.Conv2d
  conv_bn_relu  train-fwd+bwd   fastconv.ConvBNReLU2d train(), forward + grad   vs nn.Sequential(Conv2d, BatchNorm2d, ReLU)
  conv_bn_relu  eval-fwd        eval(), BatchNorm folded, torch.no_grad()       vs the same Sequential in eval()
  max_pool2d    fwd             fastconv.MaxPool2d under torch.no_grad()        vs nn.MaxPool2d

Backends (the `provider` column):
  CPU (no GPU here), the fastconv paths with the kernels replaced by no-ops (the pure host path):
    fastconv-cpu-noop       backend 'cpu' (the C++ CPU twins; same op path as 'cuda') with the extension in
                            its dry run (`noop_kernels`): each C++ op is really called, checks its arguments
                            and allocates its outputs, then skips its arithmetic (`ext_op_call_us`: one such
                            call).
    fastconv-cpu            backend 'cpu', real C++ kernels (their tiny compute included).
    fastconv-triton-dryrun  backend 'triton' inside fastconv.triton.launch.dry_run(): every Triton launch does
                            everything but launch (tile chosen, buffers allocated), CPU tensors accepted.
    fastconv-torch          backend 'torch' (fastconv's ops composed of PyTorch's kernels), real.
  GPU: real calls on CUDA tensors: fastconv-cuda, fastconv-triton, fastconv-triton-jit (the same with Triton's own
  launch path for every launch, FASTCONV_DIRECT_LAUNCH=0: what the direct launch saves), fastconv-torch.
The nn modules always run for real (on tiny tensors their kernels are the floor).

Timing: a round times a loop of `calls` calls; each round times the nn module's loop and then the fastconv
loop (interleaved, so both see the same machine state); the figure is the median over rounds, µs per call;
ratio = fastconv median / nn median. Clock: on CPU the thread's CPU time (time.thread_time): with one torch
thread all of a call's work runs on this thread, and on a shared machine wall time doubles whenever the
scheduler shares the core with another process, which hits a long fastconv loop far more often than a short
nn loop (seen here: 36 µs vs 78 µs per call in alternate rounds of the same loop); the wall-clock medians
are kept too (wall_median_us). On a GPU: wall time (perf_counter), torch.cuda.synchronize() before the loop
and after it, so host time per call = wall time of the loop / calls. torch.set_num_threads(1) while timing;
TRITON_INTERPRET is unset while timing (the dry run must take the GPU's tile-choice path, not the
interpreter's). Goals (issue 16) are reported, never enforced.

    python -m bench._overhead [--rounds R] [--calls N] [--op OP] [--provider P] [--write] [--json]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

import fastconv
from fastconv import _backend

N, C, HW, K, R = 1, 4, 6, 4, 3
POOL = 2
ROUNDS_ENV, CALLS_ENV = "FASTCONV_BENCH_OVERHEAD_ROUNDS", "FASTCONV_BENCH_OVERHEAD_CALLS"
DEFAULT_ROUNDS, DEFAULT_CALLS = 15, 100

# (op, mode) -> (fastconv module, nn module)
OPS = {
    ("conv2d", "eval-fwd"): ("fastconv.Conv2d", "nn.Conv2d"),
    ("conv2d", "fwd+bwd"): ("fastconv.Conv2d", "nn.Conv2d"),
    ("conv_bn_relu", "train-fwd+bwd"): ("fastconv.ConvBNReLU2d", "nn.Sequential(Conv2d, BatchNorm2d, ReLU)"),
    ("conv_bn_relu", "eval-fwd"): ("fastconv.ConvBNReLU2d", "nn.Sequential(Conv2d, BatchNorm2d, ReLU)"),
    ("max_pool2d", "fwd"): ("fastconv.MaxPool2d", "nn.MaxPool2d"),
}
# issue 16's goals: fastconv time / nn time at most this, for the cpu / cuda / triton paths
GOALS = {("conv2d", "eval-fwd"): 1.5, ("conv2d", "fwd+bwd"): 1.5, ("conv_bn_relu", "train-fwd+bwd"): 1.0,
         ("max_pool2d", "fwd"): 1.5}
TORCH_GOAL = "as close as its composition allows"

# provider -> (fastconv backend, what is timed)
PROVIDERS = {
    "fastconv-cpu-noop": ("cpu", "host path: C++ kernels replaced by no-ops"),
    "fastconv-cpu": ("cpu", "real C++ CPU kernels"),
    "fastconv-triton-dryrun": ("triton", "host path: Triton launches skipped (launch.dry_run)"),
    "fastconv-torch": ("torch", "real (PyTorch kernels composed)"),
    "fastconv-cuda": ("cuda", "real CUDA C++ kernels"),
    "fastconv-triton": ("triton", "real Triton kernels"),
    "fastconv-triton-jit": ("triton", "real Triton kernels, each launch through kernel[grid](...)"),
}
CPU_PROVIDERS = ("fastconv-cpu-noop", "fastconv-cpu", "fastconv-triton-dryrun", "fastconv-torch")
# rows that show what a part of the path costs, held to no goal
COMPARISON = {"fastconv-triton-jit": "comparison: Triton's own launch path"}
GPU_PROVIDERS = ("fastconv-cuda", "fastconv-triton", "fastconv-triton-jit", "fastconv-torch")


def providers(device: torch.device) -> tuple[str, ...]:
    return GPU_PROVIDERS if device.type == "cuda" else CPU_PROVIDERS


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    mode: str
    provider: str

    @property
    def id(self) -> str:
        return f"{self.op}|{self.mode}|{self.provider}"

    @property
    def backend(self) -> str:
        return PROVIDERS[self.provider][0]


def cases(device: torch.device, ops=None, provs=None) -> list[Case]:
    return [Case(op, mode, p) for (op, mode) in OPS for p in providers(device)
            if (not ops or op in ops) and (not provs or p in provs)]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------------------
# The no-op C++ kernels (backend 'cpu' on a machine without a GPU)


class _Counting:
    """torch.ops.fastconv, counting the ext_ op calls made through it."""

    def __init__(self, ops):
        self._ops, self.calls = ops, 0

    def __getattr__(self, name):
        op = getattr(self._ops, name)

        def call(*args, **kwargs):
            self.calls += 1
            return op(*args, **kwargs)

        return call


def _ext_op_modules():
    from fastconv.ops import conv2d, conv_bn_act, max_pool2d

    return (conv2d, conv_bn_act, max_pool2d)


@contextlib.contextmanager
def _ext_ops_replaced(make):
    """Every fastconv.ops.*.ext_ops() returns make(the real torch.ops.fastconv) inside. The real ext_ops() still
    runs (loading check, fake-kernel registration check), so only the ext op calls themselves change."""
    import fastconv.functional as FC

    mods = _ext_op_modules()
    saved = [m.ext_ops for m in mods]
    FC._POOL_GEOMETRY.clear()  # its entries hold the max-pool kernel function each call signature resolved to

    def wrap(orig):
        def ext_ops():
            return make(orig())
        return ext_ops

    try:
        for m, orig in zip(mods, saved):
            m.ext_ops = wrap(orig)
        yield
    finally:
        for m, orig in zip(mods, saved):
            m.ext_ops = orig
        FC._POOL_GEOMETRY.clear()


@contextlib.contextmanager
def noop_kernels():
    """The C++ extension's dry run (fastconv._C._set_dry_run, csrc/include/fastconv/dry_run.h): every CPU ext op
    is called for real (bindings, dispatcher, argument checks, output allocation) and returns before its
    arithmetic. Raises fastconv.BackendNotSupported (the row is skipped with the reason) without the extension."""
    from fastconv import _ext

    if not _ext.load():
        raise fastconv.BackendNotSupported(f"fastconv-cpu-noop: the C++ dry run needs fastconv._C: {_ext.reason()}")
    from fastconv import _C

    _C._set_dry_run(True)
    try:
        yield
    finally:
        _C._set_dry_run(False)


@contextlib.contextmanager
def counting_kernels():
    """The real C++ ext ops, counted (yields a _Counting whose .calls is the count)."""
    box = {"counter": None}

    def make(real):
        if box["counter"] is None or box["counter"]._ops is not real:
            box["counter"] = _Counting(real)
        return box["counter"]

    class Total:
        @property
        def calls(self):
            return box["counter"].calls if box["counter"] is not None else 0

    with _ext_ops_replaced(make):
        yield Total()


# ---------------------------------------------------------------------------------------------------------
# One row: the fastconv module and its nn counterpart, each as a loop of calls


def _modules(op: str, device: torch.device):
    torch.manual_seed(0)
    if op == "conv2d":
        fc = fastconv.Conv2d(C, K, R, padding=1, device=device)
        ref = nn.Conv2d(C, K, R, padding=1, device=device)
        ref.load_state_dict(fc.state_dict())
        return fc, ref, lambda m: [m.weight, m.bias]
    if op == "conv_bn_relu":  # no conv bias before a BatchNorm (as bench/_providers.conv_bn_relu)
        fc = fastconv.ConvBNReLU2d(C, K, R, padding=1, bias=False, device=device)
        with torch.no_grad():  # realistic running statistics for eval, not the initial 0 / 1
            fc.bn.running_mean.uniform_(-0.5, 0.5)
            fc.bn.running_var.uniform_(0.5, 2.0)
        ref = nn.Sequential(nn.Conv2d(C, K, R, padding=1, bias=False), nn.BatchNorm2d(K), nn.ReLU()).to(device)
        ref[0].load_state_dict(fc.conv.state_dict())
        ref[1].load_state_dict(fc.bn.state_dict())
        return fc, ref, lambda m: ([m.conv.weight, m.bn.weight, m.bn.bias] if isinstance(m, fastconv.ConvBNReLU2d)
                                   else [m[0].weight, m[1].weight, m[1].bias])
    if op == "max_pool2d":
        return fastconv.MaxPool2d(POOL), nn.MaxPool2d(POOL), lambda m: []
    raise ValueError(op)


def _call(module, params, mode: str, x: torch.Tensor, g: torch.Tensor | None):
    """One call of the row's mode (the contexts are entered once per loop, around all calls)."""
    if mode.endswith("fwd+bwd"):
        wrt = [x, *params(module)]

        def call():
            torch.autograd.grad(module(x), wrt, g)
    else:
        def call():
            module(x)
    return call


@dataclasses.dataclass
class Pair:
    case: Case
    fastconv_loop: object  # loop(n): n calls of the fastconv module, contexts entered once
    nn_loop: object
    kernel_calls: int | None  # Triton launches / C++ ext op calls per fastconv call (None: not counted)


@contextlib.contextmanager
def _contexts(case: Case, device: torch.device, grad: bool):
    """The row's backend, dry run and grad mode; entered inside one `with`, so a context that raises on entry
    (noop_kernels without the extension) unwinds those entered before it instead of leaking the backend."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(fastconv.backend(case.backend))
        if case.provider == "fastconv-triton-dryrun":
            from fastconv.triton import launch

            stack.enter_context(launch.dry_run())
        if case.provider == "fastconv-cpu-noop":
            stack.enter_context(noop_kernels())
        if case.provider == "fastconv-triton-jit":
            stack.enter_context(_backend.environment(FASTCONV_DIRECT_LAUNCH="0"))
        if not grad:
            stack.enter_context(torch.no_grad())
        yield


def _count_kernels(case: Case, device: torch.device, call, grad: bool) -> int | None:
    if case.backend == "triton":
        from fastconv.triton import launch

        with fastconv.backend("triton"), launch.recording() as launches, (
                contextlib.nullcontext() if grad else torch.no_grad()):
            call()
        return len(launches)
    if case.backend in ("cpu", "cuda"):
        with fastconv.backend(case.backend), counting_kernels() as counter, (
                contextlib.nullcontext() if grad else torch.no_grad()):
            call()
        return counter.calls
    return None


def build(case: Case, device: torch.device) -> Pair:
    """The row's two loops, each called once (so a backend that cannot run raises fastconv.BackendNotSupported
    here) and its kernel count. Modules in train() for train-/fwd+bwd modes, eval() otherwise."""
    grad = case.mode.endswith("fwd+bwd")
    fc, ref, params = _modules(case.op, device)
    fc.train(case.mode.startswith("train") or case.mode == "fwd+bwd")
    ref.train(fc.training)
    x = torch.randn(N, C, HW, HW, device=device, requires_grad=grad)
    out_hw = HW // POOL if case.op == "max_pool2d" else HW
    g = torch.randn(N, K if case.op != "max_pool2d" else C, out_hw, out_hw, device=device) if grad else None
    fc_call, ref_call = _call(fc, params, case.mode, x, g), _call(ref, params, case.mode, x, g)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def fastconv_loop(n: int):
        with _contexts(case, device, grad):
            for _ in range(n):
                fc_call()
        sync()

    def nn_loop(n: int):
        with contextlib.nullcontext() if grad else torch.no_grad():
            for _ in range(n):
                ref_call()
        sync()

    fastconv_loop(1)
    nn_loop(1)
    kernels = None if case.provider == "fastconv-torch" else _count_kernels(case, device, fc_call, grad)
    return Pair(case, fastconv_loop, nn_loop, kernels)


def clock(device: torch.device):
    """The clock of record: the thread's CPU time on CPU, wall time on a GPU (see the module doc)."""
    return time.perf_counter if device.type == "cuda" else time.thread_time


def clock_name(device: torch.device) -> str:
    return "perf_counter (wall)" if device.type == "cuda" else "time.thread_time (this thread's CPU time)"


def timed_loop(loop, calls: int, device: torch.device) -> tuple[float, float]:
    """(seconds per call by the clock of record, wall seconds per call) of loop(calls), the device synchronized
    before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    c = clock(device)
    c0, w0 = c(), time.perf_counter()
    loop(calls)  # synchronizes at its end on a GPU
    w1, c1 = time.perf_counter(), c()
    return (c1 - c0) / calls, (w1 - w0) / calls


def row(pair: Pair, fastconv_s: list[float], nn_s: list[float], calls: int, device: torch.device,
        fastconv_wall_s: list[float], nn_wall_s: list[float]) -> dict:
    """One result row from per-round seconds per call (clock of record, and wall)."""
    case = pair.case
    fc_us, nn_us = statistics.median(fastconv_s) * 1e6, statistics.median(nn_s) * 1e6
    ratio = fc_us / nn_us
    goal = GOALS.get((case.op, case.mode)) if case.backend != "torch" and case.provider not in COMPARISON else None
    if case.backend == "torch":
        goal_text = TORCH_GOAL
    elif case.provider in COMPARISON:
        goal_text = COMPARISON[case.provider]
    elif goal is None:
        goal_text = "no goal set"
    else:
        goal_text = f"≤ {goal:g}×"
    module, nn_module = OPS[(case.op, case.mode)]
    return {"op": case.op, "mode": case.mode, "provider": case.provider, "backend": case.backend,
            "path": PROVIDERS[case.provider][1], "module": module, "nn_module": nn_module,
            "median_us": fc_us, "min_us": min(fastconv_s) * 1e6, "nn_median_us": nn_us, "nn_min_us": min(nn_s) * 1e6,
            "ratio": ratio, "goal": goal, "goal_text": goal_text, "goal_met": (ratio <= goal) if goal else None,
            "wall_median_us": statistics.median(fastconv_wall_s) * 1e6,
            "nn_wall_median_us": statistics.median(nn_wall_s) * 1e6,
            "kernel_calls": pair.kernel_calls, "rounds": len(fastconv_s), "calls": calls,
            "timer": (f"median over {len(fastconv_s)} rounds of a loop of {calls} calls ({clock_name(device)}"
                      + (", torch.cuda.synchronize() before and after" if device.type == "cuda" else "")
                      + "), nn and fastconv loops interleaved per round")}


@contextlib.contextmanager
def timing_environment():
    """torch.set_num_threads(1) and TRITON_INTERPRET unset, both restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _backend.environment(TRITON_INTERPRET=None):
            yield
    finally:
        torch.set_num_threads(threads)


def ext_op_call_us(calls: int = 2000) -> float | None:
    """Median µs of one call of a C++ ext op doing no arithmetic: fastconv._C.ext_conv2d on this benchmark's
    conv shapes in the dry run (the direct entry point, dispatcher, checks, allocation of its outputs). None
    without the extension."""
    from fastconv import _ext

    if not _ext.load():
        return None
    from fastconv import _C

    x, w, out = torch.randn(N, C, HW, HW), torch.randn(K, C, R, R), torch.empty(N, K, HW, HW)
    args = (x, w, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, None, None, None, 0, False, False, out)
    _C._set_dry_run(True)
    try:
        _C.ext_conv2d(*args)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(calls):
                _C.ext_conv2d(*args)
            times.append((time.perf_counter() - t0) / calls)
    finally:
        _C._set_dry_run(False)
    return statistics.median(times) * 1e6


def rounds_default() -> int:
    return int(os.environ.get(ROUNDS_ENV) or DEFAULT_ROUNDS)


def calls_default() -> int:
    return int(os.environ.get(CALLS_ENV) or DEFAULT_CALLS)


def measure(rounds: int | None = None, calls: int | None = None, device: torch.device | None = None,
            ops=None, provs=None, warmup: int = 2) -> list[dict]:
    """Every row (see the module doc), as dicts; a row whose backend cannot run here is a dict with
    `skipped` (the reason) and no timings. Rounds interleave all rows."""
    rounds, calls = rounds or rounds_default(), calls or calls_default()
    device = device or default_device()
    with timing_environment():
        pairs, out = [], {}
        for case in cases(device, ops, provs):
            try:
                pairs.append(build(case, device))
            except fastconv.BackendNotSupported as e:
                out[case.id] = skipped_row(case, str(e))
        for pair in pairs:
            for _ in range(warmup):
                pair.nn_loop(calls)
                pair.fastconv_loop(calls)
        times = {p.case.id: ([], []) for p in pairs}  # per round: (clock of record, wall) per call
        for _ in range(rounds):
            for pair in pairs:
                fc, nn_ = times[pair.case.id]
                nn_.append(timed_loop(pair.nn_loop, calls, device))
                fc.append(timed_loop(pair.fastconv_loop, calls, device))
        for pair in pairs:
            fc, nn_ = times[pair.case.id]
            out[pair.case.id] = row(pair, [t for t, _ in fc], [t for t, _ in nn_], calls, device,
                                    [w for _, w in fc], [w for _, w in nn_])
    return [out[c.id] for c in cases(device, ops, provs)]


def skipped_row(case: Case, why: str) -> dict:
    module, nn_module = OPS[(case.op, case.mode)]
    return {"op": case.op, "mode": case.mode, "provider": case.provider, "backend": case.backend,
            "path": PROVIDERS[case.provider][1], "module": module, "nn_module": nn_module, "skipped": why}


# ---------------------------------------------------------------------------------------------------------
# Report


def notes(device: torch.device, ext_call_us: float | None) -> list[str]:
    shape = f"{N}×{C}×{HW}×{HW} fp32 NCHW input; conv {C}→{K} channels, {R}×{R}, padding 1; max-pool {POOL}×{POOL}"
    out = [f"Host overhead per call on tiny tensors ({shape}): kernel time is negligible, the rows time the "
           f"host path of each module against the torch.nn module doing the same. torch CPU threads: 1."]
    if device.type == "cpu":
        out.append("Clock: this thread's CPU time (time.thread_time), not wall time: on this shared machine the "
                   "wall time of a loop doubles whenever another process shares the core, which hits the long "
                   "fastconv loops far more often than the short nn loops; the JSON keeps the wall-clock medians "
                   "too (wall_median_us, nn_wall_median_us).")
    if device.type == "cpu":
        out.append("No GPU here: the fastconv rows `fastconv-cpu-noop` (backend `cpu`, the C++ extension in its "
                   "dry run: every ext op is called, checks its arguments and allocates its outputs, and skips "
                   "its arithmetic) and `fastconv-triton-dryrun` (backend "
                   "`triton` inside `fastconv.triton.launch.dry_run()`: tiles chosen, buffers allocated, each "
                   "launch's direct-launch key computed and looked up, or a layer call's or training node's C++ "
                   "replay checked and its buffers allocated, no launch) are the pure host path; `fastconv-cpu` and "
                   "`fastconv-torch` are real calls; the nn modules are "
                   "real calls (their kernels on tiny tensors are the floor). TRITON_INTERPRET unset while timing.")
        if ext_call_us is not None:
            out.append(f"One C++ ext op call that does no arithmetic costs {ext_call_us:.2g} µs here "
                       f"(fastconv._C.ext_conv2d in the dry run, these shapes), so `fastconv-cpu` minus "
                       f"`fastconv-cpu-noop` is the C++ kernels' compute on these tiny tensors. `kernels/call`: "
                       f"C++ calls from Python (Triton launches for the triton rows) per call; a conv's or fused "
                       f"block's training step is one C++ autograd node (csrc/conv2d.cpp, csrc/conv_bn_act.cpp; "
                       f"Triton: csrc/triton_conv2d.cpp, csrc/triton_conv_bn_act.cpp) whose ext ops or replayed "
                       f"launches, forward and backward, run inside that one call.")
    else:
        out.append("GPU: every row is a real call on CUDA tensors; a round is a loop of calls between two "
                   "torch.cuda.synchronize(), so host time per call = wall time of the loop / calls (a "
                   "GPU-bound row would show kernel time instead; on these sizes none should be). "
                   "`kernels/call` counts Triton launches / C++ calls from Python (a CUDA ext op may launch several "
                   "kernels; a C++ autograd node's training step is one call). `fastconv-triton-jit` is "
                   "`fastconv-triton` with every launch through Triton's own kernel[grid](...) "
                   "(FASTCONV_DIRECT_LAUNCH=0): the difference is what the direct launch saves.")
    out.append("fwd+bwd rows: forward then torch.autograd.grad of the input and every parameter (no .grad "
               "accumulation), modules in train(); eval-fwd/fwd rows under torch.no_grad(), modules in eval(). "
               "ratio = fastconv median / nn median (lower is better). Goals (issue 16) apply to the cpu, cuda "
               "and triton paths; the torch backend is held to \"as close as its composition allows\". A missed "
               "goal is reported here, never fails the run.")
    return out


def _f(v, fmt):
    return "—" if v is None else fmt.format(v)


def _met(r) -> str:
    if r.get("goal_met") is None:
        return "—"
    return "yes" if r["goal_met"] else "**no**"


def table(rows: list[dict]) -> list[str]:
    lines = ["| op | mode | fastconv module | provider | median µs | nn median µs | ratio | kernels/call | goal "
             "| met |", "|" + "---|" * 10]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['op']} | {r['mode']} | {r['module']} | {r['provider']} | skipped: {r['skipped']} "
                         f"| | | | | |")
            continue
        lines.append(f"| {r['op']} | {r['mode']} | {r['module']} | {r['provider']} | {r['median_us']:.1f} | "
                     f"{r['nn_median_us']:.1f} | {r['ratio']:.2f} | {_f(r['kernel_calls'], '{}')} | "
                     f"{r['goal_text']} | {_met(r)} |")
    return lines


def markdown(doc: dict) -> str:
    env = doc["environment"]
    lines = [f"# fastconv host overhead — {env['device']}", "",
             f"`{doc['command']}`, {env['date_utc']} UTC, commit `{(env['git_commit'] or '?')[:10]}`"
             + (" (uncommitted changes)" if env.get("git_dirty") else ""),
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, Python {env['python']}", ""]
    lines += [f"- {n}" for n in doc["notes"]]
    lines += ["", *table(doc["rows"]), ""]
    nn_modules = dict.fromkeys((r["module"], r["nn_module"]) for r in doc["rows"])
    lines += ["nn counterparts: " + "; ".join(f"{a} vs {b}" for a, b in nn_modules) + ".", ""]
    timers = list(dict.fromkeys(r["timer"] for r in doc["rows"] if "timer" in r))
    lines += [f"Timing: {'; '.join(timers)}.", ""] if timers else []
    return "\n".join(lines)


def document(rows: list[dict], device: torch.device, command: str, ext_call_us: float | None) -> dict:
    from bench import _report

    return {"environment": _report.environment(device), "command": command,
            "notes": notes(device, ext_call_us), "ext_op_call_us": ext_call_us, "rows": rows}


def write(doc: dict, out_dir) -> None:
    import pathlib

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    (out / "overhead.md").write_text(markdown(doc))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=None, help=f"rounds per row (default ${ROUNDS_ENV} or "
                        f"{DEFAULT_ROUNDS})")
    parser.add_argument("--calls", type=int, default=None, help=f"calls per round (default ${CALLS_ENV} or "
                        f"{DEFAULT_CALLS})")
    parser.add_argument("--op", action="append", choices=sorted({op for op, _ in OPS}), help="only this op "
                        "(repeatable)")
    parser.add_argument("--provider", action="append", choices=sorted(PROVIDERS), help="only this provider "
                        "(repeatable)")
    parser.add_argument("--write", action="store_true", help="also write overhead.{json,md} to "
                        "bench/results/<device>/ (or $FASTCONV_BENCH_OUT)")
    parser.add_argument("--json", action="store_true", help="print the JSON document instead of the table")
    args = parser.parse_args(argv)
    device = default_device()
    rows = measure(args.rounds, args.calls, device, args.op, args.provider)
    with timing_environment():
        ext_us = ext_op_call_us()
    doc = document(rows, device, "python -m bench._overhead " + " ".join(argv if argv is not None else sys.argv[1:]),
                   ext_us)
    print(json.dumps(doc, indent=1, ensure_ascii=False) if args.json else markdown(doc))
    if args.write:
        from bench import _report

        rec = _report.Recorder(device, "overhead", doc["command"], [])
        write(doc, rec.out_dir())
    return 0


if __name__ == "__main__":
    sys.exit(main())
