"""Triton conv2d: implicit-GEMM forward with fused epilogue, dgrad and split-K wgrad.

Forward as a GEMM (per group g):  Y[m, co] = sum_k X_col[m, k] * W[k, co]
    m  = (n, oh, ow)        over N*OH*OW output pixels
    co                      over C_out/groups output channels
    k  = (kh, kw, ci)       over KH*KW*C_in/groups, walked as one flat loop over (kh, kw, ci block) so that
                            no column buffer exists: the X tile for (kh, kw) is gathered straight from x at
                            ih = oh*stride - pad + kh*dilation (zero outside the image).
Every tensor is read and written through its strides; the launchers make the operands of the GEMM loops
channel-contiguous (channels_last copies of NCHW inputs, see _common.channels_contiguous) and outputs keep the
caller's layout. Index math switches to int64 when any tensor passes 2**31 elements.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _act_bits
from .._activations import MASK_ACTIVATIONS
from .._args import accumulation_dtype, conv_output_size
from ._common import (
    cdiv,
    ACTIVATIONS,
    acc_dtype,
    channels_contiguous,
    channels_strided,
    check_runnable,
    dot_precision,
    interpreting,
    meta_like,
    meta_operand,
    needs_int64,
    noted,
    PlanCache,
    ticket_counters,
    upcast_dot_operands,
)
from ._epilogue import (
    _column_halves,
    _vector_halves,
    activation,
    store_bn_grad_sums,
    epilogue_store,
    fold_bias,
    grouped_tile,
    pixel_coords,
    residual_like,
    split_store,
    store_tile,
    tile_rows,
)
from .launch import SPLIT_K_ALIGN, SPLIT_K_MAX, Problem, TunedKernel, memo_id, run, sm_count

@triton.jit
def _conv2d_fwd_kernel(
    x_ptr, w_ptr, y_ptr, bias_ptr, scale_ptr, shift_ptr, res_ptr,
    in_scale_ptr, in_shift_ptr,  # PROLOGUE per-input-channel coefficients [C_in] (else dummies)
    M, H, W, OH, OW, CIN_G, COUT_G, KH, KW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sxn, sxc, sxh, sxw,
    swo, swc, swh, sww,
    syn, syc, syh, syw,
    cnt_ptr, mean_ptr, m2_ptr,  # STATS partials [cdiv(M, BLOCK_M), C_out], passed by keyword (stats_scratch)
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RES: tl.constexpr,
    ACT: tl.constexpr, STATS: tl.constexpr, ACC_TYPE: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, IDX64: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_N: tl.constexpr,
    PROLOGUE: tl.constexpr, IN_ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y = epilogue(conv(x, w)); with PROLOGUE, x_ptr holds z and the A operand is x = act_IN_ACT(z * in_scale[c]
    + in_shift[c]) (prologue_tile), so the previous block's normalised output is never materialised."""
    g = tl.program_id(1)
    tile_m, tile_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(COUT_G, BLOCK_N), GROUP_M)
    if IDX64:
        g = g.to(tl.int64)
    offs_m, mask_m = tile_rows(tile_m * BLOCK_M, BLOCK_M, M, IDX64)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < COUT_G
    n, oh, ow = pixel_coords(offs_m, OH, OW, IDX64)
    co = g * COUT_G + offs_n
    # Row (pixel) and column (output channel) parts of the addresses are 1-D vectors built once; each step
    # of the flat (kh, kw, ci-block) loop adds a scalar to them and broadcasts to the 2-D tile at the load.
    # Coordinates stay int32 (|ih| < H + pad); only the address sums go int64 on the IDX64 path.
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_rows = n * sxn + ih0 * sxh + iw0 * sxw + (g * CIN_G) * sxc
    w_cols = co * swo
    ih0 = ih0.to(tl.int32)
    iw0 = iw0.to(tl.int32)
    k_xc = offs_k * sxc
    k_wc = offs_k * swc
    if PROLOGUE:  # the group's first input channel; the loop adds c0 + offs_k
        in_scale_ptr += g * CIN_G
        in_shift_ptr += g * CIN_G

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_TYPE)
    # The flat loop's position (kh, kw, c0) is carried and stepped like an odometer (c0 fastest) rather than
    # divided out of t: no integer divisions by runtime values per step.
    kh = 0
    kw = 0
    c0 = 0
    for t in range(KH * KW * tl.cdiv(CIN_G, BLOCK_K)):
        dh = kh * dil_h
        dw = kw * dil_w
        ih = ih0 + dh
        iw = iw0 + dw
        row_ok = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        ci_ok = offs_k < CIN_G - c0
        if IDX64:
            a_rows = x_rows + (dh.to(tl.int64) * sxh + dw.to(tl.int64) * sxw + c0.to(tl.int64) * sxc)
            b_cols = w_cols + (kh.to(tl.int64) * swh + kw.to(tl.int64) * sww + c0.to(tl.int64) * swc)
        else:
            a_rows = x_rows + (dh * sxh + dw * sxw + c0 * sxc)
            b_cols = w_cols + (kh * swh + kw * sww + c0 * swc)
        a = tl.load(x_ptr + a_rows[:, None] + k_xc[None, :], mask=row_ok[:, None] & ci_ok[None, :], other=0.0)
        if PROLOGUE:
            s = tl.load(in_scale_ptr + c0 + offs_k, mask=ci_ok, other=0.0)
            t = tl.load(in_shift_ptr + c0 + offs_k, mask=ci_ok, other=0.0)
            a = prologue_tile(a, s, t, row_ok[:, None] & ci_ok[None, :], ACC_TYPE, IN_ACT)
        b = tl.load(w_ptr + b_cols[None, :] + k_wc[:, None], mask=ci_ok[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC_TYPE)
        kh, kw, c0 = _next_step(kh, kw, c0, BLOCK_K, CIN_G, KW)

    epilogue_store(
        acc, offs_m, OH, OW, mask_m, co, mask_n,
        y_ptr, syn, syc, syh, syw,
        bias_ptr, scale_ptr, shift_ptr, res_ptr,
        HAS_BIAS, HAS_SCALE, HAS_SHIFT, HAS_RES, ACT,
        tile_m, COUT_G * tl.num_programs(1), cnt_ptr, mean_ptr, m2_ptr, STATS, SPLIT_N, IDX64,
    )


@triton.jit
def prologue_tile(z, scale, shift, valid, ACC_TYPE: tl.constexpr, IN_ACT: tl.constexpr):
    """The PROLOGUE's GEMM operand from a loaded [pixels, channels] tile of z (the producer's pre-BN conv output):
    act(z * scale + shift) per channel, in ACC_TYPE, cast back to z's dtype. `scale` / `shift` run along the
    tile's second axis. Padding and out-of-range lanes are zeroed after the transform: the conv pads x, not z,
    and act(shift) is not 0 in general."""
    u = z.to(ACC_TYPE) * scale.to(ACC_TYPE)[None, :] + shift.to(ACC_TYPE)[None, :]
    return tl.where(valid, activation(u, IN_ACT), 0.0).to(z.dtype)


@triton.jit
def _next_step(outer, inner, c0, BLOCK_K: tl.constexpr, C, INNER):
    """Advance the (outer tap, inner tap, channel block) position of a flat conv GEMM loop by one step:
    channel blocks fastest, then the inner tap (wrapping at INNER), then the outer one."""
    c0 += BLOCK_K
    wrap_c = c0 >= C
    c0 = tl.where(wrap_c, 0, c0)
    inner += wrap_c.to(tl.int32)
    wrap_t = inner >= INNER
    inner = tl.where(wrap_t, 0, inner)
    outer += wrap_t.to(tl.int32)
    return outer, inner, c0


@triton.jit
def _first_tap(r, pad, dil, K, STRIDE: tl.constexpr):
    """The taps k in [0, K) with (r + pad - k*dil) % STRIDE == 0 are k0, k0 + step, ...: returns
    (k0, step, count). The solutions form one residue class modulo step = STRIDE / gcd(STRIDE, dil), so
    the first lies below STRIDE."""
    k0 = K
    for t in tl.static_range(STRIDE - 1, -1, -1):
        k0 = tl.where(((r + pad - t * dil) % STRIDE == 0) & (t < K), t, k0)
    step = STRIDE
    for t in tl.static_range(STRIDE - 1, 0, -1):
        step = tl.where((t * dil) % STRIDE == 0, t, step)
    count = tl.where(k0 < K, (K - k0 + step - 1) // step, 0)
    return k0, step, count


@triton.jit
def _conv2d_dgrad_kernel(
    dy_ptr, w_ptr, dx_ptr,
    MP, H, W, OH, OW, HP, WP, CIN_G, COUT_G, KH, KW,
    stride_h: tl.constexpr, stride_w: tl.constexpr, pad_h, pad_w, dil_h, dil_w,
    sdyn, sdyc, sdyh, sdyw,
    swo, swc, swh, sww,
    sdxn, sdxc, sdxh, sdxw,
    # ADD: the tensor t added to dx (any strides) and, with ADD == 2, its act' bits (fastconv._act_bits; else dummies)
    add_ptr, san, sac, sah, saw, add_bits_ptr,
    # BN_GRAD: x = act(bn(z)) of the producer's z, its batch statistics and affine (else dummies)
    z_ptr, szn, szc, szh, szw, bn_mean_ptr, bn_var_ptr, bn_w_ptr, bn_b_ptr, bn_eps,
    sum_g_ptr, sum_gx_ptr,  # BN_GRAD partials [stride phases * row tiles, C_in], by keyword (bn_grad_scratch)
    ACC_TYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    IDX64: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_N: tl.constexpr,
    BN_GRAD: tl.constexpr, BN_AFFINE: tl.constexpr, BN_ACT: tl.constexpr, ADD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx[n, ci, h, w] = sum_{co, kh, kw} dy[n, co, oh, ow] * w[co, ci, kh, kw], where
    h = oh*stride - pad + kh*dil.

    Stride phases: input pixels are split into stride_h*stride_w classes (h % stride_h, w % stride_w).
    Within one class, whether tap kh reaches an output row does not depend on the pixel, so each program
    (one class, one tile) walks only the taps that do (an arithmetic progression, see _first_tap) instead of
    masking (stride-1)/stride of its loads, and oh = i + (rh + pad - kh*dil) / stride exactly. Every input
    pixel lies in exactly one class, so each dx element is written once, zeros included.

    BN_GRAD (a chain of fused blocks, see ops.conv_bn_chain): x was act(bn(z)) of the producer's pre-BatchNorm z,
    so dx is followed by BatchNorm's training-mode backward, whose first pass needs per channel the sums of
    g = dx * act'(u) and g * xhat over all pixels. This program adds up its own tile's (store_bn_grad_sums) into
    row (phase, row tile) of the partials: the backward's separate reduce pass over dx and z is not needed.

    ADD (a residual block's backward, see conv2d_input_grad's `add`): 1 stores dx = dgrad + t, 2 stores
    dx = dgrad + (t where act' else 0), act' the bit of (pixel, channel) in add_bits_ptr (fastconv._act_bits layout);
    t is read through its own strides (san, sac, sah, saw), the sum taken in ACC_TYPE and cast once on the store
    (_add_store). t must not overlap dx: the autotuner runs every tile on the real buffers, so an in-place add
    would be applied once per tile tried.
    """
    pid_pg = tl.program_id(1)
    phase = pid_pg % (stride_h * stride_w)
    g = pid_pg // (stride_h * stride_w)
    rh = phase // stride_w
    rw = phase % stride_w
    tile_m, tile_n = grouped_tile(tl.program_id(0), tl.cdiv(MP, BLOCK_M), tl.cdiv(CIN_G, BLOCK_N), GROUP_M)
    if IDX64:
        g = g.to(tl.int64)
    offs_m, in_grid = tile_rows(tile_m * BLOCK_M, BLOCK_M, MP, IDX64)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # m -> (n, i, j) over the phase's sub-grid; the pixel is (rh + i*stride_h, rw + j*stride_w).
    n, i, j = pixel_coords(offs_m, HP, WP, IDX64)
    mask_m = in_grid & (rh + i * stride_h < H) & (rw + j * stride_w < W)
    mask_n = offs_n < CIN_G
    # 1-D address parts, built once: dy at (n, oh = i, ow = j) and w at (g*COUT_G, offs_n); each step of the
    # flat (tap, co-block) loop adds scalars and broadcasts to the 2-D tiles at the load.
    dy_rows = n * sdyn + i * sdyh + j * sdyw + (g * COUT_G) * sdyc
    w_cols = (g * COUT_G) * swo + offs_n * swc
    i = i.to(tl.int32)
    j = j.to(tl.int32)
    k_dyc = offs_k * sdyc
    k_wo = offs_k * swo
    kh0, step_h, count_h = _first_tap(rh, pad_h, dil_h, KH, stride_h)
    kw0, step_w, count_w = _first_tap(rw, pad_w, dil_w, KW, stride_w)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_TYPE)
    # (th, tw, c0) odometer as in the forward loop; the tap is (kh0 + th*step_h, kw0 + tw*step_w).
    th = 0
    tw = 0
    c0 = 0
    for t in range(count_h * count_w * tl.cdiv(COUT_G, BLOCK_K)):
        kh = kh0 + th * step_h
        kw = kw0 + tw * step_w
        dh = (rh + pad_h - kh * dil_h) // stride_h  # exact: the tap belongs to this phase
        dw = (rw + pad_w - kw * dil_w) // stride_w
        oh = i + dh
        ow = j + dw
        row_ok = mask_m & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
        co_ok = offs_k < COUT_G - c0
        if IDX64:
            a_rows = dy_rows + (dh.to(tl.int64) * sdyh + dw.to(tl.int64) * sdyw + c0.to(tl.int64) * sdyc)
            b_cols = w_cols + (kh.to(tl.int64) * swh + kw.to(tl.int64) * sww + c0.to(tl.int64) * swo)
        else:
            a_rows = dy_rows + (dh * sdyh + dw * sdyw + c0 * sdyc)
            b_cols = w_cols + (kh * swh + kw * sww + c0 * swo)
        a = tl.load(dy_ptr + a_rows[:, None] + k_dyc[None, :], mask=row_ok[:, None] & co_ok[None, :], other=0.0)
        b = tl.load(w_ptr + b_cols[None, :] + k_wo[:, None], mask=co_ok[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC_TYPE)
        th, tw, c0 = _next_step(th, tw, c0, BLOCK_K, COUT_G, count_w)

    n, i, j = pixel_coords(offs_m, HP, WP, IDX64)
    ph = rh + i * stride_h  # the rows' input pixels (n, ph, pw)
    pw = rw + j * stride_w
    dx_rows = n * sdxn + ph * sdxh + pw * sdxw
    groups = tl.num_programs(1) // (stride_h * stride_w)
    if ADD != 0:
        _add_store(acc, n, ph, pw, dx_rows, g * CIN_G + offs_n, mask_m, mask_n, dx_ptr, sdxc,
                   add_ptr, san, sac, sah, saw, add_bits_ptr, H, W, CIN_G * groups, ADD, SPLIT_N)
    else:
        store_tile(acc, dx_rows, g * CIN_G + offs_n, mask_m, mask_n, dx_ptr, sdxc, dx_ptr, False, 0, SPLIT_N)
    if BN_GRAD:
        z_rows = n * szn + ph * szh + pw * szw
        store_bn_grad_sums(acc, z_rows, g * CIN_G + offs_n, mask_m, mask_n, phase * tl.cdiv(MP, BLOCK_M) + tile_m,
                           CIN_G * groups, dx_ptr, z_ptr, szc, bn_mean_ptr, bn_var_ptr, bn_w_ptr, bn_b_ptr, bn_eps,
                           sum_g_ptr, sum_gx_ptr, BN_AFFINE, BN_ACT)


@triton.jit
def _add_store(acc, n, h, w, dx_rows, c, mask_m, mask_n, dx_ptr, sdxc, add_ptr, san, sac, sah, saw, bits_ptr, H, W, C,
               ADD: tl.constexpr, SPLIT_N: tl.constexpr):
    """The dgrad's ADD epilogue: dx[dx_rows[m] + c * sdxc] = acc + t[n, c, h, w] (ADD 1), or acc + (t[n, c, h, w]
    where act'(p, c) else 0) (ADD 2: bit p % 32 of int32 word [p // 32, c] of bits_ptr, p = (n*H + h)*W + w; a
    select, not a product, so that a non-finite t where act' is 0 adds 0, as PyTorch's threshold backward passes
    none of it), summed in acc's dtype and cast to dx's once. t is read through its own strides: its 1-D row part
    is built here, after the main loop. With SPLIT_N (an NCHW dx, see store_tile) in four channel quarters, so that
    only a quarter of the tile's per-element addresses, t values and bit words are live at once (halves spilled).
    Never launched with IDX64: the kernel report measured spills there (ADD 1: 64 B on sm_80's pinned TF32 128x32
    tile; ADD 2: 16-140 B on sm_80's TF32 128x128, 128x64 and 128x32 tiles; splitting the columns made them
    worse), so conv2d_input_grad adds after the dgrad with PyTorch ops for tensors past 2**31 elements."""
    add_rows = n * san + h * sah + w * saw
    if ADD == 2:
        p = (n * H + h) * W + w  # >= 0
        word_rows = (p >> 5) * C
        bit = tl.full(p.shape, 1, tl.int32) << (p & 31).to(tl.int32)  # the pixel's bit within its words
    else:
        word_rows = add_rows  # unused
        bit = add_rows
    if SPLIT_N:
        acc_lo, acc_hi = _column_halves(acc)
        c_lo, c_hi = _vector_halves(c)
        ok_lo, ok_hi = _vector_halves(mask_n)
        _add_store_half(acc_lo, dx_rows, add_rows, word_rows, bit, c_lo, mask_m, ok_lo, dx_ptr, sdxc, add_ptr, sac,
                        bits_ptr, ADD)
        _add_store_half(acc_hi, dx_rows, add_rows, word_rows, bit, c_hi, mask_m, ok_hi, dx_ptr, sdxc, add_ptr, sac,
                        bits_ptr, ADD)
    else:
        _add_store_part(acc, dx_rows, add_rows, word_rows, bit, c, mask_m, mask_n, dx_ptr, sdxc, add_ptr, sac,
                        bits_ptr, ADD)


@triton.jit
def _add_store_half(acc, dx_rows, add_rows, word_rows, bit, c, mask_m, mask_n, dx_ptr, sdxc, add_ptr, sac, bits_ptr,
                    ADD: tl.constexpr):
    """One channel half of an NCHW (SPLIT_N) add, itself in two quarters: with the t tile (and the bit words)
    beside the accumulator, halves still spilled (100-576 B, kernel report add_NCHW / add_bits_NCHW)."""
    acc_lo, acc_hi = _column_halves(acc)
    c_lo, c_hi = _vector_halves(c)
    ok_lo, ok_hi = _vector_halves(mask_n)
    _add_store_part(acc_lo, dx_rows, add_rows, word_rows, bit, c_lo, mask_m, ok_lo, dx_ptr, sdxc, add_ptr, sac,
                    bits_ptr, ADD)
    _add_store_part(acc_hi, dx_rows, add_rows, word_rows, bit, c_hi, mask_m, ok_hi, dx_ptr, sdxc, add_ptr, sac,
                    bits_ptr, ADD)


@triton.jit
def _add_store_part(acc, dx_rows, add_rows, word_rows, bit, c, mask_m, mask_n, dx_ptr, sdxc, add_ptr, sac, bits_ptr,
                    ADD: tl.constexpr):
    mask = mask_m[:, None] & mask_n[None, :]
    t = tl.load(add_ptr + add_rows[:, None] + (c * sac)[None, :], mask=mask, other=0.0).to(acc.dtype)
    if ADD == 2:
        words = tl.load(bits_ptr + word_rows[:, None] + c[None, :], mask=mask, other=0)
        t = tl.where((words & bit[:, None]) != 0, t, 0.0)
    acc += t
    tl.store(dx_ptr + dx_rows[:, None] + (c * sdxc)[None, :], acc.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv2d_wgrad_kernel(
    dy_ptr, x_ptr,
    P, H, W, OH, OW, CIN_G, COUT_G, KH, KW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sdyn, sdyc, sdyh, sdyw,
    sxn, sxc, sxh, sxw,
    in_scale_ptr, in_shift_ptr,  # PROLOGUE per-input-channel coefficients [C_in] (else dummies)
    COUT, swo, swc, swh, sww,
    # per tile (the launcher's scratch, by keyword): where dw / db go, the split length, and with REDUCE_LAST the
    # final dw / db and the ticket counters
    dw_ptr, db_ptr, K_PER_SPLIT, dwf_ptr, dbf_ptr, lock_ptr,
    HAS_DBIAS: tl.constexpr, ACC_TYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    IDX64: tl.constexpr, PROLOGUE: tl.constexpr, IN_ACT: tl.constexpr, REDUCE_LAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dw for one K split:  dw[co, (kh, kw, ci)] = sum_p dy[co, p] * x_col[p, (kh, kw, ci)], the reduction over
    p = (n, oh, ow) cut into contiguous chunks of K_PER_SPLIT (grid axis 1), stored at dw_ptr[split, co, kh, kw, ci]
    in dw_ptr's dtype. One split into a channels_last weight: dw_ptr is the weight gradient itself (that layout;
    no other pass); else fp32 partials, and REDUCE_LAST: the last of a tile's splits to finish (a ticket: an atomic
    add on the tile's counter after a barrier, acq_rel at GPU scope, so every split's partial is visible to it)
    sums the tile's partials in split order (deterministic), casts them and stores dw through dwf_ptr's strides
    (swo, swc, swh, sww: the weight's own layout) and db into dbf_ptr, then resets the counter (zero between
    launches: _common.ticket_counters). No second launch.

    The bias gradient is the same reduction of dy alone: the programs at (kh, kw, ci-tile) == 0 also sum
    their dy tiles into db_ptr[split, co].

    With PROLOGUE, x_ptr holds z and x = act_IN_ACT(z * in_scale[c] + in_shift[c]) is rebuilt per tile
    (prologue_tile); a program's channels are fixed, so its scale/shift are loaded once.
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    g = tl.program_id(2)
    num_n = tl.cdiv(CIN_G, BLOCK_N)
    tile_m = pid // (KH * KW * num_n)
    rest = pid % (KH * KW * num_n)
    tap = rest // num_n
    tile_n = rest % num_n
    kh = tap // KW
    kw = tap % KW
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if IDX64:
        g = g.to(tl.int64)
    mask_m = offs_m < COUT_G
    mask_n = offs_n < CIN_G
    # The group's channel offset goes into the (64-bit scalar) base pointers; the per-channel parts stay int32
    # even on the IDX64 path: the launcher passes channel-contiguous dy and x (channels_contiguous), so a
    # valid element's offs * stride is below the channel count.
    dy_base = dy_ptr + (g * COUT_G) * sdyc
    x_base = x_ptr + (g * CIN_G) * sxc
    dy_cols = offs_m * sdyc
    x_cols = offs_n * sxc
    dh = kh * dil_h - pad_h
    dw = kw * dil_w - pad_w
    with_bias = (tap == 0) & (tile_n == 0)
    if PROLOGUE:
        in_s = tl.load(in_scale_ptr + g * CIN_G + offs_n, mask=mask_n, other=0.0)
        in_t = tl.load(in_shift_ptr + g * CIN_G + offs_n, mask=mask_n, other=0.0)
    # Pixel indices p = (n, oh, ow) take P's width (int64 only once P itself passes 2**31, which Triton's
    # launcher passes as i64): P * 0 promotes the chunk start.
    k_lo = (P * 0 + split) * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, P)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_TYPE)
    db = tl.zeros((BLOCK_M,), dtype=ACC_TYPE)
    for p0 in range(k_lo, k_hi, BLOCK_K):
        p, p_ok = tile_rows(p0, BLOCK_K, k_hi, IDX64)
        n, oh, ow = pixel_coords(p, OH, OW, IDX64)
        ih = oh * stride_h + dh
        iw = ow * stride_w + dw
        x_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        dy_p = n * sdyn + oh * sdyh + ow * sdyw
        x_p = n * sxn + ih * sxh + iw * sxw
        a = tl.load(dy_base + dy_cols[:, None] + dy_p[None, :], mask=mask_m[:, None] & p_ok[None, :], other=0.0)
        b = tl.load(x_base + x_p[:, None] + x_cols[None, :], mask=x_ok[:, None] & mask_n[None, :], other=0.0)
        if PROLOGUE:
            b = prologue_tile(b, in_s, in_t, x_ok[:, None] & mask_n[None, :], ACC_TYPE, IN_ACT)
        if HAS_DBIAS:
            if with_bias:
                db += tl.sum(a.to(ACC_TYPE), axis=1)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC_TYPE)

    # layout [SPLIT, COUT, KH, KW, CIN_G]
    co = g * COUT_G + offs_m
    if IDX64:
        split = split.to(tl.int64)
    row = (split * COUT + co) * (KH * KW) + tap
    off = (row * CIN_G)[:, None] + offs_n[None, :]
    tl.store(dw_ptr + off, acc.to(dw_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    if HAS_DBIAS:
        if with_bias:
            tl.store(db_ptr + split * COUT + co, db.to(db_ptr.dtype.element_ty), mask=mask_m)
    if REDUCE_LAST:
        tl.debug_barrier()  # every thread's partial stored before the ticket releases it
        lock = lock_ptr + g * tl.num_programs(0) + pid
        ticket = tl.atomic_add(lock, 1, sem="acq_rel", scope="gpu")
        if ticket == tl.num_programs(1) - 1:
            _wgrad_finish(dw_ptr, db_ptr, dwf_ptr, dbf_ptr, g, tile_m * BLOCK_M, offs_n, tap, kh, kw, mask_n,
                          with_bias, tl.num_programs(1), COUT, COUT_G, CIN_G, KH, KW, swo, swc, swh, sww, HAS_DBIAS,
                          BLOCK_M, BLOCK_N, 16)
            tl.atomic_xchg(lock, 0, sem="relaxed", scope="gpu")


@triton.jit
def _wgrad_finish(part_ptr, dbp_ptr, dw_ptr, db_ptr, g, m_lo, offs_n, tap, kh, kw, mask_n, with_bias, SPLIT, COUT,
                  COUT_G, CIN_G, KH, KW, swo, swc, swh, sww, HAS_DBIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, FIN_M: tl.constexpr):
    """One wgrad tile's epilogue: dw[co, ci, kh, kw] = the sum of its SPLIT partials [SPLIT, COUT, KH, KW, CIN_G]
    in split order, cast to dw's dtype and stored through dw's strides; db likewise from [SPLIT, COUT]. FIN_M rows
    of the tile at a time (a loop, not unrolled: a whole [BLOCK_M, BLOCK_N] sum and its addresses next to the GEMM's
    live values spilled on the big tiles). Loads bypass L1 (.cg): the partials were written by other programs."""
    for m0 in range(0, BLOCK_M, FIN_M):
        r = m_lo + m0 + tl.arange(0, FIN_M)
        mask_m = r < COUT_G
        co = g * COUT_G + r  # int64 with IDX64 (g is)
        mask = mask_m[:, None] & mask_n[None, :]
        acc = tl.zeros((FIN_M, BLOCK_N), part_ptr.dtype.element_ty)
        acc_b = tl.zeros((FIN_M,), part_ptr.dtype.element_ty)
        for s in range(SPLIT):
            row = (s * COUT + co) * (KH * KW) + tap
            acc += tl.load(part_ptr + (row * CIN_G)[:, None] + offs_n[None, :], mask=mask, other=0.0,
                           cache_modifier=".cg")
            if HAS_DBIAS:
                if with_bias:
                    acc_b += tl.load(dbp_ptr + s * COUT + co, mask=mask_m, other=0.0, cache_modifier=".cg")
        out = (co * swo + kh * swh + kw * sww)[:, None] + (offs_n * swc)[None, :]
        tl.store(dw_ptr + out, acc.to(dw_ptr.dtype.element_ty), mask=mask)
        if HAS_DBIAS:
            if with_bias:
                tl.store(db_ptr + co, acc_b.to(db_ptr.dtype.element_ty), mask=mask_m)


_fwd = TunedKernel(_conv2d_fwd_kernel, "conv2d_fwd")
_dgrad = TunedKernel(_conv2d_dgrad_kernel, "conv2d_dgrad")
_wgrad = TunedKernel(_conv2d_wgrad_kernel, "conv2d_wgrad")

GROUP_M = 8
STATS_ARGS = ("cnt_ptr", "mean_ptr", "m2_ptr")


def stats_scratch(M: int, channels: int, like: torch.Tensor, want: bool):
    """scratch(meta) for a conv launch with the STATS epilogue: (count, mean, M2) partials [cdiv(M, BLOCK_M),
    channels] sized for the tile that runs. Every row is written by that launch (one row per row tile, all
    channels), so nothing needs zeroing and a tile the autotuner tried before leaves nothing behind that the
    finalize could read. Without `want`, the scratch is the dict of dummy pointers, never touched (a dict:
    TunedKernel takes it as it is, whatever the tile)."""
    if not want:
        return dict.fromkeys(STATS_ARGS, like)
    acc = accumulation_dtype(like.dtype)

    def scratch(meta):
        rows = cdiv(M, meta["BLOCK_M"])
        return {name: workspace((rows, channels), like.device, acc) for name in STATS_ARGS}

    return scratch


def stats_of(extra: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(extra[name] for name in STATS_ARGS)


def workspace(shape, device, dtype) -> torch.Tensor:
    """Scratch buffers the kernels fully overwrite (tests poison them with NaN through this hook)."""
    return noted("scratch", torch.empty(shape, device=device, dtype=dtype))


def pads(padding) -> tuple[int, int, int, int]:
    """(pad_h, pad_w) or (top, bottom, left, right) -> (top, bottom, left, right)."""
    padding = tuple(int(p) for p in padding)
    return (padding[0], padding[0], padding[1], padding[1]) if len(padding) == 2 else padding


def output_hw(H: int, W: int, KH: int, KW: int, stride, padding, dilation) -> tuple[int, int]:
    top, bottom, left, right = pads(padding)
    return (conv_output_size(H, KH, stride[0], top, bottom, dilation[0]),
            conv_output_size(W, KW, stride[1], left, right, dilation[1]))


def conv2d_forward(
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
    prologue: tuple[torch.Tensor, torch.Tensor, str] | None = None,
    force_int64: bool = False,
):
    """Implicit-GEMM conv2d on a 4-D NCHW-shaped x (any strides; read channels_last, see
    channels_contiguous) with the fused epilogue.

    prologue = (in_scale, in_shift, in_activation): x is then the previous block's pre-BN output z, and the conv
    reads act(z * in_scale[c] + in_shift[c]) (per input channel c, 1-D [C_in] coefficients) without
    materialising it; padding stays zero after the transform.

    padding is (pad_h, pad_w) or (top, bottom, left, right); the gradients only need top and left.
    `out` (optional) is the preallocated [N, C_out, OH, OW] result in the memory format the caller wants;
    residual has out's shape and any strides. Returns y, or with `stats` (y, (count, mean, M2)): the
    BatchNorm partials of the bias-free conv output, one row per row tile of the launch (stats_scratch).
    """
    check_runnable(x, weight)
    # everything but the tensors depends only on the call signature: worked out once per signature
    key = (x.shape, x.stride(), x.dtype, x.device, weight.shape, weight.stride(), tuple(stride), tuple(padding),
           tuple(dilation), groups, bias is None, scale is None, shift is None,
           None if residual is None else (residual.shape, residual.stride()), activation, stats,
           None if prologue is None else prologue[2], None if out is None else out.stride(), force_int64,
           dot_precision(x.dtype), interpreting())
    plan = _FWD_PLANS.get(key) or _FWD_PLANS.put(key, _forward_plan(
        x, weight, bias, stride, padding, dilation, groups, scale, shift, residual, activation, out, stats,
        prologue, force_int64))
    shape, ints, problem, grid, consts, memo, fixed = plan
    x, weight = channels_contiguous(x), channels_contiguous(weight)
    y = out if out is not None else x.new_empty(shape)
    if grid is None:  # nothing to compute
        return (y, empty_stats(shape[1], y)) if stats else y
    if residual is not None:
        residual = residual_like(residual, y)
    res = residual if residual is not None else y
    if bias is not None and scale is not None:
        bias, shift = fold_bias(bias, scale, shift)
    in_scale, in_shift, _ = prologue_args(prologue, x.shape[1], y)
    _, extra = _fwd(
        grid,
        x, weight, y,
        bias if bias is not None else y,  # dummies (y) are never read: their HAS_* flag is off
        scale if scale is not None else y,
        shift if shift is not None else y,
        res,
        in_scale, in_shift,
        *ints,
        problem=problem,
        device=x.device,
        scratch=stats_scratch(problem.m, shape[1], y, stats),
        memo=memo,
        fixed=fixed,
        **consts,
    )
    return (y, stats_of(extra)) if stats else y


def bn_grad_fusable(grad_out, weight, z, activation: str, force_int64: bool = False) -> bool:
    """Whether conv2d_input_grad's bn epilogue takes this launch: a mask activation (act' a 0/1 mask of u),
    channels_last z (dx is laid out like z) and int32 indexing. The kernel report compiled the other variants
    too: SiLU / Hardswish (more tiles live beside the accumulator), NCHW (the split store plus a strided z
    tile) and IDX64 spilled 8-1,132 B, so those chains run the dgrad and BatchNorm's reduce pass apart."""
    return (activation in MASK_ACTIVATIONS and not channels_strided(z) and not force_int64
            and not needs_int64(grad_out, weight, z))


# Launch plans per call signature of conv2d_forward, conv2d_input_grad and conv2d_weight_grad.
_FWD_PLANS, _DGRAD_PLANS, _WGRAD_PLANS = PlanCache(), PlanCache(), PlanCache()


def _forward_plan(x, weight, bias, stride, padding, dilation, groups, scale, shift, residual, activation, out,
                  stats, prologue, force_int64):
    """(output shape, the launch's integer arguments, Problem, grid (None: empty output), constexprs, autotune
    memo key) of conv2d_forward's call signature. Works on meta stand-ins of the tensors (strides as the call
    will see them after its channels_last copies), so the plan holds no tensor."""
    xm, wm = meta_operand(x), meta_operand(weight)
    N, C, H, W = x.shape
    C_out, cin_g, KH, KW = weight.shape
    OH, OW = output_hw(H, W, KH, KW, stride, padding, dilation)
    shape = (N, C_out, OH, OW)
    ym = meta_like(out) if out is not None else xm.new_empty(shape)
    M = N * OH * OW
    cout_g = C_out // groups
    problem = Problem(M, cout_g, cin_g, KH * KW, groups)
    if M == 0 or C_out == 0:
        return shape, (), problem, None, {}, None, None
    top, _, left, _ = pads(padding)
    rm = None if residual is None else residual_like(meta_like(residual), ym)
    ints = (M, H, W, OH, OW, cin_g, cout_g, KH, KW, stride[0], stride[1], top, left, dilation[0], dilation[1],
            *xm.stride(), *wm.stride(), *ym.stride())
    consts = dict(
        HAS_BIAS=bias is not None and scale is None,  # a bias before a scale is folded into the shift
        HAS_SCALE=scale is not None,
        HAS_SHIFT=shift is not None or (bias is not None and scale is not None),
        HAS_RES=residual is not None,
        ACT=ACTIVATIONS[activation],
        STATS=stats,
        ACC_TYPE=acc_dtype(x.dtype),
        PRECISION=dot_precision(x.dtype),
        UPCAST=upcast_dot_operands(x.dtype),
        IDX64=force_int64 or needs_int64(xm, wm, ym, rm),
        GROUP_M=GROUP_M,
        SPLIT_N=split_store(ym),
        PROLOGUE=prologue is not None,
        IN_ACT=0 if prologue is None else ACTIVATIONS[prologue[2]],
    )
    return (shape, ints, problem,
            lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(cout_g, meta["BLOCK_N"]), groups), consts,
            memo_id((x.device, x.dtype, problem, *consts.items())), {})


def prologue_args(prologue, channels: int, dummy: torch.Tensor):
    """(in_scale, in_shift, IN_ACT) for a launch: the prologue's per-channel coefficients (contiguous, as the
    kernels index them by channel) and activation code; without a prologue, dummies never read."""
    if prologue is None:
        return dummy, dummy, 0
    in_scale, in_shift, in_act = prologue
    for t in (in_scale, in_shift):
        if t.shape != (channels,):
            raise ValueError(f"prologue coefficients must have shape ({channels},), got {tuple(t.shape)}")
    return in_scale.contiguous(), in_shift.contiguous(), ACTIVATIONS[in_act]


def empty_stats(channels: int, like: torch.Tensor):
    """Partials of an empty conv output: no rows."""
    return tuple(like.new_empty((0, channels), dtype=accumulation_dtype(like.dtype)) for _ in STATS_ARGS)


def conv2d_input_grad(
    grad_out: torch.Tensor,
    weight: torch.Tensor,
    input_shape: tuple[int, int, int, int],
    stride, padding, dilation, groups: int,
    *,
    out: torch.Tensor | None = None,
    bn=None,
    force_int64: bool = False,
    add=None,
):
    """dgrad: the gradient of conv2d with respect to its input, as an implicit GEMM over stride phases.

    bn = (z, mean, var, bn_weight, bn_bias, eps, activation), where the conv's input was x = act(bn(z)) (a chain
    of fused blocks; mean / var z's batch statistics, bn_weight / bn_bias None without affine): then returns
    (dx, (sum_g, sum_gx)), the partial sums of BatchNorm's backward over each row tile (see the kernel's doc),
    [rows, C_in] in the accumulation dtype with rows sized for the tile that ran; batch_norm.bn_grad_sums adds
    them up.

    add = (t, bits) (a residual block's backward: the gradient reaching the block's input through the conv and
    through the shortcut): returns dx = dgrad + t, or with bits dx = dgrad + t * act', summed in the accumulation
    dtype and rounded once, in the dgrad's own store (no separate add pass). t has shape input_shape and dx's
    dtype, any strides (channels_last, NCHW, an expanded view: read through its strides, never copied); bits is
    None or act'(u) of t's elements as fastconv._act_bits packs it for input_shape (a contiguous int32
    [ceil(N*H*W / 32), C] tensor): the add takes t where the bit is 1 and 0 where it is 0 (a select, as PyTorch's
    threshold backward: a NaN / inf t where the bit is 0 adds 0). `out` must not overlap t: the autotuner runs
    every tile it tries on the real buffers, so an in-place add would be added once per tile (ValueError). Where
    the launch needs 64-bit indices the add runs after the dgrad with PyTorch ops (the kernel report measured the
    IDX64 add epilogue spilling). Not with bn (see _check_add)."""
    check_runnable(grad_out, weight)
    if add is not None:
        _check_add(add, input_shape, out.dtype if out is not None else grad_out.dtype, grad_out.device, bn)
        if out is not None and _same_storage(out, add[0]):
            raise ValueError("conv2d_input_grad: out must not share memory with add's tensor, because the "
                             "autotuner runs every tile on the real buffers (an in-place add would repeat)")
    key = (grad_out.shape, grad_out.stride(), grad_out.dtype, grad_out.device, weight.shape, weight.stride(),
           tuple(input_shape), tuple(stride), tuple(padding), tuple(dilation), groups,
           None if out is None else out.stride(), force_int64, dot_precision(grad_out.dtype), interpreting(),
           None if bn is None else (bn[0].stride(), bn[3] is None, bn[6]),
           None if add is None else (add[0].stride(), add[1] is not None))
    plan = _DGRAD_PLANS.get(key) or _DGRAD_PLANS.put(key, _input_grad_plan(
        grad_out, weight, input_shape, stride, padding, dilation, groups, out, bn, force_int64, add))
    work, ints, problem, grid, consts, memo, fixed = plan
    if add is not None and work is True and consts["IDX64"]:  # no spill-checked IDX64 add epilogue: add after
        dx = conv2d_input_grad(grad_out, weight, input_shape, stride, padding, dilation, groups, out=out,
                               force_int64=force_int64)
        t, bits = add
        return dx.add_(t if bits is None else torch.where(_act_bits.unpack(bits, input_shape), t, t.new_zeros(())))
    dx = out if out is not None else grad_out.new_empty(input_shape)
    if work is not True:  # nothing to compute: an empty dx, or one no output pixel reaches (zeros, or the add)
        if work == "zero":
            dx = dx.zero_() if add is None else _add_only(dx, add, input_shape)
        if bn is None:
            return dx
        rows = 1 if work == "zero" else 0  # zero sums: one row of zeros
        return dx, tuple(dx.new_zeros((rows, input_shape[1]), dtype=accumulation_dtype(dx.dtype)) for _ in range(2))
    grad_out, weight = channels_contiguous(grad_out), channels_contiguous(weight)
    if add is None:
        add_args = (dx, 0, 0, 0, 0, dx)  # dummies, never read
    else:
        t, bits = add
        add_args = (t, *t.stride(), bits if bits is not None else dx)
    if bn is None:
        bn_args, scratch = (dx, 0, 0, 0, 0, dx, dx, dx, dx, 0.0, dx, dx), None  # dummies, never read
    else:
        z, mean, var, bn_weight, bn_bias, eps, _ = bn
        bn_args = (z, *z.stride(), mean, var, bn_weight if bn_weight is not None else mean,
                   bn_bias if bn_bias is not None else mean, float(eps))
        scratch = bn_grad_scratch(problem, stride, input_shape[1], dx)
    _, extra = _dgrad(grid, grad_out, weight, dx, *ints, *add_args, *bn_args, problem=problem,
                      device=grad_out.device, scratch=scratch, memo=memo, fixed=fixed, **consts)
    return dx if bn is None else (dx, (extra["sum_g_ptr"], extra["sum_gx_ptr"]))


def _check_add(add, input_shape, dtype: torch.dtype, device: torch.device, bn) -> None:
    """ValueError unless conv2d_input_grad's `add` = (t, bits) fits the call (the kernel reads both unchecked)."""
    if bn is not None:
        raise ValueError("conv2d_input_grad: add is not supported together with bn because the BatchNorm "
                         "epilogue (store_bn_grad_sums) sums the dgrad tile without the added t, and the two "
                         "epilogues together are not among the kernel report's spill-checked variants; add t "
                         "(add=...) without bn, or pass bn without add and add t before the BatchNorm backward")
    if not (isinstance(add, (tuple, list)) and len(add) == 2):
        raise ValueError("conv2d_input_grad: add must be a pair (t, bits), bits None or act' bits")
    t, bits = add
    if tuple(t.shape) != tuple(input_shape) or t.dtype != dtype or t.device != device:
        raise ValueError(f"conv2d_input_grad: add's tensor must have the input's shape {list(input_shape)}, dx's "
                         f"dtype {dtype} and device {device}, got {list(t.shape)} {t.dtype} on {t.device}")
    if bits is not None:
        _act_bits.check_layout(bits, input_shape, device, "conv2d_input_grad: add's bits")


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b may share memory: the same storage (meta tensors, which have none: the same tensor)."""
    if a is b:
        return True
    if a.device.type == "meta" or a.numel() == 0 or b.numel() == 0:
        return False
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _add_only(dx: torch.Tensor, add, input_shape) -> torch.Tensor:
    """dx = t (* act' bits) where the dgrad itself is zero (no output pixel reaches the input): PyTorch ops."""
    t, bits = add
    if bits is None:
        return dx.copy_(t)
    return torch.where(_act_bits.unpack(bits, input_shape), t, t.new_zeros(()), out=dx)


def bn_grad_scratch(problem: Problem, stride, channels: int, dx: torch.Tensor):
    """scratch(meta) of a BN_GRAD dgrad launch: the [stride phases * cdiv(MP, BLOCK_M), C_in] partials, sized
    for the tile that runs; every row is written (one per (phase, row tile), all channels over the groups and
    channel tiles), so nothing is zero-filled and a tile the autotuner tried before leaves nothing behind."""
    acc = accumulation_dtype(dx.dtype)

    def scratch(meta):
        rows = stride[0] * stride[1] * cdiv(problem.m, meta["BLOCK_M"])
        return {name: workspace((rows, channels), dx.device, acc) for name in ("sum_g_ptr", "sum_gx_ptr")}

    return scratch


def _input_grad_plan(grad_out, weight, input_shape, stride, padding, dilation, groups, out, bn, force_int64,
                     add=None):
    """conv2d_input_grad's launch plan for its call signature (see _forward_plan); `work` is True, or "zero" /
    "empty" where there is nothing to launch. Raises where the bn epilogue does not apply (bn_grad_fusable)."""
    if bn is not None and not bn_grad_fusable(grad_out, weight, bn[0], bn[6], force_int64):
        raise ValueError("conv2d_input_grad: the BatchNorm epilogue takes channels_last z, int32 indexing and "
                         f"{MASK_ACTIVATIONS} (see bn_grad_fusable), not {bn[6]!r} on z of strides {bn[0].stride()}")
    gm, wm = meta_operand(grad_out), meta_operand(weight)
    dxm = meta_like(out) if out is not None else gm.new_empty(input_shape)
    N, C, H, W = input_shape
    C_out, cin_g, KH, KW = weight.shape
    OH, OW = grad_out.shape[2], grad_out.shape[3]
    cout_g = C_out // groups
    if dxm.numel() == 0 or cout_g == 0 or OH * OW == 0:
        return "empty" if dxm.numel() == 0 else "zero", (), None, None, {}, None, None
    sh, sw = stride
    HP, WP = cdiv(H, sh), cdiv(W, sw)
    MP = N * HP * WP
    top, _, left, _ = pads(padding)
    ints = (MP, H, W, OH, OW, HP, WP, cin_g, cout_g, KH, KW, sh, sw, top, left, dilation[0], dilation[1],
            *gm.stride(), *wm.stride(), *dxm.stride())
    # the taps one stride phase walks, at most cdiv(K, stride) per axis (_first_tap)
    problem = Problem(MP, cin_g, cout_g, cdiv(KH, sh) * cdiv(KW, sw), groups * sh * sw)
    zm = None if bn is None else meta_like(bn[0])
    am = None if add is None else meta_like(add[0])
    consts = dict(
        ACC_TYPE=acc_dtype(grad_out.dtype),
        PRECISION=dot_precision(grad_out.dtype),
        UPCAST=upcast_dot_operands(grad_out.dtype),
        IDX64=force_int64 or needs_int64(gm, wm, dxm, zm, am),
        GROUP_M=GROUP_M,
        SPLIT_N=split_store(dxm),
        BN_GRAD=bn is not None,
        BN_AFFINE=bn is not None and bn[3] is not None,
        BN_ACT=0 if bn is None else ACTIVATIONS[bn[6]],
        ADD=0 if add is None else (1 if add[1] is None else 2),
    )
    return (True, ints, problem,
            lambda meta: (cdiv(MP, meta["BLOCK_M"]) * cdiv(cin_g, meta["BLOCK_N"]), groups * sh * sw), consts,
            memo_id((grad_out.device, grad_out.dtype, problem, *consts.items())), {})


def conv2d_weight_grad(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight_shape: tuple[int, int, int, int],
    stride, padding, dilation, groups: int,
    *,
    bias_grad: bool = False,
    splits: int | None = None,
    prologue: tuple[torch.Tensor, torch.Tensor, str] | None = None,
    channels_last: bool = False,
    force_int64: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """wgrad (and optionally the bias gradient) by split-K GEMM over the N*OH*OW pixels. With `prologue`
    (see conv2d_forward), x is z and the gradient is taken with respect to the weight of conv(act(z * in_scale +
    in_shift), w): the kernel rebuilds each x tile from z. dw is contiguous, or channels_last with
    `channels_last` (the weight's own layout, so that autograd's gradient accumulation copies nothing)."""
    check_runnable(grad_out, x)
    key = (grad_out.shape, grad_out.stride(), grad_out.dtype, grad_out.device, x.shape, x.stride(), x.dtype,
           tuple(weight_shape), tuple(stride), tuple(padding), tuple(dilation), groups, bias_grad, splits,
           None if prologue is None else prologue[2], channels_last, force_int64,
           dot_precision(x.dtype), interpreting(), None if splits else sm_count(x.device))
    plan = _WGRAD_PLANS.get(key) or _WGRAD_PLANS.put(key, _weight_grad_plan(
        grad_out, x, weight_shape, stride, padding, dilation, groups, bias_grad, splits, prologue, channels_last,
        force_int64, key[-1]))
    ints, problem, split_of, grid, consts, memo, fixed = plan
    C_out, cin_g, KH, KW = weight_shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if grid is None:  # no pixels or no channels: zero gradients
        dw = x.new_zeros(weight_shape).contiguous(memory_format=fmt)
        return dw, (x.new_zeros(C_out) if bias_grad else None)
    grad_out, x = channels_contiguous(grad_out), channels_contiguous(x)
    # every element written by the wgrad kernel (one split) or the reduce pass, in the weight's layout
    if channels_last:
        dw = workspace((C_out, KH, KW, cin_g), x.device, x.dtype).permute(0, 3, 1, 2)
    else:
        dw = workspace(weight_shape, x.device, x.dtype)
    db = workspace((C_out,), x.device, grad_out.dtype) if bias_grad else None
    in_scale, in_shift, _ = prologue_args(prologue, x.shape[1], x)
    _wgrad(
        grid,
        grad_out, x,
        *ints[0],
        in_scale, in_shift,
        *ints[1],
        problem=problem,
        device=x.device,
        scratch=_wgrad_scratch(split_of, dw, db, x.device, cin_g, groups, KH, KW),
        memo=memo,
        fixed=fixed,
        **consts,
    )
    return dw, db


def _weight_grad_plan(grad_out, x, weight_shape, stride, padding, dilation, groups, bias_grad, splits, prologue,
                      channels_last, force_int64, sms):
    """conv2d_weight_grad's launch plan for its call signature (see _forward_plan): (integer arguments before and
    after the prologue coefficients, Problem, split_of(meta) -> (splits, chunk), grid (None: zero gradients),
    constexprs, autotune memo key)."""
    gm, xm = meta_operand(grad_out), meta_operand(x)
    N, C, H, W = x.shape
    C_out, cin_g, KH, KW = weight_shape
    OH, OW = grad_out.shape[2], grad_out.shape[3]
    P = N * OH * OW
    cout_g = C_out // groups
    if P == 0 or C_out == 0 or cin_g == 0:
        return None, None, None, None, {}, None, None
    dwm = (torch.empty((C_out, KH, KW, cin_g), dtype=x.dtype, device="meta").permute(0, 3, 1, 2) if channels_last
           else torch.empty(weight_shape, dtype=x.dtype, device="meta"))
    if splits:  # a fixed split count (tests); else per tile, to fill one wave (Problem.split_fill)
        k_per_split = cdiv(cdiv(P, splits), SPLIT_K_ALIGN) * SPLIT_K_ALIGN
        problem = Problem(cout_g, cin_g, k_per_split, 1, KH * KW * cdiv(P, k_per_split) * groups)
    else:
        problem = Problem(cout_g, cin_g, P, 1, KH * KW * groups, split_fill=sms)

    def split_of(meta):
        if splits:
            return cdiv(P, problem.k_per_tap), problem.k_per_tap
        return problem.splits((meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"], 0, 0))

    top, _, left, _ = pads(padding)
    ints = ((P, H, W, OH, OW, cin_g, cout_g, KH, KW, stride[0], stride[1], top, left, dilation[0], dilation[1],
             *gm.stride(), *xm.stride()),
            (C_out, *dwm.stride()))
    consts = dict(
        HAS_DBIAS=bias_grad,
        ACC_TYPE=acc_dtype(x.dtype),
        PRECISION=dot_precision(x.dtype),
        UPCAST=upcast_dot_operands(x.dtype),
        # the partials hold up to max(splits, SPLIT_K_MAX) copies of dw
        IDX64=(force_int64 or needs_int64(gm, xm, dwm)
               or max(splits or 0, SPLIT_K_MAX) * dwm.numel() >= 2**31 - 2**20),
        PROLOGUE=prologue is not None,
        IN_ACT=0 if prologue is None else ACTIVATIONS[prologue[2]],
    )

    def grid(meta):
        return cdiv(cout_g, meta["BLOCK_M"]) * KH * KW * cdiv(cin_g, meta["BLOCK_N"]), split_of(meta)[0], groups

    return (ints, problem, split_of, grid, consts,
            memo_id((x.device, x.dtype, problem, *consts.items())), {})


def _wgrad_scratch(split_of, dw, db, device, cin_g: int, groups: int, KH: int, KW: int):
    """scratch(meta) of a wgrad launch. One split into a dw the kernel can store (laid out [C_out, KH, KW, cin_g]:
    channels_last, or any 1x1 weight): dw and db themselves; else fp32 partials [split, C_out, KH, KW, cin_g]
    and [split, C_out] that each tile's last split adds up into dw and db (REDUCE_LAST; sized per tile: the
    split count depends on it)."""
    C_out = dw.shape[0]
    part_dtype = accumulation_dtype(dw.dtype)
    direct_ok = dw.permute(0, 2, 3, 1).is_contiguous()  # dw laid out [C_out, KH, KW, cin_g]: the kernel's own store

    def scratch(meta):
        split, chunk = split_of(meta)
        db_out = db if db is not None else dw
        if split == 1 and direct_ok:
            return dict(dw_ptr=dw, db_ptr=db_out, K_PER_SPLIT=chunk, dwf_ptr=dw, dbf_ptr=db_out, lock_ptr=dw,
                        REDUCE_LAST=False)
        partial = workspace((split, C_out, KH, KW, cin_g), device, part_dtype)
        db_partial = workspace((split, C_out), device, part_dtype) if db is not None else partial
        tiles = cdiv(C_out // groups, meta["BLOCK_M"]) * KH * KW * cdiv(cin_g, meta["BLOCK_N"]) * groups
        return dict(dw_ptr=partial, db_ptr=db_partial, K_PER_SPLIT=chunk, dwf_ptr=dw, dbf_ptr=db_out,
                    lock_ptr=ticket_counters(device, tiles), REDUCE_LAST=True)

    return scratch
