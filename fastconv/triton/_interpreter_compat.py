"""Triton 3.6's interpreter (TRITON_INTERPRET=1) under NumPy >= 2.4: a loop bounded by a runtime value fails.

The 3.6 interpreter holds every scalar as a one-element 1-D NumPy array and converts it for Python's `range`
with `int(array)`, which NumPy 2.4 made an error ("only 0-dimensional arrays can be converted to Python
scalars"; NumPy 1.25-2.3 only warned). So every `for t in range(n)` with a runtime `n` -- the conv kernels'
main loops, wgrad's pixel loop, the BatchNorm and max-pool loops -- fails there; hoisting the trip count into
a variable changes nothing, since that variable is such an array too. Triton 3.7 and newer squeeze the array
first. `install()` gives 3.6 (and older) the same conversion, scoped exactly like the interpreter's own
patches (undone after each launch), and does nothing for compiled kernels, for newer Triton, or when the
interpreter is off. Kernels are untouched.
"""
from __future__ import annotations

import os


def _needed(version: str) -> bool:
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) < (3, 7)


def install() -> bool:
    """Patch the interpreter's scalar-to-index conversion when it needs it; True when patched."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return False
    try:
        import triton
        from triton.runtime import interpreter
    except Exception:  # noqa: BLE001 - no (usable) triton: nothing to patch
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_fastconv_index", False) or not _needed(triton.__version__):
        return False

    def _index(self):
        return int(self.handle.data.squeeze())  # what triton 3.7+ does

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", _index)

    _patch_lang_tensor._fastconv_index = True
    interpreter._patch_lang_tensor = _patch_lang_tensor
    return True
