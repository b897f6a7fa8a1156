// im2col / col2im index math for conv2d, shared by the CPU twin (csrc/cpu/conv2d.cpp) and the CUDA kernels
// (csrc/cuda/im2col.cu), so the CPU tests exercise the very mapping the GPU runs. All int64.
//
// GEMM view of a conv with groups: per group g,
//   rows    m = (n * OH + oh) * OW + ow                  one per output pixel, M = N * OH * OW
//   columns k = (ci * KH + kh) * KW + kw                 one per weight tap of the group, K = cin_g * KH * KW
//   cols[m, k] = x[n, g * cin_g + ci, oh * sh - pad_top + kh * dh, ow * sw - pad_left + kw * dw]  (0 if outside)
//   y[n, g * cout_g + co, oh, ow] = sum_k cols[m, k] * w[g * cout_g + co, k]
#pragma once

#include "fastconv/common.h"

namespace fastconv {

struct ConvGeom {
  int64_t N, C, H, W;          // input
  int64_t C_out, OH, OW;       // output
  int64_t KH, KW;              // kernel
  int64_t groups, cin_g, cout_g;
  int64_t sh, sw, pad_top, pad_left, dh, dw;

  FASTCONV_HD int64_t rows() const { return N * OH * OW; }
  FASTCONV_HD int64_t cols() const { return cin_g * KH * KW; }
};

struct Pixel {
  int64_t n, h, w;
};

struct Tap {
  int64_t c, kh, kw;  // c: input channel within the group
};

FASTCONV_HD inline Pixel split_row(int64_t m, const ConvGeom& g) {
  Pixel p;
  p.w = m % g.OW;
  int64_t t = m / g.OW;
  p.h = t % g.OH;
  p.n = t / g.OH;
  return p;
}

FASTCONV_HD inline Tap split_col(int64_t k, const ConvGeom& g) {
  Tap t;
  t.kw = k % g.KW;
  int64_t r = k / g.KW;
  t.kh = r % g.KH;
  t.c = r / g.KH;
  return t;
}

// Input coordinate read by output coordinate o through kernel tap kk (may be outside [0, size)).
FASTCONV_HD inline int64_t input_coord(int64_t o, int64_t kk, int64_t stride, int64_t pad, int64_t dil) {
  return o * stride - pad + kk * dil;
}

// Element offset of cols[m, k] in x (strides in elements), or -1 where the tap reads padding.
FASTCONV_HD inline int64_t im2col_offset(int64_t m, int64_t k, int64_t group, const ConvGeom& g,
                                         const int64_t* xs /* N, C, H, W strides */) {
  Pixel p = split_row(m, g);
  Tap t = split_col(k, g);
  int64_t ih = input_coord(p.h, t.kh, g.sh, g.pad_top, g.dh);
  int64_t iw = input_coord(p.w, t.kw, g.sw, g.pad_left, g.dw);
  if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) return -1;
  return p.n * xs[0] + (group * g.cin_g + t.c) * xs[1] + ih * xs[2] + iw * xs[3];
}

// col2im as a gather: the output coordinate that reads input coordinate i through tap kk, or -1 if none
// (i + pad - kk * dil must be a non-negative multiple of the stride, and the quotient inside [0, out_size)).
FASTCONV_HD inline int64_t output_coord(int64_t i, int64_t kk, int64_t stride, int64_t pad, int64_t dil,
                                        int64_t out_size) {
  int64_t num = i + pad - kk * dil;
  if (num < 0 || num % stride != 0) return -1;
  int64_t o = num / stride;
  return o < out_size ? o : -1;
}

// dx[n, group * cin_g + c, h, w] = sum over taps (kh, kw) of dcols[m(n, oh, ow), k(c, kh, kw)], where
// (oh, ow) = output_coord(...). `dcols` is row-major [rows, K] for the rows of images [n0, n0 + nb);
// Acc is the accumulation type.
template <typename Acc>
FASTCONV_HD inline Acc col2im_gather(const Acc* dcols, int64_t K, int64_t n_local, int64_t c, int64_t h,
                                     int64_t w, const ConvGeom& g) {
  Acc sum = Acc(0);
  for (int64_t kh = 0; kh < g.KH; ++kh) {
    int64_t oh = output_coord(h, kh, g.sh, g.pad_top, g.dh, g.OH);
    if (oh < 0) continue;
    for (int64_t kw = 0; kw < g.KW; ++kw) {
      int64_t ow = output_coord(w, kw, g.sw, g.pad_left, g.dw, g.OW);
      if (ow < 0) continue;
      int64_t m = (n_local * g.OH + oh) * g.OW + ow;
      int64_t k = (c * g.KH + kh) * g.KW + kw;
      sum += dcols[m * K + k];
    }
  }
  return sum;
}

}  // namespace fastconv
