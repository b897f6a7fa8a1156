"""Benchmark inputs: dtype names, the TF32 switch, memory layouts, and rotating input sets.

Rotation: on a GPU each row's inputs come in enough independent copies that one pass over all of them
exceeds twice the L2 cache, and successive calls take the next copy, so no call finds its inputs in L2
(do_bench additionally flushes L2 before each call). On CPU one set is used: rows are timed as a user's
loop would run them, caches warm.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch.utils._pytree import tree_leaves

DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
MAX_SETS = 16


@contextlib.contextmanager
def tf32(enabled: bool):
    """cuDNN's and cuBLAS's TF32 flags for fp32 (fastconv's Triton kernels read cudnn.allow_tf32 too)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20))


def copies_needed(set_bytes: int, device: torch.device) -> int:
    l2 = l2_bytes(device)
    return 1 if l2 == 0 or set_bytes <= 0 else min(MAX_SETS, max(1, math.ceil(2 * l2 / set_bytes)))


class Rotation:
    """`count` input sets made by make_set(); next() cycles through them."""

    def __init__(self, make_set, device: torch.device):
        first = make_set()
        size = sum(t.numel() * t.element_size() for t in tree_leaves(first) if isinstance(t, torch.Tensor))
        self.sets = [first] + [make_set() for _ in range(copies_needed(size, device) - 1)]
        self.i = 0

    def next(self):
        s = self.sets[self.i]
        self.i = (self.i + 1) % len(self.sets)
        return s


def randn(shape, dtype, layout, device, requires_grad=False):
    t = torch.randn(shape, device=device, dtype=dtype)
    if len(shape) == 4:
        t = t.contiguous(memory_format=LAYOUTS[layout])
    return t.requires_grad_(requires_grad)
