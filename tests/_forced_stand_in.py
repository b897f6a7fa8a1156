"""Test-only stand-in for `fastconv.triton.launch.forced(tile)` (scripts/tile_sweep.py's forcing API) under the
Triton interpreter: inside forced(tile), the interpreter's launches (configs.interpret_meta) run that tile.
`used` records the (family, tile) of every launch it forced. Never imported by the package."""
from __future__ import annotations

import contextlib
import sys
import types

used: list = []
_state: dict = {"tile": None}


def interpret_meta_for(real):
    def interpret_meta(family):
        if _state["tile"] is None:
            return real(family)
        bm, bn, bk, warps, stages = _state["tile"]
        used.append((family, _state["tile"]))
        return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages}

    interpret_meta.stand_in = True
    return interpret_meta


@contextlib.contextmanager
def forced(tile):
    _state["tile"] = tuple(tile)
    try:
        yield
    finally:
        _state["tile"] = None


def module() -> types.ModuleType:
    mod = types.ModuleType("fastconv.triton.launch")
    mod.forced = forced
    return mod


def install() -> None:
    """For a subprocess (sitecustomize): the stand-in module and the patched interpret_meta, for good."""
    from fastconv.triton import configs

    if not getattr(configs.interpret_meta, "stand_in", False):
        configs.interpret_meta = interpret_meta_for(configs.interpret_meta)
    sys.modules["fastconv.triton.launch"] = module()
