"""`python -m fastconv.info`: versions, devices, and which backends / algorithms / dtypes are available,
with the reason for each thing that is not."""
from __future__ import annotations

import platform
import sys

import torch

from . import _backend

OPS = {"conv2d": ("triton", "torch", "cuda", "cpu")}
DTYPES = ("float32", "float16", "bfloat16", "float64")


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception as exc:  # noqa: BLE001 - report, don't fail
        return f"not available ({type(exc).__name__}: {exc})"


def _dtype_note(backend: str, device_type: str, dtype: str) -> str:
    if backend == "triton" and dtype == "float64":
        return "interpreter only (gradcheck); GPUs run fp64 dots slowly and fastconv doesn't tune for them"
    if backend == "triton" and dtype == "float32":
        tf32 = _backend.conv_tf32_allowed()
        return f"TF32 tensor cores {'on' if tf32 else 'off'} (cuDNN's conv TF32 setting, as nn.Conv2d)"
    if backend == "triton" and dtype == "bfloat16" and device_type == "cpu":
        return "interpreter: dots upcast to fp32 (its bf16 dot is broken); stores truncate"
    return ""


def lines() -> list[str]:
    out = [
        f"fastconv {__import__('fastconv').__version__}",
        f"python {platform.python_version()} on {platform.platform()}",
        f"torch {torch.__version__} (CUDA build {torch.version.cuda})",
        f"triton {_version('triton')}",
        f"torchvision {_version('torchvision')}",
        f"TRITON_INTERPRET={'1' if _backend.interpreting() else '0'}",
        f"selected backend: {_backend.current()} (fastconv.backend(...) or ${_backend.ENV_VAR})",
        "",
        "devices:",
    ]
    devices = ["cpu"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append(f"  cuda:{i} {p.name} sm_{p.major}{p.minor} {p.total_memory / 2**30:.0f} GiB")
        devices.append("cuda")
    else:
        out.append("  cuda: none visible to torch")
    out.append("  cpu")
    from . import _ext

    ext_ok, ext_why = _backend.extension_status("cpu")
    built = _ext.build_info()
    detail = (f"loaded; CUDA kernels {'built for ' + ','.join(built['archs']) + ' (CUDA ' + str(built['cuda_version']) + ')' if built.get('cuda') else 'not built'}; "
              f"{built.get('cxx')}" if ext_ok else "missing: " + ext_why)
    out += ["", f"C++/CUDA extension fastconv._C: {detail}"]
    if not _backend.env_flag("FASTCONV_DIRECT_LAUNCH", True):
        fast = "off (FASTCONV_DIRECT_LAUNCH=0: every launch through Triton's own path)"
    elif not (ext_ok and _ext.load() and hasattr(sys.modules["fastconv._C"], "_triton_replay")):
        fast = "off (needs the extension: every launch through Triton's own path)"
    else:
        fast = "on (FASTCONV_DIRECT_LAUNCH=0 turns them off)"
    out += [f"Triton host path: direct launches, C++ replays of layer calls and training nodes {fast}", ""]
    for device_type in ("cuda", "cpu"):
        out.append(f"backends for {device_type} tensors:")
        avail = _backend.availability(device_type)
        for name in ("triton", "torch", "cuda", "cpu"):
            ok, why = avail[name]
            out.append(f"  {name:7s} {'available' if ok else 'unavailable: ' + why}")
        if device_type == "cuda":
            picked = "triton" if avail["triton"][0] else "torch"
        else:
            picked = ", ".join(f"{op}: {_backend.resolve(op, torch.device('cpu'), backends, 'auto')}"
                               for op, backends in OPS.items())
        out.append(f"  auto -> {picked}")
    out += ["", "ops:"]
    for op, backends in OPS.items():
        out.append(f"  {op}: backends {', '.join(backends)}; triton algorithms implicit (default), im2col; "
                   "cpu/cuda: im2col GEMM")
    out += ["", "dtypes (triton backend):"]
    for dt in DTYPES:
        note = _dtype_note("triton", "cuda" if torch.cuda.is_available() else "cpu", dt)
        out.append(f"  {dt:9s} {note}")
    return out


def main() -> None:
    print("\n".join(lines()))


if __name__ == "__main__":
    main()
