"""The quick ahead-of-time kernel report (what CI runs): every Triton kernel compiles for sm_80 and sm_90,
every kernel family with fp16, bf16 and fp32 (GEMM families with tf32 too), half-precision and TF32 GEMMs
use tensor cores, and the first autotune configs neither spill nor overflow shared memory. Needs no GPU: it
compiles for the targets with Triton's bundled ptxas. The full report (every config and variant) is
`python -m fastconv.kernel_report`."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONV2D_KERNELS = ("_conv2d_fwd_kernel", "_conv2d_dgrad_kernel", "_conv2d_wgrad_kernel")
ARCHES = ("sm_80", "sm_90")
FAMILIES = ("conv2d", "im2col", "batch_norm", "max_pool2d")
GEMM_FAMILIES = ("conv2d", "im2col")


def family(kernel):
    return next(f for f in FAMILIES if kernel.startswith(f"_{f}_"))


@pytest.fixture(scope="module")
def rows():
    # A subprocess with a clean environment: the report must work whatever the test session's interpreter
    # setting is, and its stdout must be pure JSON.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "fastconv.kernel_report", "--quick", "--json", "--family", "triton"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    print(proc.stderr[-4000:])
    failed = [r for r in json.loads(proc.stdout or "[]") if r["note"].startswith("compile failed")]
    assert proc.returncode == 0 and not failed, f"rc={proc.returncode} failed={failed}\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


def test_keys(rows):
    keys = {"kernel", "config", "dtype", "arch", "registers", "spills", "shared_bytes", "tensor_cores", "gemm", "note",
            "family"}
    assert rows and all(set(r) == keys for r in rows)


@pytest.mark.parametrize("arch", ARCHES)
def test_every_kernel_on_both_arches(rows, arch):
    from fastconv.kernel_report import QUICK_DTYPES

    got = {r["kernel"] for r in rows if r["arch"] == arch and r["registers"] > 0}
    assert got >= set(QUICK_DTYPES) | set(CONV2D_KERNELS), set(QUICK_DTYPES) - got


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("fam", FAMILIES)
def test_every_family_in_every_dtype(rows, fam, arch):
    got = {r["dtype"] for r in rows if family(r["kernel"]) == fam and r["arch"] == arch and r["registers"] > 0}
    want = {"fp16", "bf16", "fp32"} | ({"tf32"} if fam in GEMM_FAMILIES else set())
    assert got >= want, got


@pytest.mark.parametrize("arch", ARCHES)
def test_idx64_case_present(rows, arch):
    assert any(r["kernel"] == "_conv2d_fwd_kernel" and r["arch"] == arch and "IDX64" in r["config"]
               and r["registers"] > 0 for r in rows)


def test_every_kernel_compiled(rows):
    # A "skipped" row means kernel_report.CASES has no value for one of the kernel's constexprs.
    assert all(r["registers"] > 0 for r in rows), [r for r in rows if r["registers"] <= 0]


def test_half_precision_gemms_use_tensor_cores(rows):
    half = [r for r in rows if r["gemm"] and r["dtype"] in ("fp16", "bf16")]
    assert {(family(r["kernel"]), r["arch"]) for r in half} == {(f, a) for f in GEMM_FAMILIES for a in ARCHES}
    for r in half:
        want = ("HMMA",) if r["arch"] == "sm_80" else ("HGMMA", "HMMA")
        assert r["tensor_cores"].startswith(want), r
    # tf32 GEMMs too
    assert all(r["tensor_cores"] for r in rows if r["gemm"] and r["dtype"] == "tf32")


def test_shared_memory_fits(rows):
    limit = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
    assert all(r["shared_bytes"] <= limit[r["arch"]] for r in rows), [
        r for r in rows if r["shared_bytes"] > limit[r["arch"]]]


def test_no_spills(rows):
    spilling = [f"{r['kernel']} {r['config']} {r['dtype']} {r['arch']}: {r['registers']} regs, {r['spills']} B spilled"
                for r in rows if r["spills"]]
    assert not spilling, "quick configs spill:\n" + "\n".join(spilling)


def test_ptxas_numbers():
    from fastconv.kernel_report import _ptxas_numbers

    log = ("ptxas info    : Function properties for k\n    8 bytes stack frame, 12 bytes spill stores, 8 bytes spill "
           "loads\nptxas info    : Used 128 registers, used 1 barriers, 472 bytes cmem[0]\n")
    assert _ptxas_numbers(log) == (128, 20)
    assert _ptxas_numbers("") == (0, 0)


def test_summary_counts_occupancy_spills_apart():
    from fastconv.kernel_report import OCCUPANCY_SPILL, summary, _row

    rows = [_row("_k", "a", "fp16", "sm_80", registers=255, spills=40, note="spills 40B st+ld"),
            _row("_k", "b", "fp16", "sm_80", registers=128, spills=8,
                 note=f"spills 8B st+ld; {OCCUPANCY_SPILL}: none with .maxnreg 255"),
            _row("_k", "c", "fp16", "sm_80", registers=96)]
    head = summary(rows)[0]
    assert f"rows with spills: 2 (1 {OCCUPANCY_SPILL}s, 1 other)" in head


def test_register_pins_name_real_tiles():
    """configs.MAXNREG pins registers on tiles that exist, and the launcher's tile list carries the pin."""
    from fastconv.triton.configs import CONFIGS, MAXNREG, tiles

    for (fam, kind, arch, tile), pin in MAXNREG.items():
        assert tile in CONFIGS[fam][kind][arch], (fam, kind, arch, tile)
        assert (pin % 8 == 0 and pin < 255) or pin == 255  # 255: no occupancy target
        listed = tiles(fam, arch, kind)
        assert [p for t, p in listed if t == tile] == [pin]
        assert all(p is None or (fam, kind, arch, t) in MAXNREG for t, p in listed)


def test_fused_launches_keep_spare_registers():
    """A fused launch (scale/shift, residual, BN statistics, NCHW halves, IDX64) autotunes only over tiles that
    leave FUSED_SPARE_REGISTERS beside the fp32 accumulator; every table keeps its first tile (the one the
    default report compiles every variant on) and at least three tiles for fused launches."""
    from fastconv.triton.configs import CONFIGS, FUSED_SPARE_REGISTERS, fits_fused, is_fused, tiles

    assert not fits_fused((128, 128, 32, 4, 4)) and not fits_fused((256, 128, 64, 8, 3))
    assert not fits_fused((256, 128, 32, 16, 3))  # 16 warps: 128 registers per thread in all
    assert fits_fused((128, 128, 64, 8, 3)) and fits_fused((128, 64, 32, 4, 4))
    assert fits_fused((64, 128, 16, 4, 3), "tf32") and not fits_fused((64, 128, 16, 4, 3), "fp32")  # FMA fragments
    assert is_fused({"HAS_RES": True}) and is_fused({"SPLIT_N": True}) and not is_fused({"HAS_BIAS": True, "ACT": 1})
    for fam, kinds in CONFIGS.items():
        for kind, arches in kinds.items():
            for arch in arches:
                fused = tiles(fam, arch, kind, fused=True)
                assert fused[0] == tiles(fam, arch, kind)[0] and len(fused) >= 3, (fam, kind, arch)
                for (bm, bn, bk, w, s), _ in fused:
                    assert min(255, 65536 // (32 * w)) - bm * bn // (32 * w) >= FUSED_SPARE_REGISTERS[kind]


def test_tuned_kernel_autotunes_fused_launches_over_fitting_tiles(monkeypatch):
    """On a GPU, TunedKernel tunes a fused launch only over tiles configs.fits_fused allows, a plain one over
    the whole table (each tile benchmarked once per key)."""
    import torch
    from fastconv.triton import configs, launch

    benched = []

    class FakeKernel:
        fn = test_tuned_kernel_autotunes_fused_launches_over_fitting_tiles

        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    def fake_bench(fn):
        benched.append(1)
        fn()
        return 1.0

    monkeypatch.setattr(launch, "interpreting", lambda: False)
    monkeypatch.setenv("FASTCONV_ARCH", "sm_90")
    monkeypatch.setenv("FASTCONV_AUTOTUNE", "1")
    monkeypatch.setenv("FASTCONV_CACHE_DIR", str(__import__("tempfile").mkdtemp()))
    monkeypatch.setattr(launch, "_bench_ms", fake_bench)
    monkeypatch.setattr(launch, "CACHE", launch._DiskCache())
    tk = launch.TunedKernel(FakeKernel(), "conv2d_fwd")
    x = torch.empty(1, dtype=torch.float16)
    p = launch.Problem(4096, 64, 64, 9)
    counts = []
    for flags in (dict(HAS_BIAS=True, HAS_RES=False), dict(HAS_BIAS=False, HAS_RES=True),
                  dict(HAS_BIAS=True, HAS_RES=False)):
        before = len(benched)
        tk(lambda meta: (1,), x, problem=p, device=torch.device("cpu"), IDX64=False, **flags)
        counts.append(len(benched) - before)
    plain = len(configs.tiles("conv2d_fwd", "sm_90", "half"))
    fused = len(configs.tiles("conv2d_fwd", "sm_90", "half", fused=True))
    assert fused < plain
    assert counts == [plain, fused, 0]  # the third launch reuses the first's tuned tile


def test_full_report_plan_names_only_kernel_parameters():
    """Every constexpr the full report (all variants) would pass is a parameter of its kernel: Triton 3.6 rejects an
    unknown one at compile time ("'POOL' is not in list"), later versions ignore it, so a stale CASES entry would only
    show on the oldest stack. Planning compiles nothing, so this runs in a second."""
    code = ("import json; from fastconv.kernel_report import _plan; "
            f"jobs, rows = _plan({list(ARCHES)!r}, quick=False, all_variants=True); "
            "print(json.dumps([len(jobs), [r['note'] for r in rows]]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # JITFunctions, not interpreted ones
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n_jobs, notes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert n_jobs > 1000 and not notes, notes
