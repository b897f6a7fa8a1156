#!/usr/bin/env python3
"""The "key figures" part of scripts/gpu_check.sh's summary.md, from the artefacts a run left so far.

    python3 scripts/gpu_check_summary.py --steps STEPS.tsv --header HEADER.md [--tile-sweep JSON]
                                         [--tests XML] [--bench JSON] [--profile-top TXT] > summary.md

Standard library only (it must work even where torch does not import). STEPS.tsv: one step per line,
`name<TAB>status<TAB>seconds<TAB>note`. Every input may be missing or partial: the summary says so.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import xml.etree.ElementTree as ET


def _read(path):
    p = pathlib.Path(path) if path else None
    return p if p is not None and p.is_file() and p.stat().st_size > 0 else None


def _json(path, what: str):
    """(document, None) of a JSON result file, or (None, the summary line saying why there is none)."""
    p = _read(path)
    if p is None:
        return None, [f"- {what}: no result file."]
    try:
        return json.loads(p.read_text()), None
    except ValueError as e:
        return None, [f"- {what}: unreadable result ({e})."]


def steps_table(path) -> list[str]:
    lines = ["| step | status | seconds | artefact / note |", "|---|---|---:|---|"]
    p = _read(path)
    for line in (p.read_text().splitlines() if p else []):
        parts = (line.split("\t") + ["", "", "", ""])[:4]
        lines.append("| " + " | ".join(x.replace("|", "/") for x in parts) + " |")
    return lines


def tile_sweep(path) -> list[str]:
    doc, missing = _json(path, "Tile sweep")
    if missing:
        return missing
    if doc.get("skipped"):
        return [f"- Tile sweep: skipped: {doc['skipped']}"]
    if doc.get("error"):
        return [f"- Tile sweep: NOT RUN: {doc['error']}"]
    out = [f"- Tile sweep ({doc.get('arch')}, {doc.get('device_name')}, triton {doc.get('triton')}"
           f"{'' if doc.get('complete') else ', INCOMPLETE'}): "
           + "; ".join(f"{fam} {s['pass']} pass / {s['fail']} fail / {s['not_run']} not run"
                       for fam, s in doc.get("summary", {}).items())]
    bad = [r for r in doc.get("rows", []) if r.get("status") not in ("pass", "not run")]
    for r in bad[:12]:
        out.append(f"  - {r.get('status')}: {r['family']} {r['kind']} {r['tile_label']} {r['variant']} {r['dtype']} "
                   f"err {r.get('max_err')} {r.get('message', '')}"[:300])
    if len(bad) > 12:
        out.append(f"  - ... {len(bad) - 12} more (tile_sweep.json)")
    return out


def tests(path) -> list[str]:
    p = _read(path)
    if p is None:
        return ["- Tests: no junit file."]
    try:
        root = ET.parse(p).getroot()
    except ET.ParseError as e:
        return [f"- Tests: unreadable junit ({e})."]
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = sum(int(s.get("tests", 0)) for s in suites)
    fail = sum(int(s.get("failures", 0)) for s in suites)
    err = sum(int(s.get("errors", 0)) for s in suites)
    skip = sum(int(s.get("skipped", 0)) for s in suites)
    secs = sum(float(s.get("time", 0)) for s in suites)
    out = [f"- Tests: {total} run, {total - fail - err - skip} passed, {fail} failed, {err} errors, {skip} skipped "
           f"({secs:.0f} s)"]
    bad = [c for c in root.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
    for c in bad[:15]:
        what = c.find("failure") if c.find("failure") is not None else c.find("error")
        msg = (what.get("message") or "").splitlines()[0][:160] if what is not None else ""
        out.append(f"  - {c.get('classname')}::{c.get('name')}: {msg}")
    if len(bad) > 15:
        out.append(f"  - ... {len(bad) - 15} more (tests.xml)")
    return out


def _x(v, fmt="{:.2f}"):
    return "—" if v is None else fmt.format(v)


def bench(path) -> list[str]:
    doc, missing = _json(path, "Benchmarks")
    if missing:
        return missing
    env = doc.get("environment", {})
    out = [f"- Benchmarks: set `{doc.get('set')}` on {env.get('device')} (torch {env.get('torch')}, triton "
           f"{env.get('triton')}, cuDNN {env.get('cudnn')}); speed-up = torch time / this row's time (> 1: faster)", "",
           "| op | shape | mode | dtype | layout | provider | median ms | vs torch eager (cuDNN on a GPU) | vs torch.compile |",
           "|---|---|---|---|---|---|---:|---:|---:|"]
    for r in doc.get("rows", []):
        out.append(f"| {r.get('op')} | {r.get('shape')} | {r.get('mode')} | {r.get('dtype')} | {r.get('layout')} | "
                   f"{r.get('provider')} | {_x(r.get('median_ms'), '{:.3f}')} | {_x(r.get('speedup_vs_eager'))} | "
                   f"{_x(r.get('speedup_vs_compile'))} |")
    models = doc.get("models", [])
    if models:
        out += ["", "| model | phase | batch | variant | images/s | vs plain PyTorch |", "|---|---|---:|---|---:|---:|"]
        plain = {(m["model"], m["phase"]): m.get("images_per_s") for m in models if m.get("variant") == "plain"}
        for m in models:
            base = plain.get((m["model"], m["phase"]))
            ratio = m["images_per_s"] / base if base and m.get("images_per_s") else None
            out.append(f"| {m['model']} | {m['phase']} | {m.get('batch')} | {m['variant']} | "
                       f"{_x(m.get('images_per_s'), '{:.0f}')} | {_x(ratio)} |")
    for s in doc.get("skipped", [])[:10]:
        out.append(f"- skipped: {s.get('op')} {s.get('provider')} ({s.get('rows')} rows): {s.get('reason')}"[:300])
    return out


def overhead(path) -> list[str]:
    doc, missing = _json(path, "Host overhead")
    if missing:
        return missing
    env = doc.get("environment", {})
    out = [f"- Host overhead per call, tiny tensors (bench._overhead on {env.get('device')}): fastconv ÷ nn module", "",
           "| op | mode | provider | median µs | nn µs | ratio | goal | met |", "|---|---|---|---:|---:|---:|---|---|"]
    for r in doc.get("rows", []):
        met = r.get("goal_met")
        out.append(f"| {r.get('op')} | {r.get('mode')} | {r.get('provider')} | {_x(r.get('median_us'), '{:.1f}')} | "
                   f"{_x(r.get('nn_median_us'), '{:.1f}')} | {_x(r.get('ratio'))} | {r.get('goal_text', '')} | "
                   f"{'—' if met is None else ('yes' if met else 'no')} |")
    return out


def profile(path) -> list[str]:
    p = _read(path)
    if p is None:
        return ["- Profile: no top-ops table."]
    lines = p.read_text().splitlines()
    return ["- Profile (top operators, from the trace):", "", "```"] + lines[:30] + ["```"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", required=True)
    ap.add_argument("--header")
    ap.add_argument("--tile-sweep")
    ap.add_argument("--tests")
    ap.add_argument("--bench")
    ap.add_argument("--profile-top")
    ap.add_argument("--overhead")
    a = ap.parse_args(argv)
    out = []
    h = _read(a.header)
    if h:
        out += h.read_text().rstrip("\n").splitlines() + [""]
    out += steps_table(a.steps) + ["", "## Key figures", ""]
    for part in (tile_sweep(a.tile_sweep), tests(a.tests), bench(a.bench), overhead(a.overhead), profile(a.profile_top)):
        out += part + [""]
    sys.stdout.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
