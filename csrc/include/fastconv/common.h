// Definitions shared by every fastconv kernel, CPU (csrc/cpu) and CUDA (csrc/cuda) alike.
// Plain C++ only: no torch / ATen / c10 includes, so .cu files that include this compile with nvcc alone.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTCONV_HD __host__ __device__
#else
#define FASTCONV_HD
#endif

namespace fastconv {

// Same order as fastconv.ops.conv2d.ACTIVATIONS and the Triton epilogue's ACT codes.
enum class Act : int64_t { identity = 0, relu = 1, relu6 = 2, silu = 3, hardswish = 4 };

constexpr int64_t kNumActs = 5;

FASTCONV_HD inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
FASTCONV_HD inline T min_of(T a, T b) { return a < b ? a : b; }

template <typename T>
FASTCONV_HD inline T max_of(T a, T b) { return a < b ? b : a; }

// Activation applied to the pre-activation u (computed in float or double).
template <typename T>
FASTCONV_HD inline T apply_act(T u, Act act) {
  switch (act) {
    // NaN stays NaN, as in torch.relu / relu6 (every comparison with NaN is false)
    case Act::relu:
      return u < T(0) ? T(0) : u;
    case Act::relu6:
      return u < T(0) ? T(0) : (u > T(6) ? T(6) : u);
    case Act::silu:
      return u / (T(1) + exp(-u));
    case Act::hardswish:
      return u * min_of(max_of(u + T(3), T(0)), T(6)) / T(6);
    case Act::identity:
    default:
      return u;
  }
}

// d act(u) / du at the pre-activation u.
template <typename T>
FASTCONV_HD inline T act_grad(T u, Act act) {
  switch (act) {
    // as PyTorch's threshold / hardtanh backward: a NaN passes the gradient through
    case Act::relu:
      return u <= T(0) ? T(0) : T(1);
    case Act::relu6:
      return (u <= T(0) || u >= T(6)) ? T(0) : T(1);
    case Act::silu: {
      T s = T(1) / (T(1) + exp(-u));
      return s * (T(1) + u * (T(1) - s));
    }
    case Act::hardswish:
      return u <= T(-3) ? T(0) : (u >= T(3) ? T(1) : (T(2) * u + T(3)) / T(6));
    case Act::identity:
    default:
      return T(1);
  }
}

FASTCONV_HD inline bool valid_act(int64_t code) { return code >= 0 && code < kNumActs; }

}  // namespace fastconv
