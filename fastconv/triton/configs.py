"""Tile configurations, as data, per kernel family and GPU architecture.

Each entry is (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). launch.TunedKernel picks one per launch from
the list for its compute capability, operand kind and fused-or-plain variant (autotuned on a GPU, heuristic
with FASTCONV_AUTOTUNE=0 and in the launch plan, the small INTERPRET tile under the Triton interpreter). All blocks are powers of
two and every tl.dot dimension is >= 16, as the GPU compiler requires.
"""
from __future__ import annotations

import os

import torch


# Tensor-core tiles for 16-bit operands (fp16, bf16). Every tile keeps its fp32 accumulator at <= 64
# registers per thread on sm_80 (BLOCK_M * BLOCK_N / (32 * num_warps)): 128x128 takes 8 warps, since with 4
# the accumulator (128 registers) plus double-buffered MMA operands leaves too little for the addresses
# and the fused epilogue and ptxas spills. Hopper's wgmma keeps operands in shared memory, so it affords
# larger tiles per warp.
_HALF_SM80 = [
    (128, 128, 32, 8, 4),
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
_HALF_SM90 = [
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
# TF32 tensor cores (fp32 with allow_tf32): operands are twice as wide, so K blocks are half as deep.
_TF32_SM80 = [
    (128, 128, 32, 8, 4),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (64, 64, 32, 4, 4),
    (128, 32, 32, 4, 4),
    (64, 32, 32, 2, 5),
    (256, 64, 32, 8, 3),
    (64, 256, 32, 8, 3),
]
_TF32_SM90 = [
    (128, 128, 32, 8, 3),
    (128, 256, 32, 8, 3),
    (256, 128, 32, 8, 3),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (64, 64, 32, 4, 4),
    (128, 32, 32, 4, 4),
    (64, 32, 32, 2, 5),
]
# im2col's GEMM at 256x128 on 8 warps sits at ptxas's 255-register ceiling and spills 40-48 B under Triton 3.8;
# on 16 warps (4 warpgroups, 128 registers each) it is spill-free. The implicit-GEMM kernels keep 8 warps:
# on 16 their dgrad spills ~300 B.
_TF32_SM90_IM2COL = [(256, 128, 32, 16, 3) if t == (256, 128, 32, 8, 3) else t for t in _TF32_SM90]
# Exact fp32 (allow_tf32 off) runs on FMA units: each thread holds its rows of the A tile and columns of
# the B tile for the whole K block in registers, so K blocks stay shallow (16; tl.dot takes no K below 16).
_FP32 = [
    (128, 64, 16, 8, 3),
    (64, 128, 16, 4, 3),
    (64, 64, 16, 4, 3),
    (128, 32, 16, 4, 3),
    (32, 64, 16, 2, 3),
    (32, 32, 16, 2, 3),
]
# Narrow reductions (few input channels per group, e.g. the RGB stem or depthwise convs) waste most of a
# wide K block, so those problems also try K=16.
_SMALL_K = [(64, 64, 16, 4, 3), (128, 32, 16, 4, 3), (32, 32, 16, 2, 3)]

# family -> operand kind ("half": fp16/bf16, "tf32", "fp32": exact fp32 and fp64) -> arch -> tiles
KINDS = ("half", "tf32", "fp32")


def _family(small_k: bool, tf32_sm90=_TF32_SM90) -> dict[str, dict[str, list[tuple[int, int, int, int, int]]]]:
    extra = _SMALL_K if small_k else []
    return {
        "half": {"sm_80": _HALF_SM80 + extra, "sm_90": _HALF_SM90 + extra},
        "tf32": {"sm_80": _TF32_SM80 + extra, "sm_90": tf32_sm90 + extra},
        "fp32": {"sm_80": _FP32, "sm_90": _FP32},
    }


CONFIGS = {
    "conv2d_fwd": _family(small_k=True),
    "conv2d_dgrad": _family(small_k=True),
    "conv2d_wgrad": _family(small_k=True),
    "im2col_gemm": _family(small_k=False, tf32_sm90=_TF32_SM90_IM2COL),
}

# ptxas register limits pinned per (family, operand kind, arch, tile). Left to pick its own limit, ptxas aims
# at an occupancy and, under Triton's --regAllocOptLevel=2, spills 8-36 B on these tiles; handed an explicit
# .maxnreg at (or a step of 8 or 16 above) the count it picked, it allocates without spilling. Each pin is the
# lowest multiple of 8 at which every kernel variant (epilogues, stride-2 dgrad, NCHW, IDX64) compiles
# spill-free under Triton 3.8 and 3.9 (their ptxas choices differ by up to 32 registers):
# `python -m fastconv.kernel_report` compiles all of them on pinned tiles. Pins above ptxas's own
# choice cost occupancy only where shared memory does not already bound it.
MAXNREG = {
    ("conv2d_fwd", "fp32", "sm_80", (32, 64, 16, 2, 3)): 136,
    ("conv2d_fwd", "fp32", "sm_80", (128, 64, 16, 8, 3)): 128,
    ("conv2d_dgrad", "fp32", "sm_80", (128, 32, 16, 4, 3)): 144,
    ("conv2d_dgrad", "tf32", "sm_80", (128, 32, 32, 4, 4)): 152,
    ("conv2d_dgrad", "fp32", "sm_90", (32, 64, 16, 2, 3)): 128,
    ("conv2d_dgrad", "half", "sm_90", (64, 32, 32, 2, 5)): 112,
    ("conv2d_wgrad", "tf32", "sm_80", (64, 64, 32, 4, 4)): 120,
    ("conv2d_wgrad", "tf32", "sm_80", (128, 32, 32, 4, 4)): 128,
    ("conv2d_wgrad", "tf32", "sm_80", (64, 32, 32, 2, 5)): 255,  # 144 until wgrad's in-kernel split reduction
    ("conv2d_wgrad", "fp32", "sm_90", (64, 64, 16, 4, 3)): 96,
    ("conv2d_wgrad", "fp32", "sm_90", (128, 32, 16, 4, 3)): 104,
    # 255: no occupancy target at all. On these tiles one variant (statistics, IDX64, stride 2) takes far more
    # registers than the plain kernel (e.g. 162 vs 128), so ptxas's occupancy choice spilled 8-40 B there.
    ("conv2d_fwd", "tf32", "sm_90", (64, 32, 32, 2, 5)): 255,
    ("conv2d_dgrad", "tf32", "sm_80", (128, 64, 32, 4, 4)): 255,
    ("conv2d_dgrad", "tf32", "sm_90", (64, 32, 32, 2, 5)): 255,
    ("conv2d_wgrad", "half", "sm_80", (32, 64, 32, 2, 5)): 255,
    # the split-K wgrad's in-kernel split reduction (REDUCE_LAST) made ptxas's occupancy choice spill 8-32 B here
    ("conv2d_wgrad", "half", "sm_80", (64, 64, 16, 4, 3)): 255,
    ("conv2d_wgrad", "fp32", "sm_80", (64, 64, 16, 4, 3)): 255,
    ("conv2d_wgrad", "tf32", "sm_80", (128, 64, 32, 4, 4)): 255,
    ("conv2d_wgrad", "fp32", "sm_90", (32, 64, 16, 2, 3)): 255,
    ("im2col_gemm", "half", "sm_80", (32, 64, 32, 2, 5)): 255,
    ("im2col_gemm", "tf32", "sm_80", (128, 32, 32, 4, 4)): 255,
    ("im2col_gemm", "fp32", "sm_90", (64, 64, 16, 4, 3)): 255,
}

# Launches with the operand PROLOGUE (kernel_report's prologue_* variants, `--all-variants --variant prologue`):
# the wgrad kernel rebuilding its x tile in registers needs far more of them than its other variants (200-255 on
# the exact-fp32 FMA tiles). Where a tile's MAXNREG pin made a prologue launch spill (8-1552 B, none with
# `.maxnreg 255`), such a launch runs without an occupancy target instead. The forward's exact-fp32 128x64 tile on
# sm_90 is erratic: its IDX64 prologue spilled 8 B at ptxas's choice (128) and at 255, and some prologue variant
# spilled 8-24 B at each of 200, 216, 224 and 232; 208 is spill-free for all. On the tiles in
# PROLOGUE_EXCLUDED a prologue launch (the IDX64 one on sm_80's 32x64) spilled 8-28 B even at 255 registers, and
# prologue launches do not run there.
PROLOGUE_MAXNREG = {
    ("conv2d_fwd", "fp32", "sm_90", (128, 64, 16, 8, 3)): 208,
    ("conv2d_wgrad", "tf32", "sm_80", (64, 64, 32, 4, 4)): 255,
    ("conv2d_wgrad", "tf32", "sm_80", (128, 32, 32, 4, 4)): 255,
    ("conv2d_wgrad", "tf32", "sm_80", (64, 32, 32, 2, 5)): 255,
    ("conv2d_wgrad", "fp32", "sm_90", (64, 64, 16, 4, 3)): 255,
    ("conv2d_wgrad", "fp32", "sm_90", (128, 32, 16, 4, 3)): 255,
}
PROLOGUE_EXCLUDED = {
    ("conv2d_wgrad", "fp32", "sm_80", (64, 64, 16, 4, 3)),
    ("conv2d_wgrad", "fp32", "sm_80", (32, 64, 16, 2, 3)),
    ("conv2d_wgrad", "fp32", "sm_90", (32, 64, 16, 2, 3)),
}

# Launches whose constexprs set any of these carry a heavy epilogue, prologue or address path: per-channel
# scale/shift, residual, BN statistics partials, a dgrad add (ADD), an NCHW store in channel halves, 64-bit indices, the operand
# transform of a PROLOGUE (act(z * scale + shift) on every A tile, in registers).
FUSED_FLAGS = ("HAS_SCALE", "HAS_SHIFT", "HAS_RES", "STATS", "SPLIT_N", "IDX64", "PROLOGUE", "BN_GRAD", "ADD")
# Registers a fused launch needs besides its fp32 accumulator, per operand kind. Compiling every variant on
# every tile (`kernel_report --all-variants`, triton 3.8 and 3.9) showed the fused variants spilling 24 B - 2 KB
# on exactly the tiles that leave less than this beside the accumulator (sm_90's 128x128/4-warp and 128x256 /
# 256x128 / 8-warp tiles: 128 accumulator registers; a 16-warp tile, capped at 128 registers in all; the exact-
# fp32 64x128/4-warp tile, whose FMA loop also holds each K step's A and B fragments in registers); the other
# spills it found were occupancy spills of 8-40 B, pinned above.
FUSED_SPARE_REGISTERS = {"half": 128, "tf32": 128, "fp32": 192}


def is_fused(flags: dict) -> bool:
    return any(flags.get(f) for f in FUSED_FLAGS)


def fits_fused(tile: tuple[int, int, int, int, int], kind: str = "half") -> bool:
    """Whether a fused launch may run on this tile: registers per thread (255, or the register file shared by
    32*warps threads) minus the fp32 accumulator's BLOCK_M*BLOCK_N/(32*warps) leaves FUSED_SPARE_REGISTERS."""
    bm, bn, _, warps, _ = tile
    threads = 32 * warps
    return min(255, 65536 // threads) - bm * bn // threads >= FUSED_SPARE_REGISTERS[kind]


# One config per family under the interpreter: small enough that test shapes cross tile boundaries, large
# enough to keep the interpreter's per-program overhead down. wgrad's K is the pixel reduction.
INTERPRET = {"conv2d_fwd": (32, 32, 32, 4, 1), "conv2d_dgrad": (32, 32, 32, 4, 1),
             "conv2d_wgrad": (32, 32, 64, 4, 1), "im2col_gemm": (32, 32, 32, 4, 1)}
# im2col gather kernel: (BLOCK_M rows, BLOCK_K columns, num_warps)
IM2COL_BLOCKS = (64, 64, 4)


def arch_key(device: torch.device | None = None) -> str:
    """'sm_80' for Ampere-class parts, 'sm_90' for Hopper and newer; the closest table we keep. FASTCONV_ARCH
    (sm_80 / sm_90) stands in for the device where none is (launch plan, interpreter tests)."""
    if os.environ.get("FASTCONV_ARCH"):
        return os.environ["FASTCONV_ARCH"]
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return "sm_80"
    major, _ = torch.cuda.get_device_capability(device)
    return "sm_90" if major >= 9 else "sm_80"


def operand_kind(dtype: torch.dtype, precision: str) -> str:
    """Which tile table a launch uses: 16-bit tensor cores, TF32 tensor cores, or exact fp32/fp64 FMA."""
    if dtype in (torch.float16, torch.bfloat16):
        return "half"
    return "tf32" if precision == "tf32" else "fp32"


def pin(family: str, kind: str, arch: str, tile, prologue: bool = False) -> int | None:
    """The register limit a launch runs with on `tile` (None: ptxas's choice); `prologue`: a PROLOGUE launch."""
    key = (family, kind, arch, tuple(tile))
    if prologue and key in PROLOGUE_MAXNREG:
        return PROLOGUE_MAXNREG[key]
    return MAXNREG.get(key)


def runs_on(family: str, kind: str, arch: str, tile, fused: bool = False, prologue: bool = False) -> bool:
    """Whether a launch (`fused`: with FUSED_FLAGS set; `prologue`: with PROLOGUE) may run on `tile`."""
    if fused and not fits_fused(tile, kind):
        return False
    return not (prologue and (family, kind, arch, tuple(tile)) in PROLOGUE_EXCLUDED)


def tiles(family: str, arch: str, kind: str = "half", fused: bool = False, prologue: bool = False
          ) -> list[tuple[tuple[int, int, int, int, int], int | None]]:
    """(tile, pinned register limit or None) for each tile of the table a launch may run on (`fused`: one with
    FUSED_FLAGS set; `prologue`: one with PROLOGUE, which is fused too): what the launcher autotunes over and
    what the kernel report compiles."""
    return [(c, pin(family, kind, arch, c, prologue)) for c in CONFIGS[family][kind][arch]
            if runs_on(family, kind, arch, c, fused or prologue, prologue)]
