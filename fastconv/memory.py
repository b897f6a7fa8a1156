"""Measure what autograd keeps for backward: `saved_bytes(model, *inputs)`."""
from __future__ import annotations

import torch
from torch import nn


def saved_bytes(model: nn.Module, *inputs: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward during one forward of `model`,
    parameters and buffers excluded (they exist regardless). Inputs count when saved (PyTorch's first
    conv saves its input, so does ours)."""
    static = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in static and s.nbytes() > 0:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*inputs)
    del out
    return sum(storages.values())
