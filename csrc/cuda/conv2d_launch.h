// Plain-C++ interface between the conv2d CUDA kernels (im2col.cu, col2im.cu, conv2d_gemm.cu; compiled by
// nvcc without torch headers) and their torch-side wrapper (conv2d_cuda.cpp). Every launcher returns
// cudaGetLastError() so the caller can turn a failed launch into a TORCH_CHECK naming the op.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "dtype.h"
#include "fastconv/common.h"
#include "fastconv/im2col.h"

namespace fastconv {

// cols[r, k] (row-major [rows, K], x's dtype) = x-tap of GEMM row m0 + r, column k, group `group`.
struct Im2colParams {
  const void* x;
  int64_t xs[4];
  ConvGeom g;
  int64_t group, m0, rows;
  void* cols;
  DType dtype;
};
cudaError_t launch_im2col(const Im2colParams& p, cudaStream_t stream);

// dx[n0 + n, c, h, w] = gather of dcols (accumulation type, [groups][nb*OH*OW][K]) for images n < nb.
struct Col2imParams {
  const void* dcols;  // float, or double for fp64
  int64_t group_stride;
  ConvGeom g;
  int64_t n0, nb;
  void* dx;
  int64_t dxs[4];
  DType dtype;  // of dx
};
cudaError_t launch_col2im(const Col2imParams& p, cudaStream_t stream);

// Batched GEMM C[z][m, n] = sum_k A[z][m, k] * B[z][k, n] over z < batch, A and B in `dtype` with any
// element strides, accumulated in fp32 (fp64 for f64). Tensor cores: f16/bf16 always, f32 with allow_tf32.
struct GemmParams {
  const void* a;
  int64_t sam, sak, a_batch;
  const void* b;
  int64_t sbk, sbn, b_batch;
  int64_t M, N, K, batch;
  DType dtype;
  bool allow_tf32;

  // conv == false: C (accumulation type) at c + z*c_batch + m*scm + n*scn; accumulate adds to it.
  void* c;
  int64_t scm, scn, c_batch;
  bool accumulate;

  // conv == true: C is the conv output of group z, channel z*N + n, GEMM row m0 + m -> (n, oh, ow):
  // y = act(((acc + bias) * scale + shift) + residual) stored through y's strides in `dtype`, and with
  // stats, BatchNorm partials (count, mean, M2 of acc before the bias) per 64-row tile at [tile, channel].
  bool conv;
  ConvGeom g;
  int64_t m0;
  void* y;
  int64_t ys[4];
  const void* bias;   // accumulation type, [C_out] or null
  const void* scale;  // idem
  const void* shift;  // idem
  const void* residual;  // dtype, or null
  int64_t rs[4];
  Act act;
  void* stat_count;  // accumulation type, [T, C_out] or null
  void* stat_mean;
  void* stat_m2;
};
cudaError_t launch_gemm(const GemmParams& p, cudaStream_t stream);

// Rows of a GEMM tile; equals kStatsRows so one tile yields one row of BatchNorm partials.
constexpr int kGemmBM = 64;

}  // namespace fastconv
