"""Ahead-of-time compile report for fastconv's Triton kernels, no GPU needed.

    python -m fastconv.kernel_report [--json] [--arch sm_80|sm_90] [--quick | --all-variants] [--jobs N]
                                     [--family all|triton|cuda] [--kernel REGEX] [--variant REGEX]

The CUDA C++ kernels of csrc/cuda (family "cuda") are reported by fastconv/_cuda_report.py (nvcc + ptxas -v +
cuobjdump); every row names its family.

Every module-level ``@triton.jit`` function named ``_*_kernel`` in ``fastconv/triton/*.py`` is compiled
for real GPU targets (sm_80, sm_90a) with each tile config of its family in ``configs.CONFIGS`` and each
dtype, and per compile the report gives registers and spill bytes (ptxas -v), shared memory (Triton's
metadata) and the tensor-core instructions in the SASS (cuobjdump). ``--quick`` (what CI runs) compiles the
first config of each list for the dtypes in QUICK_DTYPES (every kernel on both targets; every kernel family
with fp16, bf16 and fp32, the GEMM families with tf32 too) plus one IDX64=True case; the full report adds
every dtype, every config and, on the first config and on each config with pinned registers, the variants listed
in CASES; ``--all-variants`` compiles every variant on every config the autotuner may pick for it (fused
launches skip the tiles configs.fits_fused rules out; about 2.5 times the compiles). ``--variant REGEX`` keeps only
the variant rows whose name matches (no plain rows): e.g. ``--all-variants --variant prologue`` compiles just
the prologue variants, on every tile they may run on.

The constexprs and scalar values mirror the launchers on a representative problem (a channels_last ResNet-50
layer, 64 channels), and the scalars are specialised as Triton's launcher would (stride 1 -> constexpr,
multiples of 16 -> divisibility hints): the numbers are those of the fast path that problem actually runs.

Compiles run in spawned worker processes whose environment has TRITON_INTERPRET removed before triton is
imported, so the report works (and the kernels are real JITFunctions) even when the calling process runs
under the interpreter. The calling process never imports triton.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

from ._args import conv_output_size

ARCHES = {"sm_80": 80, "sm_90": 90}
# Opt-in dynamic shared memory per block: A100 / H100. Consumer Ampere/Ada (sm_86/sm_89), which also get the
# sm_80 config list, allow only 99 KiB.
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
SM86_SHARED_LIMIT = 99 * 1024
DTYPES = ("fp32", "tf32", "fp16", "bf16")
# the torch dtype of each report dtype ("tf32" = float32 operands with allow_tf32)
TORCH_DTYPES = {"fp32": "float32", "tf32": "float32", "fp16": "float16", "bf16": "bfloat16"}
KEYS = ("kernel", "config", "dtype", "arch", "registers", "spills", "shared_bytes", "tensor_cores", "gemm", "note",
        "family")
FAILED = "compile failed"
MAX_REGISTERS = 255  # per thread, sm_80 and sm_90
# ptxas without a register cap may keep a kernel at an occupancy point (96, 128, 168 registers) and spill a few
# bytes rather than take more; the report recompiles such rows with `.maxnreg 255` (and Triton's ptxas flags)
# and, when that is spill-free, marks them with this note: spills of ptxas's choosing, not register pressure.
# configs.MAXNREG pins a register limit on the tiles where that happened.
OCCUPANCY_SPILL = "occupancy spill"
TC_RE = re.compile(r"\b((?:HMMA|HGMMA|IMMA|IGMMA|DMMA|QGMMA|UTCHMMA|UTCMMA)\.[\w.]+)")


def _strides(prefix, C, H, W, channels_last=True, dims="nchw"):
    """Element strides of a dense [N, C, H, W] tensor, named prefix + dims (e.g. sxn, sxc, sxh, sxw)."""
    s = (H * W * C, 1, W * C, C) if channels_last else (C * H * W, H * W, W, 1)
    return {prefix + d: v for d, v in zip(dims, s)}


def _conv_args(N=32, C=64, K=64, H=56, W=56, R=3, S=3, stride=1, pad=1, dil=1, nchw=()):
    """Scalar args of the conv kernels for a ResNet-50 3x3 layer, channels_last except the tensors whose stride
    prefixes are in `nchw`. The launchers make every operand a GEMM loop reads channel-contiguous
    (triton._common.channels_contiguous), so only outputs (sy, sdx) can be NCHW; the residual is read in y's
    layout (triton._epilogue.residual_like)."""
    OH, OW = conv_output_size(H, R, stride, pad, pad, dil), conv_output_size(W, S, stride, pad, pad, dil)
    HP, WP = -(-H // stride), -(-W // stride)
    shapes = dict(sx=(C, H, W), sw=(C, R, S), sy=(K, OH, OW), sdy=(K, OH, OW), sdx=(C, H, W))
    strides = {}
    for prefix, chw in shapes.items():
        strides.update(_strides(prefix, *chw, prefix not in nchw, "ochw" if prefix == "sw" else "nchw"))
    return dict(M=N * OH * OW, MP=N * HP * WP, P=N * OH * OW, H=H, W=W, OH=OH, OW=OW, HP=HP, WP=WP,
                CIN_G=C, COUT_G=K, COUT=K, KH=R, KW=S, KDIM=R * S * C, K_PER_SPLIT=64 * 49,
                stride_h=stride, stride_w=stride, pad_h=pad, pad_w=pad, dil_h=dil, dil_w=dil, **strides)


def _pool_args(channels_last=True, N=32, C=64, H=112, W=112, OH=56, OW=56):
    """ResNet stem max-pool, 3x3 stride 2 pad 1. TOTAL is set per kernel (elements of what it writes)."""
    cl = channels_last
    return dict(C=C, H=H, W=W, OH=OH, OW=OW, KH=3, KW=3, NH=2, NW=2,
                stride_h=2, stride_w=2, pad_h=1, pad_w=1, dil_h=1, dil_w=1, **_strides("sx", C, H, W, cl),
                **_strides("sdy", C, OH, OW, cl), **_strides("so", C, OH, OW, cl))


def _bn_args(N=32, C=64, H=56, W=56):
    strides = {}
    for prefix in ("sz", "sy", "sr", "sd", "sx", "sq"):
        strides.update(_strides(prefix, C, H, W))
    return dict(P=N * H * W, C=C, H=H, W=W, eps=1e-5, P_PER_SPLIT=64 * 98, T=-(-N * H * W // 32), **strides)


_FWD_BASE = dict(HAS_BIAS=True, HAS_SCALE=False, HAS_SHIFT=False, HAS_RES=False, ACT=0, STATS=False, GROUP_M=8,
                 SPLIT_N=False)
_FWD_VARIANTS = {
    # eval BN + residual + SiLU; the launcher folds the conv bias into the shift (epilogue.fold_bias)
    "bn_res_silu": dict(HAS_BIAS=False, HAS_SCALE=True, HAS_SHIFT=True, HAS_RES=True, ACT=3),
    "stats": dict(HAS_BIAS=False, STATS=True),  # training BN: per-tile (count, mean, M2) partials
    # an NCHW model: x and w arrive channels_last (launcher copy), y stays NCHW, and the launcher's
    # split_store(y) sets SPLIT_N
    "NCHW": dict(SPLIT_N=True, args=_conv_args(nchw=("sy",))),
}
# the implicit-GEMM kernels' operand prologue (off in the base): x = act(z * in_scale + in_shift) per input channel,
# the coefficients fp32 (BatchNorm folded from fp32 statistics)
_NO_PROLOGUE = dict(PROLOGUE=False, IN_ACT=0)
_PROLOGUE_VARIANTS = {"prologue_relu": dict(PROLOGUE=True, IN_ACT=1), "prologue_silu": dict(PROLOGUE=True, IN_ACT=3),
                      "prologue_idx64": dict(PROLOGUE=True, IN_ACT=1, IDX64=True)}
_FP32_STATS = dict(cnt_ptr="fp32", mean_ptr="fp32", m2_ptr="fp32")
_FP32_PROLOGUE = dict(in_scale_ptr="fp32", in_shift_ptr="fp32")
_BN_TYPES = dict(mean_ptr="fp32", var_ptr="fp32", w_ptr="fp32", b_ptr="fp32", sum_g_ptr="fp32", sum_gx_ptr="fp32")
_BN_FWD_BASE = dict(HAS_AFFINE=True, HAS_RES=False, ACT=1, ACT_BITS=False)
_BN_BASE = dict(_BN_FWD_BASE, POOL=False)  # the backward passes also read a max-pooled block's gradient (POOL)
# the reduce pass with split partials added up by each channel block's last program (LAST_SUMS)
_BN_REDUCE_BASE = dict(_BN_BASE, LAST_SUMS=True, BLOCK_T=64)
_BN_RES_SILU = dict(HAS_RES=True, ACT=3)
# a residual block's last BatchNorm with ReLU / ReLU6: the forward stores act' as int32 bit words, the backward
# passes read them through res_ptr instead of the residual (fastconv._act_bits)
_BN_BITS = dict(ACT_BITS=True, types=dict(res_ptr="i32"))
# The BatchNorm backward of a block whose output was max-pooled (batch_norm_act_pool): grad_y gathered from the
# pooled gradient through int8 argmax taps; 2x2 windows (one candidate) and ResNet's overlapping 3x3 stride 2.
_BN_POOL_ARGS = dict(OH=28, OW=28, KH=2, KW=2, NH=1, NW=1, pool_sh=2, pool_sw=2, pool_ph=0, pool_pw=0, pool_dh=1,
                     pool_dw=1, **_strides("sd", 64, 28, 28), **_strides("so", 64, 28, 28))
_BN_POOL = dict(POOL=True, args=dict(_bn_args(), **_BN_POOL_ARGS))
_BN_POOL_3x3 = dict(POOL=True, args=dict(_bn_args(), **dict(_BN_POOL_ARGS, KH=3, KW=3, NH=2, NW=2, pool_ph=1,
                                                                pool_pw=1)))
_BN_POOL_TYPES = dict(_BN_TYPES, off_ptr="i8")
_BN_POOL_FWD = dict(Q=32 * 28 * 28, C=64, H=56, W=56, OH=28, OW=28, eps=1e-5, stride_h=2, stride_w=2, pad_h=0, pad_w=0,
                    dil_h=1, dil_w=1, **_strides("sz", 64, 56, 56), **_strides("sy", 64, 28, 28))

# Per kernel, mirroring its launcher:
#   family   key of configs.CONFIGS giving the (BM, BN, BK, warps, stages) tiles; or `tiles`, a function of the
#            kernel's module returning fixed (constexprs, warps, stages) tiles (launches without num_warps /
#            num_stages get Triton's defaults, 4 and 3)
#   base     constexprs of the common call (ACC_TYPE/ACC, PRECISION, UPCAST, IDX64 come from _common_constexprs)
#   args     values of the non-constexpr scalars for a representative problem. They decide Triton's launch-time
#            specialization exactly as a real call would: 1 becomes a constexpr, multiples of 16 get a
#            divisibility hint (vectorised, pipelined loads); scalars not listed get neither (worst case).
#            Floats are fp32; every pointer is 16-byte aligned, as torch allocations are.
#   variants name -> constexpr overrides (num_warps and `args` too), compiled on the first tile only (full
#            report); a dict or a function of the kernel's module. IDX64=True is added to every kernel with IDX64.
#   types    pointer args whose element type does not follow the case's dtype
#   dtypes   the dtypes the kernel is launched with, when not all of DTYPES (tf32 only for GEMMs anyway)


def _pool_case(base, total, **more_variants):
    # BLOCK and warps from the launcher's own gpu_launch(idx64, dtype); a 3x3 window's taps are int8.
    def tile(m, idx64):
        block, warps = m.gpu_launch(idx64, m.torch.float32)
        return dict(BLOCK=block, IDX64=idx64), warps

    def variants(m):
        meta, warps = tile(m, True)
        nchw = dict(CHANNELS_LAST=False, args=dict(_pool_args(channels_last=False), TOTAL=total))
        return {"NCHW": nchw, "IDX64": dict(meta, num_warps=warps), **more_variants}

    return dict(tiles=lambda m: [(*tile(m, False), 3)], base=base, args=dict(_pool_args(), TOTAL=total),
                types=dict(off_ptr="i8"), variants=variants)


def _bn_tiles(m):
    return [(dict(BLOCK_P=m.BLOCK_P, BLOCK_C=m.BLOCK_C), 4, 3)]


_CONV = _conv_args()
_BN = _bn_args()
CASES = {
    "_conv2d_fwd_kernel": dict(family="conv2d_fwd", base=dict(_FWD_BASE, **_NO_PROLOGUE), args=_CONV,
                               variants=dict(_FWD_VARIANTS, **_PROLOGUE_VARIANTS,
                                             # a prologue block's conv feeding the next fused block's BN: both ends
                                             prologue_stats=dict(HAS_BIAS=False, STATS=True, PROLOGUE=True,
                                                                 IN_ACT=1)),
                               types=dict(_FP32_STATS, **_FP32_PROLOGUE)),
    "_conv2d_dgrad_kernel": dict(family="conv2d_dgrad", base=dict(stride_h=1, stride_w=1, GROUP_M=8, SPLIT_N=False,
                                                                  BN_GRAD=False, BN_AFFINE=False, BN_ACT=0, ADD=0),
                                 args=dict(_CONV, **_strides("sz", 64, 56, 56), **_strides("sa", 64, 56, 56),
                                           bn_eps=1e-5),
                                 variants={"stride2": dict(stride_h=2, stride_w=2, args=_conv_args(stride=2)),
                                           "NCHW": dict(SPLIT_N=True, args=_conv_args(nchw=("sdx",))),
                                           # a chain's dgrad with BatchNorm's backward sums in its epilogue (fp32
                                           # statistics and partials): ReLU, ReLU6 at stride 2. Launched only
                                           # channels_last, int32, mask activations (triton.conv2d.bn_grad_fusable:
                                           # NCHW / IDX64 / SiLU variants spilled 8-1,132 B)
                                           "bn_grad": dict(BN_GRAD=True, BN_AFFINE=True, BN_ACT=1),
                                           "bn_grad_relu6_stride2": dict(BN_GRAD=True, BN_AFFINE=True, BN_ACT=2,
                                                                         stride_h=2, stride_w=2,
                                                                         args=dict(_conv_args(stride=2),
                                                                                   **_strides("sz", 64, 56, 56),
                                                                                   bn_eps=1e-5)),
                                           # a residual block's backward: dx = dgrad + t (ADD=1, a channels_last t
                                           # read through its own strides) or + t where the block's int32 act' bit
                                           # is set (ADD=2, fastconv._act_bits), in the dgrad's store; an NCHW dx
                                           # and t (SPLIT_N: the add in channel quarters). With IDX64 the add
                                           # spilled 16-152 B on sm_80's TF32 tiles and the pinned ones (r112,
                                           # r152), so it is never launched (conv2d.conv2d_input_grad adds after
                                           # the dgrad there) and has no variant here
                                           "add": dict(ADD=1),
                                           "add_bits": dict(ADD=2),
                                           "add_stride2": dict(ADD=1, stride_h=2, stride_w=2,
                                                               args=dict(_conv_args(stride=2),
                                                                         **_strides("sa", 64, 56, 56))),
                                           "add_NCHW": dict(ADD=1, SPLIT_N=True,
                                                            args=dict(_conv_args(nchw=("sdx",)),
                                                                      **_strides("sa", 64, 56, 56, False))),
                                           "add_bits_NCHW": dict(ADD=2, SPLIT_N=True,
                                                                 args=dict(_conv_args(nchw=("sdx",)),
                                                                           **_strides("sa", 64, 56, 56, False)))},
                                 types=dict(bn_mean_ptr="fp32", bn_var_ptr="fp32", bn_w_ptr="fp32",
                                            bn_b_ptr="fp32", sum_g_ptr="fp32", sum_gx_ptr="fp32",
                                            add_bits_ptr="i32")),
    # split-K: fp32 partials whose tile's last split sums them into dw / db (REDUCE_LAST; ticket counters i32)
    "_conv2d_wgrad_kernel": dict(family="conv2d_wgrad", base=dict(HAS_DBIAS=False, REDUCE_LAST=True, **_NO_PROLOGUE),
                                 args=_CONV,
                                 variants={"dbias": dict(HAS_DBIAS=True), **_PROLOGUE_VARIANTS,
                                           "prologue_dbias": dict(HAS_DBIAS=True, PROLOGUE=True, IN_ACT=1),
                                           # one split into a channels_last weight: dw / db stored directly
                                           "one_split": dict(REDUCE_LAST=False, HAS_DBIAS=True)},
                                 types=dict(dw_ptr="fp32", db_ptr="fp32", lock_ptr="i32", **_FP32_PROLOGUE)),
    "_im2col_gemm_kernel": dict(family="im2col_gemm", base=_FWD_BASE, args=_CONV, variants=_FWD_VARIANTS,
                                types=_FP32_STATS),
    "_im2col_gather_kernel": dict(tiles=lambda m: [(dict(BLOCK_M=m.IM2COL_BLOCKS[0], BLOCK_K=m.IM2COL_BLOCKS[1]),
                                                    m.IM2COL_BLOCKS[2], 3)], args=_CONV),
    # 3x3 windows are unrolled (KH*KW <= MAX_UNROLL_TAPS); 7x7 takes the loop.
    "_max_pool2d_fwd_kernel": _pool_case(dict(KH=3, KW=3, UNROLL=True, CHANNELS_LAST=True, STORE_TAPS=True),
                                         total=32 * 64 * 56 * 56,
                                         k7_loop=dict(KH=7, KW=7, UNROLL=False)),
    "_max_pool2d_bwd_kernel": _pool_case(dict(CHANNELS_LAST=True), total=32 * 64 * 112 * 112),
    # the BN finalize tree: inner passes write chunk partials, the last one the mean (+ conv bias) and var, and
    # with RUNNING updates the running statistics (here bf16 buffers) with a float or a 0-dim tensor momentum
    "_batch_norm_combine_kernel": dict(
        tiles=lambda m: [(dict(BLOCK_T=m.COMBINE_BLOCK_T, BLOCK_C=m.COMBINE_BLOCK_C), 4, 3)],
        base=dict(FINAL=False, HAS_BIAS=False, RUNNING=False, MOMENTUM_TENSOR=False, COUNT=False, FOLD=False,
                  HAS_GAMMA=False, HAS_BETA=False),
        args=dict(_BN, ROWS=1024, momentum_hi=0.1, momentum_lo=0.0, eps_hi=1e-5, eps_lo=0.0),
        variants={"final": dict(FINAL=True, HAS_BIAS=True),
                  "final_running": dict(FINAL=True, HAS_BIAS=True, RUNNING=True),
                  # with a float momentum the last pass also counts num_batches_tracked (int64)
                  "final_running_count": dict(FINAL=True, HAS_BIAS=True, RUNNING=True, COUNT=True),
                  "final_running_tensor": dict(FINAL=True, HAS_BIAS=True, RUNNING=True, MOMENTUM_TENSOR=True),
                  # a chain producer's: the BatchNorm folded into the next conv's prologue scale/shift too
                  "final_running_fold": dict(FINAL=True, HAS_BIAS=True, RUNNING=True, FOLD=True, HAS_GAMMA=True,
                                             HAS_BETA=True),
                  "final_fold_no_affine": dict(FINAL=True, FOLD=True)},
        types=dict(run_mean_ptr="bf16", run_var_ptr="bf16", gamma_ptr="bf16", beta_ptr="bf16", count_ptr="i64"),
        dtypes=("fp32",)),  # fp32 statistics whatever the model's dtype
    # the column sums of a chain dgrad's BatchNorm partials: chunks and a last-program sum (ticket counters i32)
    "_batch_norm_sum_rows_kernel": dict(
        tiles=lambda m: [(dict(BLOCK_T=m.COMBINE_BLOCK_T, BLOCK_C=m.COMBINE_BLOCK_C), 4, 3)],
        base=dict(LAST_SUMS=True), args=dict(T=4096, C=64, ROWS=1024, CHUNKS=4),
        variants={"one_chunk": dict(LAST_SUMS=False, args=dict(T=1024, C=64, ROWS=1024, CHUNKS=1))},
        types=dict(lock_ptr="i32"), dtypes=("fp32",)),
    "_batch_norm_act_fwd_kernel": dict(tiles=_bn_tiles, base=dict(_BN_FWD_BASE, RES_AFFINE=False), args=_BN,
                                       types=dict(_BN_TYPES, bits_ptr="i32", res_scale_ptr="fp32",
                                                  res_shift_ptr="fp32"),
                                       variants={"res_silu": _BN_RES_SILU,
                                                 "res_relu_bits": dict(HAS_RES=True, ACT_BITS=True),
                                                 "res_relu6_bits": dict(HAS_RES=True, ACT=2, ACT_BITS=True),
                                                 # a residual block whose projection's BatchNorm is applied here,
                                                 # on its z (ops.residual_block)
                                                 "res_affine_relu_bits": dict(HAS_RES=True, ACT_BITS=True,
                                                                              RES_AFFINE=True)}),
    "_batch_norm_act_bwd_reduce_kernel": dict(tiles=_bn_tiles, base=_BN_REDUCE_BASE, args=dict(_BN, SPLITS=33),
                                              types=dict(_BN_POOL_TYPES, total_g_ptr="fp32", total_gx_ptr="fp32",
                                                         lock_ptr="i32"),
                                              variants={"res_silu": _BN_RES_SILU, "one_split": dict(LAST_SUMS=False),
                                                        "relu_bits": _BN_BITS,
                                                        "relu6_bits": dict(_BN_BITS, ACT=2),
                                                        "pool2x2": dict(_BN_POOL, args=dict(_BN_POOL["args"], SPLITS=33)),
                                                        "pool3x3_s2": dict(_BN_POOL_3x3,
                                                                           args=dict(_BN_POOL_3x3["args"], SPLITS=33))}),
    # WRITE_PARAM_GRADS: the parameter gradients stored cast from the fp32 sums (parameters in the case's dtype)
    "_batch_norm_act_bwd_apply_kernel": dict(tiles=_bn_tiles,
                                             base=dict(_BN_BASE, WANT_DRES=False, WRITE_PARAM_GRADS=False),
                                             args=_BN, types=_BN_POOL_TYPES,
                                             variants={"res_silu_dres": dict(_BN_RES_SILU, WANT_DRES=True),
                                                       "relu_bits_dres": dict(_BN_BITS, WANT_DRES=True),
                                                       "param_grads": dict(WRITE_PARAM_GRADS=True),
                                                       "pool2x2_param_grads": dict(_BN_POOL, WRITE_PARAM_GRADS=True),
                                                       "pool3x3_s2": _BN_POOL_3x3}),
    # BatchNorm + activation + max-pool in one pass (batch_norm_act_pool): 2x2 (VGG / CIFAR stages) unrolled, ResNet's
    # 3x3 stride 2 pad 1, and a 7x7 window in the loop; int8 taps
    "_batch_norm_act_pool_fwd_kernel": dict(
        tiles=_bn_tiles, base=dict(KH=2, KW=2, UNROLL=True, HAS_AFFINE=True, ACT=1),
        args=_BN_POOL_FWD,
        variants={"3x3_s2_silu": dict(KH=3, KW=3, ACT=3, args=dict(_BN_POOL_FWD, pad_h=1, pad_w=1)),
                  "7x7_loop": dict(KH=7, KW=7, UNROLL=False)},
        types=dict(_BN_TYPES, off_ptr="i8")),
}
QUICK_IDX64 = ("_conv2d_fwd_kernel", "fp16")  # the one IDX64=True case of --quick
# --quick: the dtypes compiled per kernel (first config, each arch), spread so that each family (conv2d,
# im2col, batch_norm, max_pool2d) sees fp16, bf16 and fp32 and each GEMM family tf32 once. Kernels not
# listed get their first dtype.
QUICK_DTYPES = {
    "_conv2d_fwd_kernel": ("fp16", "bf16", "tf32", "fp32"),
    "_conv2d_dgrad_kernel": ("bf16", "tf32"),
    "_conv2d_wgrad_kernel": ("fp16", "bf16", "fp32"),
    "_im2col_gemm_kernel": ("fp16", "tf32", "fp32"),
    "_im2col_gather_kernel": ("bf16",),
    "_max_pool2d_fwd_kernel": ("fp16", "fp32"),
    "_max_pool2d_bwd_kernel": ("bf16",),
    "_batch_norm_act_fwd_kernel": ("fp16",),
    "_batch_norm_act_bwd_reduce_kernel": ("bf16",),
    "_batch_norm_sum_rows_kernel": ("fp32",),
    "_batch_norm_act_bwd_apply_kernel": ("fp32",),
    "_batch_norm_act_pool_fwd_kernel": ("bf16",),
    "_batch_norm_combine_kernel": ("fp32",),
}


# ---------------------------------------------------------------------------------------------- workers


def _worker_init():
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton prints its ptxas -v log: no second ptxas run
    os.dup2(2, 1)  # Triton prints failing PTX to stdout; keep the parent's stdout (JSON) clean


def _kernels():
    """(module name, kernel name, JITFunction or the import error) for every `_*_kernel` of fastconv.triton."""
    import triton
    import fastconv.triton as pkg

    found = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        name = f"{pkg.__name__}.{info.name}"
        try:
            mod = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - a broken module is a failed row, not a crash
            found.append((name, "(import)", e))
            continue
        for kname, obj in vars(mod).items():
            if (kname.startswith("_") and kname.endswith("_kernel") and isinstance(obj, triton.runtime.JITFunction)
                    and obj.__module__ == name):
                found.append((name, kname, obj))
    return found


def _common_constexprs(dtype):
    import triton.language as tl

    return dict(ACC_TYPE=tl.float32, ACC=tl.float32, PRECISION=_precision(dtype), UPCAST=False, IDX64=False,
                GROUP_M=8)


def _precision(dtype):
    return "tf32" if dtype == "tf32" else "ieee"


def _operand_kind(dtype):
    """The configs table ("half", "tf32", "fp32") a launch with this report dtype uses."""
    import torch

    from fastconv.triton.configs import operand_kind

    return operand_kind(getattr(torch, TORCH_DTYPES[dtype]), _precision(dtype))


def _tuned_family(case, name):
    """The configs.CONFIGS family whose tiles the launcher autotunes over, or None (fixed tiles)."""
    from fastconv.triton.configs import CONFIGS

    family = None if "tiles" in case else case.get("family") or name.strip("_").removesuffix("_kernel")
    return family if family in CONFIGS else None


def _tiles(case, name, mod, arch, dtype):
    """(constexprs, num_warps, num_stages, maxnreg or None) per tile the launcher may run."""
    if "tiles" in case:
        return [(*t, None) for t in case["tiles"](mod)]
    from fastconv.triton.configs import tiles

    family = _tuned_family(case, name)
    if family is None:
        return [({}, 4, 3, None)]
    return [(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), w, s, maxnreg)
            for (bm, bn, bk, w, s), maxnreg in tiles(family, arch, _operand_kind(dtype))]


def _label(constexprs, warps, stages, maxnreg=None):
    """BM128_BN64_BK32_w4_s4 from the BLOCK_* constexprs; _r128 when configs.MAXNREG pins the registers."""
    short = {"BLOCK_M": "BM", "BLOCK_N": "BN", "BLOCK_K": "BK"}
    blocks = [f"{short.get(k, k)}{v}" for k, v in constexprs.items() if k.startswith("BLOCK")]
    return "_".join(blocks + [f"w{warps}", f"s{stages}"] + ([f"r{maxnreg}"] if maxnreg else []))


def _plan(arches, quick, only=None, all_variants=False, variant=None):
    """The compile jobs (plain dicts), and rows for what cannot be compiled: failed imports or tables.
    `only`: a regular expression; kernels whose name it does not match (re.search) are left out.
    `all_variants`: every variant on every tile, not only on the first and the pinned ones.
    `variant`: a regular expression; only the variant rows whose name it matches (no plain rows)."""
    jobs, rows = [], []
    for module, name, fn in _kernels():
        if only and not re.search(only, name):
            continue
        if isinstance(fn, Exception):
            rows += [_row(module, "", "", a, note=f"{FAILED}: import: {type(fn).__name__}: {fn}"[:300]) for a in arches]
            continue
        try:
            jobs += _kernel_jobs(module, name, fn, arches, quick, rows, all_variants, variant)
        except Exception as e:  # noqa: BLE001 - CASES out of step with the kernel or its launcher
            rows += [_row(name, "", "", a, note=f"{FAILED}: CASES entry: {type(e).__name__}: {e}"[:300])
                     for a in arches]
    return jobs, rows


def _kernel_jobs(module, name, fn, arches, quick, skipped, all_variants=False, variant=None):
    case = CASES.get(name, {})
    mod = importlib.import_module(module)
    consts = [n for n, p in zip(fn.arg_names, fn.params) if p.is_constexpr]
    gemm = "tl.dot" in fn.src
    dtypes = [d for d in case.get("dtypes", DTYPES) if gemm or d != "tf32"]
    if quick:
        dtypes = [d for d in dtypes if d in QUICK_DTYPES.get(name, dtypes[:1])]
    variants = case.get("variants", {})
    variants = dict(variants(mod) if callable(variants) else variants)
    if "IDX64" in consts:
        variants.setdefault("IDX64", dict(IDX64=True))
    from fastconv.triton.configs import is_fused, pin, runs_on

    family = _tuned_family(case, name)
    tuned = family is not None
    jobs = []
    for arch in arches:
        for dtype in dtypes:
            tiles = _tiles(case, name, mod, arch, dtype)
            kind = _operand_kind(dtype) if tuned else None
            runs = [(t, "", {}) for t in (tiles[:1] if quick else tiles)] if variant is None else []
            if not quick:
                # every variant on the first tile and on each tile with pinned registers (configs.MAXNREG)
                pinned = [t for t in tiles[1:] if t[3] or all_variants]
                runs += [(t, flag, over) for t in tiles[:1] + pinned for flag, over in variants.items()
                         if variant is None or re.search(variant, flag)]
            extra = ([(tiles[0], "IDX64", variants["IDX64"])] if quick and (name, dtype) == QUICK_IDX64
                     and (variant is None or re.search(variant, "IDX64")) else [])
            for (meta, warps, stages, maxnreg), flag, over in runs + extra:
                over = dict(over)
                warps = over.pop("num_warps", warps)
                args = over.pop("args", case.get("args", {}))
                types = dict(case.get("types", {}), **over.pop("types", {}))
                constexprs = {k: v for k, v in _common_constexprs(dtype).items() if k in consts}
                for layer in (case.get("base", {}), meta, over):
                    constexprs.update(layer)
                if tuned:
                    tile = (constexprs["BLOCK_M"], constexprs["BLOCK_N"], constexprs["BLOCK_K"], warps, stages)
                    prologue = bool(constexprs.get("PROLOGUE"))
                    if not runs_on(family, kind, arch, tile, is_fused(constexprs), prologue):
                        continue  # the launcher never runs this launch on this tile (configs.runs_on)
                    maxnreg = pin(family, kind, arch, tile, prologue)
                config = f"{_label(constexprs, warps, stages, maxnreg)} {flag}".strip()
                missing = [c for c in consts if c not in constexprs]
                unknown = [c for c in constexprs if c not in fn.arg_names]
                if unknown:  # Triton 3.6 rejects these at compile time, later versions ignore them: fail everywhere
                    raise ValueError(f"kernel_report.CASES[{name!r}] {config}: {','.join(unknown)} not parameters "
                                     f"of {name}")
                if missing:
                    skipped.append(_row(name, config, dtype, arch, gemm=gemm,
                                        note=f"skipped: no value for constexpr {','.join(missing)}; "
                                             "add the kernel to kernel_report.CASES"))
                    continue
                sig, attrs = _signature(fn, "fp32" if dtype == "tf32" else dtype, types, args, constexprs)
                jobs.append(dict(module=module, kernel=name, config=config, dtype=dtype, arch=arch, signature=sig,
                                 constexprs=constexprs, attrs=attrs, num_warps=warps, num_stages=stages,
                                 maxnreg=maxnreg))
    return jobs


def _signature(fn, elem, types, args, constexprs):
    """Signature and attributes as Triton's launcher would specialize them for these scalar values; scalars
    equal to 1 are added to `constexprs`."""
    sig, attrs = {}, {}
    for i, (n, p) in enumerate(zip(fn.arg_names, fn.params)):
        v = args.get(n)
        if p.is_constexpr:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = "*" + types.get(n, elem)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[n] = "fp32"
        elif v == 1 and not p.do_not_specialize:
            sig[n] = "constexpr"
            constexprs[n] = 1
        else:
            sig[n] = "i32" if v is None or -2**31 <= v < 2**31 else "i64"
            if v is not None and v % 16 == 0 and not p.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _row(kernel, config, dtype, arch, **kw):
    row = dict(kernel=kernel, config=config, dtype=dtype, arch=arch, registers=0, spills=0, shared_bytes=0,
               tensor_cores="", gemm=False, note="")
    row.update(kw)
    return row


def _ptxas_numbers(log):
    """(registers, spill bytes stored + loaded) from a ptxas -v log; (0, 0) when absent."""
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (int(regs.group(1)) if regs else 0), (int(spill.group(1)) + int(spill.group(2)) if spill else 0)


def _ptxas(cc, gpu, ptx, cubin):
    """ptxas -v's log for `ptx`, run with the flags Triton's make_cubin passes (its --regAllocOptLevel=2, a
    workaround for a ptxas 13 bug, changes where ptxas spills)."""
    from triton.backends.nvidia.compiler import get_ptxas

    cmd = [get_ptxas(cc).path, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", ptx, "-o", cubin]
    return subprocess.run(cmd, capture_output=True, text=True).stderr


def _compile(job):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton import knobs

    arch, cc = job["arch"], ARCHES[job["arch"]]
    row = _row(job["kernel"], job["config"], job["dtype"], arch)
    log = io.StringIO()
    try:
        fn = getattr(importlib.import_module(job["module"]), job["kernel"])
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(fn, signature=job["signature"], constexprs=job["constexprs"],
                                         attrs=job["attrs"]),
                               target=GPUTarget("cuda", cc, 32),
                               options=dict(num_warps=job["num_warps"], num_stages=job["num_stages"],
                                            maxnreg=job.get("maxnreg")))
    except Exception as e:  # noqa: BLE001 - every failure becomes a row
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        if type(e).__name__ == "OutOfResources":
            row["note"] = f"out of resources: {lines[0] if lines else e!r}"
        else:
            row["note"] = f"{FAILED}: {type(e).__name__}: {lines[0] if lines else ''}"[:300]
        return row

    row["gemm"] = "tt.dot" in k.asm["ttir"]
    row["shared_bytes"] = int(k.metadata.shared)
    log = log.getvalue()
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        with open(cubin, "wb") as f:
            f.write(k.asm["cubin"])
        # On a Triton cache hit ptxas did not run: use the log kept from the first compile, or run ptxas as
        # Triton's make_cubin does.
        saved = os.path.join(knobs.cache.dir, "kernel_report", f"{k.hash}.ptxas.log")
        if "Used" not in log and os.path.exists(saved):
            with open(saved) as f:
                log = f.read()
        gpu = re.search(r"^\.target\s+(sm_\w+)", k.asm["ptx"], re.M).group(1)  # sm_90a on Hopper
        if "Used" not in log:
            log = _ptxas(cc, gpu, ptx, os.path.join(tmp, "v.cubin"))
        with contextlib.suppress(OSError):
            os.makedirs(os.path.dirname(saved), exist_ok=True)
            with open(f"{saved}.{os.getpid()}", "w") as f:
                f.write(log)
            os.replace(f"{saved}.{os.getpid()}", saved)
        sass = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", cubin], capture_output=True, text=True).stdout
        regs, spill = _ptxas_numbers(log)
        occupancy_spill = False
        if spill and regs < MAX_REGISTERS:
            # Spilling below the register limit: ptxas capped registers at its occupancy target. Check the
            # kernel is spill-free when allowed every register (a .maxnreg directive on the entry).
            with open(ptx, "w") as f:
                unpinned = re.sub(r"^\.maxnreg[^\n]*\n", "", k.asm["ptx"], flags=re.M)
                f.write(re.sub(r"^(\.(?:reqntid|maxntid)[^\n]*)$", rf"\1\n.maxnreg {MAX_REGISTERS}", unpinned,
                               count=1, flags=re.M))
            relaxed = _ptxas(cc, gpu, ptx, os.path.join(tmp, "r.cubin"))
            r_regs, r_spill = _ptxas_numbers(relaxed)
            occupancy_spill = r_spill == 0 and r_regs > 0
    row["registers"] = regs
    row["spills"] = spill
    row["tensor_cores"] = ",".join(sorted(set(TC_RE.findall(sass))))
    notes = []
    if row["shared_bytes"] > SHARED_LIMIT[arch]:
        notes.append(f"shared {row['shared_bytes']} > {arch} limit {SHARED_LIMIT[arch]}: never fits")
    elif arch == "sm_80" and row["shared_bytes"] > SM86_SHARED_LIMIT:
        notes.append(f"shared > {SM86_SHARED_LIMIT} (too big for sm_86/sm_89)")
    if row["spills"]:
        notes.append(f"spills {row['spills']}B st+ld")
        if occupancy_spill:
            notes.append(f"{OCCUPANCY_SPILL}: none with .maxnreg {MAX_REGISTERS}")
    if not regs:
        notes.append(f"{FAILED}: no ptxas register count")
    row["note"] = "; ".join(notes)
    return row


# ---------------------------------------------------------------------------------------------- driver


def report(arches=("sm_80", "sm_90"), quick=False, jobs=2, only=None, all_variants=False, variant=None
           ) -> list[dict]:
    """Compile the kernels (those whose name matches the regular expression `only`, if given; only the variants
    matching `variant`, if given) and return one row per compile (dicts with KEYS)."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=ctx, initializer=_worker_init) as pool:
        work, unplanned = pool.submit(_plan, tuple(arches), quick, only, all_variants, variant).result()
        # Slowest compiles first so the workers finish together; rows keep plan order.
        order = sorted(range(len(work)), key=lambda i: -_cost(work[i]))
        done = dict(zip(order, pool.map(_compile, [work[i] for i in order])))
    return [done[i] for i in range(len(work))] + unplanned


def _cost(job):
    """Rough relative compile time: big tiles and fp32 (FMA or tf32) GEMMs take longest."""
    c = job["constexprs"]
    area = c.get("BLOCK_M", 1) * c.get("BLOCK_N", 1) * c.get("BLOCK_K", 1) * job["num_stages"]
    return area * (2 if job["dtype"] in ("fp32", "tf32") else 1) * (2 if c.get("IDX64") else 1)


def summary(rows) -> list[str]:
    def fails(r):
        return r["note"].startswith(FAILED)

    half = [r for r in rows if r["gemm"] and r["dtype"] in ("fp16", "bf16") and not fails(r)]
    on_tc = [r for r in half if r["tensor_cores"]]
    spills = [r for r in rows if r["spills"]]
    occupancy = [r for r in spills if OCCUPANCY_SPILL in r["note"]]
    too_big = [r for r in rows if r["shared_bytes"] > SHARED_LIMIT[r["arch"]] or r["note"].startswith("out of res")]
    sm86 = [r for r in rows if r["arch"] == "sm_80" and SM86_SHARED_LIMIT < r["shared_bytes"] <= SHARED_LIMIT["sm_80"]]
    failed = [r for r in rows if fails(r)]
    skipped = [r for r in rows if r["note"].startswith("skipped")]
    lines = [f"{len(rows)} rows; GEMM fp16/bf16 rows on tensor cores: {len(on_tc)}/{len(half)}; "
             f"rows with spills: {len(spills)} ({len(occupancy)} {OCCUPANCY_SPILL}s, "
             f"{len(spills) - len(occupancy)} other); over shared-memory limit: {len(too_big)} "
             f"(+{len(sm86)} sm_80 rows too big for sm_86/sm_89 only); "
             f"compile failures: {len(failed)}; skipped: {len(skipped)}"]
    for title, group in (("NOT ON TENSOR CORES", [r for r in half if not r["tensor_cores"]]),
                         ("SPILLS", spills), ("NEVER FITS SHARED MEMORY (prune from autotune list)", too_big),
                         ("COMPILE FAILED", failed), ("SKIPPED", skipped)):
        lines += [f"{title}: {r['kernel']} {r['config']} {r['dtype']} {r['arch']} {r['note']}" for r in group]
    return lines


def format_table(rows) -> str:
    table = [list(KEYS)] + [[str(r[k]) for k in KEYS] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(KEYS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in table)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastconv.kernel_report", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print a JSON list of rows (summary goes to stderr)")
    p.add_argument("--arch", choices=sorted(ARCHES), action="append", help="target (repeatable; default: all)")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--quick", action="store_true",
                       help="first config per kernel x arch for the QUICK_DTYPES, plus one IDX64")
    scope.add_argument("--all-variants", action="store_true",
                       help="every variant (fused epilogues, NCHW, IDX64, ...) on every config, not only the first")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes (default 2)")
    p.add_argument("--family", choices=("all", "triton", "cuda"), default="all",
                   help="Triton kernels, CUDA C++ kernels (csrc/cuda), or both (default)")
    p.add_argument("--kernel", metavar="REGEX", help="only the Triton kernels whose name matches REGEX (re.search)")
    p.add_argument("--variant", metavar="REGEX",
                   help="only the variant rows (e.g. prologue_relu) whose name matches REGEX; no plain rows")
    args = p.parse_args(argv)

    t0 = time.time()
    rows = []
    if args.family in ("all", "triton"):
        rows += [dict(r, family="triton") for r in report(tuple(args.arch or ARCHES), quick=args.quick, jobs=args.jobs,
                                                            only=args.kernel, all_variants=args.all_variants,
                                                            variant=args.variant)]
    if args.family in ("all", "cuda"):
        from . import _cuda_report

        rows += _cuda_report.report(tuple(args.arch or ARCHES), jobs=args.jobs)
    lines = summary(rows) + [f"compiled in {time.time() - t0:.0f} s"]
    if args.json:
        print(json.dumps(rows, indent=1))
        print("\n".join(lines), file=sys.stderr)
    else:
        print(format_table(rows))
        print("\n".join(lines))
    return 1 if any(r["note"].startswith(FAILED) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
