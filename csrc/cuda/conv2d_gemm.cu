// Tiled shared-memory GEMM for the conv2d ops, with the fused conv epilogue.
//
// One CTA of 128 threads computes a BM x BN = 64 x 64 tile of C[z] = A[z] . B[z]: each K step stages a
// BM x BK slab of A and a BK x BN slab of B in shared memory (any element strides, zero-filled outside),
// then multiplies them with
//   - tensor cores (nvcuda::wmma) for fp16 / bf16 (fp32 accumulation) and for fp32 when TF32 is allowed,
//   - FFMA (fp32) or DFMA (fp64) otherwise, 4 x 8 outputs per thread.
// The accumulator tile is then written to shared memory (reusing the operand buffers), where the epilogue
// reads it: a plain (optionally accumulating) store for dgrad / wgrad, or for the conv forward the BatchNorm
// partials of the tile (two passes over it: mean, then M2) followed by bias, scale, shift, residual,
// activation and the cast, stored through the output's strides (NCHW or channels_last).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include "conv2d_launch.h"
#include "dtype_dispatch.cuh"
#include "fastconv/epilogue.h"

namespace fastconv {
namespace {

constexpr int BM = kGemmBM, BN = 64, THREADS = 128;
constexpr int LDC = BN + 4;  // padded row of the accumulator tile (a multiple of 4 for wmma float stores)

enum class Mma { ffma = 0, wmma16 = 1, tf32 = 2 };

template <typename T, Mma MMA>
struct Tile {
  static constexpr int BK = std::is_same<T, double>::value ? 16 : 32;
  using Acc = acc_t<T>;
  using Stage = typename std::conditional<MMA == Mma::tf32, float, T>::type;
  static constexpr int kOperandBytes = (BM * BK + BK * BN) * int(sizeof(Stage));
  static constexpr int kAccBytes = BM * LDC * int(sizeof(Acc));
  static constexpr int kSmemBytes = kOperandBytes > kAccBytes ? kOperandBytes : kAccBytes;
};

template <typename T>
__device__ __forceinline__ void stage_tiles(const GemmParams& p, const T* a, const T* b, int64_t m0, int64_t n0,
                                            int64_t k0, int BK, T* sA, T* sB) {
  for (int i = threadIdx.x; i < BM * BK; i += THREADS) {
    const int m = i / BK, k = i - m * BK;
    const int64_t gm = m0 + m, gk = k0 + k;
    sA[i] = (gm < p.M && gk < p.K) ? a[gm * p.sam + gk * p.sak] : from_float<T>(0.0f);
  }
  for (int i = threadIdx.x; i < BK * BN; i += THREADS) {
    const int k = i / BN, n = i - k * BN;
    const int64_t gk = k0 + k, gn = n0 + n;
    sB[i] = (gk < p.K && gn < p.N) ? b[gk * p.sbk + gn * p.sbn] : from_float<T>(0.0f);
  }
}

// Main loop with FFMA / DFMA: thread (ty, tx) owns rows ty*4.. and columns tx + 8*j (j < 8) of the tile.
template <typename T>
__device__ void mainloop_ffma(const GemmParams& p, const T* a, const T* b, int64_t m0, int64_t n0,
                              unsigned char* smem, acc_t<T>* sC) {
  using Acc = acc_t<T>;
  constexpr int BK = Tile<T, Mma::ffma>::BK;
  T* sA = reinterpret_cast<T*>(smem);
  T* sB = sA + BM * BK;
  const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;  // 16 x 8 threads
  Acc acc[4][8] = {};
  for (int64_t k0 = 0; k0 < p.K; k0 += BK) {
    stage_tiles<T>(p, a, b, m0, n0, k0, BK, sA, sB);
    __syncthreads();
#pragma unroll 4
    for (int k = 0; k < BK; ++k) {
      Acc av[4], bv[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = to_acc<T>(sA[(ty * 4 + i) * BK + k]);
#pragma unroll
      for (int j = 0; j < 8; ++j) bv[j] = to_acc<T>(sB[k * BN + tx + 8 * j]);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] += av[i] * bv[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) sC[(ty * 4 + i) * LDC + tx + 8 * j] = acc[i][j];
}

// Main loop on tensor cores: 4 warps in a 2 x 2 grid, each a 32 x 32 sub-tile of 2 x 2 wmma fragments.
// MMA == wmma16: fp16/bf16 operands, m16n16k16. MMA == tf32: fp32 operands rounded to TF32, m16n16k8.
template <typename T, Mma MMA>
__device__ void mainloop_wmma(const GemmParams& p, const T* a, const T* b, int64_t m0, int64_t n0,
                              unsigned char* smem, float* sC) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  constexpr int BK = Tile<T, MMA>::BK;
  constexpr int FK = MMA == Mma::tf32 ? 8 : 16;
  using FragT = typename std::conditional<MMA == Mma::tf32, wmma::precision::tf32, T>::type;
  T* sA = reinterpret_cast<T*>(smem);
  T* sB = sA + BM * BK;
  const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
  wmma::fragment<wmma::accumulator, 16, 16, FK, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  for (int64_t k0 = 0; k0 < p.K; k0 += BK) {
    stage_tiles<T>(p, a, b, m0, n0, k0, BK, sA, sB);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk += FK) {
      wmma::fragment<wmma::matrix_a, 16, 16, FK, FragT, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, FK, FragT, wmma::row_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(fa[i], sA + (wm * 32 + i * 16) * BK + kk, BK);
        wmma::load_matrix_sync(fb[i], sB + kk * BN + wn * 32 + i * 16, BN);
        if constexpr (MMA == Mma::tf32) {
#pragma unroll
          for (int e = 0; e < fa[i].num_elements; ++e) fa[i].x[e] = wmma::__float_to_tf32(fa[i].x[e]);
#pragma unroll
          for (int e = 0; e < fb[i].num_elements; ++e) fb[i].x[e] = wmma::__float_to_tf32(fb[i].x[e]);
        }
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(sC + (wm * 32 + i * 16) * LDC + wn * 32 + j * 16, acc[i][j], LDC, wmma::mem_row_major);
#else
  // Tensor-core paths are only launched on sm_80+; older targets keep a correct FFMA fallback.
  mainloop_ffma<T>(p, a, b, m0, n0, smem, reinterpret_cast<acc_t<T>*>(sC));
#endif
}

// Conv epilogue over the accumulator tile in shared memory.
template <typename T>
__device__ void conv_epilogue(const GemmParams& p, const acc_t<T>* sC, int64_t m0, int64_t n0, int64_t z) {
  using Acc = acc_t<T>;
  const int rows = int(min_of<int64_t>(BM, p.M - m0));
  const int cols = int(min_of<int64_t>(BN, p.N - n0));
  if (p.stat_count != nullptr) {
    const int64_t tile = (p.m0 + m0) / BM;
    for (int n = threadIdx.x; n < cols; n += THREADS) {
      Acc s = 0;
      for (int m = 0; m < rows; ++m) s += sC[m * LDC + n];
      const Acc mean = s / Acc(rows);
      Acc q = 0;
      for (int m = 0; m < rows; ++m) {
        const Acc d = sC[m * LDC + n] - mean;
        q += d * d;
      }
      const int64_t off = tile * p.g.C_out + z * p.N + n0 + n;
      static_cast<Acc*>(p.stat_count)[off] = Acc(rows);
      static_cast<Acc*>(p.stat_mean)[off] = mean;
      static_cast<Acc*>(p.stat_m2)[off] = q;
    }
  }
  const EpilogueParams<Acc> ep{static_cast<const Acc*>(p.bias), static_cast<const Acc*>(p.scale),
                               static_cast<const Acc*>(p.shift), p.act};
  const T* res = static_cast<const T*>(p.residual);
  T* y = static_cast<T*>(p.y);
  const bool channel_fastest = p.ys[1] == 1;  // channels_last: consecutive threads take consecutive channels
  for (int i = threadIdx.x; i < BM * BN; i += THREADS) {
    const int m = channel_fastest ? i / BN : i % BM;
    const int n = channel_fastest ? i % BN : i / BM;
    if (m >= rows || n >= cols) continue;
    const Pixel px = split_row(p.m0 + m0 + m, p.g);
    const int64_t c = z * p.N + n0 + n;
    const Acc r = res ? to_acc<T>(res[px.n * p.rs[0] + c * p.rs[1] + px.h * p.rs[2] + px.w * p.rs[3]]) : Acc(0);
    const Acc v = epilogue_value<Acc>(sC[m * LDC + n], c, ep, res != nullptr, r);
    y[px.n * p.ys[0] + c * p.ys[1] + px.h * p.ys[2] + px.w * p.ys[3]] = from_acc<T>(v);
  }
}

template <typename T>
__device__ void plain_epilogue(const GemmParams& p, const acc_t<T>* sC, int64_t m0, int64_t n0, int64_t z) {
  using Acc = acc_t<T>;
  Acc* c = static_cast<Acc*>(p.c) + z * p.c_batch;
  for (int i = threadIdx.x; i < BM * BN; i += THREADS) {
    const int m = i / BN, n = i % BN;
    const int64_t gm = m0 + m, gn = n0 + n;
    if (gm >= p.M || gn >= p.N) continue;
    Acc* dst = c + gm * p.scm + gn * p.scn;
    *dst = p.accumulate ? *dst + sC[m * LDC + n] : sC[m * LDC + n];
  }
}

template <typename T, Mma MMA>
__global__ void __launch_bounds__(THREADS) gemm_kernel(GemmParams p) {
  using Acc = acc_t<T>;
  __shared__ __align__(32) unsigned char smem[Tile<T, MMA>::kSmemBytes];
  const int64_t z = blockIdx.z;
  const int64_t m0 = int64_t(blockIdx.x) * BM, n0 = int64_t(blockIdx.y) * BN;
  const T* a = static_cast<const T*>(p.a) + z * p.a_batch;
  const T* b = static_cast<const T*>(p.b) + z * p.b_batch;
  Acc* sC = reinterpret_cast<Acc*>(smem);
  if constexpr (MMA == Mma::ffma) {
    mainloop_ffma<T>(p, a, b, m0, n0, smem, sC);
  } else {
    mainloop_wmma<T, MMA>(p, a, b, m0, n0, smem, reinterpret_cast<float*>(smem));
  }
  __syncthreads();
  if (p.conv) {
    conv_epilogue<T>(p, sC, m0, n0, z);
  } else {
    plain_epilogue<T>(p, sC, m0, n0, z);
  }
}

template <typename T, Mma MMA>
cudaError_t launch(const GemmParams& p, cudaStream_t stream) {
  const dim3 grid(unsigned(ceil_div(p.M, BM)), unsigned(ceil_div(p.N, BN)), unsigned(p.batch));
  gemm_kernel<T, MMA><<<grid, THREADS, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gemm(const GemmParams& p, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0 || p.batch == 0) return cudaSuccess;
  if (ceil_div(p.N, BN) > 65535 || p.batch > 65535 || ceil_div(p.M, BM) > 2147483647) return cudaErrorInvalidConfiguration;
  switch (p.dtype) {
    case DType::f16:
      return launch<__half, Mma::wmma16>(p, stream);
    case DType::bf16:
      return launch<__nv_bfloat16, Mma::wmma16>(p, stream);
    case DType::f32:
      return p.allow_tf32 ? launch<float, Mma::tf32>(p, stream) : launch<float, Mma::ffma>(p, stream);
    case DType::f64:
      return launch<double, Mma::ffma>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastconv
