"""Tile configurations, as data, per kernel family and GPU architecture.

Each entry is (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). On a GPU the launcher autotunes over the
list for its compute capability (keyed on the problem shape and dtype); under the Triton interpreter
(TRITON_INTERPRET=1) it uses the single small INTERPRET config and never autotunes. All blocks are powers of
two and every tl.dot dimension is >= 16, as the GPU compiler requires.
"""
from __future__ import annotations

import torch
import triton

from ._common import interpreting

_GEMM_SM80 = [
    (128, 128, 32, 4, 4),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (64, 64, 32, 4, 4),
    (128, 32, 32, 4, 4),
    (64, 32, 32, 2, 5),
    (32, 64, 32, 2, 5),
    (128, 128, 64, 8, 3),
    (256, 64, 32, 8, 3),
    (64, 256, 32, 8, 3),
]
_GEMM_SM90 = [
    (128, 128, 64, 8, 3),
    (128, 128, 32, 4, 4),
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (128, 32, 64, 4, 4),
    (64, 32, 32, 2, 5),
]
# Narrow reductions (few input channels per group, e.g. the RGB stem or depthwise convs) waste most of a
# wide K block, so those problems also try K=16.
_SMALL_K = [(64, 64, 16, 4, 3), (128, 32, 16, 4, 3), (32, 32, 16, 2, 3)]

CONFIGS: dict[str, dict[str, list[tuple[int, int, int, int, int]]]] = {
    "conv2d_fwd": {"sm_80": _GEMM_SM80 + _SMALL_K, "sm_90": _GEMM_SM90 + _SMALL_K},
    "conv2d_dgrad": {"sm_80": _GEMM_SM80 + _SMALL_K, "sm_90": _GEMM_SM90 + _SMALL_K},
    "conv2d_wgrad": {"sm_80": _GEMM_SM80 + _SMALL_K, "sm_90": _GEMM_SM90 + _SMALL_K},
    "im2col_gemm": {"sm_80": _GEMM_SM80, "sm_90": _GEMM_SM90},
}

# One config per family under the interpreter: small enough that test shapes cross tile boundaries, large
# enough to keep the interpreter's per-program overhead down. wgrad's K is the pixel reduction.
INTERPRET = {"conv2d_fwd": (32, 32, 32, 4, 1), "conv2d_dgrad": (32, 32, 32, 4, 1),
             "conv2d_wgrad": (32, 32, 64, 4, 1), "im2col_gemm": (32, 32, 32, 4, 1)}
# im2col gather kernel: (BLOCK_M rows, BLOCK_K columns, num_warps)
IM2COL_BLOCKS = (64, 64, 4)


def arch_key(device: torch.device | None = None) -> str:
    """'sm_80' for Ampere-class parts, 'sm_90' for Hopper and newer; the closest table we keep."""
    if device is None or not torch.cuda.is_available():
        return "sm_80"
    major, _ = torch.cuda.get_device_capability(device)
    return "sm_90" if major >= 9 else "sm_80"


def to_triton(cfg: tuple[int, int, int, int, int]) -> triton.Config:
    bm, bn, bk, warps, stages = cfg
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


def configs_for(family: str, arch: str) -> list[triton.Config]:
    return [to_triton(c) for c in CONFIGS[family][arch]]


def interpret_meta(family: str) -> dict:
    bm, bn, bk, warps, stages = INTERPRET[family]
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages}


class TunedKernel:
    """Calls a @triton.jit kernel with a fixed config under the interpreter and through one
    triton.autotune wrapper per architecture on a GPU. `grid` is a function of the meta-parameters."""

    def __init__(self, kernel, family: str, key: list[str]):
        self.kernel = kernel
        self.family = family
        self.key = key
        self._tuned: dict[str, object] = {}

    def __call__(self, grid, *args, device: torch.device, **kwargs):
        if interpreting():
            meta = interpret_meta(self.family)
            self.kernel[grid(meta)](*args, **kwargs, **meta)
            return
        arch = arch_key(device)
        tuned = self._tuned.get(arch)
        if tuned is None:
            tuned = triton.autotune(configs=configs_for(self.family, arch), key=self.key)(self.kernel)
            self._tuned[arch] = tuned
        tuned[grid](*args, **kwargs)
