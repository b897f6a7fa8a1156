// Training-mode BatchNorm math shared by the CPU twin (csrc/cpu/batch_norm.cpp) and the CUDA kernels
// (csrc/cuda/batch_norm.cu). Plain C++: no torch includes. Acc is float (double for fp64 tensors).
//
// Forward:  partials (count, mean, M2) per [tile, channel] -> Chan combination -> mean (+ conv bias), biased var
//           y = act((z - mean) * invstd * gamma + beta [+ residual])
// Backward: g = dy * act'(u), xhat = (z - mean) * invstd
//           sum_g, sum_gx = sums over (n, h, w) of g and g * xhat
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

// Biased variance of the combined set (0 for an empty set).
template <typename Acc>
FASTCONV_HD inline Acc moments_var(const Moments<Acc>& a) {
  return a.n > Acc(0) ? a.m2 / a.n : Acc(0);
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
