// col2im as a gather (no atomics): one thread per input-gradient element sums the dcols entries whose
// im2col tap read it (fastconv/im2col.h col2im_gather, shared with the CPU twin). int64 indices.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "conv2d_launch.h"
#include "dtype_dispatch.cuh"

namespace fastconv {
namespace {

template <typename T, typename Acc>
__global__ void col2im_kernel(const Acc* __restrict__ dcols, Col2imParams p, T* __restrict__ dx) {
  const ConvGeom& g = p.g;
  const int64_t total = p.nb * g.C * g.H * g.W;
  const int64_t K = g.cols();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t w = i % g.W;
    int64_t t = i / g.W;
    const int64_t h = t % g.H;
    t /= g.H;
    const int64_t c = t % g.C;
    const int64_t n = t / g.C;
    const int64_t grp = c / g.cin_g;
    const Acc v = col2im_gather<Acc>(dcols + grp * p.group_stride, K, n, c - grp * g.cin_g, h, w, g);
    dx[(p.n0 + n) * p.dxs[0] + c * p.dxs[1] + h * p.dxs[2] + w * p.dxs[3]] = from_acc<T>(v);
  }
}

}  // namespace

cudaError_t launch_col2im(const Col2imParams& p, cudaStream_t stream) {
  const int64_t total = p.nb * p.g.C * p.g.H * p.g.W;
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  const unsigned blocks = unsigned(min_of<int64_t>(ceil_div(total, threads), 65535 * 8));
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = acc_t<T>;
    col2im_kernel<T, Acc><<<blocks, threads, 0, stream>>>(static_cast<const Acc*>(p.dcols), p, static_cast<T*>(p.dx));
    return cudaGetLastError();
  });
}

}  // namespace fastconv
