"""Ahead-of-time compile report for fastconv's CUDA C++ kernels (csrc/cuda/*.cu), no GPU needed; the CUDA
part of ``python -m fastconv.kernel_report``.

Each .cu file is compiled on its own (they include no torch headers) with nvcc for every target in one call
(``-gencode`` per arch, ``-Xptxas -v``), into a fatbinary. Per kernel and arch the rows give registers,
spills and static shared memory from ptxas, and the tensor-core instructions (HMMA / HGMMA / DMMA ...) counted
in the SASS (cuobjdump -sass). Kernel names are demangled with cu++filt, or c++filt where the toolkit has
none. Row fields are those of the Triton rows plus ``family`` ("cuda").
"""
from __future__ import annotations

import collections
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
TC_RE = re.compile(r"\b((?:HMMA|HGMMA|IMMA|IGMMA|DMMA|QGMMA|UTCHMMA|UTCMMA)\.[\w.]+)")
FAILED = "compile failed"

# Template arguments of the kernels -> the dtype column (fp32 with the TF32 tensor-core main loop is "tf32").
_DTYPES = (("__nv_bfloat16", "bf16"), ("__half", "fp16"), ("double", "fp64"), ("float", "fp32"))


def _toolkit_bin() -> Path | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return Path(home) / "bin"
    nvcc = shutil.which("nvcc")
    return Path(nvcc).parent if nvcc else None


def tool(name: str) -> str | None:
    """A CUDA binary: from the toolkit, else PATH, else (cuobjdump, nvdisasm) the copy bundled with Triton."""
    bin_dir = _toolkit_bin()
    if bin_dir and (bin_dir / name).exists():
        return str(bin_dir / name)
    if shutil.which(name):
        return shutil.which(name)
    spec = importlib.util.find_spec("triton")  # locating the package does not import it
    if spec and spec.submodule_search_locations:
        bundled = Path(spec.submodule_search_locations[0]) / "backends" / "nvidia" / "bin" / name
        if bundled.exists():
            return str(bundled)
    return None


def available() -> tuple[bool, str]:
    missing = [t for t in ("nvcc", "cuobjdump") if tool(t) is None]
    if missing:
        return False, f"no {' / '.join(missing)} found (set CUDA_HOME to a CUDA toolkit)"
    return True, ""


def demangle(names: list[str]) -> dict[str, str]:
    filt = tool("cu++filt") or shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _short(demangled: str) -> tuple[str, str]:
    """('fastconv::gemm_kernel', '<float, Mma 2>') from a demangled signature."""
    name = re.sub(r"\(anonymous namespace\)::", "", demangled)
    name = re.sub(r"^void ", "", name)
    name = name.split("(")[0] if "<" not in name else name[: name.rfind(">") + 1]
    base, _, targs = name.partition("<")
    return base, ("<" + targs) if targs else ""


def _dtype(targs: str) -> str:
    for needle, dt in _DTYPES:
        if needle in targs:
            if dt == "fp32" and re.search(r"Mma\)2\b", targs):
                return "tf32"
            return dt
    return "-"


def _parse_ptxas(log: str) -> dict[tuple[str, str], dict]:
    """{(mangled, arch): {registers, spills, shared_bytes}} from nvcc -Xptxas -v output."""
    found: dict[tuple[str, str], dict] = {}
    key = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            key = (m.group(1), m.group(2))
            found[key] = {"registers": 0, "spills": 0, "shared_bytes": 0}
            continue
        if key is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            found[key]["spills"] = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            found[key]["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            found[key]["shared_bytes"] = int(s.group(1)) if s else 0
    return found


def _parse_sass(sass: str) -> dict[tuple[str, str], collections.Counter]:
    """{(mangled, arch): Counter of tensor-core opcodes} from cuobjdump -sass of a fatbinary."""
    counts: dict[tuple[str, str], collections.Counter] = {}
    arch, func = None, None
    for line in sass.splitlines():
        m = re.search(r"arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.search(r"Function : (\S+)", line)
        if m:
            func = m.group(1)
            counts[(func, arch)] = collections.Counter()
            continue
        if func is not None:
            for op in TC_RE.findall(line):
                counts[(func, arch)][op] += 1
    return counts


def compile_file(cu: Path, arches: tuple[str, ...]) -> list[dict]:
    """Compile one .cu for `arches` and return its rows (one per kernel and arch)."""
    nvcc, cuobjdump = tool("nvcc"), tool("cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, cu.stem + ".fatbin")
        gencode = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in arches]
        cmd = [nvcc, "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-fatbin", *gencode, "-Xptxas", "-v",
               f"-I{CSRC / 'include'}", f"-I{CSRC / 'cuda'}", str(cu), "-o", out]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return [_row(cu, "-", "", a, note=f"{FAILED}: {' | '.join(tail)}") for a in arches]
        sass = subprocess.run([cuobjdump, "-sass", out], capture_output=True, text=True).stdout
    ptxas = _parse_ptxas(proc.stderr + proc.stdout)
    tcs = _parse_sass(sass)
    names = demangle(sorted({k[0] for k in ptxas}))
    rows = []
    for (mangled, arch), info in sorted(ptxas.items(), key=lambda kv: (names[kv[0][0]], kv[0][1])):
        base, targs = _short(names[mangled])
        tc = tcs.get((mangled, arch), collections.Counter())
        note = f"spills {info['spills']}B" if info["spills"] else ""
        rows.append(_row(cu, base, targs, arch, note=note, tensor_cores=",".join(f"{k}x{v}" for k, v in sorted(tc.items())),
                         **info))
    return rows


def _row(cu: Path, kernel: str, targs: str, arch: str, note: str = "", **fields) -> dict:
    row = dict(kernel=kernel, config=f"{cu.name}{targs}", dtype=_dtype(targs), arch=arch, registers=0, spills=0,
               shared_bytes=0, tensor_cores="", gemm="gemm" in kernel, note=note, family="cuda")
    row.update(fields)
    return row


def sources() -> list[Path]:
    return sorted((CSRC / "cuda").glob("*.cu"))


def report(arches=("sm_80", "sm_90"), jobs: int = 2) -> list[dict]:
    """Rows for every kernel of every csrc/cuda/*.cu file; one 'compile failed' row per arch if the toolkit
    is missing."""
    ok, why = available()
    if not ok:
        return [dict(kernel="csrc/cuda/*.cu", config="-", dtype="-", arch=a, registers=0, spills=0, shared_bytes=0,
                     tensor_cores="", gemm=False, note=f"{FAILED}: {why}", family="cuda") for a in arches]
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        per_file = list(pool.map(lambda cu: compile_file(cu, tuple(arches)), sources()))
    return [r for rows in per_file for r in rows]
