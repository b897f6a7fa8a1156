"""Lazy loader of the C++/CUDA extension fastconv._C (built by setup.py from csrc/).

Importing fastconv never needs it: `load()` tries once, on first use, and remembers why it failed, so
`fastconv._backend` can say which backends are unavailable and why.
"""
from __future__ import annotations

import functools
import importlib
import json

_state: dict = {}


def load() -> bool:
    """Import fastconv._C (registering torch.ops.fastconv.ext_*); True if it is loaded."""
    if "ok" not in _state:
        try:
            importlib.import_module("fastconv._C")
            _state["ok"], _state["why"] = True, ""
        except ImportError as exc:
            missing = getattr(exc, "name", None) == "fastconv._C"
            why = ("the C++ extension fastconv._C is not built in this install (build it with "
                   "`pip install --no-build-isolation -e .` or scripts/setup.sh; FASTCONV_BUILD_EXT=0 skips it)"
                   if missing else f"fastconv._C failed to load: {exc}")
            _state["ok"], _state["why"] = False, why
        except OSError as exc:  # a broken .so (ABI/torch version mismatch)
            _state["ok"], _state["why"] = False, f"fastconv._C failed to load: {exc}"
    return _state["ok"]


_fakes_registered: set = set()


def ops(op: str, register_fakes):
    """The ext ops' entry points with fastconv._C loaded and `register_fakes()` (the fake kernels of `op`'s
    ext_ ops) run once: the module fastconv._C, whose functions ext_* call torch.ops.fastconv.ext_* through
    the C++ dispatcher without torch.ops' Python argument parsing (csrc/bindings.cpp), or torch.ops.fastconv
    for an extension built before those existed. Same arguments, same results. Fakes register lazily because
    register_fake needs the op to exist and fastconv imports without the extension. Raises
    BackendNotSupported naming `op` when the extension is missing."""
    found = _entry.get(op)
    if found is not None:  # the per-call path: loaded and registered already
        return found
    import torch

    from ._backend import BackendNotSupported

    if not load():
        raise BackendNotSupported(f"fastconv.{op}: the C++ kernels are unavailable because {reason()}")
    if op not in _fakes_registered:
        register_fakes()
        _fakes_registered.add(op)
    module = importlib.import_module("fastconv._C")
    _entry[op] = module if hasattr(module, "ext_conv2d") else torch.ops.fastconv
    return _entry[op]


_entry: dict = {}  # op -> the object ops() returns for it


def reason() -> str:
    """Why the extension is not loaded ('' if it is)."""
    load()
    return _state["why"]


@functools.lru_cache(maxsize=None)
def build_info() -> dict:
    """What the extension was built with: {'cuda': bool, 'cuda_version', 'nvcc', 'archs', 'cxx'}; {} if absent."""
    if not load():
        return {}
    import torch

    info = json.loads(torch.ops.fastconv.ext_build_info())
    if isinstance(info.get("archs"), str):  # setup.py passes the list as "sm_80+sm_90"
        info["archs"] = [a for a in info["archs"].split("+") if a]
    return info


def cuda_kernels_status() -> tuple[bool, str]:
    """(built, reason) for the CUDA kernels inside the extension."""
    if not load():
        return False, reason()
    if not build_info().get("cuda"):
        return False, ("fastconv._C was built without CUDA kernels (no nvcc / CPU-only torch at build time, or "
                       "FASTCONV_BUILD_CUDA=0); rebuild with a CUDA toolkit")
    return True, ""
