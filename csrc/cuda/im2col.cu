// im2col for the conv GEMMs: one thread per element of cols [rows, K], index math from fastconv/im2col.h
// (the same functions the CPU twin runs). int64 indices throughout.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "conv2d_launch.h"
#include "dtype_dispatch.cuh"

namespace fastconv {
namespace {

template <typename T>
__global__ void im2col_kernel(const T* __restrict__ x, Im2colParams p, T* __restrict__ cols) {
  const int64_t K = p.g.cols();
  const int64_t total = p.rows * K;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / K, k = i - r * K;
    const int64_t off = im2col_offset(p.m0 + r, k, p.group, p.g, p.xs);
    cols[i] = off < 0 ? from_float<T>(0.0f) : x[off];
  }
}

}  // namespace

cudaError_t launch_im2col(const Im2colParams& p, cudaStream_t stream) {
  const int64_t total = p.rows * p.g.cols();
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  const unsigned blocks = unsigned(min_of<int64_t>(ceil_div(total, threads), 65535 * 8));
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    im2col_kernel<T><<<blocks, threads, 0, stream>>>(static_cast<const T*>(p.x), p, static_cast<T*>(p.cols));
    return cudaGetLastError();
  });
}

}  // namespace fastconv
