// CUDA training-mode BatchNorm kernels: statistics partials, Chan finalize, normalize + affine + activation,
// and the backward's reduce and apply passes. Per-element math from fastconv/batch_norm.h, shared with the
// CPU twin.
//
// Reductions: one block per (tile of kBnTileRows pixels, group of channels), 256 threads laid out as
// channel lanes x row lanes. For channels_last tensors 32 channel lanes run along the warp (coalesced reads
// of consecutive channels); otherwise 32 row lanes do (consecutive pixels of one plane). Row lanes are
// combined by a tree in shared memory (block_combine). The [T, C] tile partials are then combined by passes
// of bn_combine_kernel (geometry and order in fastconv/batch_norm.h), one block per (chunk of
// kBnCombineRows rows, 32 channels). No thread loops over more than 64 values; fixed order everywhere:
// deterministic, no atomics.
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

// Tile kernels: a thread's loop covers kBnTileRows / RB pixels.
static_assert(kBnTileRows / Lanes<true>::RB <= 64 && kBnTileRows / Lanes<false>::RB <= 64, "long tile loops");
static_assert(Lanes<true>::RB == kBnCombineLanes && Lanes<true>::CB == kBnCombineChannels,
              "bn_combine_kernel's block is Lanes<true>");

// Combines the states of a block's RB row lanes per channel lane: a tree in shared memory, lane r taking
// lane r + s for s = RB/2, ..., 1 (the order of bn_combine_tree). Row lane 0 returns the total.
template <typename L, typename S>
__device__ __forceinline__ S block_combine(S s, S (&sh)[L::RB][L::CB]) {
  const int r = L::row(), c = L::channel();
  sh[r][c] = s;
  __syncthreads();
  for (int step = L::RB / 2; step > 0; step /= 2) {
    if (r < step) {
      combine(s, sh[r + step][c]);
      sh[r][c] = s;
    }
    __syncthreads();
  }
  return s;
}

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
  __shared__ Moments<Acc> sh[L::RB][L::CB];
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
  m = block_combine<L>(m, sh);
  if (L::row() == 0 && c < p.C) {
    const int64_t o = t * p.C + c;
    static_cast<Acc*>(p.cnt)[o] = m.n;
    static_cast<Acc*>(p.mean)[o] = m.mean;
    static_cast<Acc*>(p.m2)[o] = m.m2;
  }
}

// ---------------------------------------------------------------------------------------------------------
// combination of [rows, C] partial states: one pass (fastconv/batch_norm.h)

template <typename S>
struct CombinePass {
  const S* in;  // [rows, C] states of the previous pass; nullptr: the op's partials (first pass)
  S* out;       // [chunks, C]; nullptr: last pass, the op's per-channel outputs
  int64_t rows, C;
};

// The op's partials row i = t * C + c, and its outputs per channel: finalize ...
template <typename Acc>
__device__ __forceinline__ void partial_row(const BatchNormFinalizeParams& p, int64_t i, Moments<Acc>& s) {
  s = {static_cast<const Acc*>(p.cnt)[i], static_cast<const Acc*>(p.mean)[i], static_cast<const Acc*>(p.m2)[i]};
}
// running = lerp(running, stat rounded to the buffer's dtype, w) in the buffer's opmath type (at::lerp's).
template <typename B, typename Acc>
__device__ __forceinline__ void running_lerp(void* buf, int64_t stride, int64_t c, Acc stat, double w) {
  using O = acc_t<B>;
  B* p = static_cast<B*>(buf) + c * stride;
  const O st = to_acc<B>(from_acc<B>(static_cast<O>(stat)));
  store(p, bn_running_lerp<O>(load(p), st, static_cast<O>(w)));
}
template <typename Acc>
__device__ __forceinline__ void running_update(const BatchNormFinalizeParams& p, int64_t c, Acc mean, Acc var) {
  const double w = p.momentum_ptr ? static_cast<double>(*static_cast<const Acc*>(p.momentum_ptr)) : p.momentum;
  const Acc unbiased = var * static_cast<Acc>(p.unbias);
  switch (p.running_dtype) {  // (dispatch_dtype is host code)
#define FASTCONV_RUNNING(B)                                                \
  running_lerp<B>(p.running_mean, p.running_mean_stride, c, mean, w);      \
  running_lerp<B>(p.running_var, p.running_var_stride, c, unbiased, w);    \
  break;
    case DType::f32:
      FASTCONV_RUNNING(float)
    case DType::f64:
      FASTCONV_RUNNING(double)
    case DType::f16:
      FASTCONV_RUNNING(__half)
    case DType::bf16:
      FASTCONV_RUNNING(__nv_bfloat16)
#undef FASTCONV_RUNNING
  }
  if (c == 0 && p.num_batches_tracked) ++*p.num_batches_tracked;  // one thread stores channel 0
}

template <typename Acc>
__device__ __forceinline__ void store_result(const BatchNormFinalizeParams& p, int64_t c, const Moments<Acc>& s) {
  const Acc b = p.bias ? static_cast<const Acc*>(p.bias)[c] : Acc(0);
  const Acc mean = s.mean + b, var = moments_var(s);
  static_cast<Acc*>(p.mean_out)[c] = mean;
  static_cast<Acc*>(p.var_out)[c] = var;
  if (p.running_mean) running_update(p, c, mean, var);
}
// ... and the backward's sums
template <typename Acc>
__device__ __forceinline__ void partial_row(const BatchNormBackwardParams& p, int64_t i, GradSums<Acc>& s) {
  s = {static_cast<const Acc*>(p.part_g)[i], static_cast<const Acc*>(p.part_gx)[i]};
}
template <typename Acc>
__device__ __forceinline__ void store_result(const BatchNormBackwardParams& p, int64_t c, const GradSums<Acc>& s) {
  static_cast<Acc*>(p.sum_g)[c] = s.g;
  static_cast<Acc*>(p.sum_gx)[c] = s.gx;
}

// Block (chunk blockIdx.x, channels blockIdx.y * 32 + [0, 32)): rows [r0, r1) of at most kBnCombineRows.
template <typename S, typename P>
__global__ void __launch_bounds__(kThreads) bn_combine_kernel(P p, CombinePass<S> pass) {
  using L = Lanes<true>;
  __shared__ S sh[L::RB][L::CB];
  const int64_t k = blockIdx.x;
  const int64_t c = int64_t(blockIdx.y) * L::CB + L::channel();
  const int64_t r0 = k * kBnCombineRows, r1 = min_of(pass.rows, r0 + kBnCombineRows);
  S s{};
  if (c < pass.C) {
    s = bn_combine_lane<S>([&](int64_t r) {
      S v;
      if (pass.in) v = pass.in[r * pass.C + c];
      else partial_row(p, r * pass.C + c, v);
      return v;
    }, r0, r1, L::row());
  }
  s = block_combine<L>(s, sh);
  if (L::row() == 0 && c < pass.C) {
    if (pass.out) pass.out[k * pass.C + c] = s;
    else store_result(p, c, s);
  }
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
  __shared__ GradSums<Acc> sh[L::RB][L::CB];
  const int64_t t = blockIdx.x;
  const int64_t c = int64_t(blockIdx.y) * L::CB + L::channel();
  const int64_t P = p.N * p.H * p.W;
  const int64_t p0 = t * kBnTileRows, p1 = min_of(P, p0 + kBnTileRows);
  GradSums<Acc> s{};
  if (c < p.C) {
    const BnChannel<Acc> k = channel_coeffs<Acc>(p.ch, c);
    for (int64_t q = p0 + L::row(); q < p1; q += L::RB) {
      const int64_t w = q % p.W, nh = q / p.W;
      Acc xhat;
      const Acc g = grad_at<T>(p, k, nh / p.H, c, nh % p.H, w, xhat);
      s.g += g;
      s.gx += g * xhat;
    }
  }
  s = block_combine<L>(s, sh);
  if (L::row() == 0 && c < p.C) {
    static_cast<Acc*>(p.part_g)[t * p.C + c] = s.g;
    static_cast<Acc*>(p.part_gx)[t * p.C + c] = s.gx;
  }
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

// All passes combining `rows` partial rows of p into its per-channel outputs; ws holds
// bn_combine_workspace_rows(rows) * C states.
template <typename S, typename P>
cudaError_t launch_combine(const P& p, int64_t rows, int64_t C, S* ws, cudaStream_t stream) {
  const unsigned channel_blocks = static_cast<unsigned>(ceil_div(C, kBnCombineChannels));
  const S* in = nullptr;  // the first pass reads p's partials
  cudaError_t err = cudaSuccess;
  bn_combine_passes(rows, [&](int64_t n, int64_t chunks) {
    if (err != cudaSuccess) return;
    S* out = chunks > 1 ? ws : nullptr;  // the last pass writes p's outputs
    bn_combine_kernel<S, P><<<dim3(static_cast<unsigned>(chunks), channel_blocks), kThreads, 0, stream>>>(
        p, CombinePass<S>{in, out, n, C});
    err = cudaGetLastError();
    in = out;
    ws += chunks * C;
  });
  return err;
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
  if (p.f64) return launch_combine(p, p.T, p.C, static_cast<Moments<double>*>(p.workspace), stream);
  return launch_combine(p, p.T, p.C, static_cast<Moments<float>*>(p.workspace), stream);
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
    cudaError_t err = launch_combine(p, p.T, p.C, static_cast<GradSums<Acc>*>(p.workspace), stream);
    if (err != cudaSuccess || total == 0) return err;
    const unsigned grid = grid_stride_blocks<kThreads>(total);
    if (p.channels_last) bn_bwd_apply_kernel<T, true><<<grid, kThreads, 0, stream>>>(p, total);
    else bn_bwd_apply_kernel<T, false><<<grid, kThreads, 0, stream>>>(p, total);
    return cudaGetLastError();
  });
}

}  // namespace fastconv
