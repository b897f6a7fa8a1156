"""The CUDA C++ part of the kernel report (fastconv/_cuda_report.py): the conv2d .cu files compile standalone
for sm_80 and sm_90, ptxas numbers are parsed per kernel, and the half-precision and TF32 GEMMs run on tensor
cores (HMMA in the SASS). Needs nvcc + cuobjdump (no GPU); skipped with the reason without them."""
from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import pytest

from fastconv import _cuda_report, kernel_report

ARCHES = ("sm_80", "sm_90")
CONV_FILES = ("conv2d_gemm.cu", "im2col.cu", "col2im.cu")

pytestmark = pytest.mark.skipif(not _cuda_report.available()[0], reason=f"CUDA report: {_cuda_report.available()[1]}")


@pytest.fixture(scope="module")
def rows():
    files = [_cuda_report.CSRC / "cuda" / f for f in CONV_FILES]
    out = []
    for f in files:
        out += _cuda_report.compile_file(f, ARCHES)
    return out


def test_every_conv_kernel_compiles_for_both_arches(rows):
    assert not [r for r in rows if r["note"].startswith(_cuda_report.FAILED)]
    for kernel in ("fastconv::gemm_kernel", "fastconv::im2col_kernel", "fastconv::col2im_kernel"):
        for arch in ARCHES:
            got = {r["dtype"] for r in rows if r["kernel"] == kernel and r["arch"] == arch and r["registers"] > 0}
            assert got >= {"fp32", "fp16", "bf16", "fp64"}, (kernel, arch, got)


def test_rows_have_the_triton_fields_plus_family(rows):
    assert all(set(r) == set(kernel_report.KEYS) and r["family"] == "cuda" for r in rows)


@pytest.mark.parametrize("arch", ARCHES)
def test_gemm_tensor_cores(rows, arch):
    gemm = {r["dtype"]: r for r in rows if r["gemm"] and r["arch"] == arch}
    assert set(gemm) == {"fp32", "tf32", "fp16", "bf16", "fp64"}, set(gemm)
    assert "HMMA" in gemm["fp16"]["tensor_cores"] and "BF16" in gemm["bf16"]["tensor_cores"]
    assert "TF32" in gemm["tf32"]["tensor_cores"]
    assert gemm["fp32"]["tensor_cores"] == ""  # TF32 off: exact FFMA, as nn.Conv2d with allow_tf32=False
    # static shared memory must stay under the 48 KiB that needs no opt-in
    assert all(r["shared_bytes"] <= 48 * 1024 for r in gemm.values())


def test_parsers_on_fixed_text():
    log = ("ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'\n"
           "    8 bytes stack frame, 4 bytes spill stores, 8 bytes spill loads\n"
           "ptxas info    : Used 40 registers, used 1 barriers, 1024 bytes smem, 360 bytes cmem[0]\n")
    assert _cuda_report._parse_ptxas(log) == {("_Z3fooPf", "sm_80"): {"registers": 40, "spills": 12,
                                                                     "shared_bytes": 1024}}
    sass = ("arch = sm_90\n  Function : _Z3fooPf\n  /*0010*/ HMMA.16816.F32 R4, R8, R12, R4 ;\n"
            "  /*0020*/ HMMA.16816.F32 R4, R8, R12, R4 ;\n")
    assert _cuda_report._parse_sass(sass)[("_Z3fooPf", "sm_90")] == {"HMMA.16816.F32": 2}


def test_cli_family_cuda(monkeypatch):
    monkeypatch.setattr(_cuda_report, "sources", lambda: [_cuda_report.CSRC / "cuda" / "im2col.cu"])
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = kernel_report.main(["--family", "cuda", "--json", "--arch", "sm_80"])
    rows = json.loads(buf.getvalue())
    assert rc == 0 and rows and {r["family"] for r in rows} == {"cuda"} and {r["arch"] for r in rows} == {"sm_80"}


def test_batch_norm_kernels_compile_without_spills():
    """The C++ BatchNorm kernels, the passes combining the partials (bn_combine_kernel) included."""
    rows = _cuda_report.compile_file(_cuda_report.CSRC / "cuda" / "batch_norm.cu", ARCHES)
    assert rows and not [r for r in rows if r["note"].startswith(_cuda_report.FAILED)]
    assert [r for r in rows if r["spills"]] == []
    for arch in ARCHES:
        combine = [r for r in rows if r["kernel"] == "fastconv::bn_combine_kernel" and r["arch"] == arch]
        # Moments (finalize) and GradSums (backward sums), float and double each
        assert sorted(r["dtype"] for r in combine) == ["fp32", "fp32", "fp64", "fp64"], combine
        assert {"Moments", "GradSums"} <= {n for r in combine for n in ("Moments", "GradSums") if n in r["config"]}
