"""fastconv.triton's launcher modules as attributes, imported on first use: `_triton.conv2d` is
fastconv.triton.conv2d. Importing Triton takes seconds and fastconv imports without it (backends torch / cpu /
cuda), so the ops cannot import the launchers at module level; a function-level `from ..triton import conv2d`
would instead run the import system on every op call (a few thousand instructions each, several per training
step of the Triton path's host time), where this is one attribute lookup after the first."""
from __future__ import annotations

import importlib


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    module = importlib.import_module(f"fastconv.triton.{name}")
    globals()[name] = module  # from now on a plain module attribute
    return module
