"""What a Triton launch costs the host before the kernel runs, per host-overhead row on the Triton path
(bench/_overhead.py, issue 16): Triton's own `kernel[grid](...)` binding against fastconv's direct launch.

`kernel[grid](*args, **kwargs)` (JITFunction.run) binds the arguments and computes the specialization through
the binder Triton generates per kernel (one call per argument), then its cache key (the specialization tuple and
str(options)), before it looks the compiled kernel up and calls its launcher. fastconv's direct launch
(fastconv.triton.launch._Direct) does that once per key, then computes its own key in one C++ pass
(fastconv._C._triton_launch_key) and calls the launcher itself. This times both on the real arguments of every
launch of each row (captured from one call, on CPU tensors; the binder is built for an sm_90 target, as on an
H100/H200): Triton's binder + cache key, and fastconv's `_dry_launch` (hook check, key, lookup). Neither
includes the launcher call that both then make. The overhead bench's `fastconv-triton-dryrun` rows include the
second, not the first.

    python -m bench._launch_binding [--op OP] [--calls N] [--write] [--json]
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import statistics
import sys
import types

import torch

from bench import _overhead as O

DEFAULT_CALLS = 2000
ROUNDS = 5


def triton_view(kernel):
    """The kernel as Triton's launch path sees it (signature, KernelParams): itself when it is a JITFunction;
    under the interpreter (an InterpretedFunction, which has neither) the parameters JITFunction builds from the
    same function, which is exact for kernels without @triton.jit options (checked). A view passes through."""
    from triton.runtime.jit import JITFunction, KernelParam

    if isinstance(kernel, JITFunction) or isinstance(kernel, types.SimpleNamespace):
        return kernel
    options = {k: v for k, v in getattr(kernel, "kwargs", {}).items() if v}
    if options:
        raise ValueError(f"{kernel.fn.__name__}: @triton.jit options {options} (not modelled here)")
    sig = inspect.signature(kernel.fn)
    params = [KernelParam(i, p, False, False) for i, p in enumerate(sig.parameters.values())]
    return types.SimpleNamespace(fn=kernel.fn, signature=sig, params=params, pre_run_hooks=[])


def triton_binder(kernel, arch: int = 90):
    """binder(*args, **kwargs) -> (bound arguments, specialization, options): the function JITFunction.run binds
    a launch with, for a CUDA target of compute capability `arch`."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    k = triton_view(kernel)
    return create_function_from_signature(k.signature, k.params, make_backend(GPUTarget("cuda", arch, 32)))


def captured(case: O.Case) -> list[tuple]:
    """(kernel, args, kwargs) of each Triton launch of one call of the row's fastconv module (not run)."""
    import fastconv
    from fastconv import _backend
    from fastconv.triton import launch

    calls = []
    grad = case.mode.endswith("fwd+bwd")
    fc, _, params = O._modules(case.op, torch.device("cpu"))
    fc.train(case.mode.startswith("train") or case.mode == "fwd+bwd")
    x = torch.randn(O.N, O.C, O.HW, O.HW, requires_grad=grad)
    out_hw = O.HW // O.POOL if case.op == "max_pool2d" else O.HW
    g = torch.randn(O.N, O.K if case.op != "max_pool2d" else O.C, out_hw, out_hw) if grad else None
    call = O._call(fc, params, case.mode, x, g)
    saved = launch.launch
    launch.launch = lambda kernel, grid, args, kwargs, device: calls.append((kernel, args, dict(kwargs)))
    try:
        with fastconv.backend("triton"), _backend.planning_mode(), (
                contextlib.nullcontext() if grad else torch.no_grad()):
            call()
    finally:
        launch.launch = saved
    return calls


def _per_call_us(fn, calls: int) -> float:
    """Median over ROUNDS loops of `calls` calls of fn, µs per call by the overhead bench's CPU clock."""
    def loop(n: int):
        for _ in range(n):
            fn()

    loop(min(calls, 200))
    cpu = torch.device("cpu")
    return statistics.median(O.timed_loop(loop, calls, cpu)[0] for _ in range(ROUNDS)) * 1e6


def measure(ops=None, calls: int = DEFAULT_CALLS) -> list[dict]:
    from triton.runtime.jit import compute_cache_key

    from fastconv.triton import launch

    cases = O.cases(torch.device("cpu"), ops, ["fastconv-triton-dryrun"])
    found = [[(kernel, args, kwargs, triton_binder(kernel)) for kernel, args, kwargs in captured(case)]
             for case in cases]
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # TRITON_INTERPRET stays as the kernels were decorated: Triton modules the binder imports check it
    try:
        for case, calls_of_case in zip(cases, found):
            launches = []
            for kernel, args, kwargs, binder in calls_of_case:
                cache = {}
                jit_kwargs = {**kwargs, "debug": False}  # JITFunction.run adds the debug option

                def triton_path(binder=binder, args=args, kw=jit_kwargs, cache=cache):
                    _, spec, options = binder(*args, **kw)
                    compute_cache_key(cache, spec, options)

                def direct(kernel=kernel, args=args, kwargs=kwargs):
                    launch._dry_launch(kernel, args, kwargs)

                launches.append({"kernel": kernel.fn.__name__, "arguments": len(triton_view(kernel).params),
                                 "triton_us": _per_call_us(triton_path, calls),
                                 "direct_us": _per_call_us(direct, calls)})
            rows.append({"op": case.op, "mode": case.mode, "launches": launches,
                         "triton_us": sum(r["triton_us"] for r in launches),
                         "direct_us": sum(r["direct_us"] for r in launches)})
    finally:
        torch.set_num_threads(threads)
    return rows


def markdown(doc: dict) -> str:
    env = doc["environment"]
    lines = [f"# Triton launch binding: Triton's path vs fastconv's direct launch ({env.get('device', 'cpu')})", "",
             f"{env.get('torch')} / triton {env.get('triton')} / Python {env.get('python')}; "
             f"`{doc['command']}`", "", doc["note"], "",
             "| op | mode | launches | Triton binder + key µs / call | direct key + lookup µs / call | saved µs |",
             "|---|---|---:|---:|---:|---:|"]
    for r in doc["rows"]:
        lines.append(f"| {r['op']} | {r['mode']} | {len(r['launches'])} | {r['triton_us']:.1f} | "
                     f"{r['direct_us']:.1f} | {r['triton_us'] - r['direct_us']:.1f} |")
    lines += ["", "Per launch:", "", "| op | mode | kernel | arguments | Triton µs | direct µs |",
              "|---|---|---|---:|---:|---:|"]
    for r in doc["rows"]:
        for k in r["launches"]:
            lines.append(f"| {r['op']} | {r['mode']} | `{k['kernel']}` | {k['arguments']} | {k['triton_us']:.2f} | "
                         f"{k['direct_us']:.2f} |")
    return "\n".join(lines) + "\n"


NOTE = ("Host time per call (this thread's CPU time, median of 5 rounds) of what precedes the launcher call on "
        "each Triton launch of the row's fastconv module (tiny tensors as in overhead.md): Triton's "
        "JITFunction.run binder and cache key (sm_90 target), and fastconv's direct launch key and lookup "
        "(`fastconv.triton.launch._dry_launch`). The launcher call itself, the same on both paths, is not "
        "included.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._launch_binding", description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", action="append", choices=sorted({op for op, _ in O.OPS}), help="only this op")
    parser.add_argument("--calls", type=int, default=DEFAULT_CALLS, help=f"calls per round (default {DEFAULT_CALLS})")
    parser.add_argument("--write", action="store_true", help="also write launch_binding.{json,md} to "
                        "bench/results/<device>/ (or $FASTCONV_BENCH_OUT)")
    parser.add_argument("--json", action="store_true", help="print the JSON document instead of the table")
    args = parser.parse_args(argv)
    from bench import _report

    doc = {"environment": _report.environment(torch.device("cpu")),
           "command": "python -m bench._launch_binding " + " ".join(argv if argv is not None else sys.argv[1:]),
           "note": NOTE, "rows": measure(args.op, args.calls)}
    print(json.dumps(doc, indent=1) if args.json else markdown(doc))
    if args.write:
        import pathlib

        out = pathlib.Path(_report.Recorder(torch.device("cpu"), "launch_binding", doc["command"], []).out_dir())
        out.mkdir(parents=True, exist_ok=True)
        (out / "launch_binding.json").write_text(json.dumps(doc, indent=1) + "\n")
        (out / "launch_binding.md").write_text(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
