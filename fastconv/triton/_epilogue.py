"""Device helpers shared by the conv kernels (implicit GEMM and im2col GEMM).

The epilogue runs on the fp32 accumulator tile [BLOCK_M pixels, BLOCK_N output channels] before the store:

    y = act(((acc + bias[c]) * scale[c] + shift[c]) + residual[n, c, oh, ow])

so plain conv (bias), eval-mode BatchNorm folding (scale/shift), ResNet shortcuts (residual) and the
activation all happen in registers, in one write of the output. The residual is read through y's own offsets
(the launchers hand it over in y's layout, see residual_like): one address tile serves the load and the store.
"""
import torch
import triton
import triton.language as tl

from ._common import channels_strided



@triton.jit
def activation(x, ACT: tl.constexpr):
    # NaN stays NaN, as in torch.relu / relu6 (Triton's min/max drop NaNs unless told)
    if ACT == 1:
        x = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACT == 2:
        x = tl.minimum(tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL), 6.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACT == 3:
        x = x / (1.0 + tl.exp(-x))
    elif ACT == 4:
        x = x * tl.minimum(tl.maximum(x + 3.0, 0.0), 6.0) / 6.0
    return x


@triton.jit
def activation_grad(u, ACT: tl.constexpr):
    """d act(u) / du, evaluated at the pre-activation u."""
    # the masks are written as PyTorch's threshold / hardtanh backward are: a NaN passes the gradient through
    if ACT == 1:
        d = tl.where(u <= 0, 0.0, 1.0)
    elif ACT == 2:
        d = tl.where((u <= 0) | (u >= 6), 0.0, 1.0)
    elif ACT == 3:
        s = 1.0 / (1.0 + tl.exp(-u))
        d = s * (1.0 + u * (1.0 - s))
    elif ACT == 4:
        d = tl.where(u <= -3.0, 0.0, tl.where(u >= 3.0, 1.0, (2.0 * u + 3.0) / 6.0))
    else:
        d = tl.full(u.shape, 1.0, u.dtype)
    return d.to(u.dtype)


@triton.jit
def bn_coefficients(c, cm, mean_ptr, var_ptr, w_ptr, b_ptr, eps, HAS_AFFINE: tl.constexpr, ACC: tl.constexpr):
    """BatchNorm per channel c (where cm): mean, invstd, gamma, beta in the accumulation type."""
    mean = tl.load(mean_ptr + c, mask=cm, other=0.0).to(ACC)
    invstd = 1.0 / tl.sqrt(tl.load(var_ptr + c, mask=cm, other=1.0).to(ACC) + eps)
    if HAS_AFFINE:
        gamma = tl.load(w_ptr + c, mask=cm, other=1.0).to(ACC)
        beta = tl.load(b_ptr + c, mask=cm, other=0.0).to(ACC)
    else:
        gamma = tl.full(mean.shape, 1.0, ACC)
        beta = tl.zeros(mean.shape, ACC)
    return mean, invstd, gamma, beta


@triton.jit
def store_bn_grad_sums(acc, rows, c, mask_m, mask_n, row, C, dx_ptr, z_ptr, szc, mean_ptr, var_ptr, w_ptr, b_ptr,
                       eps, sum_g_ptr, sum_gx_ptr, HAS_AFFINE: tl.constexpr, ACT: tl.constexpr):
    """The first pass of BatchNorm's training-mode backward, on a dgrad tile: acc is the gradient of the
    (virtual) x = act(bn(z)) at input pixels `rows` (z's offsets) and channels c; stores this tile's sums over
    its pixels of g = acc * act'(u) and g * xhat (xhat = (z - mean) * invstd, u = xhat * gamma + beta) at row
    `row` of the [rows, C] partials. acc is rounded to dx's dtype first, so the sums are of the very values the
    apply pass reads back. ACT: identity, relu or relu6 (conv2d.bn_grad_fusable: a mask, no further tile live)."""
    ACC = acc.dtype
    mask = mask_m[:, None] & mask_n[None, :]
    mean, invstd, gamma, beta = bn_coefficients(c, mask_n, mean_ptr, var_ptr, w_ptr, b_ptr, eps, HAS_AFFINE, ACC)
    z = tl.load(z_ptr + rows[:, None] + (c * szc)[None, :], mask=mask, other=0.0).to(ACC)
    xhat = (z - mean[None, :]) * invstd[None, :]
    g = acc.to(dx_ptr.dtype.element_ty).to(ACC)
    if ACT != 0:
        g = g * activation_grad(xhat * gamma[None, :] + beta[None, :], ACT)
    g = tl.where(mask, g, 0.0)
    tl.store(sum_g_ptr + row * C + c, tl.sum(g, axis=0), mask=mask_n)
    tl.store(sum_gx_ptr + row * C + c, tl.sum(g * xhat, axis=0), mask=mask_n)


@triton.jit
def store_tile_stats(acc, mask_m, co, mask_n, tile, C, cnt_ptr, mean_ptr, m2_ptr):
    """BatchNorm partials of this tile: per channel, the count, mean and M2 (sum of squared deviations
    from the tile mean) of its valid rows. Stored at [tile, co]; batch_norm.finalize combines them
    with Chan's formula, which stays accurate where a naive sum of squares would cancel. Taken on the
    accumulator before the bias is added, and the bias joins the mean only after the combination, so a
    large bias costs no variance precision."""
    rows = tl.sum(mask_m.to(acc.dtype), axis=0)
    valid = mask_m[:, None]
    mean = tl.sum(tl.where(valid, acc, 0.0), axis=0) / tl.maximum(rows, 1.0)
    dev = tl.where(valid, acc - mean[None, :], 0.0)
    m2 = tl.sum(dev * dev, axis=0)
    off = tile * C + co
    tl.store(cnt_ptr + off, tl.zeros_like(mean) + rows, mask=mask_n)
    tl.store(mean_ptr + off, mean, mask=mask_n)
    tl.store(m2_ptr + off, m2, mask=mask_n)


@triton.jit
def split_rows(offs_m, OH, OW):
    """GEMM row m -> output pixel (n, oh, ow) for a row-major (N, OH, OW) enumeration."""
    ow = offs_m % OW
    t = offs_m // OW
    oh = t % OH
    n = t // OH
    return n, oh, ow


@triton.jit
def tile_rows(first, BLOCK: tl.constexpr, M, IDX64: tl.constexpr):
    """GEMM rows first .. first + BLOCK - 1 of M, and which of them exist.

    Rows stay in M's width (int32 unless M itself passes 2**31, when Triton passes M as i64). The int32 launches
    leave headroom for lanes past the end (_common.INDEX_HEADROOM); on the IDX64 path, where M may sit just
    below 2**31, those lanes are clamped to the last row instead, so no lane ever leaves the width."""
    lane = tl.arange(0, BLOCK)
    if IDX64:
        rows = first + tl.minimum(lane, M - 1 - first)
        valid = lane < M - first
    else:
        rows = first + lane
        valid = rows < M
    return rows, valid


@triton.jit
def pixel_coords(rows, OH, OW, IDX64: tl.constexpr):
    """(n, oh, ow) of GEMM rows of an (N, OH, OW) pixel grid, for address math: divided in the rows' own width
    (tile_rows) and widened to int64 on the IDX64 path. 64-bit divisions are emulated in software; dividing
    int64 rows is what made the IDX64 kernels spill."""
    n, oh, ow = split_rows(rows, OH, OW)
    if IDX64:
        n = n.to(tl.int64)
        oh = oh.to(tl.int64)
        ow = ow.to(tl.int64)
    return n, oh, ow


def fold_bias(bias, scale, shift):
    """(bias, shift) for the launch: with a scale, (acc + bias) * scale + shift is computed as
    acc * scale + (bias * scale + shift), so the epilogue holds one per-channel vector fewer (each costs a
    register per output column a thread owns)."""
    if bias is None or scale is None:
        return bias, shift
    dtype = torch.promote_types(bias.dtype, scale.dtype)
    folded = bias.to(dtype) * scale.to(dtype)
    if shift is not None:
        folded = folded + shift.to(dtype)
    return None, folded


def residual_like(residual, y):
    """The residual with y's strides (a copy only when its layout differs where it matters): the epilogue
    reads it through y's offsets, since a second 2-D tile of addresses was what made the residual variants of
    the 128x128 TF32 tiles spill."""
    if residual is None or all(a == b for a, b, n in zip(residual.stride(), y.stride(), y.shape) if n > 1):
        return residual
    return residual.new_empty_strided(y.shape, y.stride()).copy_(residual)  # y's strides, its own dtype


def split_store(y) -> bool:
    """The launchers' SPLIT_N: store the tile in two channel halves when the output y (and so the residual, read
    in y's layout) is not channel-contiguous (NCHW). There each element needs its own 64-bit address and mask,
    and a whole tile of them at once is what made the NCHW variants spill; channels_last stores vectorise along
    the channels and do better unsplit."""
    return channels_strided(y)


@triton.jit
def _residual_act_store(acc, rows, co, mask_m, mask_n, y_ptr, syc, res_ptr, HAS_RES: tl.constexpr,
                        ACT: tl.constexpr):
    mask = mask_m[:, None] & mask_n[None, :]
    cols = co * syc
    # base + rows, then + cols: summing the two offset vectors into a 2-D offset tile first costs registers
    if HAS_RES:
        acc += tl.load(res_ptr + rows[:, None] + cols[None, :], mask=mask, other=0.0).to(acc.dtype)
    acc = activation(acc, ACT)
    tl.store(y_ptr + rows[:, None] + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _column_halves(v):
    """[BM, 2h] -> ([BM, :h], [BM, h:]). tl.split splits a trailing axis of size 2, hence the reshape and
    permute that bring the half index last."""
    return tl.split(tl.permute(tl.reshape(v, (v.shape[0], 2, v.shape[1] // 2)), (0, 2, 1)))


@triton.jit
def _vector_halves(v):
    """[2h] -> ([:h], [h:])."""
    return tl.split(tl.permute(tl.reshape(v, (2, v.shape[0] // 2)), (1, 0)))


@triton.jit
def epilogue_store(
    acc, offs_m, OH, OW, mask_m, co, mask_n,
    y_ptr, syn, syc, syh, syw,
    bias_ptr, scale_ptr, shift_ptr, res_ptr,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RES: tl.constexpr,
    ACT: tl.constexpr,
    stats_tile, C, cnt_ptr, mean_ptr, m2_ptr, STATS: tl.constexpr, SPLIT_N: tl.constexpr, IDX64: tl.constexpr,
):
    """Apply bias/scale/shift/residual/activation to `acc` and store it, cast to y's dtype. With STATS,
    also store the tile's BatchNorm partials of the bias-free acc (training-mode conv+BN). SPLIT_N: see
    store_tile.

    offs_m are the tile's GEMM rows (pixels m = (n, oh, ow) of an (N, OH, OW) grid), co its columns (global
    output channels); strides are in elements. The pixel decomposition happens here, after the main loop,
    so that it is not live across it; addresses are 1-D row and column parts broadcast only at the access.
    res_ptr points at a residual in y's layout (residual_like).
    """
    if STATS:
        store_tile_stats(acc, mask_m, co, mask_n, stats_tile, C, cnt_ptr, mean_ptr, m2_ptr)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=mask_n, other=0.0).to(acc.dtype)[None, :]
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + co, mask=mask_n, other=0.0).to(acc.dtype)[None, :]
    if HAS_SHIFT:
        acc += tl.load(shift_ptr + co, mask=mask_n, other=0.0).to(acc.dtype)[None, :]
    n, oh, ow = pixel_coords(offs_m, OH, OW, IDX64)
    rows = n * syn + oh * syh + ow * syw
    store_tile(acc, rows, co, mask_m, mask_n, y_ptr, syc, res_ptr, HAS_RES, ACT, SPLIT_N)


@triton.jit
def store_tile(acc, rows, co, mask_m, mask_n, y_ptr, syc, res_ptr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
               SPLIT_N: tl.constexpr):
    """y[rows[m] + co[c] * syc] = act(acc[m, c] + residual[rows[m] + co[c] * syc]), masked, cast to y's
    dtype (the residual in y's layout); with SPLIT_N (see split_store) in two passes over the channel halves,
    so that only half the tile's per-element addresses and masks are live at once."""
    if SPLIT_N:
        acc_lo, acc_hi = _column_halves(acc)
        co_lo, co_hi = _vector_halves(co)
        ok_lo, ok_hi = _vector_halves(mask_n)
        _residual_act_store(acc_lo, rows, co_lo, mask_m, ok_lo, y_ptr, syc, res_ptr, HAS_RES, ACT)
        _residual_act_store(acc_hi, rows, co_hi, mask_m, ok_hi, y_ptr, syc, res_ptr, HAS_RES, ACT)
    else:
        _residual_act_store(acc, rows, co, mask_m, mask_n, y_ptr, syc, res_ptr, HAS_RES, ACT)


@triton.jit
def grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Map a linear program id to (tile_m, tile_n), walking GROUP_M row tiles per column sweep so
    neighbouring programs share weight tiles in L2."""
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    tile_m = first_m + (pid % width) % size_m
    tile_n = (pid % width) // size_m
    return tile_m, tile_n
