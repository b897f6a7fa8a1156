// Launchers of the CUDA max-pool kernels (csrc/cuda/max_pool2d.cu): plain parameter structs, no torch types,
// so the .cu file compiles with nvcc alone. Each returns cudaGetLastError() after its launch.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"
#include "fastconv/max_pool2d.h"

namespace fastconv {

struct MaxPool2dForwardParams {
  const void* x;  // [N, C, H, W], strides sx (elements)
  void* y;        // dense in `channels_last` order or NCHW order
  void* offsets;  // same layout as y, offsets_bytes wide; nullptr: not written
  int64_t N, C, H, W, OH, OW;
  int64_t sx[4];
  PoolGeometry g;
  bool channels_last;
  DType dtype;
  int offsets_bytes;  // 1, 2 or 4
};

struct MaxPool2dBackwardParams {
  const void* dy;       // [N, C, OH, OW], strides sdy
  const void* offsets;  // [N, C, OH, OW], strides soff
  void* dx;             // [N, C, H, W] dense in `channels_last` or NCHW order
  int64_t N, C, H, W, OH, OW;
  int64_t sdy[4], soff[4];
  PoolGeometry g;
  bool channels_last;
  DType dtype;
  int offsets_bytes;
};

cudaError_t launch_max_pool2d_forward(const MaxPool2dForwardParams& p, cudaStream_t stream);
cudaError_t launch_max_pool2d_backward(const MaxPool2dBackwardParams& p, cudaStream_t stream);

}  // namespace fastconv
