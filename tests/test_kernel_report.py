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
    """configs.MAXNREG pins registers on tiles that exist, and the autotune configs carry the pin."""
    from fastconv.triton.configs import CONFIGS, MAXNREG, configs_for

    for (fam, kind, arch, tile), pin in MAXNREG.items():
        assert tile in CONFIGS[fam][kind][arch], (fam, kind, arch, tile)
        assert (pin % 8 == 0 and pin < 255) or pin == 255  # 255: no occupancy target
        tiles = [((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages),
                  c.maxnreg) for c in configs_for(fam, arch, kind)]
        assert [p for t, p in tiles if t == tile] == [pin]
        assert all(p is None or (fam, kind, arch, t) in MAXNREG for t, p in tiles)


def _json_without_interpreter(code: str):
    """Run `code` in a fresh Python without TRITON_INTERPRET (the kernels are then JITFunctions the report can
    plan and compile) and parse the JSON it prints last."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_pinned_tile_variants_planned_and_spill_free():
    """The full report compiles every variant on a pinned tile (with the pin); and one pinned tile compiled for
    real (sm_90, Triton's ptxas flags) stays within its pin without spills."""
    code = """if True:
        import json
        from fastconv import kernel_report as kr
        jobs, _ = kr._plan(("sm_90",), False, "_conv2d_wgrad_kernel")
        pinned = [j for j in jobs if j["dtype"] == "fp32" and j["config"].startswith("BM128_BN32_BK16_w4_s3_r104")]
        plain = next(j for j in pinned if j["config"] == "BM128_BN32_BK16_w4_s3_r104")
        print(json.dumps(dict(variants=sorted(j["config"].partition(" ")[2] for j in pinned),
                              pins=sorted({j["maxnreg"] for j in pinned}), row=kr._compile(plain))))
    """
    out = _json_without_interpreter(code)
    assert out["variants"] == ["", "IDX64", "dbias"] and out["pins"] == [104]
    row = out["row"]
    assert 0 < row["registers"] <= 104 and row["spills"] == 0, row


def test_tiles_obey_gpu_compiler_rules():
    """Every autotune tile compiles on a GPU: power-of-two blocks and warps, every tl.dot dim >= 16 (Triton
    3.7 rejects K < 16 at compile time, which would abort autotuning), and the interpreter tiles likewise."""
    from fastconv.triton.configs import CONFIGS, INTERPRET

    def pow2(v):
        return v > 0 and v & (v - 1) == 0

    tiles = [t for fam in CONFIGS.values() for kind in fam.values() for arch in kind.values() for t in arch]
    tiles += list(INTERPRET.values())
    for bm, bn, bk, warps, stages in tiles:
        assert all(pow2(b) and b >= 16 for b in (bm, bn, bk)), (bm, bn, bk)
        assert pow2(warps) and warps <= 16 and stages >= 1, (warps, stages)


def test_all_variants_plans_every_variant_on_every_tile():
    """--all-variants compiles each fused-epilogue / layout / IDX64 variant on every tile the autotuner may pick,
    the default only on the first tile and the pinned ones."""
    code = """if True:
        import json
        from fastconv import kernel_report as kr
        default, _ = kr._plan(("sm_80",), False, "_im2col_gemm_kernel")
        every, _ = kr._plan(("sm_80",), False, "_im2col_gemm_kernel", all_variants=True)
        print(json.dumps(dict(default=[j["config"] for j in default if j["dtype"] == "fp16"],
                              every=[j["config"] for j in every if j["dtype"] == "fp16"])))
    """
    out = _json_without_interpreter(code)
    from fastconv.kernel_report import CASES, _label
    from fastconv.triton.configs import fits_fused, tiles

    variants = set(CASES["_im2col_gemm_kernel"]["variants"]) | {"IDX64"}
    assert variants == {"stats", "NCHW", "bn_res_silu", "IDX64"}  # each sets a FUSED_FLAGS constexpr
    every = [c.partition(" ") for c in out["every"]]
    table = tiles("im2col_gemm", "sm_80", "half")
    for (bm, bn, bk, w, s), pin in table:
        label = _label(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), w, s, pin)
        want = variants | {""} if fits_fused((bm, bn, bk, w, s)) else {""}
        assert sorted(f for t, _, f in every if t == label) == sorted(want), label
    assert len(every) == len(table) + len(variants) * sum(fits_fused(t) for t, _ in table)
    # the default plan: variants on the first tile and on pinned ones only
    with_variants = 1 + sum(1 for t, pin in table[1:] if pin and fits_fused(t))
    assert len(out["default"]) == len(table) + len(variants) * with_variants
    assert len(out["default"]) < len(every)


def test_fused_launches_keep_spare_registers():
    """A fused launch (scale/shift, residual, BN statistics, NCHW halves, IDX64) autotunes only over tiles that
    leave FUSED_SPARE_REGISTERS beside the fp32 accumulator; every table keeps its first tile (the one the
    default report compiles every variant on) and at least three tiles for fused launches."""
    from fastconv.triton.configs import CONFIGS, FUSED_SPARE_REGISTERS, configs_for, fits_fused, is_fused, tiles

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
                assert len(configs_for(fam, arch, kind, fused=True)) == len(fused)


def test_tuned_kernel_autotunes_fused_launches_over_fitting_tiles(monkeypatch):
    """On a GPU, TunedKernel keeps one autotuner per (arch, operand kind, fused): a fused launch never sees a
    tile that configs.fits_fused rules out, a plain one sees the whole table."""
    import torch
    from fastconv.triton import configs

    seen = []

    class FakeAutotuned:
        def __init__(self, cfgs):
            self.cfgs = cfgs

        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append((len(self.cfgs), kwargs))

    def fake_autotune(configs, key):
        return lambda kernel: FakeAutotuned(configs)

    monkeypatch.setattr(configs, "interpreting", lambda: False)
    monkeypatch.setattr(configs, "arch_key", lambda device=None: "sm_90")
    monkeypatch.setattr(configs.triton, "autotune", fake_autotune)
    tk = configs.TunedKernel(object(), "conv2d_fwd", ["M"])
    x = torch.empty(1, dtype=torch.float16)
    tk(lambda meta: (1,), x, device=torch.device("cpu"), HAS_BIAS=True, HAS_RES=False, IDX64=False)
    tk(lambda meta: (1,), x, device=torch.device("cpu"), HAS_BIAS=False, HAS_RES=True, IDX64=False)
    tk(lambda meta: (1,), x, device=torch.device("cpu"), HAS_BIAS=True, HAS_RES=False, IDX64=False)
    plain = len(configs.tiles("conv2d_fwd", "sm_90", "half"))
    fused = len(configs.tiles("conv2d_fwd", "sm_90", "half", fused=True))
    assert fused < plain
    assert [n for n, _ in seen] == [plain, fused, plain]
    assert set(tk._tuned) == {("sm_90", "half", False), ("sm_90", "half", True)}
