"""Triton BatchNorm (training mode) around the conv kernels: statistics finalize, normalize+affine+act,
and the backward's two passes.

Forward:   z = conv(x) + bias            conv kernel, STATS epilogue writes per-tile (count, mean, M2)
           mean, var = finalize(...)      Chan's parallel combination of the tile partials, as a tree
           y = act((z - mean) * invstd * gamma + beta [+ residual])
Backward (only z, mean, var are kept; xhat, u and the activation mask are recomputed from z; with a residual and a
mask activation the forward stores act' as bits, ACT_BITS, and the backward reads those instead of the residual):
           g = dy * act'(u),  xhat = (z - mean) * invstd
           sum_g, sum_gx = sum over (n, h, w) of g and g * xhat      (reduce pass; its last program per channel
                                                                       block adds the split partials up)
           dz = gamma * invstd * (g - sum_g / P - xhat * sum_gx / P)  (apply pass; also writes g as the
                                                                        residual's gradient when asked)
Tensors are [N, C, H, W] read through their strides; a tile is [BLOCK_P pixels, BLOCK_C channels].
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from .._args import accumulation_dtype
from ._common import ACTIVATIONS, acc_dtype, cdiv, check_runnable, needs_int64, ticket_counters
from ._epilogue import activation, activation_grad, bn_coefficients, split_rows
from . import conv2d as _conv
from .launch import run, sm_count
from .max_pool2d import candidate_windows, window_grad_sum

BLOCK_P, BLOCK_C = 64, 32


@triton.jit
def _lerp_store(ptr, end, w, mask, ACC: tl.constexpr):
    """*ptr = lerp(*ptr, end, w) in ACC, stored in *ptr's dtype; ATen's lerp formula (exact at w = 0 and 1).
    16-bit buffers are rounded from fp32 (fp64 -> bf16 has no direct conversion everywhere; the interpreter's
    gives garbage)."""
    old = tl.load(ptr, mask=mask, other=0.0).to(ACC)
    diff = end - old
    new = tl.where(tl.abs(w) < 0.5, old + w * diff, end - diff * (1.0 - w))
    if ptr.dtype.element_ty.primitive_bitwidth == 16:
        new = new.to(tl.float32)
    tl.store(ptr, new.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_cast(ptr, value, mask):
    """Store in *ptr's dtype; 16-bit from fp32 (see _lerp_store)."""
    if ptr.dtype.element_ty.primitive_bitwidth == 16:
        value = value.to(tl.float32)
    tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _batch_norm_combine_kernel(cnt_ptr, mean_ptr, m2_ptr, T, C, ROWS,
                            cnt_out_ptr, mean_out_ptr, m2_out_ptr, bias_ptr,
                            run_mean_ptr, run_var_ptr, momentum_ptr, momentum_hi, momentum_lo, count_ptr,
                            gamma_ptr, beta_ptr, eps_hi, eps_lo, scale_out_ptr, shift_out_ptr,
                            FINAL: tl.constexpr, HAS_BIAS: tl.constexpr, RUNNING: tl.constexpr,
                            MOMENTUM_TENSOR: tl.constexpr, COUNT: tl.constexpr, FOLD: tl.constexpr,
                            HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, BLOCK_T: tl.constexpr,
                            BLOCK_C: tl.constexpr):
    """Combine rows [chunk * ROWS, (chunk + 1) * ROWS) of T (count, mean, M2) partials per channel, BLOCK_T rows
    at a time: a block's rows merge at once (n = sum n_i, mean = sum n_i mean_i / n,
    M2 = sum M2_i + sum n_i (mean_i - mean)^2), then into the running result with Chan's pairwise formula
    (n = na + nb, d = mb - ma, mean = ma + d nb / n, M2 = M2a + M2b + d^2 na nb / n). Not FINAL: writes the
    chunk's combined row [chunk, C]; FINAL (one chunk): writes the mean (plus the conv bias, which the partials
    leave out) and the biased variance [C], and with RUNNING also updates the running statistics in place, in
    their own dtype: running = lerp(running, batch statistic, momentum) with the unbiased variance M2 / (n - 1),
    as F.batch_norm does. The momentum is a 0-dim tensor read here (MOMENTUM_TENSOR: momentum=None's
    1 / num_batches_tracked, no host sync) or a float passed as fp32 hi + lo parts (exact for fp64 buffers).
    COUNT (with a float momentum): program 0 also adds 1 to the BatchNorm's num_batches_tracked (int64, *count_ptr),
    which nothing else in the launch reads: nn.BatchNorm2d's counter without a launch of its own.
    FOLD (FINAL): also the BatchNorm folded per channel for the next conv's operand prologue,
    scale = gamma * rsqrt(var + eps), shift = beta - mean * scale (gamma 1 / beta 0 without HAS_GAMMA / HAS_BETA;
    eps as fp32 hi + lo), in the statistics' dtype.
    Each program owns its channels: no other program touches them."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    lo = tl.program_id(1) * ROWS
    hi = tl.minimum(lo + ROWS, T)
    acc = mean_out_ptr.dtype.element_ty
    n_a = tl.zeros((BLOCK_C,), dtype=acc)
    mean_a = tl.zeros((BLOCK_C,), dtype=acc)
    m2_a = tl.zeros((BLOCK_C,), dtype=acc)
    for t0 in range(lo, hi, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mask = (t < hi)[:, None] & cm[None, :]
        off = t[:, None] * C + c[None, :]
        n_i = tl.load(cnt_ptr + off, mask=mask, other=0.0)
        mean_i = tl.load(mean_ptr + off, mask=mask, other=0.0)
        n_b = tl.sum(n_i, axis=0)
        mean_b = tl.sum(n_i * mean_i, axis=0) / tl.maximum(n_b, 1.0)
        d_i = tl.where(mask, mean_i - mean_b[None, :], 0.0)
        m2_b = tl.sum(tl.load(m2_ptr + off, mask=mask, other=0.0) + n_i * d_i * d_i, axis=0)
        n = n_a + n_b
        frac = tl.where(n > 0, n_b / tl.maximum(n, 1.0), 0.0)
        delta = mean_b - mean_a
        mean_a += delta * frac
        m2_a += m2_b + delta * delta * n_a * frac
        n_a = n
    if FINAL:
        if HAS_BIAS:
            mean_a += tl.load(bias_ptr + c, mask=cm, other=0.0).to(acc)
        var = m2_a / tl.maximum(n_a, 1.0)
        tl.store(mean_out_ptr + c, mean_a, mask=cm)
        tl.store(m2_out_ptr + c, var, mask=cm)
        if FOLD:
            scale = 1.0 / tl.sqrt(var + (tl.cast(eps_hi, acc) + tl.cast(eps_lo, acc)))
            if HAS_GAMMA:
                scale = scale * tl.load(gamma_ptr + c, mask=cm, other=1.0).to(acc)
            shift = -mean_a * scale
            if HAS_BETA:
                shift += tl.load(beta_ptr + c, mask=cm, other=0.0).to(acc)
            tl.store(scale_out_ptr + c, scale, mask=cm)
            tl.store(shift_out_ptr + c, shift, mask=cm)
        if RUNNING:
            if MOMENTUM_TENSOR:
                w = tl.load(momentum_ptr).to(acc)
            else:
                w = tl.cast(momentum_hi, acc) + tl.cast(momentum_lo, acc)
            _lerp_store(run_mean_ptr + c, mean_a, w, cm, acc)
            _lerp_store(run_var_ptr + c, m2_a / tl.maximum(n_a - 1.0, 1.0), w, cm, acc)
            if COUNT:
                if tl.program_id(0) == 0:
                    tl.store(count_ptr, tl.load(count_ptr) + 1)
    else:
        out = tl.program_id(1) * C + c
        tl.store(cnt_out_ptr + out, n_a, mask=cm)
        tl.store(mean_out_ptr + out, mean_a, mask=cm)
        tl.store(m2_out_ptr + out, m2_a, mask=cm)


@triton.jit
def _bn_tile(p0, c0, P, C, H, W, IDX64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    p = p0 + tl.arange(0, BLOCK_P)
    c = c0 + tl.arange(0, BLOCK_C)
    if IDX64:
        p = p.to(tl.int64)
        c = c.to(tl.int64)
    n, h, w = split_rows(p, H, W)
    mask = (p < P)[:, None] & (c < C)[None, :]
    return n, h, w, c, mask


@triton.jit
def _bn_coefficients(c, C, mean_ptr, var_ptr, w_ptr, b_ptr, eps, HAS_AFFINE: tl.constexpr, ACC: tl.constexpr):
    """Per channel c < C: mean, invstd, gamma, beta in the accumulation type."""
    return bn_coefficients(c, c < C, mean_ptr, var_ptr, w_ptr, b_ptr, eps, HAS_AFFINE, ACC)


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _act_bit_rows(p0, P, c, C, IDX64: tl.constexpr, BLOCK_P: tl.constexpr):
    """The offsets and mask of a tile's int32 act' words [p // 32, c] (fastconv._act_bits: pixels p0 ..
    p0 + BLOCK_P - 1, p0 a multiple of BLOCK_P: a program owns whole words, no two programs write one)."""
    tl.static_assert(BLOCK_P % 32 == 0, "act' bits: BLOCK_P must be a multiple of the 32-bit word")
    r = p0 // 32 + tl.arange(0, BLOCK_P // 32)
    if IDX64:
        r = r.to(tl.int64)
    return r[:, None] * C + c[None, :], (r * 32 < P)[:, None] & (c < C)[None, :]


@triton.jit
def _store_act_bits(bits_ptr, d, mask, p0, P, c, C, IDX64: tl.constexpr, BLOCK_P: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    """act' (d, [BLOCK_P, BLOCK_C]) != 0 of a tile as bits: 32 pixels of a channel per int32 word."""
    on = tl.where(mask & (d != 0), 1, 0)
    shifted = tl.reshape(on, (BLOCK_P // 32, 32, BLOCK_C)) << tl.arange(0, 32)[None, :, None]
    off, wmask = _act_bit_rows(p0, P, c, C, IDX64, BLOCK_P)
    tl.store(bits_ptr + off, tl.reduce(shifted, 1, _bit_or), mask=wmask)


@triton.jit
def _load_act_bits(bits_ptr, p0, P, c, C, IDX64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """_store_act_bits' inverse: the tile's act' as 0 / 1 int32 [BLOCK_P, BLOCK_C]."""
    off, wmask = _act_bit_rows(p0, P, c, C, IDX64, BLOCK_P)
    words = tl.load(bits_ptr + off, mask=wmask, other=0)
    return tl.reshape((words[:, None, :] >> tl.arange(0, 32)[None, :, None]) & 1, (BLOCK_P, BLOCK_C))


@triton.jit
def _batch_norm_act_fwd_kernel(
    z_ptr, y_ptr, res_ptr, bits_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, res_scale_ptr, res_shift_ptr,
    P, C, H, W, eps,
    szn, szc, szh, szw, syn, syc, syh, syw, srn, src, srh, srw,
    HAS_AFFINE: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, ACT_BITS: tl.constexpr, ACC: tl.constexpr,
    IDX64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, RES_AFFINE: tl.constexpr = False,
):
    """y; with ACT_BITS also act'(u) as bits into bits_ptr (fastconv._act_bits). RES_AFFINE: the residual is
    added as res * res_scale[c] + res_shift[c] (a projection shortcut's BatchNorm, folded: its z is read, its
    normalized output never written)."""
    p0 = tl.program_id(0) * BLOCK_P
    n, h, w, c, mask = _bn_tile(p0, tl.program_id(1) * BLOCK_C, P, C, H, W, IDX64, BLOCK_P, BLOCK_C)
    mean, invstd, gamma, beta = _bn_coefficients(c, C, mean_ptr, var_ptr, w_ptr, b_ptr, eps, HAS_AFFINE, ACC)
    scale = invstd * gamma
    shift = beta - mean * scale
    z = tl.load(z_ptr + (n * szn + h * szh + w * szw)[:, None] + (c * szc)[None, :], mask=mask, other=0.0)
    u = z.to(ACC) * scale[None, :] + shift[None, :]
    if HAS_RES:
        r = tl.load(res_ptr + (n * srn + h * srh + w * srw)[:, None] + (c * src)[None, :], mask=mask,
                    other=0.0).to(ACC)
        if RES_AFFINE:
            r = (r * tl.load(res_scale_ptr + c, mask=c < C, other=0.0).to(ACC)[None, :]
                 + tl.load(res_shift_ptr + c, mask=c < C, other=0.0).to(ACC)[None, :])
        u += r
    y = activation(u, ACT)
    tl.store(y_ptr + (n * syn + h * syh + w * syw)[:, None] + (c * syc)[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mask)
    if ACT_BITS:
        _store_act_bits(bits_ptr, activation_grad(u, ACT), mask, p0, P, c, C, IDX64, BLOCK_P, BLOCK_C)


@triton.jit
def _bn_grad_u(dy_ptr, z_ptr, res_ptr, off_ptr, p0, P, C, n, h, w, c, mask, mean, invstd, gamma, beta,
               sdn, sdc, sdh, sdw, szn, szc, szh, szw, srn, src, srh, srw, son, soc, soh, sow,
               OH, OW, KH, KW, NH, NW, pool_sh, pool_sw, pool_ph, pool_pw, pool_dh, pool_dw,
               HAS_RES: tl.constexpr, ACT: tl.constexpr, ACT_BITS: tl.constexpr, POOL: tl.constexpr,
               ACC: tl.constexpr, IDX64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Recompute xhat and u from z, and return (g = dy * act'(u), xhat) for the tile of pixels p0 .. p0 + BLOCK_P
    - 1. POOL: y was max-pooled (batch_norm_act_pool) and dy_ptr / off_ptr are the pooled output's gradient and
    argmax taps, [N, C, OH, OW]: dy is gathered from the windows that picked each pixel
    (max_pool2d.window_grad_sum). ACT_BITS: act' is read from the forward's bits at res_ptr, not recomputed."""
    z = tl.load(z_ptr + (n * szn + h * szh + w * szw)[:, None] + (c * szc)[None, :], mask=mask, other=0.0)
    xhat = (z.to(ACC) - mean[None, :]) * invstd[None, :]
    if POOL:
        g = window_grad_sum(dy_ptr, off_ptr, n[:, None], c[None, :], h[:, None], w[:, None], mask, OH, OW, KH, KW,
                            NH, NW, pool_sh, pool_sw, pool_ph, pool_pw, pool_dh, pool_dw, sdn, sdc, sdh, sdw,
                            son, soc, soh, sow, ACC)
    else:
        dy = tl.load(dy_ptr + (n * sdn + h * sdh + w * sdw)[:, None] + (c * sdc)[None, :], mask=mask, other=0.0)
        g = dy.to(ACC)
    if ACT_BITS:
        g = g * _load_act_bits(res_ptr, p0, P, c, C, IDX64, BLOCK_P, BLOCK_C).to(ACC)
    elif ACT != 0:
        u = xhat * gamma[None, :] + beta[None, :]
        if HAS_RES:
            u += tl.load(res_ptr + (n * srn + h * srh + w * srw)[:, None] + (c * src)[None, :], mask=mask,
                         other=0.0).to(ACC)
        g = g * activation_grad(u, ACT)
    g = tl.where(mask, g, 0.0)
    return g, xhat


@triton.jit
def _batch_norm_act_bwd_reduce_kernel(
    dy_ptr, z_ptr, res_ptr, off_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, sum_g_ptr, sum_gx_ptr, lock_ptr,
    total_g_ptr, total_gx_ptr, P, C, H, W, eps, P_PER_SPLIT, SPLITS,
    sdn, sdc, sdh, sdw, szn, szc, szh, szw, srn, src, srh, srw, son, soc, soh, sow,
    OH, OW, KH, KW, NH, NW, pool_sh, pool_sw, pool_ph, pool_pw, pool_dh, pool_dw,
    HAS_AFFINE: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, ACT_BITS: tl.constexpr, POOL: tl.constexpr,
    ACC: tl.constexpr, IDX64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, LAST_SUMS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Partial sums of g and g * xhat over pixels [split * P_PER_SPLIT, ...) -> [split, C]. One pass over the
    pixels, software-pipelined (tl.range num_stages: the next tiles' loads are in flight while this one is
    reduced); the partials stay element-wise [BLOCK_P, BLOCK_C] in registers and are reduced across pixels once,
    after the loop, not once per step.

    LAST_SUMS (SPLITS > 1): the last of a channel block's SPLITS programs to finish also adds up their partial
    rows into total_g / total_gx [C], in split order (deterministic: `_sum_partial_rows`, the same arithmetic as
    the former sum-rows pass), so no second launch is needed. "Last" is decided by a ticket, an atomic add on
    the channel block's counter in lock_ptr after the program's partials are written (barrier, then acq_rel at
    GPU scope: the partials are visible to whoever draws the last ticket); that program resets the counter to 0
    for the next launch (the counters are zero between launches: `_common.ticket_counters`)."""
    split = tl.program_id(1)
    c0 = tl.program_id(0) * BLOCK_C
    c = c0 + tl.arange(0, BLOCK_C)
    mean, invstd, gamma, beta = _bn_coefficients(c, C, mean_ptr, var_ptr, w_ptr, b_ptr, eps, HAS_AFFINE, ACC)
    acc_g = tl.zeros((BLOCK_P, BLOCK_C), ACC)
    acc_gx = tl.zeros((BLOCK_P, BLOCK_C), ACC)
    p_lo = split * P_PER_SPLIT
    p_hi = tl.minimum(p_lo + P_PER_SPLIT, P)
    for p0 in tl.range(p_lo, p_hi, BLOCK_P, num_stages=3):
        n, h, w, cc, mask = _bn_tile(p0, c0, p_hi, C, H, W, IDX64, BLOCK_P, BLOCK_C)
        g, xhat = _bn_grad_u(dy_ptr, z_ptr, res_ptr, off_ptr, p0, P, C, n, h, w, cc, mask, mean, invstd, gamma,
                             beta, sdn, sdc, sdh, sdw, szn, szc, szh, szw, srn, src, srh, srw, son, soc, soh, sow,
                             OH, OW, KH, KW, NH, NW, pool_sh, pool_sw, pool_ph, pool_pw, pool_dh, pool_dw,
                             HAS_RES, ACT, ACT_BITS, POOL, ACC, IDX64, BLOCK_P, BLOCK_C)
        acc_g += g
        acc_gx += g * xhat
    cm = c < C
    tl.store(sum_g_ptr + split * C + c, tl.sum(acc_g, axis=0), mask=cm)
    tl.store(sum_gx_ptr + split * C + c, tl.sum(acc_gx, axis=0), mask=cm)
    if LAST_SUMS:
        tl.debug_barrier()  # every thread's partials stored before the ticket releases them
        ticket = tl.atomic_add(lock_ptr + tl.program_id(0), 1, sem="acq_rel", scope="gpu")
        if ticket == SPLITS - 1:
            _sum_partial_rows(sum_g_ptr, sum_gx_ptr, SPLITS, C, c, cm, total_g_ptr, total_gx_ptr, ACC, BLOCK_T,
                              BLOCK_C)
            tl.atomic_xchg(lock_ptr + tl.program_id(0), 0, sem="relaxed", scope="gpu")


@triton.jit
def _sum_partial_rows(a_ptr, b_ptr, T, C, c, cm, a_out_ptr, b_out_ptr, ACC: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    """Column sums of rows [0, T) of two [T, C] arrays at channels c: BLOCK_T rows per step, element-wise partials
    to the loop end, then one reduction (a fixed order). Loads bypass L1 (.cg): the rows were written by other
    programs of the same launch."""
    sum_a = tl.zeros((BLOCK_T, BLOCK_C), dtype=ACC)
    sum_b = tl.zeros((BLOCK_T, BLOCK_C), dtype=ACC)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mask = (t < T)[:, None] & cm[None, :]
        off = t[:, None] * C + c[None, :]
        sum_a += tl.load(a_ptr + off, mask=mask, other=0.0, cache_modifier=".cg").to(ACC)
        sum_b += tl.load(b_ptr + off, mask=mask, other=0.0, cache_modifier=".cg").to(ACC)
    tl.store(a_out_ptr + c, tl.sum(sum_a, axis=0), mask=cm)
    tl.store(b_out_ptr + c, tl.sum(sum_b, axis=0), mask=cm)


@triton.jit
def _batch_norm_sum_rows_kernel(a_ptr, b_ptr, T, C, ROWS, CHUNKS, part_a_ptr, part_b_ptr, lock_ptr, a_out_ptr, b_out_ptr,
                        ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, LAST_SUMS: tl.constexpr):
    """Column sums of two [T, C] arrays -> [C] (bn_grad_sums). Without LAST_SUMS one program per channel block
    sums all T rows. With LAST_SUMS, program (channel block, chunk) sums rows [chunk * ROWS, +ROWS) into row
    `chunk` of the [CHUNKS, C] part arrays, and the last of a channel block's CHUNKS programs to finish (a ticket,
    as in the reduce kernel: barrier, then an acq_rel atomic at GPU scope; it resets the counter) adds those rows
    up in chunk order: deterministic, one launch, no program looping over more than max(ROWS, CHUNKS) rows."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    if LAST_SUMS:
        chunk = tl.program_id(1)
        first = chunk * ROWS
        _sum_partial_rows(a_ptr + first * C, b_ptr + first * C, tl.minimum(T - first, ROWS), C, c, cm,
                          part_a_ptr + chunk * C, part_b_ptr + chunk * C, ACC, BLOCK_T, BLOCK_C)
        tl.debug_barrier()  # every thread's row stored before the ticket releases it
        ticket = tl.atomic_add(lock_ptr + tl.program_id(0), 1, sem="acq_rel", scope="gpu")
        if ticket == CHUNKS - 1:
            _sum_partial_rows(part_a_ptr, part_b_ptr, CHUNKS, C, c, cm, a_out_ptr, b_out_ptr, ACC, BLOCK_T, BLOCK_C)
            tl.atomic_xchg(lock_ptr + tl.program_id(0), 0, sem="relaxed", scope="gpu")
    else:
        _sum_partial_rows(a_ptr, b_ptr, T, C, c, cm, a_out_ptr, b_out_ptr, ACC, BLOCK_T, BLOCK_C)


@triton.jit
def _batch_norm_act_bwd_apply_kernel(
    dy_ptr, z_ptr, res_ptr, off_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, sum_g_ptr, sum_gx_ptr, dz_ptr, dres_ptr,
    dbeta_ptr, dgamma_ptr,
    P, C, H, W, eps,
    sdn, sdc, sdh, sdw, szn, szc, szh, szw, srn, src, srh, srw, sxn, sxc, sxh, sxw, sqn, sqc, sqh, sqw,
    son, soc, soh, sow, OH, OW, KH, KW, NH, NW, pool_sh, pool_sw, pool_ph, pool_pw, pool_dh, pool_dw,
    HAS_AFFINE: tl.constexpr, HAS_RES: tl.constexpr, WANT_DRES: tl.constexpr, WRITE_PARAM_GRADS: tl.constexpr,
    ACT: tl.constexpr, ACT_BITS: tl.constexpr, POOL: tl.constexpr, ACC: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dz (and the residual's gradient g). WRITE_PARAM_GRADS: the first pixel tile's programs also store the sums
    (fp32 / fp64, as accumulated) cast to the BatchNorm parameters' dtype, dbeta = sum_g, dgamma = sum_gx: the
    parameter gradients without a cast launch."""
    p0 = tl.program_id(0) * BLOCK_P
    n, h, w, c, mask = _bn_tile(p0, tl.program_id(1) * BLOCK_C, P, C, H, W, IDX64, BLOCK_P, BLOCK_C)
    mean, invstd, gamma, beta = _bn_coefficients(c, C, mean_ptr, var_ptr, w_ptr, b_ptr, eps, HAS_AFFINE, ACC)
    g, xhat = _bn_grad_u(dy_ptr, z_ptr, res_ptr, off_ptr, p0, P, C, n, h, w, c, mask, mean, invstd, gamma, beta,
                         sdn, sdc, sdh, sdw, szn, szc, szh, szw, srn, src, srh, srw, son, soc, soh, sow,
                         OH, OW, KH, KW, NH, NW, pool_sh, pool_sw, pool_ph, pool_pw, pool_dh, pool_dw,
                         HAS_RES, ACT, ACT_BITS, POOL, ACC, IDX64, BLOCK_P, BLOCK_C)
    cm = c < C
    sum_g = tl.load(sum_g_ptr + c, mask=cm, other=0.0).to(ACC)
    sum_gx = tl.load(sum_gx_ptr + c, mask=cm, other=0.0).to(ACC)
    if WRITE_PARAM_GRADS:
        if tl.program_id(0) == 0:
            _store_cast(dbeta_ptr + c, sum_g, cm)
            _store_cast(dgamma_ptr + c, sum_gx, cm)
    mean_g = sum_g / P
    mean_gx = sum_gx / P
    dz = (gamma * invstd)[None, :] * (g - mean_g[None, :] - xhat * mean_gx[None, :])
    tl.store(dz_ptr + (n * sxn + h * sxh + w * sxw)[:, None] + (c * sxc)[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=mask)
    if WANT_DRES:
        tl.store(dres_ptr + (n * sqn + h * sqh + w * sqw)[:, None] + (c * sqc)[None, :],
                 g.to(dres_ptr.dtype.element_ty), mask=mask)


# Finalize: each program merges at most COMBINE_ROWS partial rows (COMBINE_ROWS / COMBINE_BLOCK_T = 16 loop
# steps); more rows take another level of the same kernel over the chunks' results.
COMBINE_BLOCK_T, COMBINE_BLOCK_C = 64, 32
COMBINE_ROWS = 16 * COMBINE_BLOCK_T
# BatchNorm backward reduction: at most this many BLOCK_P steps per program (more pixels, more splits; the splits'
# partial rows are added up by the last program, COMBINE_BLOCK_T rows per step).
REDUCE_MAX_STEPS = 256


def _momentum_parts(momentum: float) -> tuple[float, float]:
    """A float momentum (or eps) as fp32 hi + lo (Triton passes float scalars as fp32): their sum in fp64 is the
    float to about 48 bits, so fp64 running statistics see the same factor as nn.BatchNorm2d."""
    def fp32(v: float) -> float:
        return struct.unpack("f", struct.pack("f", v))[0]

    hi = fp32(momentum)
    return hi, fp32(momentum - hi)


def finalize(stats, channels: int, bias: torch.Tensor | None = None, running=None, fold=None):
    """(count, mean, M2) partials [T, C] of the bias-free conv output -> per-channel batch mean (bias
    added) and biased variance, by a tree of _batch_norm_combine_kernel levels (no long serial loop).

    running: None or (running_mean, running_var, momentum, momentum_tensor[, num_batches_tracked]): the tree's last
    pass also updates the running statistics in place (unbiased variance), with momentum_tensor (0-dim, read in
    the kernel) when it is not None, else the float momentum, and adds 1 to num_batches_tracked when given (a
    float momentum only: the counter is then read by nothing in the launch).

    fold: None or (bn_weight, bn_bias, eps) of this BatchNorm (weight / bias may be None): the last pass also
    writes its per-channel (scale, shift) for the next conv's prologue, returned as (mean, var, scale, shift)."""
    cnt, mean_p, m2_p = stats
    check_runnable(cnt)
    mean = torch.empty(channels, device=cnt.device, dtype=cnt.dtype)
    var = torch.empty_like(mean)
    blocks_c = cdiv(channels, COMBINE_BLOCK_C)
    T = cnt.shape[0]
    no_running = (mean, mean, mean, 0.0, 0.0, mean)
    no_fold = (mean, mean, 0.0, 0.0, mean, mean)
    no_fold_flags = dict(FOLD=False, HAS_GAMMA=False, HAS_BETA=False)
    while T > COMBINE_ROWS:
        chunks = cdiv(T, COMBINE_ROWS)
        out = [_conv.workspace((chunks, channels), cnt.device, cnt.dtype) for _ in range(3)]
        run(_batch_norm_combine_kernel, (blocks_c, chunks), cnt, mean_p, m2_p, T, channels, COMBINE_ROWS, *out, mean,
            *no_running, *no_fold, device=cnt.device, loop=cdiv(COMBINE_ROWS, COMBINE_BLOCK_T),
            FINAL=False, HAS_BIAS=False, RUNNING=False, MOMENTUM_TENSOR=False, COUNT=False, **no_fold_flags,
            BLOCK_T=COMBINE_BLOCK_T, BLOCK_C=COMBINE_BLOCK_C)
        (cnt, mean_p, m2_p), T = out, chunks
    running_args, momentum_tensor, count = no_running, False, None
    if running is not None:
        run_mean, run_var, momentum, mom_t, *rest = running
        count = rest[0] if rest else None
        check_runnable(run_mean, run_var)
        momentum_tensor = mom_t is not None
        if momentum_tensor and count is not None:
            raise ValueError("finalize: num_batches_tracked is counted in the kernel only with a float momentum")
        if momentum_tensor:
            mom_t = mom_t if mom_t.device == cnt.device else mom_t.to(cnt.device)
            running_args = (run_mean, run_var, mom_t, 0.0, 0.0, mean)
        else:
            running_args = (run_mean, run_var, mean, *_momentum_parts(momentum),
                            count if count is not None else mean)
    fold_args, fold_flags = no_fold, no_fold_flags
    if fold is not None:
        gamma, beta, eps = fold
        scale, shift = torch.empty_like(mean), torch.empty_like(mean)
        fold_args = (gamma.contiguous() if gamma is not None else mean, beta.contiguous() if beta is not None else mean,
                     *_momentum_parts(float(eps)), scale, shift)
        fold_flags = dict(FOLD=True, HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None)
    run(_batch_norm_combine_kernel, (blocks_c, 1), cnt, mean_p, m2_p, T, channels, COMBINE_ROWS,
        mean, mean, var, bias if bias is not None else mean, *running_args, *fold_args,
        device=cnt.device, loop=cdiv(T, COMBINE_BLOCK_T),
        FINAL=True, HAS_BIAS=bias is not None, RUNNING=running is not None, MOMENTUM_TENSOR=momentum_tensor,
        COUNT=count is not None,
        **fold_flags, BLOCK_T=COMBINE_BLOCK_T, BLOCK_C=COMBINE_BLOCK_C)
    return (mean, var) if fold is None else (mean, var, fold_args[4], fold_args[5])


def reduce_splits(P: int, C: int, device: torch.device) -> int:
    """Pixel splits of the backward reduction: enough programs for ~4 per SM, and never more than
    REDUCE_MAX_STEPS BLOCK_P steps per program."""
    fill = (4 * sm_count(device)) // cdiv(C, BLOCK_C)
    return max(1, cdiv(P, REDUCE_MAX_STEPS * BLOCK_P), min(cdiv(P, 4 * BLOCK_P), fill))


def _affine_args(weight, bias, fallback):
    return (weight if weight is not None else fallback), (bias if bias is not None else fallback)


def batch_norm_act_forward(z, mean, var, weight, bias, eps: float, activation: str,
                           residual: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
                           act_bits: torch.Tensor | None = None, force_int64: bool = False,
                           residual_affine=None) -> torch.Tensor:
    """y = act((z - mean) / sqrt(var + eps) * weight + bias [+ residual]) over [N, C, H, W] z. act_bits: an int32
    tensor of fastconv._act_bits' shape to receive act'(u) as bits (a mask activation), for the backward.
    residual_affine = (scale, shift), per-channel vectors: the residual enters as residual * scale + shift (a
    projection shortcut's z and its BatchNorm folded)."""
    if residual_affine is not None and residual is None:
        raise ValueError("batch_norm_act_forward: residual_affine scales a residual, which is missing")
    check_runnable(z)
    N, C, H, W = z.shape
    y = out if out is not None else torch.empty_like(z)
    P = N * H * W
    if y.numel() == 0:
        return y
    res = residual if residual is not None else z
    w, b = _affine_args(weight, bias, mean)
    run(_batch_norm_act_fwd_kernel, (cdiv(P, BLOCK_P), cdiv(C, BLOCK_C)),
        z, y, res, act_bits if act_bits is not None else y, mean, var, w, b,
        *(residual_affine if residual_affine is not None else (mean, mean)), P, C, H, W, eps,
        *z.stride(), *y.stride(), *res.stride(),
        device=z.device,
        HAS_AFFINE=weight is not None, HAS_RES=residual is not None, ACT=ACTIVATIONS[activation],
        ACT_BITS=act_bits is not None, ACC=acc_dtype(z.dtype), IDX64=force_int64 or needs_int64(z, y, residual),
        BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, RES_AFFINE=residual_affine is not None,
    )
    return y


def bn_grad_sums(partial_g: torch.Tensor, partial_gx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, C] partial sums (conv2d_input_grad's BN_GRAD rows) -> their column sums [C], in a fixed order
    (deterministic), in one launch: up to COMBINE_ROWS rows by one program per channel block, more in chunks of
    at least COMBINE_ROWS rows whose last program adds the chunk sums up (_batch_norm_sum_rows_kernel)."""
    T, C = partial_g.shape
    device, acc = partial_g.device, partial_g.dtype
    out_g, out_gx = (_conv.workspace((C,), device, acc) for _ in range(2))
    if T == 0:
        return out_g.zero_(), out_gx.zero_()
    rows = max(COMBINE_ROWS, cdiv(cdiv(T, COMBINE_ROWS), COMBINE_BLOCK_T) * COMBINE_BLOCK_T)
    chunks = cdiv(T, rows)
    if chunks > 1:
        part_g, part_gx = (_conv.workspace((chunks, C), device, acc) for _ in range(2))
        locks = ticket_counters(device, cdiv(C, COMBINE_BLOCK_C))
    else:
        part_g = part_gx = locks = out_g  # never touched
    run(_batch_norm_sum_rows_kernel, (cdiv(C, COMBINE_BLOCK_C), chunks), partial_g, partial_gx, T, C, rows, chunks,
        part_g, part_gx, locks, out_g, out_gx, device=device,
        loop=cdiv(min(T, rows), COMBINE_BLOCK_T) + (cdiv(chunks, COMBINE_BLOCK_T) if chunks > 1 else 0),
        ACC=acc_dtype(acc), BLOCK_T=COMBINE_BLOCK_T, BLOCK_C=COMBINE_BLOCK_C, LAST_SUMS=chunks > 1)
    return out_g, out_gx


def conv2d_input_grad_bn_act(grad_out, weight, z, mean, var, bn_weight, bn_bias, eps: float, activation: str,
                             stride, padding, dilation, groups: int, *, out=None, param_dtypes=None,
                             force_int64: bool = False):
    """The gradient of the producer's z through x = act(bn(z)) (training mode, z's batch statistics mean / var)
    and conv(x, weight): (grad_z, sum_g, sum_gx) as batch_norm_act_backward returns them (dbeta = sum_g, dgamma =
    sum_gx). Three launches and no separate reduce pass: the dgrad writes dx laid out like z and its tiles' BatchNorm
    sums (conv2d_input_grad's bn), bn_grad_sums adds the tile rows up, the apply pass makes grad_z (in place of dx,
    in `out` if given). Where the epilogue does not apply (conv2d.bn_grad_fusable), the dgrad and the two passes
    of batch_norm_act_backward."""
    check_runnable(grad_out, weight, z)
    dx = out if out is not None else torch.empty_like(z)
    if not _conv.bn_grad_fusable(grad_out, weight, z, activation, force_int64):
        _conv.conv2d_input_grad(grad_out, weight, tuple(z.shape), stride, padding, dilation, groups, out=dx,
                                force_int64=force_int64)
        grad_z, sum_g, sum_gx, _ = batch_norm_act_backward(dx, z, mean, var, bn_weight, bn_bias, eps, activation,
                                                           grad_z=dx, param_dtypes=param_dtypes,
                                                           force_int64=force_int64)
        return grad_z, sum_g, sum_gx
    dx, partials = _conv.conv2d_input_grad(grad_out, weight, tuple(z.shape), stride, padding, dilation, groups,
                                           out=dx, bn=(z, mean, var, bn_weight, bn_bias, eps, activation),
                                           force_int64=force_int64)
    grad_z, sum_g, sum_gx, _ = batch_norm_act_backward(dx, z, mean, var, bn_weight, bn_bias, eps, activation,
                                                       grad_z=dx, sums=bn_grad_sums(*partials),
                                                       param_dtypes=param_dtypes, force_int64=force_int64)
    return grad_z, sum_g, sum_gx


def _reduce(grad_y, z, res, res_strides, offsets, mean, var, w, b, eps, pool_args, splits, common):
    """The backward's reduce pass: (sum_g, sum_gx) [C] over all pixels."""
    N, C, H, W = z.shape
    P = N * H * W
    acc = accumulation_dtype(z.dtype)
    if splits is None:
        splits = reduce_splits(P, C, z.device)
    per_split = cdiv(cdiv(P, splits), BLOCK_P) * BLOCK_P
    splits = cdiv(P, per_split)
    # One split writes the sums themselves ([C]); more write [splits, C] partials, which the last program of each
    # channel block adds up into the [C] sums (LAST_SUMS).
    sum_g_p = _conv.workspace((splits, C) if splits > 1 else (C,), z.device, acc)
    sum_gx_p = _conv.workspace(sum_g_p.shape, z.device, acc)
    if splits > 1:
        sum_g_acc, sum_gx_acc = (_conv.workspace((C,), z.device, acc) for _ in range(2))
        locks = ticket_counters(z.device, cdiv(C, BLOCK_C))
    else:
        sum_g_acc, sum_gx_acc, locks = sum_g_p, sum_gx_p, sum_g_p
    run(_batch_norm_act_bwd_reduce_kernel, (cdiv(C, BLOCK_C), splits),
        grad_y, z, res, offsets, mean, var, w, b, sum_g_p, sum_gx_p, locks, sum_g_acc, sum_gx_acc,
        P, C, H, W, eps, per_split, splits, *grad_y.stride(), *z.stride(), *res_strides, *pool_args,
        device=z.device, loop=cdiv(per_split, BLOCK_P) + cdiv(splits, COMBINE_BLOCK_T) * (splits > 1),
        LAST_SUMS=splits > 1, BLOCK_T=COMBINE_BLOCK_T, **common,
    )
    return sum_g_acc, sum_gx_acc


def batch_norm_act_backward(grad_y, z, mean, var, weight, bias, eps: float, activation: str,
                            residual: torch.Tensor | None = None, *, want_dres: bool = False,
                            grad_z: torch.Tensor | None = None, grad_res: torch.Tensor | None = None,
                            splits: int | None = None, force_int64: bool = False,
                            param_dtypes: tuple[torch.dtype, torch.dtype] | None = None, pool=None, sums=None,
                            act_bits: torch.Tensor | None = None):
    """Returns (grad_z, sum_g, sum_gx, grad_residual or None); dgamma = sum_gx, dbeta = sum_g, accumulated in
    fp32 (fp64 for fp64) and returned in param_dtypes = (sum_g's, sum_gx's) when given (the BatchNorm bias's and
    weight's dtypes): the apply pass stores them cast, no separate cast launch.

    pool: None, or (offsets, kernel_size, stride, padding, dilation) when y was max-pooled
    (batch_norm_act_pool): grad_y is then the pooled output's gradient, gathered per pixel in both passes
    through the argmax taps `offsets` (no residual).
    sums: (sum_g, sum_gx) [C] worked out already (conv2d_input_grad_bn_act): no reduce pass, only the apply pass.
    act_bits: act'(u) as the forward stored it (batch_norm_act_forward's act_bits): read instead of recomputing u,
    so the residual is not read (and may be None).
    grad_z may be grad_y itself (each element is read before it is overwritten, by the same program)."""
    check_runnable(grad_y, z)
    N, C, H, W = z.shape
    P = N * H * W
    dz = grad_z if grad_z is not None else torch.empty_like(z)
    dres = (grad_res if grad_res is not None else torch.empty_like(z)) if want_dres else None
    acc = accumulation_dtype(z.dtype)
    g_dtype, gx_dtype = param_dtypes if param_dtypes is not None else (acc, acc)
    if P == 0:
        return dz, torch.zeros(C, device=z.device, dtype=g_dtype), torch.zeros(C, device=z.device, dtype=gx_dtype), dres
    if act_bits is not None:
        residual = None  # act' comes from the bits, read through the residual's pointer
    res = act_bits if act_bits is not None else residual if residual is not None else z
    res_strides = (residual if residual is not None else z).stride()  # unused with the bits
    w, b = _affine_args(weight, bias, mean)
    if pool is not None:
        offsets, kernel_size, stride, padding, dilation = pool
        pool_args = (*offsets.stride(), *grad_y.shape[2:], *kernel_size, *candidate_windows(kernel_size, stride, dilation),
                     *stride, *padding, *dilation)
    else:
        offsets, pool_args = z, (0,) * 16
    common = dict(HAS_AFFINE=weight is not None, HAS_RES=residual is not None, ACT=ACTIVATIONS[activation],
                  ACT_BITS=act_bits is not None, POOL=pool is not None, ACC=acc_dtype(z.dtype),
                  IDX64=force_int64 or needs_int64(z, grad_y, residual), BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
    if sums is None:
        sum_g_acc, sum_gx_acc = _reduce(grad_y, z, res, res_strides, offsets, mean, var, w, b, eps, pool_args, splits,
                                        common)
    else:
        sum_g_acc, sum_gx_acc = sums
    sum_g, sum_gx = sum_g_acc, sum_gx_acc
    dres_t = dres if dres is not None else dz
    cast = (g_dtype, gx_dtype) != (acc, acc)
    if cast:  # written by the apply pass (every element: its first pixel tile covers all channels)
        sum_g = _conv.workspace((C,), z.device, g_dtype)
        sum_gx = _conv.workspace((C,), z.device, gx_dtype)
        dbeta, dgamma = sum_g, sum_gx
    run(_batch_norm_act_bwd_apply_kernel, (cdiv(P, BLOCK_P), cdiv(C, BLOCK_C)),
        grad_y, z, res, offsets, mean, var, w, b, sum_g_acc, sum_gx_acc, dz, dres_t,
        *((dbeta, dgamma) if cast else (sum_g, sum_gx)), P, C, H, W, eps,
        *grad_y.stride(), *z.stride(), *res_strides, *dz.stride(), *dres_t.stride(), *pool_args,
        device=z.device, WANT_DRES=want_dres, WRITE_PARAM_GRADS=cast, **common,
    )
    return dz, sum_g, sum_gx, dres
