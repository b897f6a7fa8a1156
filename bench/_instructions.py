"""Instruction counts of the host-overhead rows (bench/_overhead.py, issue 16): for judging a host-path change on a
shared machine whose timings move by ±30% between runs. Callgrind counts the instructions of one loop of a row's
fastconv module and of one loop of its nn module, valgrind's instrumentation switched on around that loop only
(`callgrind_control -i on/off`); the counts repeat to about 0.3%. Instructions are not time (cache misses and
allocation cost differ), but work a change removes shows, whatever else the machine is doing.

    python -m bench._instructions [--op OP] [--provider P] [--calls N] [--json]

Each (row, side) is one process under valgrind, where importing torch takes about a minute: a few minutes per
row. Needs valgrind (callgrind and callgrind_control) on PATH.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from bench import _overhead as O

DEFAULT_CALLS = 50
SIDES = ("fastconv", "nn")


def _child(op: str, mode: str, provider: str, side: str, calls: int) -> None:
    """Under valgrind: build the row, warm it up, count one loop of `calls` calls of `side`."""
    import torch

    torch.set_num_threads(1)
    os.environ.pop("TRITON_INTERPRET", None)  # as the overhead bench: the dry run takes the GPU's path
    pair = O.build(O.Case(op, mode, provider), torch.device("cpu"))
    loop = pair.fastconv_loop if side == "fastconv" else pair.nn_loop
    loop(10)
    pid = str(os.getpid())
    subprocess.run(["callgrind_control", "-i", "on", pid], check=True, capture_output=True)
    loop(calls)
    subprocess.run(["callgrind_control", "-i", "off", pid], check=True, capture_output=True)


def count(case: O.Case, side: str, calls: int) -> int:
    """Instructions of `calls` calls of one side of a row (a valgrind run of this module's child mode)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={tmp}/cg.%p",
               sys.executable, "-m", "bench._instructions", "--child", case.op, case.mode, case.provider, side,
               str(calls)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    found = re.findall(r"Collected : (\d+)", proc.stderr)
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"callgrind run failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return int(found[-1])


def measure(ops=None, providers=None, calls: int = DEFAULT_CALLS) -> list[dict]:
    import torch

    rows = []
    for case in O.cases(torch.device("cpu"), ops, providers):
        if case.provider == "fastconv-torch":
            continue  # not a goal row
        n = {side: count(case, side, calls) for side in SIDES}
        rows.append({"op": case.op, "mode": case.mode, "provider": case.provider, "calls": calls,
                     "fastconv_instructions": n["fastconv"], "nn_instructions": n["nn"],
                     "ratio": n["fastconv"] / n["nn"], "goal": O.GOALS.get((case.op, case.mode))})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| op | mode | provider | fastconv k instr / call | nn k instr / call | ratio | goal |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        goal = f"≤ {r['goal']}×" if r["goal"] is not None else "—"
        lines.append(f"| {r['op']} | {r['mode']} | {r['provider']} | {r['fastconv_instructions'] / r['calls'] / 1e3:.1f}"
                     f" | {r['nn_instructions'] / r['calls'] / 1e3:.1f} | {r['ratio']:.2f} | {goal} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._instructions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", nargs=5, metavar=("OP", "MODE", "PROVIDER", "SIDE", "CALLS"), help=argparse.SUPPRESS)
    parser.add_argument("--op", action="append", choices=sorted({op for op, _ in O.OPS}), help="only this op")
    parser.add_argument("--provider", action="append", choices=sorted(O.CPU_PROVIDERS), help="only this provider")
    parser.add_argument("--calls", type=int, default=DEFAULT_CALLS, help=f"calls counted (default {DEFAULT_CALLS})")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of the table")
    args = parser.parse_args(argv)
    if args.child:
        op, mode, provider, side, calls = args.child
        _child(op, mode, provider, side, int(calls))
        return 0
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        print(f"bench._instructions needs {' and '.join(missing)} on PATH (Debian: apt install valgrind)",
              file=sys.stderr)
        return 2
    rows = measure(args.op, args.provider, args.calls)
    print(json.dumps(rows, indent=1) if args.json else table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
