// The conv GEMM's fused epilogue, shared by the CPU twin and the CUDA kernel:
//   y = act(((acc + bias[c]) * scale[c] + shift[c]) + residual[n, c, oh, ow]), cast to y's dtype,
// and the BatchNorm partials of one row tile (count, mean, M2 of acc per channel, before the bias; combined
// later with Chan's formula by ext_batch_norm_finalize). Same math as fastconv/triton/_epilogue.py.
#pragma once

#include "fastconv/common.h"

namespace fastconv {

// Rows per BatchNorm-partials tile of the C++ backends: stats tensors are [ceil_div(M, kStatsRows), C_out].
constexpr int64_t kStatsRows = 64;

template <typename Acc>
struct EpilogueParams {
  const Acc* bias;   // [C_out] or nullptr
  const Acc* scale;  // [C_out] or nullptr
  const Acc* shift;  // [C_out] or nullptr
  Act act;
};

template <typename Acc>
FASTCONV_HD inline Acc epilogue_value(Acc acc, int64_t c, const EpilogueParams<Acc>& p, bool has_res,
                                      Acc res) {
  if (p.bias) acc += p.bias[c];
  if (p.scale) acc *= p.scale[c];
  if (p.shift) acc += p.shift[c];
  if (has_res) acc += res;
  return apply_act(acc, p.act);
}

}  // namespace fastconv
