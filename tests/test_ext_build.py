"""The C++/CUDA extension fastconv._C: it is built (unless FASTCONV_BUILD_EXT=0), reports what it was built
with, holds code for the architectures the build was asked for (TORCH_CUDA_ARCH_LIST; by default sm_80 and
sm_90) when a CUDA toolkit and a CUDA torch were present, and its conv ops pass torch.library.opcheck and
produce the BatchNorm partials of the shared contract."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fastconv import _cuda_report, _ext
from fastconv.ops import conv2d as conv_ops

from .helpers import assert_close, generator, randn

EXT_DISABLED = os.environ.get("FASTCONV_BUILD_EXT", "1") == "0"
CUDA_BUILD_EXPECTED = (os.environ.get("FASTCONV_BUILD_CUDA", "1") != "0" and torch.version.cuda is not None
                       and _cuda_report.tool("nvcc") is not None)

needs_ext = pytest.mark.skipif(not _ext.load(), reason=f"fastconv._C unavailable: {_ext.reason()}")


@pytest.mark.skipif(EXT_DISABLED, reason="FASTCONV_BUILD_EXT=0: pure-Python install requested")
def test_extension_is_built_and_loads():
    assert _ext.load(), _ext.reason()
    info = _ext.build_info()
    assert set(info) >= {"cuda", "cuda_version", "nvcc", "archs", "cxx"}, info


def requested_archs(arch_list: str | None = None) -> list[str]:
    """The sm_XY names of the architectures a build is asked for: TORCH_CUDA_ARCH_LIST (as setup.py reads it:
    "9.0", "8.0;9.0", "8.0 9.0+PTX", "9.0a" -> sm_90a), or setup.py's default sm_80 + sm_90 when it is unset."""
    if arch_list is None:
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    archs = ["sm_" + a.split("+")[0].replace(".", "") for a in arch_list.replace(" ", ";").split(";") if a.strip()]
    return archs or ["sm_80", "sm_90"]


def test_requested_archs_parses_like_setup_py():
    assert requested_archs("") == ["sm_80", "sm_90"]
    assert requested_archs("9.0") == ["sm_90"]
    assert requested_archs("8.0;9.0") == requested_archs("8.0 9.0+PTX") == ["sm_80", "sm_90"]
    assert requested_archs("9.0a") == ["sm_90a"]


@pytest.mark.skipif(not CUDA_BUILD_EXPECTED, reason="no nvcc or CPU-only torch (or FASTCONV_BUILD_CUDA=0): "
                                                      "the extension is built without CUDA kernels")
def test_cuda_kernels_compiled_for_requested_archs():
    """Code for every requested architecture (sm_80 and sm_90 unless TORCH_CUDA_ARCH_LIST says otherwise,
    e.g. scripts/gpu_check.sh builds for the visible GPU only), and the build recorded exactly what it made."""
    assert _ext.load(), _ext.reason()
    info = _ext.build_info()
    assert info["cuda"] is True, info
    want = requested_archs()
    assert set(want) <= set(info["archs"]), (
        f"the extension was built for {info['archs']}, this test run asks for {want} (TORCH_CUDA_ARCH_LIST="
        f"{os.environ.get('TORCH_CUDA_ARCH_LIST')!r}; unset means sm_80 + sm_90): rebuild, or set the list the "
        "build was given")
    cuobjdump = _cuda_report.tool("cuobjdump")
    if cuobjdump is None:
        pytest.skip("cuobjdump not found: cannot list the ELF images in the library")
    so = importlib.util.find_spec("fastconv._C").origin
    elfs = subprocess.run([cuobjdump, "--list-elf", so], capture_output=True, text=True, check=True).stdout
    for arch in info["archs"]:
        assert f".{arch}." in elfs, f"no {arch} cubin in {so}:\n{elfs}"


def _conv_case(device, dtype=torch.float32):
    gen = generator("ext-opcheck", str(dtype))
    x = randn((2, 4, 9, 7), dtype, device, gen).contiguous(memory_format=torch.channels_last)
    w = randn((6, 2, 3, 3), dtype, device, gen)
    return gen, x, w, ([2, 1], [1, 0, 2, 1], [1, 2], 2)


def _devices():
    return ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not (torch.cuda.is_available() and _ext.cuda_kernels_status()[0]),
        reason="needs a CUDA device and fastconv._C with CUDA kernels")])]


@needs_ext
@pytest.mark.parametrize("device", _devices())
def test_opcheck_ext_ops(device):
    from torch.library import opcheck

    conv_ops.ext_ops()  # loads the extension and registers the fakes

    ops = torch.ops.fastconv  # the registered ops (ext_ops() returns their direct entry points)
    gen, x, w, geo = _conv_case(device)
    out = conv_ops._new_output(x, w, geo[0], geo[1], geo[2])
    res = randn(out.shape, torch.float32, device, gen)
    vec = randn((6,), torch.float32, device, gen)
    opcheck(ops.ext_conv2d.default, (x, w, vec, *geo, None, None, None, 0, False, False, out))
    opcheck(ops.ext_conv2d.default, (x, w, None, *geo, vec, vec, res, 3, True, False, torch.empty_like(out)))
    gy = randn(out.shape, torch.float32, device, gen)
    opcheck(ops.ext_conv2d_input_grad.default, (gy, w, *geo, False, torch.empty_like(x)))
    opcheck(ops.ext_conv2d_weight_grad.default, (gy, x, list(w.shape), *geo, True, False))
    opcheck(ops.ext_conv2d_weight_grad.default, (gy, x, list(w.shape), *geo, False, False))


@needs_ext
@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_bn_partials_contract(device, dtype):
    """count/mean/M2 per 64-row tile of the conv before the bias; Chan's combination + bias = batch stats."""
    gen = generator("ext-stats", str(dtype))
    x = randn((3, 5, 11, 10), dtype, device, gen)  # 3 * 11 * 10 = 330 rows: 6 tiles, the last one partial
    w = randn((7, 5, 3, 3), dtype, device, gen)
    bias = randn((7,), dtype, device, gen)
    y, (cnt, mean, m2) = conv_ops.ext_conv2d(x, w, bias, (1, 1), (1, 1, 1, 1), (1, 1), 1, stats=True)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert cnt.shape == mean.shape == m2.shape == (conv_ops.stats_tiles(3, 11, 10), 7) and cnt.dtype == acc
    z = F.conv2d(x.double().cpu(), w.double().cpu(), None, 1, 1)
    assert_close(y, z + bias.double().cpu()[:, None, None], dtype, "ext_conv2d forward with stats")
    rows = z.permute(0, 2, 3, 1).reshape(-1, 7)
    tiles = rows.split(_ext.build_info()["stats_rows"])
    assert cnt.cpu().double()[:, 0].tolist() == [float(t.shape[0]) for t in tiles]
    ref_mean = torch.stack([t.mean(0) for t in tiles])
    ref_m2 = torch.stack([((t - t.mean(0)) ** 2).sum(0) for t in tiles])
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(mean.cpu().double(), ref_mean, rtol=tol, atol=tol)
    torch.testing.assert_close(m2.cpu().double(), ref_m2, rtol=tol, atol=tol * 64)


@needs_ext
def test_ext_op_errors_are_clear():
    conv_ops.ext_ops()  # loads the extension and registers the fakes
    ops = torch.ops.fastconv  # the registered ops (ext_ops() returns their direct entry points)
    x, w = torch.randn(1, 4, 5, 5), torch.randn(2, 4, 3, 3)
    out = torch.empty(1, 2, 3, 3)
    geo = ([1, 1], [0, 0, 0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError, match="unsupported dtype Int"):
        ops.ext_conv2d(x.int(), w.int(), None, *geo, None, None, None, 0, False, False, out.int())
    with pytest.raises(RuntimeError, match=r"out has size \[1, 2, 4, 4\]"):
        ops.ext_conv2d(x, w, None, *geo, None, None, None, 0, False, False, torch.empty(1, 2, 4, 4))
    with pytest.raises(RuntimeError, match="unknown activation code 9"):
        ops.ext_conv2d(x, w, None, *geo, None, None, None, 9, False, False, out)
    with pytest.raises(RuntimeError, match="padding\\[4\\]"):
        ops.ext_conv2d(x, w, None, [1, 1], [0, 0], [1, 1], 1, None, None, None, 0, False, False, out)
    with pytest.raises(RuntimeError, match="divisible by groups"):
        ops.ext_conv2d_weight_grad(torch.randn(1, 3, 3, 3), x, [3, 2, 3, 3], *geo[:3], 2, False, False)


def test_fastconv_imports_and_explains_without_extension(tmp_path):
    """With fastconv._C unimportable, fastconv still imports and says why the cpu/cuda backends are missing."""
    code = ("import sys, fastconv\n"
            "from fastconv import _backend\n"
            "print(_backend.availability('cpu')['cpu'])\n"
            "print(_backend.availability('cuda')['cuda'])\n")
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text("import sys\nsys.modules['fastconv._C'] = None\n")  # import of fastconv._C raises
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", ""),
                                                       os.getcwd()]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    cpu_line, cuda_line = proc.stdout.strip().splitlines()
    assert cpu_line.startswith("(False,") and "fastconv._C" in cpu_line, cpu_line
    assert cuda_line.startswith("(False,"), cuda_line


EXT_OPS = ("ext_conv2d", "ext_conv2d_input_grad", "ext_conv2d_weight_grad", "ext_batch_norm_stats",
           "ext_batch_norm_finalize", "ext_batch_norm_act", "ext_batch_norm_act_backward", "ext_max_pool2d",
           "ext_max_pool2d_input_grad")


@needs_ext
def test_direct_entry_points_match_the_registered_ops():
    """fastconv._C.ext_* (csrc/bindings.cpp, what the ops' implementations call) give exactly what
    torch.ops.fastconv.ext_* give on the same arguments, and report the same errors."""
    from fastconv import _C
    from fastconv.ops import conv_bn_act as bn_ops, max_pool2d as pool_ops

    for m in (conv_ops, bn_ops, pool_ops):
        assert m.ext_ops() is _C
    assert all(callable(getattr(_C, name)) for name in EXT_OPS)
    g = generator("direct entry points")
    x, w, b = (randn(s, torch.float32, "cpu", g) for s in ((2, 6, 9, 7), (4, 3, 3, 3), (4,)))
    geo = ([2, 1], [1, 0, 1, 1], [1, 2], 2)
    outs = []
    for ops in (_C, torch.ops.fastconv):
        y = torch.full((2, 4, 4, 5), float("nan"))
        cnt, mean, m2 = ops.ext_conv2d(x, w, b, *geo, None, None, None, 1, True, False, y)
        fin = ops.ext_batch_norm_finalize(cnt, mean, m2, b)
        act = ops.ext_batch_norm_act(y, *fin, b, b, None, 1e-5, "silu")
        bwd = ops.ext_batch_norm_act_backward(torch.ones_like(y), y, *fin, b, b, None, 1e-5, "silu", False)
        dx = torch.full_like(x, float("nan"))
        ops.ext_conv2d_input_grad(bwd[0], w, *geo, False, dx)
        dw = ops.ext_conv2d_weight_grad(bwd[0], x, list(w.shape), *geo, True, False)
        pool = ops.ext_max_pool2d(x, [3, 2], [2, 2], [1, 0], [1, 1], True)
        pdx = ops.ext_max_pool2d_input_grad(pool[0], pool[1], list(x.shape), [3, 2], [2, 2], [1, 0], [1, 1], True,
                                            False)
        outs.append([y, cnt, mean, m2, *fin, act, *bwd, dx, *dw, *pool, pdx])
    for a, ref in zip(*outs):
        assert a.dtype == ref.dtype and a.shape == ref.shape and a.stride() == ref.stride()
        assert torch.equal(a, ref)
    with pytest.raises(RuntimeError, match="ext_conv2d") as direct:
        _C.ext_conv2d(x, w[:, :2], b, *geo, None, None, None, 1, False, False, torch.empty(2, 4, 4, 5))
    with pytest.raises(RuntimeError, match="ext_conv2d") as registered:
        torch.ops.fastconv.ext_conv2d(x, w[:, :2], b, *geo, None, None, None, 1, False, False, torch.empty(2, 4, 4, 5))
    assert str(direct.value).splitlines()[0] == str(registered.value).splitlines()[0]
    assert not _C._dry_run()
