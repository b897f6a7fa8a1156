// Max-pool index math shared by the CPU twin (csrc/cpu/max_pool2d.cpp) and the CUDA kernels
// (csrc/cuda/max_pool2d.cu). Plain C++: no torch includes.
//
// Offsets encoding (identical to the Triton and torch backends): for output (oh, ow) the argmax is stored
// as the tap kh * KW + kw, standing for input row ih = oh*SH - PH + kh*DH and column iw = ow*SW - PW + kw*DW.
// Window scan order is kh-major; a strictly greater value replaces the running maximum (ties keep the
// first), a NaN always replaces it (PyTorch: the last NaN of the window wins). Taps in the padding never
// win; a window lying entirely in the padding reports -inf at PyTorch's starting tap (first tap at or past
// the top/left padding).
#pragma once

#include <cstdint>

#include "fastconv/common.h"

namespace fastconv {

struct PoolGeometry {
  int64_t KH, KW;  // window
  int64_t SH, SW;  // stride
  int64_t PH, PW;  // symmetric padding
  int64_t DH, DW;  // dilation
};

// ATen's pooling_output_shape with symmetric padding (floor division of a possibly negative numerator).
FASTCONV_HD inline int64_t pool_output_size(int64_t size, int64_t k, int64_t s, int64_t p, int64_t d,
                                            bool ceil_mode) {
  int64_t num = size + 2 * p - d * (k - 1) - 1 + (ceil_mode ? s - 1 : 0);
  int64_t q = num >= 0 ? num / s : -((-num + s - 1) / s);
  int64_t out = q + 1;
  if (ceil_mode && (out - 1) * s >= size + p) out -= 1;  // the last window must start inside input or left pad
  return out;
}

// PyTorch's starting tap along one axis: the first tap whose position origin + k*dil is >= 0.
FASTCONV_HD inline int64_t first_tap(int64_t origin, int64_t dil) {
  return origin < 0 ? (dil - 1 - origin) / dil : 0;
}

// The tap reported for a window with no in-image maximum (all padding or all -inf).
FASTCONV_HD inline int64_t initial_tap(int64_t h0, int64_t w0, const PoolGeometry& g) {
  return first_tap(h0, g.DH) * g.KW + first_tap(w0, g.DW);
}

// Fold one in-image value into the running (max, tap): strict > keeps the first maximum, v != v lets every
// NaN through.
// (Written as selects, not a branch, so that CPU channel loops vectorise.)
template <typename Acc, typename Tap>
FASTCONV_HD inline void fold_tap(Acc v, Tap tap, Acc& best, Tap& best_tap) {
  const bool take = v > best || v != v;
  best = take ? v : best;
  best_tap = take ? tap : best_tap;
}

// Range of taps k (0 <= k_lo <= k < k_hi <= K) along one axis whose position origin + k*dil lies in [0, size).
FASTCONV_HD inline void tap_range(int64_t origin, int64_t size, int64_t K, int64_t dil, int64_t& k_lo,
                                  int64_t& k_hi) {
  k_lo = first_tap(origin, dil);
  int64_t last = size - 1 - origin;  // largest admissible k*dil
  k_hi = last < 0 ? 0 : min_of(K, last / dil + 1);
  if (k_hi < k_lo) k_hi = k_lo;
}

// Reads one element as the accumulation type: the plain cast, for host code and the CPU twin. CUDA code
// passes its own loader (torch builds .cu files with __CUDA_NO_HALF_CONVERSIONS__, so half/bfloat16 need
// intrinsics there).
template <typename Acc>
struct CastLoad {
  template <typename T>
  FASTCONV_HD Acc operator()(const T* p) const { return static_cast<Acc>(*p); }
};

// Max and argmax tap of window (oh, ow) of one input plane read through strides (sh, sw).
template <typename Acc, typename T, typename Load>
FASTCONV_HD inline int64_t window_argmax(const T* plane, int64_t sh, int64_t sw, int64_t H, int64_t W,
                                         int64_t oh, int64_t ow, const PoolGeometry& g, const Load& load, Acc& best) {
  const int64_t h0 = oh * g.SH - g.PH, w0 = ow * g.SW - g.PW;
  int64_t best_tap = initial_tap(h0, w0, g);
  best = -static_cast<Acc>(INFINITY);
  int64_t kh_lo, kh_hi, kw_lo, kw_hi;
  tap_range(h0, H, g.KH, g.DH, kh_lo, kh_hi);
  tap_range(w0, W, g.KW, g.DW, kw_lo, kw_hi);
  for (int64_t kh = kh_lo; kh < kh_hi; ++kh) {
    const T* row = plane + (h0 + kh * g.DH) * sh;
    for (int64_t kw = kw_lo; kw < kw_hi; ++kw) {
      fold_tap(static_cast<Acc>(load(row + (w0 + kw * g.DW) * sw)), kh * g.KW + kw, best, best_tap);
    }
  }
  return best_tap;
}

// The windows along one axis that contain input position i: output o with o*S = i + P - k*D for a tap
// 0 <= k < K, i.e. ceil((i + P - (K-1)*D) / S) <= o <= floor((i + P) / S), clipped to [0, O).
// Candidates in [o_lo, o_hi] with (i + P - o*S) % D != 0 are not windows of i (see window_tap).
// I: int64_t on the CPU; the CUDA kernels pass int32_t when every index fits (32-bit division is inline code,
// 64-bit division a subroutine call).
template <typename I>
FASTCONV_HD inline void window_range(I i, I K, I S, I P, I D, I O, I& o_lo, I& o_hi) {
  const I t = i + P;  // >= 0
  const I lo = t - (K - 1) * D;
  o_lo = lo > 0 ? (lo + S - 1) / S : I(0);
  o_hi = min_of(t / S, O - 1);
}

// The tap index k of position i in window o (-1 if window o does not read position i).
template <typename I>
FASTCONV_HD inline I window_tap(I i, I o, I S, I P, I D) {
  const I r = i + P - o * S;
  if (r < 0) return I(-1);
  const I k = r / D;
  return k * D == r ? k : I(-1);
}

}  // namespace fastconv
