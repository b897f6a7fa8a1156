"""Triton im2col GEMM: an explicit column buffer, then a GEMM that shares the implicit kernel's epilogue.

Column layout (per group g, per batch chunk):  col[g, m, k]  with
    m = (n, oh, ow)             row: one output pixel
    k = (kh, kw, ci)            column: ci fastest, so channels_last inputs gather contiguous runs
and the weight is packed to  wpack[g, k, co] = weight[g*COUT_G + co, ci, kh, kw]  in the same k order.
The GEMM is then  Y[m, co] = col[g] @ wpack[g]  with the epilogue writing y[n, co, oh, ow] through y's
strides. The batch is cut into chunks so the column buffer stays under `max_col_bytes`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import ACTIVATIONS, acc_dtype, cdiv, check_runnable, dot_precision, needs_int64, upcast_dot_operands
from ._epilogue import (
    epilogue_store,
    fold_bias,
    grouped_tile,
    pixel_coords,
    residual_like,
    split_store,
    tile_rows,
)
from .configs import IM2COL_BLOCKS
from .conv2d import GROUP_M, empty_stats, output_hw, pads, stats_of, stats_scratch, workspace
from .launch import Problem, TunedKernel, run

DEFAULT_MAX_COL_BYTES = 512 * 2**20


@triton.jit
def _im2col_gather_kernel(
    x_ptr, col_ptr,
    M, KDIM, H, W, OH, OW, CIN_G, KW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sxn, sxc, sxh, sxw,
    IDX64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    g = tl.program_id(2)
    offs_m, in_m = tile_rows(tl.program_id(0) * BLOCK_M, BLOCK_M, M, IDX64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    if IDX64:
        offs_k = offs_k.to(tl.int64)
        g = g.to(tl.int64)
    n, oh, ow = pixel_coords(offs_m, OH, OW, IDX64)
    ci = offs_k % CIN_G
    tap = offs_k // CIN_G
    kh = tap // KW
    kw = tap % KW
    ih = oh[:, None] * stride_h - pad_h + (kh * dil_h)[None, :]
    iw = ow[:, None] * stride_w - pad_w + (kw * dil_w)[None, :]
    in_tile = in_m[:, None] & (offs_k < KDIM)[None, :]
    inside = in_tile & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    src = x_ptr + (n * sxn)[:, None] + ((g * CIN_G + ci) * sxc)[None, :] + ih * sxh + iw * sxw
    vals = tl.load(src, mask=inside, other=0.0)
    dst = col_ptr + (g * M + offs_m)[:, None] * KDIM + offs_k[None, :]
    tl.store(dst, vals, mask=in_tile)


@triton.jit
def _im2col_gemm_kernel(
    col_ptr, w_ptr, y_ptr, bias_ptr, scale_ptr, shift_ptr, res_ptr,
    M, KDIM, COUT_G, OH, OW,
    syn, syc, syh, syw,
    cnt_ptr, mean_ptr, m2_ptr,  # STATS partials [cdiv(M, BLOCK_M), C_out], by keyword (conv2d.stats_scratch)
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RES: tl.constexpr,
    ACT: tl.constexpr, STATS: tl.constexpr, ACC_TYPE: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, IDX64: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    g = tl.program_id(1)
    tile_m, tile_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(COUT_G, BLOCK_N), GROUP_M)
    if IDX64:
        g = g.to(tl.int64)
    offs_m, mask_m = tile_rows(tile_m * BLOCK_M, BLOCK_M, M, IDX64)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < COUT_G
    # 1-D address parts (rows of col, columns of wpack), int32 unless IDX64; the group's base and the K
    # position live in two scalar pointers advanced each step, so no 2-D pointer tile is carried.
    if IDX64:
        a_rows = offs_m.to(tl.int64) * KDIM
    else:
        a_rows = offs_m * KDIM
    k_b = offs_k * COUT_G
    a_base = col_ptr + g * M * KDIM
    b_base = w_ptr + g * KDIM * COUT_G
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_TYPE)
    for k0 in range(0, KDIM, BLOCK_K):
        k_ok = offs_k < KDIM - k0
        a = tl.load(a_base + a_rows[:, None] + offs_k[None, :], mask=mask_m[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_base + k_b[:, None] + offs_n[None, :], mask=k_ok[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC_TYPE)
        a_base += BLOCK_K
        b_base += BLOCK_K * COUT_G

    # Pixel rows again after the loop (cheap) rather than kept live across it.
    offs_m, mask_m = tile_rows(tile_m * BLOCK_M, BLOCK_M, M, IDX64)
    epilogue_store(
        acc, offs_m, OH, OW, mask_m, g * COUT_G + offs_n, mask_n,
        y_ptr, syn, syc, syh, syw,
        bias_ptr, scale_ptr, shift_ptr, res_ptr,
        HAS_BIAS, HAS_SCALE, HAS_SHIFT, HAS_RES, ACT,
        tile_m, COUT_G * tl.num_programs(1), cnt_ptr, mean_ptr, m2_ptr, STATS, SPLIT_N, IDX64,
    )


_gemm = TunedKernel(_im2col_gemm_kernel, "im2col_gemm")


def pack_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """[C_out, CIN_G, KH, KW] -> [G, KH*KW*CIN_G, COUT_G] in the column buffer's k order."""
    C_out, cin_g, KH, KW = weight.shape
    w = weight.reshape(groups, C_out // groups, cin_g, KH, KW).permute(0, 3, 4, 2, 1)
    return w.reshape(groups, KH * KW * cin_g, C_out // groups).contiguous()


def im2col(x: torch.Tensor, kernel_size, stride, padding, dilation, groups: int,
           *, force_int64: bool = False) -> torch.Tensor:
    """The column buffer col[g, (n, oh, ow), (kh, kw, ci)] of a 4-D x (any strides)."""
    check_runnable(x)
    N, C, H, W = x.shape
    KH, KW = kernel_size
    cin_g = C // groups
    OH, OW = output_hw(H, W, KH, KW, stride, padding, dilation)
    top, _, left, _ = pads(padding)
    M, KDIM = N * OH * OW, KH * KW * cin_g
    col = workspace((groups, M, KDIM), x.device, x.dtype)
    if col.numel() == 0:
        return col
    bm, bk, warps = IM2COL_BLOCKS
    run(_im2col_gather_kernel, (cdiv(M, bm), cdiv(KDIM, bk), groups),
        x, col, M, KDIM, H, W, OH, OW, cin_g, KW,
        stride[0], stride[1], top, left, dilation[0], dilation[1],
        *x.stride(),
        device=x.device,
        IDX64=force_int64 or needs_int64(x, col), BLOCK_M=bm, BLOCK_K=bk, num_warps=warps,
    )
    return col


def conv2d_im2col(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    activation: str = "identity",
    out: torch.Tensor | None = None,
    stats: bool = False,
    max_col_bytes: int = DEFAULT_MAX_COL_BYTES,
    force_int64: bool = False,
):
    """conv2d as im2col + GEMM with the same fused epilogue as the implicit-GEMM kernel. Returns y, or with
    `stats` (y, (count, mean, M2)) as conv2d.conv2d_forward does; with batch chunks, the chunks' partial rows
    are concatenated."""
    check_runnable(x, weight)
    N, C, H, W = x.shape
    C_out, cin_g, KH, KW = weight.shape
    OH, OW = output_hw(H, W, KH, KW, stride, padding, dilation)
    y = out if out is not None else x.new_empty((N, C_out, OH, OW))
    if y.numel() == 0:
        return (y, empty_stats(C_out, y)) if stats else y
    cout_g = C_out // groups
    KDIM = KH * KW * cin_g
    wpack = pack_weight(weight, groups)
    per_image = max(groups * OH * OW * KDIM * x.element_size(), 1)
    chunk = max(1, min(N, max_col_bytes // per_image))
    dummy = y
    bias, shift = fold_bias(bias, scale, shift)
    residual = residual_like(residual, y)
    parts = []
    for n0 in range(0, N, chunk):
        n1 = min(N, n0 + chunk)
        col = im2col(x[n0:n1], (KH, KW), stride, padding, dilation, groups, force_int64=force_int64)
        y_c = y[n0:n1]
        res_c = residual[n0:n1] if residual is not None else y_c
        M = (n1 - n0) * OH * OW
        _, extra = _gemm(
            lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(cout_g, meta["BLOCK_N"]), groups),
            col, wpack, y_c,
            bias if bias is not None else dummy,
            scale if scale is not None else dummy,
            shift if shift is not None else dummy,
            res_c,
            M, KDIM, cout_g, OH, OW,
            *y_c.stride(),
            problem=Problem(M, cout_g, KDIM, 1, groups),
            device=x.device,
            scratch=stats_scratch(M, C_out, y, stats),
            HAS_BIAS=bias is not None,
            HAS_SCALE=scale is not None,
            HAS_SHIFT=shift is not None,
            HAS_RES=residual is not None,
            ACT=ACTIVATIONS[activation],
            STATS=stats,
            ACC_TYPE=acc_dtype(x.dtype),
            PRECISION=dot_precision(x.dtype),
            UPCAST=upcast_dot_operands(x.dtype),
            IDX64=force_int64 or needs_int64(col, wpack, y_c, residual),
            GROUP_M=GROUP_M,
            SPLIT_N=split_store(y_c),
        )
        parts.append(stats_of(extra) if stats else None)
    if not stats:
        return y
    if len(parts) == 1:
        return y, parts[0]
    return y, tuple(torch.cat([p[i] for p in parts]) for i in range(3))
