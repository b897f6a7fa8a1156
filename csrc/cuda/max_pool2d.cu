// CUDA max-pool kernels: forward (max + argmax tap) and the gather backward. Index math from
// fastconv/max_pool2d.h, shared with the CPU twin. One thread per output (forward) / input (backward) element,
// enumerated in that tensor's memory order (NCHW or channels_last), so writes are coalesced; the other
// tensors are read through their strides. Index is int32 when every offset fits, else int64.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "max_pool2d_launch.h"

namespace fastconv {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride beyond this

struct DeviceLoad {
  __device__ float operator()(const float* p) const { return *p; }
  __device__ double operator()(const double* p) const { return *p; }
  __device__ float operator()(const __half* p) const { return __half2float(*p); }
  __device__ float operator()(const __nv_bfloat16* p) const { return __bfloat162float(*p); }
};

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// Flat index in a dense [N, C, H, W] tensor's memory order -> (n, c, h, w).
template <typename Index, bool CL>
__device__ __forceinline__ void split_flat(Index i, Index C, Index H, Index W, Index& n, Index& c, Index& h, Index& w) {
  if (CL) {
    c = i % C;
    i /= C;
    w = i % W;
    i /= W;
    h = i % H;
    n = i / H;
  } else {
    w = i % W;
    i /= W;
    h = i % H;
    i /= H;
    c = i % C;
    n = i / C;
  }
}

template <typename T, typename Off, bool CL, typename Index>
__global__ void __launch_bounds__(kThreads) max_pool2d_fwd_kernel(MaxPool2dForwardParams p, Index total) {
  using Acc = typename AccOf<T>::type;
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
    off[i] = static_cast<Off>(tap);
  }
}

template <typename T, typename Off, bool CL, typename Index>
__global__ void __launch_bounds__(kThreads) max_pool2d_bwd_kernel(MaxPool2dBackwardParams p, Index total) {
  using Acc = typename AccOf<T>::type;
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

inline unsigned grid_for(int64_t total) {
  int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

// Largest element offset a kernel can form from sizes and strides (for the int32 / int64 choice).
inline int64_t span(const int64_t* size, const int64_t* stride) {
  int64_t s = 1;
  for (int d = 0; d < 4; ++d) s += (size[d] > 0 ? size[d] - 1 : 0) * (stride[d] < 0 ? -stride[d] : stride[d]);
  return s;
}

template <typename F>
cudaError_t dispatch(PoolDType dtype, int offsets_bytes, const F& f) {
  auto with_off = [&](auto t) -> cudaError_t {
    using T = decltype(t);
    if (offsets_bytes == 1) return f(T{}, int8_t{});
    if (offsets_bytes == 2) return f(T{}, int16_t{});
    return f(T{}, int32_t{});
  };
  switch (dtype) {
    case PoolDType::f32:
      return with_off(float{});
    case PoolDType::f16:
      return with_off(__half{});
    case PoolDType::bf16:
      return with_off(__nv_bfloat16{});
    case PoolDType::f64:
      return with_off(double{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_max_pool2d_forward(const MaxPool2dForwardParams& p, cudaStream_t stream) {
  const int64_t total = p.N * p.C * p.OH * p.OW;
  if (total == 0) return cudaSuccess;
  const int64_t xs[4] = {p.N, p.C, p.H, p.W};
  const bool idx64 = total > INT32_MAX || span(xs, p.sx) > INT32_MAX;
  const unsigned grid = grid_for(total);
  return dispatch(p.dtype, p.offsets_bytes, [&](auto t, auto o) -> cudaError_t {
    using T = decltype(t);
    using Off = decltype(o);
    if (idx64) {
      if (p.channels_last) max_pool2d_fwd_kernel<T, Off, true, int64_t><<<grid, kThreads, 0, stream>>>(p, total);
      else max_pool2d_fwd_kernel<T, Off, false, int64_t><<<grid, kThreads, 0, stream>>>(p, total);
    } else {
      if (p.channels_last) max_pool2d_fwd_kernel<T, Off, true, int32_t><<<grid, kThreads, 0, stream>>>(p, int32_t(total));
      else max_pool2d_fwd_kernel<T, Off, false, int32_t><<<grid, kThreads, 0, stream>>>(p, int32_t(total));
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_max_pool2d_backward(const MaxPool2dBackwardParams& p, cudaStream_t stream) {
  const int64_t total = p.N * p.C * p.H * p.W;
  if (total == 0) return cudaSuccess;
  const int64_t ys[4] = {p.N, p.C, p.OH, p.OW};
  const bool idx64 = total > INT32_MAX || span(ys, p.sdy) > INT32_MAX || span(ys, p.soff) > INT32_MAX;
  const unsigned grid = grid_for(total);
  return dispatch(p.dtype, p.offsets_bytes, [&](auto t, auto o) -> cudaError_t {
    using T = decltype(t);
    using Off = decltype(o);
    if (idx64) {
      if (p.channels_last) max_pool2d_bwd_kernel<T, Off, true, int64_t><<<grid, kThreads, 0, stream>>>(p, total);
      else max_pool2d_bwd_kernel<T, Off, false, int64_t><<<grid, kThreads, 0, stream>>>(p, total);
    } else {
      if (p.channels_last) max_pool2d_bwd_kernel<T, Off, true, int32_t><<<grid, kThreads, 0, stream>>>(p, int32_t(total));
      else max_pool2d_bwd_kernel<T, Off, false, int32_t><<<grid, kThreads, 0, stream>>>(p, int32_t(total));
    }
    return cudaGetLastError();
  });
}

}  // namespace fastconv
