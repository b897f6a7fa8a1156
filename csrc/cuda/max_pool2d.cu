// CUDA max-pool kernels: forward (max + argmax tap) and the gather backward. Index math from
// fastconv/max_pool2d.h, shared with the CPU twin. One thread per output (forward) / input (backward) element,
// enumerated in that tensor's memory order (NCHW or channels_last), so writes are coalesced; the other
// tensors are read through their strides. Index is int32 when every offset fits, else int64.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "dtype_dispatch.cuh"
#include "flat_index.cuh"
#include "max_pool2d_launch.h"

namespace fastconv {
namespace {

constexpr int kThreads = 256;

template <typename T, typename Off, bool CL, typename Index>
__global__ void __launch_bounds__(kThreads) max_pool2d_fwd_kernel(MaxPool2dForwardParams p, Index total) {
  using Acc = acc_t<T>;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  Off* off = static_cast<Off*>(p.offsets);
  const Index C = static_cast<Index>(p.C), OH = static_cast<Index>(p.OH), OW = static_cast<Index>(p.OW);
  for (Index i = blockIdx.x * Index(blockDim.x) + threadIdx.x; i < total; i += Index(gridDim.x) * blockDim.x) {
    Index n, c, oh, ow;
    split_flat<Index, CL>(i, C, OH, OW, n, c, oh, ow);
    const T* plane = x + static_cast<Index>(n * p.sx[0] + c * p.sx[1]);
    Acc best;
    const int64_t tap = window_argmax(plane, p.sx[2], p.sx[3], p.H, p.W, oh, ow, p.g, DeviceLoad(), best);
    store(y + i, best);
    if (off) off[i] = static_cast<Off>(tap);
  }
}

template <typename T, typename Off, bool CL, typename Index>
__global__ void __launch_bounds__(kThreads) max_pool2d_bwd_kernel(MaxPool2dBackwardParams p, Index total) {
  using Acc = acc_t<T>;
  const T* dy = static_cast<const T*>(p.dy);
  const Off* off = static_cast<const Off*>(p.offsets);
  T* dx = static_cast<T*>(p.dx);
  const PoolGeometry g = p.g;
  const DeviceLoad load;
  for (Index i = blockIdx.x * Index(blockDim.x) + threadIdx.x; i < total; i += Index(gridDim.x) * blockDim.x) {
    Index n, c, h, w;
    split_flat<Index, CL>(i, static_cast<Index>(p.C), static_cast<Index>(p.H), static_cast<Index>(p.W), n, c, h, w);
    // window geometry in Index width: 32-bit divisions on the int32 path
    const Index KH = Index(g.KH), KW = Index(g.KW), SH = Index(g.SH), SW = Index(g.SW);
    const Index PH = Index(g.PH), PW = Index(g.PW), DH = Index(g.DH), DW = Index(g.DW);
    Index oh_lo, oh_hi, ow_lo, ow_hi;
    window_range<Index>(h, KH, SH, PH, DH, Index(p.OH), oh_lo, oh_hi);
    window_range<Index>(w, KW, SW, PW, DW, Index(p.OW), ow_lo, ow_hi);
    const Index dy_base = static_cast<Index>(n * p.sdy[0] + c * p.sdy[1]);
    const Index off_base = static_cast<Index>(n * p.soff[0] + c * p.soff[1]);
    Acc acc = 0;
    // raster (oh, ow) order: every dx element is written once, deterministically (no atomics)
    for (Index oh = oh_lo; oh <= oh_hi; ++oh) {
      const Index kh = window_tap<Index>(h, oh, SH, PH, DH);
      if (kh < 0) continue;
      for (Index ow = ow_lo; ow <= ow_hi; ++ow) {
        const Index kw = window_tap<Index>(w, ow, SW, PW, DW);
        if (kw < 0) continue;
        if (static_cast<Index>(off[off_base + static_cast<Index>(oh * p.soff[2] + ow * p.soff[3])]) == kh * KW + kw)
          acc += load(dy + dy_base + static_cast<Index>(oh * p.sdy[2] + ow * p.sdy[3]));
      }
    }
    store(dx + i, acc);
  }
}

// Largest element offset a kernel can form from sizes and strides (for the int32 / int64 choice).
inline int64_t span(const int64_t* size, const int64_t* stride) {
  int64_t s = 1;
  for (int d = 0; d < 4; ++d) s += (size[d] > 0 ? size[d] - 1 : 0) * (stride[d] < 0 ? -stride[d] : stride[d]);
  return s;
}

// dtype_dispatch with the offsets' integer type (1, 2 or 4 bytes) as a second tag.
template <typename F>
cudaError_t dispatch(DType dtype, int offsets_bytes, const F& f) {
  return dispatch_dtype(dtype, [&](auto t) -> cudaError_t {
    if (offsets_bytes == 1) return f(t, int8_t{});
    if (offsets_bytes == 2) return f(t, int16_t{});
    return f(t, int32_t{});
  });
}

// Runs launch(total as Index, std::bool_constant<channels_last>) for the int32 or int64 and NCHW or
// channels_last kernel variant, then reports the launch error.
template <typename F>
cudaError_t dispatch_variant(bool idx64, bool channels_last, int64_t total, const F& launch) {
  auto with_layout = [&](auto n) -> cudaError_t {
    if (channels_last) launch(n, std::true_type{});
    else launch(n, std::false_type{});
    return cudaGetLastError();
  };
  return idx64 ? with_layout(total) : with_layout(static_cast<int32_t>(total));
}

}  // namespace

cudaError_t launch_max_pool2d_forward(const MaxPool2dForwardParams& p, cudaStream_t stream) {
  const int64_t total = p.N * p.C * p.OH * p.OW;
  if (total == 0) return cudaSuccess;
  const int64_t xs[4] = {p.N, p.C, p.H, p.W};
  const bool idx64 = total > INT32_MAX || span(xs, p.sx) > INT32_MAX;
  const unsigned grid = grid_stride_blocks<kThreads>(total);
  return dispatch(p.dtype, p.offsets_bytes, [&](auto t, auto o) -> cudaError_t {
    return dispatch_variant(idx64, p.channels_last, total, [&](auto n, auto cl) {
      max_pool2d_fwd_kernel<decltype(t), decltype(o), decltype(cl)::value, decltype(n)>
          <<<grid, kThreads, 0, stream>>>(p, n);
    });
  });
}

cudaError_t launch_max_pool2d_backward(const MaxPool2dBackwardParams& p, cudaStream_t stream) {
  const int64_t total = p.N * p.C * p.H * p.W;
  if (total == 0) return cudaSuccess;
  const int64_t ys[4] = {p.N, p.C, p.OH, p.OW};
  const bool idx64 = total > INT32_MAX || span(ys, p.sdy) > INT32_MAX || span(ys, p.soff) > INT32_MAX;
  const unsigned grid = grid_stride_blocks<kThreads>(total);
  return dispatch(p.dtype, p.offsets_bytes, [&](auto t, auto o) -> cudaError_t {
    return dispatch_variant(idx64, p.channels_last, total, [&](auto n, auto cl) {
      max_pool2d_bwd_kernel<decltype(t), decltype(o), decltype(cl)::value, decltype(n)>
          <<<grid, kThreads, 0, stream>>>(p, n);
    });
  });
}

}  // namespace fastconv
