"""The one place that picks which kernels run: `fastconv.backend(name)` and FASTCONV_BACKEND.

Backends:
    auto    Triton for CUDA tensors; for CPU tensors, per op the faster of 'cpu' and 'torch' (AUTO_CPU).
    triton  fastconv's Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).
    torch   PyTorch's own kernels (cuDNN / ATen), the reference.
    cuda    fastconv's CUDA C++ extension (fastconv._C, CUDA tensors).
    cpu     fastconv's C++ CPU kernels (fastconv._C, CPU tensors).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os

import torch

NAMES = ("auto", "triton", "torch", "cuda", "cpu")
ENV_VAR = "FASTCONV_BACKEND"

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastconv_backend", default=None)
# Launch planning (fastconv.triton.launch.recording): kernels are recorded, not run, so the Triton backend
# accepts tensors of any device (the plan runs on meta tensors).
_planning: contextvars.ContextVar[bool] = contextvars.ContextVar("fastconv_planning", default=False)


# 'auto' on CPU tensors: per op, the faster of the C++ twin ('cpu') and PyTorch's own kernels ('torch'), decided by
# `pytest bench --benchmark` (set 'cpu': every CIFAR layer of the documented models at batch 8, fp32, 1 thread,
# torch 2.15.0+cu132, AMD EPYC shared 2-core VM, commit 1210917; bench/results/cpu-amd-epyc/cpu.md). Median
# over layers of eager time / fastconv-cpu time, NCHW | channels_last:
#   conv2d        fwd 0.34x | 0.30x, fwd+bwd 0.46x | 0.43x
#   conv_bn_act   train fwd+bwd 0.40x | 0.38x, eval 0.41x | 0.36x
#   max_pool2d    fwd 0.87x | 0.26x, fwd+bwd 0.45x | 0.25x
# PyTorch wins every op, so every entry is 'torch' today; an op missing here also uses 'torch'.
AUTO_CPU: dict[str, str] = {"conv2d": "torch", "max_pool2d": "torch", "conv_bn_act": "torch"}


class BackendNotSupported(RuntimeError):
    """Raised when the chosen backend cannot run an op on the given tensors; the message says why."""


# os.environ's own bytes mapping on POSIX (kept in step by os.environ[...] = and monkeypatch.setenv): read per
# launch, where os.environ.get's encode / decode round trip costs ~1.5 us each time.
_ENVIRON = getattr(os.environ, "_data", None) if os.name == "posix" else None
_ENV_KEYS: dict[str, bytes] = {}


def _env_bytes(name: str) -> bytes | None:
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = os.fsencode(name)
    return _ENVIRON.get(key)


def getenv(name: str, default: str | None = None) -> str | None:
    """os.environ.get(name, default), cheaply."""
    if not isinstance(_ENVIRON, dict):
        return os.environ.get(name, default)
    value = _env_bytes(name)
    return default if value is None else os.fsdecode(value)


@contextlib.contextmanager
def environment(**values: str | None):
    """Environment variables set (a value) or unset (None) inside; each restored to what it was afterwards."""
    def put(settings):
        for name, value in settings.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    saved = {name: os.environ.get(name) for name in values}
    try:
        put(values)
        yield
    finally:
        put(saved)


def env_flag(name: str, default: bool) -> bool:
    """A boolean environment switch: unset -> default; '' or '0' -> False; anything else -> True."""
    if not isinstance(_ENVIRON, dict):
        value = os.environ.get(name)
        return default if value is None else value not in ("", "0")
    value = _env_bytes(name)
    return default if value is None else value not in (b"", b"0")


def _check_name(name: str) -> str:
    if name not in NAMES:
        raise ValueError(f"unknown fastconv backend {name!r}; choose one of {', '.join(NAMES)}")
    return name


def current() -> str:
    """The backend in force: the innermost `backend(...)` context, else $FASTCONV_BACKEND, else 'auto'."""
    name = _current.get()
    if name is not None:
        return name  # checked by backend() when it was set
    return _check_name(getenv(ENV_VAR, "auto") or "auto")


@contextlib.contextmanager
def backend(name: str):
    """Run the enclosed fastconv ops on backend `name` (see module doc). Nestable; thread- and task-local.
    The choice is fixed when an op runs forward, and its backward uses the same backend."""
    token = _current.set(_check_name(name))
    try:
        yield
    finally:
        _current.reset(token)


def planning() -> bool:
    return _planning.get()


@contextlib.contextmanager
def planning_mode():
    token = _planning.set(True)
    try:
        yield
    finally:
        _planning.reset(token)


def triton_status() -> tuple[bool, str]:
    """(importable, reason) for the Triton package itself."""
    if importlib.util.find_spec("triton") is None:
        return False, "the triton package is not installed (pip install triton; Linux only)"
    return True, ""


_cudnn_allow_tf32 = torch._C._get_cudnn_allow_tf32
_fp32_precision = getattr(torch._C, "_get_fp32_precision_getter", None)  # torch >= 2.9's per-op TF32 API


def conv_tf32_allowed() -> bool:
    """Whether fp32 convs may use TF32 tensor cores: exactly when nn.Conv2d's cuDNN conv may (ATen's
    allowTF32CuDNN("conv")). torch.backends.cudnn.allow_tf32 raises once the per-op API has set
    torch.backends.cudnn.conv.fp32_precision apart from the RNN's, where nn.Conv2d still answers; this reads that
    API then: the conv's setting, else cuDNN's, else the global one ("none" inherits). Read on every fp32 launch:
    the C getter costs ~0.1 us, the property ~0.4 us."""
    try:
        return _cudnn_allow_tf32()
    except RuntimeError:
        if _fp32_precision is None:
            raise
        for backend, op in (("cuda", "conv"), ("cuda", "all"), ("generic", "all")):
            precision = _fp32_precision(backend, op)
            if precision != "none":
                return precision == "tf32"
        return False


@functools.cache
def interpreting() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1, read once (Triton itself
    reads it when a kernel is first compiled, so a later change would not take effect anyway)."""
    return env_flag("TRITON_INTERPRET", False)


def extension_status(device_type: str = "cpu") -> tuple[bool, str]:
    """(usable, reason) for the C++/CUDA extension fastconv._C: for 'cuda' also whether it holds CUDA kernels."""
    from . import _ext

    if device_type == "cuda":
        return _ext.cuda_kernels_status()
    return (True, "") if _ext.load() else (False, _ext.reason())


def availability(device_type: str) -> dict[str, tuple[bool, str]]:
    """For each concrete backend: whether it can run on `device_type` tensors, and if not, why. Computed once
    per (device type, interpreter, planning) in a process: nothing it looks at changes in between, and it is
    on every op's path."""
    key = (device_type, interpreting(), planning())
    found = _AVAILABILITY.get(key)
    if found is None:
        found = _AVAILABILITY[key] = _availability(device_type)
    return found


_AVAILABILITY: dict[tuple, dict[str, tuple[bool, str]]] = {}


def _availability(device_type: str) -> dict[str, tuple[bool, str]]:
    out: dict[str, tuple[bool, str]] = {"torch": (True, "")}
    ok, why = triton_status()
    if ok and planning():
        pass
    elif ok and device_type == "cuda" and not torch.cuda.is_available():
        ok, why = False, "no CUDA device is visible to torch"
    elif ok and device_type == "cpu" and not interpreting():
        ok, why = False, ("Triton kernels run on CUDA devices; on CPU only through the Triton interpreter "
                          "(set TRITON_INTERPRET=1 before importing triton)")
    elif ok and device_type not in ("cuda", "cpu"):
        ok, why = False, f"Triton kernels do not run on {device_type} tensors"
    out["triton"] = (ok, why)
    if device_type == "cuda":
        ext_ok, ext_why = extension_status("cuda")
        if ext_ok and not torch.cuda.is_available():
            ext_ok, ext_why = False, "no CUDA device is visible to torch"
        out["cuda"] = (ext_ok, ext_why)
        out["cpu"] = (False, "the cpu backend runs CPU tensors; these are cuda tensors")
    else:
        out["cpu"] = extension_status("cpu") if device_type == "cpu" else (False, f"no kernels for {device_type}")
        out["cuda"] = (False, f"the cuda backend runs CUDA tensors; these are {device_type} tensors")
    return out


# The tensor dtypes fastconv's own kernels take (Triton, CUDA and CPU C++ alike).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


_RESOLVED: dict[tuple, str] = {}


def resolve(op: str, device: torch.device, supported: tuple[str, ...], name: str | None = None,
            dtype: torch.dtype | None = None) -> str:
    """The concrete backend that runs `op` (see _resolve); answers are remembered per (arguments, interpreter,
    planning), since availability cannot change in between: this is on every op's path."""
    # keyed on the device itself (hashed in C; device.type costs ~0.6 µs): one entry per device, same answers
    key = (op, device, supported, name or current(), dtype, _planning.get())
    found = _RESOLVED.get(key)
    if found is None:  # (interpreting() is fixed for the process: read once)
        found = _RESOLVED[key] = _resolve(op, device, supported, key[3], dtype)
    return found


def _resolve(op: str, device: torch.device, supported: tuple[str, ...], name: str | None = None,
             dtype: torch.dtype | None = None) -> str:
    """The concrete backend that runs `op` on tensors of `device` (and `dtype`, when given).

    `supported` lists the backends that implement `op`. 'auto' picks Triton for CUDA tensors, AUTO_CPU's
    choice for CPU tensors, and PyTorch for everything else, including dtypes outside KERNEL_DTYPES (integer
    tensors: drop-in means nn's answer). An explicit choice that cannot run raises BackendNotSupported with
    the reason.
    """
    name = _check_name(name or current())
    dev = device.type
    if name == "auto":
        if dtype is not None and dtype not in KERNEL_DTYPES:
            return "torch"
        if dev == "cuda" and "triton" in supported and availability(dev)["triton"][0]:
            return "triton"
        if dev == "cpu" and AUTO_CPU.get(op) == "cpu" and "cpu" in supported and availability(dev)["cpu"][0]:
            return "cpu"
        return "torch"
    if name not in supported:
        raise BackendNotSupported(
            f"fastconv.{op}: backend {name!r} is not supported because it has no {op} kernels "
            f"(backends with {op}: {', '.join(supported)})"
        )
    ok, why = availability(dev)[name]
    if not ok:
        raise BackendNotSupported(f"fastconv.{op}: backend {name!r} is not supported for {dev} tensors because {why}")
    if name != "torch" and dtype is not None and dtype not in KERNEL_DTYPES:
        kind = "Triton" if name == "triton" else "C++"
        raise BackendNotSupported(
            f"fastconv.{op}: backend {name!r} is not supported for {dtype} tensors because the {kind} kernels "
            f"take floating-point tensors (float16, bfloat16, float32, float64)")
    return name


@torch.compiler.assume_constant_result
def choose(op: str, device: torch.device, supported: tuple[str, ...], dtype: torch.dtype | None = None
           ) -> tuple[str, str]:
    """(requested, resolved) backend of a call of `op` now: `current()` and `resolve` of it. Under
    torch.compile this runs once at trace time and its answer is a constant of the compiled graph (the backend
    in force when a model is compiled is the one its graph keeps)."""
    requested = current()
    return requested, resolve(op, device, supported, requested, dtype)

