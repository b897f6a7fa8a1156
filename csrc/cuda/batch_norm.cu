// CUDA training-mode BatchNorm kernels: statistics partials, Chan finalize, normalize + affine + activation,
// and the backward's reduce and apply passes. Per-element math from fastconv/batch_norm.h, shared with the
// CPU twin.
//
// Reductions: one block per (tile of kBnTileRows pixels, group of channels), 256 threads laid out as
// channel lanes x row lanes. For channels_last tensors 32 channel lanes run along the warp (coalesced reads
// of consecutive channels); otherwise 32 row lanes do (consecutive pixels of one plane). Row lanes are
// combined in shared memory in a fixed order: deterministic, no atomics.
// Elementwise passes: one thread per element in the output's memory order (coalesced writes).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "batch_norm_launch.h"
#include "dtype_dispatch.cuh"
#include "flat_index.cuh"

namespace fastconv {
namespace {

constexpr int kThreads = 256;

// Lane layout of a reduction block: CB channel lanes x RB row lanes.
template <bool CHANNELS_FAST>
struct Lanes {
  static constexpr int CB = CHANNELS_FAST ? 32 : 8;
  static constexpr int RB = kThreads / CB;
  __device__ static int channel() { return CHANNELS_FAST ? threadIdx.x % 32 : threadIdx.x / 32; }
  __device__ static int row() { return CHANNELS_FAST ? threadIdx.x / 32 : threadIdx.x % 32; }
};

__device__ __forceinline__ int64_t offset(const int64_t* s, int64_t n, int64_t c, int64_t h, int64_t w) {
  return n * s[0] + c * s[1] + h * s[2] + w * s[3];
}

template <typename Acc>
__device__ __forceinline__ BnChannel<Acc> channel_coeffs(const BatchNormChannelParams& ch, int64_t c) {
  return bn_channel<Acc>(static_cast<const Acc*>(ch.mean), static_cast<const Acc*>(ch.var),
                         static_cast<const Acc*>(ch.weight), static_cast<const Acc*>(ch.bias),
                         static_cast<Acc>(ch.eps), c);
}

// ---------------------------------------------------------------------------------------------------------
// statistics partials

template <typename T, bool CHANNELS_FAST>
__global__ void __launch_bounds__(kThreads) bn_stats_kernel(BatchNormStatsParams p) {
  using Acc = acc_t<T>;
  using L = Lanes<CHANNELS_FAST>;
  __shared__ Acc sh[3][L::RB][L::CB];
  const T* z = static_cast<const T*>(p.z.ptr);
  const int64_t t = blockIdx.x;
  const int64_t c = int64_t(blockIdx.y) * L::CB + L::channel();
  const int64_t P = p.N * p.H * p.W;
  const int64_t p0 = t * kBnTileRows, p1 = min_of(P, p0 + kBnTileRows);
  Moments<Acc> m{0, 0, 0};
  if (c < p.C) {
    for (int64_t q = p0 + L::row(); q < p1; q += L::RB) {
      const int64_t w = q % p.W, nh = q / p.W;
      moments_push(m, static_cast<Acc>(load(z + offset(p.z.s, nh / p.H, c, nh % p.H, w))));
    }
  }
  sh[0][L::row()][L::channel()] = m.n;
  sh[1][L::row()][L::channel()] = m.mean;
  sh[2][L::row()][L::channel()] = m.m2;
  __syncthreads();
  if (L::row() == 0 && c < p.C) {
    for (int r = 1; r < L::RB; ++r) moments_merge(m, sh[0][r][L::channel()], sh[1][r][L::channel()], sh[2][r][L::channel()]);
    const int64_t o = t * p.C + c;
    static_cast<Acc*>(p.cnt)[o] = m.n;
    static_cast<Acc*>(p.mean)[o] = m.mean;
    static_cast<Acc*>(p.m2)[o] = m.m2;
  }
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads) bn_finalize_kernel(BatchNormFinalizeParams p) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= p.C) return;
  const Acc* cnt = static_cast<const Acc*>(p.cnt);
  const Acc* mean = static_cast<const Acc*>(p.mean);
  const Acc* m2 = static_cast<const Acc*>(p.m2);
  Moments<Acc> a{0, 0, 0};
  for (int64_t t = 0; t < p.T; ++t) moments_merge(a, cnt[t * p.C + c], mean[t * p.C + c], m2[t * p.C + c]);
  const Acc b = p.bias ? static_cast<const Acc*>(p.bias)[c] : Acc(0);
  static_cast<Acc*>(p.mean_out)[c] = a.mean + b;
  static_cast<Acc*>(p.var_out)[c] = moments_var(a);
}

// ---------------------------------------------------------------------------------------------------------
// elementwise: y = act(bn(z) + residual)

template <typename T, bool CL>
__global__ void __launch_bounds__(kThreads) bn_act_kernel(BatchNormActParams p, int64_t total) {
  using Acc = acc_t<T>;
  const T* z = static_cast<const T*>(p.z.ptr);
  const T* res = static_cast<const T*>(p.residual.ptr);
  T* y = static_cast<T*>(p.y);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t n, c, h, w;
    split_flat<int64_t, CL>(i, p.C, p.H, p.W, n, c, h, w);
    const BnChannel<Acc> k = channel_coeffs<Acc>(p.ch, c);
    const Acc r = res ? static_cast<Acc>(load(res + offset(p.residual.s, n, c, h, w))) : Acc(0);
    store(y + i, bn_act_value(static_cast<Acc>(load(z + offset(p.z.s, n, c, h, w))), k, r, p.ch.act));
  }
}

// ---------------------------------------------------------------------------------------------------------
// backward

template <typename T>
__device__ __forceinline__ acc_t<T> grad_at(const BatchNormBackwardParams& p, const BnChannel<acc_t<T>>& k,
                                            int64_t n, int64_t c, int64_t h, int64_t w, acc_t<T>& xhat) {
  using Acc = acc_t<T>;
  const T* res = static_cast<const T*>(p.residual.ptr);
  const Acc r = res ? static_cast<Acc>(load(res + offset(p.residual.s, n, c, h, w))) : Acc(0);
  const Acc dy = static_cast<Acc>(load(static_cast<const T*>(p.dy.ptr) + offset(p.dy.s, n, c, h, w)));
  const Acc z = static_cast<Acc>(load(static_cast<const T*>(p.z.ptr) + offset(p.z.s, n, c, h, w)));
  return bn_act_grad(dy, z, k, r, p.ch.act, xhat);
}

template <typename T, bool CHANNELS_FAST>
__global__ void __launch_bounds__(kThreads) bn_bwd_reduce_kernel(BatchNormBackwardParams p) {
  using Acc = acc_t<T>;
  using L = Lanes<CHANNELS_FAST>;
  __shared__ Acc sh[2][L::RB][L::CB];
  const int64_t t = blockIdx.x;
  const int64_t c = int64_t(blockIdx.y) * L::CB + L::channel();
  const int64_t P = p.N * p.H * p.W;
  const int64_t p0 = t * kBnTileRows, p1 = min_of(P, p0 + kBnTileRows);
  Acc sg = 0, sgx = 0;
  if (c < p.C) {
    const BnChannel<Acc> k = channel_coeffs<Acc>(p.ch, c);
    for (int64_t q = p0 + L::row(); q < p1; q += L::RB) {
      const int64_t w = q % p.W, nh = q / p.W;
      Acc xhat;
      const Acc g = grad_at<T>(p, k, nh / p.H, c, nh % p.H, w, xhat);
      sg += g;
      sgx += g * xhat;
    }
  }
  sh[0][L::row()][L::channel()] = sg;
  sh[1][L::row()][L::channel()] = sgx;
  __syncthreads();
  if (L::row() == 0 && c < p.C) {
    for (int r = 1; r < L::RB; ++r) {
      sg += sh[0][r][L::channel()];
      sgx += sh[1][r][L::channel()];
    }
    static_cast<Acc*>(p.part_g)[t * p.C + c] = sg;
    static_cast<Acc*>(p.part_gx)[t * p.C + c] = sgx;
  }
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads) bn_bwd_sum_kernel(BatchNormBackwardParams p) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= p.C) return;
  Acc a = 0, b = 0;
  for (int64_t t = 0; t < p.T; ++t) {
    a += static_cast<const Acc*>(p.part_g)[t * p.C + c];
    b += static_cast<const Acc*>(p.part_gx)[t * p.C + c];
  }
  static_cast<Acc*>(p.sum_g)[c] = a;
  static_cast<Acc*>(p.sum_gx)[c] = b;
}

template <typename T, bool CL>
__global__ void __launch_bounds__(kThreads) bn_bwd_apply_kernel(BatchNormBackwardParams p, int64_t total) {
  using Acc = acc_t<T>;
  const Acc inv_p = Acc(1) / static_cast<Acc>(p.N * p.H * p.W);
  T* dz = static_cast<T*>(p.dz);
  T* dres = static_cast<T*>(p.dres);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t n, c, h, w;
    split_flat<int64_t, CL>(i, p.C, p.H, p.W, n, c, h, w);
    const BnChannel<Acc> k = channel_coeffs<Acc>(p.ch, c);
    Acc xhat;
    const Acc g = grad_at<T>(p, k, n, c, h, w, xhat);
    const Acc mean_g = static_cast<const Acc*>(p.sum_g)[c] * inv_p;
    const Acc mean_gx = static_cast<const Acc*>(p.sum_gx)[c] * inv_p;
    store(dz + i, bn_grad_z(g, xhat, k, mean_g, mean_gx));
    if (dres) store(dres + i, g);
  }
}

// Grid of a reduction kernel: one block per (statistics tile, group of Lanes::CB channels).
template <bool CHANNELS_FAST>
dim3 reduce_grid(int64_t T, int64_t C) {
  constexpr int64_t CB = Lanes<CHANNELS_FAST>::CB;
  return dim3(static_cast<unsigned>(T), static_cast<unsigned>((C + CB - 1) / CB));
}

}  // namespace

cudaError_t launch_batch_norm_stats(const BatchNormStatsParams& p, cudaStream_t stream) {
  if (p.C == 0 || p.T == 0) return cudaSuccess;
  return dispatch_dtype(p.dtype, [&](auto t) -> cudaError_t {
    using T = decltype(t);
    if (p.channels_fast) bn_stats_kernel<T, true><<<reduce_grid<true>(p.T, p.C), kThreads, 0, stream>>>(p);
    else bn_stats_kernel<T, false><<<reduce_grid<false>(p.T, p.C), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t launch_batch_norm_finalize(const BatchNormFinalizeParams& p, cudaStream_t stream) {
  if (p.C == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>((p.C + kThreads - 1) / kThreads);
  if (p.f64) bn_finalize_kernel<double><<<grid, kThreads, 0, stream>>>(p);
  else bn_finalize_kernel<float><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_batch_norm_act(const BatchNormActParams& p, cudaStream_t stream) {
  const int64_t total = p.N * p.C * p.H * p.W;
  if (total == 0) return cudaSuccess;
  const unsigned grid = grid_stride_blocks<kThreads>(total);
  return dispatch_dtype(p.dtype, [&](auto t) -> cudaError_t {
    using T = decltype(t);
    if (p.channels_last) bn_act_kernel<T, true><<<grid, kThreads, 0, stream>>>(p, total);
    else bn_act_kernel<T, false><<<grid, kThreads, 0, stream>>>(p, total);
    return cudaGetLastError();
  });
}

cudaError_t launch_batch_norm_backward(const BatchNormBackwardParams& p, cudaStream_t stream) {
  if (p.C == 0) return cudaSuccess;
  const int64_t total = p.N * p.C * p.H * p.W;
  return dispatch_dtype(p.dtype, [&](auto t) -> cudaError_t {
    using T = decltype(t);
    using Acc = acc_t<T>;
    if (p.T > 0) {
      if (p.channels_fast) bn_bwd_reduce_kernel<T, true><<<reduce_grid<true>(p.T, p.C), kThreads, 0, stream>>>(p);
      else bn_bwd_reduce_kernel<T, false><<<reduce_grid<false>(p.T, p.C), kThreads, 0, stream>>>(p);
      cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    bn_bwd_sum_kernel<Acc><<<static_cast<unsigned>((p.C + kThreads - 1) / kThreads), kThreads, 0, stream>>>(p);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || total == 0) return err;
    const unsigned grid = grid_stride_blocks<kThreads>(total);
    if (p.channels_last) bn_bwd_apply_kernel<T, true><<<grid, kThreads, 0, stream>>>(p, total);
    else bn_bwd_apply_kernel<T, false><<<grid, kThreads, 0, stream>>>(p, total);
    return cudaGetLastError();
  });
}

}  // namespace fastconv
