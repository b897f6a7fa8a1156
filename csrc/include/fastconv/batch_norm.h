// Training-mode BatchNorm math shared by the CPU twin (csrc/cpu/batch_norm.cpp) and the CUDA kernels
// (csrc/cuda/batch_norm.cu). Plain C++: no torch includes. Acc is float (double for fp64 tensors).
//
// Forward:  partials (count, mean, M2) per [tile, channel] -> Chan combination (in passes, below) -> mean
//           (+ conv bias), biased var
//           y = act((z - mean) * invstd * gamma + beta [+ residual])
// Backward: g = dy * act'(u), xhat = (z - mean) * invstd
//           sum_g, sum_gx = sums over (n, h, w) of g and g * xhat (per tile, then combined like the forward's)
//           dz = gamma * invstd * (g - sum_g / P - xhat * sum_gx / P)
#pragma once

#include <cstdint>

#include "fastconv/common.h"

namespace fastconv {

// Running statistics of a set of values: count, mean, M2 (sum of squared deviations from the mean).
template <typename Acc>
struct Moments {
  Acc n, mean, m2;
};

// Welford's update with one value.
template <typename Acc>
FASTCONV_HD inline void moments_push(Moments<Acc>& a, Acc v) {
  a.n += Acc(1);
  const Acc d = v - a.mean;
  a.mean += d / a.n;
  a.m2 += d * (v - a.mean);
}

// Chan's parallel combination of two sets (either may be empty):
//   n = na + nb, d = mb - ma, mean = ma + d * nb / n, M2 = M2a + M2b + d^2 * na * nb / n.
template <typename Acc>
FASTCONV_HD inline void moments_merge(Moments<Acc>& a, Acc nb, Acc mean_b, Acc m2_b) {
  if (nb <= Acc(0)) return;
  const Acc n = a.n + nb;
  const Acc frac = nb / n;
  const Acc d = mean_b - a.mean;
  a.mean += d * frac;
  a.m2 += m2_b + d * d * a.n * frac;
  a.n = n;
}

// Gradient sums of the backward: sum_g and sum_gx over a set of pixels.
template <typename Acc>
struct GradSums {
  Acc g, gx;
};

// combine(a, b): a becomes the state of both sets. The one merge step of every BatchNorm reduction.
template <typename Acc>
FASTCONV_HD inline void combine(Moments<Acc>& a, const Moments<Acc>& b) {
  moments_merge(a, b.n, b.mean, b.m2);
}
template <typename Acc>
FASTCONV_HD inline void combine(GradSums<Acc>& a, const GradSums<Acc>& b) {
  a.g += b.g;
  a.gx += b.gx;
}

// Biased variance of the combined set (0 for an empty set).
template <typename Acc>
FASTCONV_HD inline Acc moments_var(const Moments<Acc>& a) {
  return a.n > Acc(0) ? a.m2 / a.n : Acc(0);
}

// F.batch_norm's training update of one running statistic, as at::lerp computes it in the buffer's opmath
// type O: running + w * (stat - running), from the other end for w >= 0.5. The caller rounds the batch
// statistic (and a tensor momentum) to the buffer's dtype first, as `buf.lerp_(stat.to(buf.dtype), w)` does.
template <typename O>
FASTCONV_HD inline O bn_running_lerp(O running, O stat, O w) {
  return w < O(0.5) ? running + w * (stat - running) : stat - (stat - running) * (O(1) - w);
}

// ---------------------------------------------------------------------------------------------------------
// Combination of [rows, C] partial states into one state per channel (ext_batch_norm_finalize: Moments;
// the backward's sums: GradSums), in passes: a pass cuts its rows into chunks of kBnCombineRows and writes
// one state per (chunk, channel), a [chunks, C] array the next pass combines, until one chunk is left.
//   CUDA: a pass is one launch of grid (chunks, channel blocks of kBnCombineChannels); in a block, row lane j
//         (of kBnCombineLanes) merges rows r0 + j, r0 + j + kBnCombineLanes, ... in order (bn_combine_lane),
//         then the lanes merge as a tree in shared memory: lane j takes lane j + s for s = lanes/2, ..., 1.
//   CPU:  the same passes, chunks, lanes and tree (bn_combine_tree), run serially: same order of merges.
// Serial bound: a thread merges at most kBnCombineRowsPerLane rows plus log2(kBnCombineLanes) tree steps per
// pass (64 + 3), whatever T; T rows take 1 pass up to 512 rows, 2 up to 512^2, 3 up to 512^3 (fastconv::
// ext_batch_norm_plan lists them).
// Pixels per statistics tile of ext_batch_norm_stats: row t of the [T, C] partials covers pixels
// [t * rows, (t + 1) * rows) (reported by ext_build_info for the ops' fake kernels).
constexpr int64_t kBnTileRowsCpu = 1024;
constexpr int64_t kBnTileRowsCuda = 512;

constexpr int kBnCombineLanes = 8;                  // row lanes per channel
constexpr int kBnCombineChannels = 32;              // channel lanes of a CUDA block (a warp, coalesced rows)
constexpr int64_t kBnCombineRowsPerLane = 64;       // serial merges of one lane per pass
constexpr int64_t kBnCombineRows = kBnCombineLanes * kBnCombineRowsPerLane;  // rows per chunk: 512

// Chunks of a pass over `rows` rows (at least 1: zero rows still give one empty state per channel).
FASTCONV_HD inline int64_t bn_combine_chunks(int64_t rows) {
  return rows > kBnCombineRows ? ceil_div(rows, kBnCombineRows) : 1;
}

// Calls f(rows, chunks) for each pass of a combination of T rows, in order; the last has chunks == 1 and the
// next pass's rows are the previous pass's chunks.
template <typename F>
inline void bn_combine_passes(int64_t T, const F& f) {
  int64_t rows = T, chunks = 1;
  do {
    chunks = bn_combine_chunks(rows);
    f(rows, chunks);
    rows = chunks;
  } while (chunks > 1);
}

// Rows all passes but the last write together: the workspace (in states of C channels) of a combination.
inline int64_t bn_combine_workspace_rows(int64_t T) {
  int64_t total = 0;
  bn_combine_passes(T, [&](int64_t, int64_t chunks) { total += chunks > 1 ? chunks : 0; });
  return total;
}

// Row lane `lane` of a chunk [r0, r1): its rows in order, row(r) giving the state of row r.
template <typename S, typename Row>
FASTCONV_HD inline S bn_combine_lane(const Row& row, int64_t r0, int64_t r1, int lane) {
  S s{};
  for (int64_t r = r0 + lane; r < r1; r += kBnCombineLanes) combine(s, row(r));
  return s;
}

// The lanes' tree, serially (the CUDA block runs each step's merges in parallel); lanes[0] gets the total.
template <typename S>
FASTCONV_HD inline void bn_combine_tree(S* lanes, int n) {
  for (int s = n / 2; s > 0; s /= 2)
    for (int j = 0; j < s; ++j) combine(lanes[j], lanes[j + s]);
}

// Per-channel coefficients: y = act(z * scale + shift [+ residual]), scale = gamma * invstd.
template <typename Acc>
struct BnChannel {
  Acc mean, invstd, gamma, beta;
  FASTCONV_HD Acc scale() const { return gamma * invstd; }
  FASTCONV_HD Acc shift() const { return beta - mean * gamma * invstd; }
};

template <typename Acc, typename W>
FASTCONV_HD inline BnChannel<Acc> bn_channel(const Acc* mean, const Acc* var, const W* weight, const W* bias,
                                            Acc eps, int64_t c) {
  BnChannel<Acc> ch;
  ch.mean = mean[c];
  ch.invstd = Acc(1) / sqrt(var[c] + eps);
  ch.gamma = weight ? static_cast<Acc>(weight[c]) : Acc(1);
  ch.beta = bias ? static_cast<Acc>(bias[c]) : Acc(0);
  return ch;
}

// Forward value of one element (residual: 0 when absent).
template <typename Acc>
FASTCONV_HD inline Acc bn_act_value(Acc z, const BnChannel<Acc>& ch, Acc residual, Act act) {
  return apply_act((z - ch.mean) * ch.invstd * ch.gamma + ch.beta + residual, act);
}

// Backward of one element: g = dy * act'(u) with u rebuilt from z; also returns xhat.
template <typename Acc>
FASTCONV_HD inline Acc bn_act_grad(Acc dy, Acc z, const BnChannel<Acc>& ch, Acc residual, Act act, Acc& xhat) {
  xhat = (z - ch.mean) * ch.invstd;
  if (act == Act::identity) return dy;
  return dy * act_grad(xhat * ch.gamma + ch.beta + residual, act);
}

// grad_z of one element from its g, xhat and the channel's mean_g = sum_g / P, mean_gx = sum_gx / P.
template <typename Acc>
FASTCONV_HD inline Acc bn_grad_z(Acc g, Acc xhat, const BnChannel<Acc>& ch, Acc mean_g, Acc mean_gx) {
  return ch.gamma * ch.invstd * (g - mean_g - xhat * mean_gx);
}

}  // namespace fastconv
