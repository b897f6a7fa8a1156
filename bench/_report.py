"""Collect benchmark rows during a session and write them: <set>.json, <set>.md and <set>-<op>.png under
bench/results/<device-slug>/ (or $FASTCONV_BENCH_OUT), tagged with device, versions and git commit; the
host-overhead rows (bench_overhead.py) go to overhead.json and overhead.md beside them."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import re
import subprocess

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT_ENV = "FASTCONV_BENCH_OUT"
KEY = ("op", "shape", "mode", "dtype", "layout")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model}"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results")
    return {
        "device": device_name(device),
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(dirty) if dirty is not None else None,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
    }


class Recorder:
    def __init__(self, device: torch.device, set_name: str, command: str, notes: list[str]):
        self.device, self.set_name, self.command, self.notes = device, set_name, command, notes
        self.rows: list[dict] = []
        self.model_rows: list[dict] = []
        self.memory_rows: list[dict] = []
        self.overhead_rows: list[dict] = []  # bench_overhead.py, written to overhead.{json,md}
        self.skipped: dict[tuple[str, str, str], int] = {}  # (op, provider, reason) -> rows
        self.providers_skipped: dict[str, str] = {}  # provider not timed on this device at all -> why
        self.peaks: dict | None = None

    def skip(self, op: str, provider: str, reason: str) -> None:
        key = (op, provider, reason)
        self.skipped[key] = self.skipped.get(key, 0) + 1

    def with_speedups(self) -> list[dict]:
        ref = {}
        for r in self.rows:
            if r["provider"] in ("torch-eager", "torch-compile"):
                ref[(r["provider"],) + tuple(r[k] for k in KEY)] = r["median_ms"]
        out = []
        for r in self.rows:
            r = dict(r)
            for prov, col in (("torch-eager", "speedup_vs_eager"), ("torch-compile", "speedup_vs_compile")):
                base = ref.get((prov,) + tuple(r[k] for k in KEY))
                r[col] = base / r["median_ms"] if base else None
            out.append(r)
        return out

    def has_set_rows(self) -> bool:
        """Whether the session produced anything for <set>.{json,md} (overhead rows have files of their own)."""
        return bool(self.rows or self.model_rows or self.memory_rows or self.skipped)

    def write_overhead(self) -> pathlib.Path:
        from bench import _overhead

        with _overhead.timing_environment():
            ext_us = _overhead.ext_op_call_us()
        order = {c.id: i for i, c in enumerate(_overhead.cases(self.device))}
        rows = sorted(self.overhead_rows, key=lambda r: order.get(f"{r['op']}|{r['mode']}|{r['provider']}", 1e9))
        out = self.out_dir()
        _overhead.write(_overhead.document(rows, self.device, self.command, ext_us), out)
        return out

    def out_dir(self) -> pathlib.Path:
        env = os.environ.get(OUT_ENV)
        return pathlib.Path(env) if env else ROOT / "bench" / "results" / slug(device_name(self.device))

    def write(self) -> pathlib.Path:
        out = self.out_dir()
        out.mkdir(parents=True, exist_ok=True)
        doc = {
            "environment": environment(self.device),
            "set": self.set_name,
            "command": self.command,
            "notes": self.notes,
            "peaks": self.peaks,
            "rows": self.with_speedups(),
            "models": self.model_rows,
            "memory": self.memory_rows,
            "overhead_rows": len(self.overhead_rows),
            "providers_skipped": self.providers_skipped,
            "skipped": [{"op": op, "provider": p, "reason": why, "rows": n}
                        for (op, p, why), n in sorted(self.skipped.items())],
        }
        (out / f"{self.set_name}.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
        (out / f"{self.set_name}.md").write_text(markdown(doc))
        for png in out.glob(f"{self.set_name}-*.png"):
            png.unlink()
        charts(doc, out, self.set_name)
        return out


def _f(v, fmt="{:.3g}"):
    return "—" if v is None else fmt.format(v)


def markdown(doc: dict) -> str:
    env = doc["environment"]
    lines = [
        f"# fastconv benchmarks — {env['device']}",
        "",
        f"`{doc['command']}` (set `{doc['set']}`), {env['date_utc']} UTC, commit `{(env['git_commit'] or '?')[:10]}`"
        + (" (uncommitted changes)" if env["git_dirty"] else ""),
        f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, "
        f"Python {env['python']}, {env['cpu_threads']} CPU threads",
        "",
    ]
    lines += [f"- {n}" for n in doc["notes"]]
    if doc.get("overhead_rows"):
        lines.append(f"- Host overhead per call ({doc['overhead_rows']} rows, bench_overhead.py): overhead.md and "
                     f"overhead.json beside this file.")
    if doc["peaks"]:
        p = doc["peaks"]
        peaks = ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in p["flops"].items())
        lines += [f"- Roofline peaks measured this session: {peaks}; bandwidth {p['bytes_per_s'] / 1e9:.3g} GB/s "
                  f"({p['how']}). A row above 100 % beat the measured peak: FLOPs are counted for direct "
                  f"convolution, which Winograd/FFT algorithms undercut; on CPU, data that stays in cache moves "
                  f"faster than the DRAM copy; and on a shared machine the peak itself is noisy."]
    lines.append("")
    head = ("| shape N,C,H,W→K,R×S,stride,pad,groups | mode | dtype | layout | provider | median ms | TFLOP/s "
            "| GB/s | % roofline | × vs eager | × vs compile |")
    for op in dict.fromkeys(r["op"] for r in doc["rows"]):
        lines += [f"## {op}", "", head, "|" + "---|" * 11]
        for r in (r for r in doc["rows"] if r["op"] == op):
            lines.append(f"| {r['shape']} | {r['mode']} | {r['dtype']} | {r['layout']} | {r['provider']} | "
                         f"{r['median_ms']:.4g} | {_f(r['tflops'])} | {_f(r['gbps'])} | "
                         f"{_f(r['roofline_pct'], '{:.1f}')} | {_f(r['speedup_vs_eager'], '{:.2f}')} | "
                         f"{_f(r['speedup_vs_compile'], '{:.2f}')} |")
        lines.append("")
    if doc["models"]:
        lines += ["## models", "", "| model | variant | phase | batch | dtype | layout | median ms/step | images/s "
                  "| bytes saved for backward |", "|" + "---|" * 9]
        for m in doc["models"]:
            lines.append(f"| {m['model']} | {m['variant']} | {m['phase']} | {m['batch']} | {m['dtype']} | "
                         f"{m['layout']} | {m['median_ms']:.4g} | {m['images_per_s']:.4g} | "
                         f"{_f(m.get('saved_bytes'), '{:,}')} |")
        lines.append("")
    if doc["memory"]:
        lines += ["## bytes saved for backward per training step", "",
                  "fastconv.memory.saved_bytes (parameters excluded), one forward in train mode.", "",
                  "| model | batch | dtype | layout | plain PyTorch | converted | converted / plain | "
                  "converted ran on |", "|" + "---|" * 8]
        for m in doc["memory"]:
            lines.append(f"| {m['model']} | {m['batch']} | {m['dtype']} | {m['layout']} | {m['plain_bytes']:,} | "
                         f"{m['fastconv_bytes']:,} | {m['ratio']:.3f} | {m['fastconv_backend']} |")
        lines.append("")
    if doc["providers_skipped"]:
        lines += ["## providers not run on this device", "", "| provider | reason |", "|---|---|"]
        lines += [f"| {p} | {why} |" for p, why in doc["providers_skipped"].items()]
        lines.append("")
    if doc["skipped"]:
        lines += ["## rows skipped", "", "| op | provider | rows | reason |", "|---|---|---|---|"]
        lines += [f"| {s['op']} | {s['provider']} | {s['rows']} | {s['reason']} |" for s in doc["skipped"]]
        lines.append("")
    return "\n".join(lines)


def charts(doc: dict, out: pathlib.Path, set_name: str) -> None:
    """Per op: achieved TFLOP/s (GB/s for max-pool) per shape and provider, one panel per mode, at the most
    common dtype/layout of the run. Models: images/s per model, variant and phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for op in dict.fromkeys(r["op"] for r in doc["rows"]):
        rows = [r for r in doc["rows"] if r["op"] == op]
        combos = [(r["dtype"], r["layout"]) for r in rows]
        dtype, layout = max(set(combos), key=combos.count)
        rows = [r for r in rows if (r["dtype"], r["layout"]) == (dtype, layout)]
        metric, unit = ("gbps", "GB/s") if op == "max_pool2d" else ("tflops", "TFLOP/s")
        modes = list(dict.fromkeys(r["mode"] for r in rows))
        shapes = list(dict.fromkeys(r["shape"] for r in rows))[:40]
        providers = list(dict.fromkeys(r["provider"] for r in rows))
        fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 0.3 * len(shapes) * len(providers) / 2 + 2),
                                 squeeze=False)
        for ax, mode in zip(axes[0], modes):
            height = 0.8 / max(len(providers), 1)
            for i, prov in enumerate(providers):
                vals = {r["shape"]: r[metric] for r in rows if r["mode"] == mode and r["provider"] == prov}
                ys = [j + i * height for j in range(len(shapes))]
                ax.barh(ys, [vals.get(s, 0.0) for s in shapes], height=height, label=prov)
            ax.set_yticks([j + 0.4 - height / 2 for j in range(len(shapes))], shapes, fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel(unit)
            ax.set_title(f"{op} {mode} ({dtype}, {layout})", fontsize=9)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{doc['environment']['device']} — torch {doc['environment']['torch']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / f"{set_name}-{op}.png", dpi=90, bbox_inches="tight")
        plt.close(fig)
    if doc["models"]:
        ms = doc["models"]
        labels = list(dict.fromkeys(m["model"] for m in ms))
        series = list(dict.fromkeys((m["variant"], m["phase"]) for m in ms))
        fig, ax = plt.subplots(figsize=(8, 0.5 * len(labels) * max(len(series), 1) / 2 + 2))
        height = 0.8 / len(series)
        for i, (variant, phase) in enumerate(series):
            vals = {m["model"]: m["images_per_s"] for m in ms if (m["variant"], m["phase"]) == (variant, phase)}
            ax.barh([j + i * height for j in range(len(labels))], [vals.get(lbl, 0.0) for lbl in labels],
                    height=height, label=f"{variant} {phase}")
        ax.set_yticks([j + 0.4 - height / 2 for j in range(len(labels))], labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("images/s")
        ax.legend(fontsize=7)
        ax.set_title(f"models — {doc['environment']['device']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / f"{set_name}-models.png", dpi=90, bbox_inches="tight")
        plt.close(fig)


def command_line(args) -> str:
    return " ".join(["pytest", *args]) if args else "pytest"

