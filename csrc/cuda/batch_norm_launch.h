// Launchers of the CUDA BatchNorm kernels (csrc/cuda/batch_norm.cu): plain parameter structs, no torch types,
// so the .cu file compiles with nvcc alone. Each returns cudaGetLastError() after its launches.
// Statistics, mean, var, weight and bias are `Acc` arrays: float, or double when dtype is f64.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"
#include "fastconv/batch_norm.h"

namespace fastconv {

constexpr int64_t kBnTileRows = kBnTileRowsCuda;  // pixels per statistics tile (fastconv/batch_norm.h)

struct BnView {  // a [N, C, H, W] tensor read or written through strides (elements)
  const void* ptr;
  int64_t s[4];
};

struct BatchNormStatsParams {
  BnView z;
  int64_t N, C, H, W, T;
  void *cnt, *mean, *m2;  // [T, C] Acc
  DType dtype;
  bool channels_fast;  // z's channel stride is its smallest (channels_last)
};

struct BatchNormFinalizeParams {
  const void *cnt, *mean, *m2;  // [T, C]
  const void* bias;             // [C] or nullptr
  void *mean_out, *var_out;     // [C]
  void* workspace;              // bn_finalize_workspace_bytes(T, C, f64)
  int64_t T, C;
  bool f64;
  // F.batch_norm's running-statistics update, done by the last pass (nullptr buffers: none): running_* [C] with
  // element strides, of dtype running_dtype; the unbiased-variance factor; momentum, or momentum_ptr (0-dim,
  // statistics dtype, already rounded to running_dtype); num_batches_tracked (int64, or nullptr) counts the call.
  void *running_mean, *running_var;
  int64_t running_mean_stride, running_var_stride;
  DType running_dtype;
  double unbias, momentum;
  const void* momentum_ptr;
  int64_t* num_batches_tracked;
};

struct BatchNormChannelParams {
  const void *mean, *var, *weight, *bias;  // [C] Acc; weight/bias may be nullptr
  double eps;
  Act act;
};

struct BatchNormActParams {
  BnView z, residual;  // residual.ptr may be nullptr
  void* y;             // dense: channels_last order when channels_last, else NCHW
  int64_t N, C, H, W;
  BatchNormChannelParams ch;
  DType dtype;
  bool channels_last;
};

struct BatchNormBackwardParams {
  BnView dy, z, residual;
  int64_t N, C, H, W, T;
  BatchNormChannelParams ch;
  void *part_g, *part_gx;  // [T, C] Acc workspace
  void *sum_g, *sum_gx;    // [C] Acc
  void* workspace;         // bn_backward_workspace_bytes(T, C, dtype == f64)
  void *dz, *dres;         // dense like BatchNormActParams::y; dres may be nullptr
  DType dtype;
  bool channels_fast, channels_last;
};

// Workspace bytes of the combination passes (fastconv/batch_norm.h) of T partial rows of C channels: states
// Moments (finalize) or GradSums (backward) of the statistics dtype; 0 when one pass does it.
inline int64_t bn_finalize_workspace_bytes(int64_t T, int64_t C, bool f64) {
  return bn_combine_workspace_rows(T) * C * int64_t(f64 ? sizeof(Moments<double>) : sizeof(Moments<float>));
}
inline int64_t bn_backward_workspace_bytes(int64_t T, int64_t C, bool f64) {
  return bn_combine_workspace_rows(T) * C * int64_t(f64 ? sizeof(GradSums<double>) : sizeof(GradSums<float>));
}

// The combination's grid has ceil(C / kBnCombineChannels) channel blocks in y (at most 65535).
constexpr int64_t kBnMaxChannels = int64_t(65535) * kBnCombineChannels;

cudaError_t launch_batch_norm_stats(const BatchNormStatsParams& p, cudaStream_t stream);
cudaError_t launch_batch_norm_finalize(const BatchNormFinalizeParams& p, cudaStream_t stream);
cudaError_t launch_batch_norm_act(const BatchNormActParams& p, cudaStream_t stream);
// reduce (partials and their sums) then apply (dz, dres)
cudaError_t launch_batch_norm_backward(const BatchNormBackwardParams& p, cudaStream_t stream);

}  // namespace fastconv
