// Torch-side argument checks and output allocation of fastconv::ext_max_pool2d(_input_grad), shared by the
// CPU (csrc/cpu/max_pool2d.cpp) and CUDA (csrc/cuda/max_pool2d_cuda.cpp) registrations.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "fastconv/max_pool2d.h"

namespace fastconv {

struct PoolShape {
  PoolGeometry g;
  int64_t N, C, H, W, OH, OW;
  at::MemoryFormat format;
};

inline at::ScalarType pool_offsets_dtype(int64_t taps) {
  if (taps <= 128) return at::kChar;
  if (taps <= 32768) return at::kShort;
  return at::kInt;
}

inline PoolGeometry pool_geometry(const char* op, at::IntArrayRef k, at::IntArrayRef s, at::IntArrayRef p,
                                  at::IntArrayRef d) {
  TORCH_CHECK(k.size() == 2 && s.size() == 2 && p.size() == 2 && d.size() == 2, op,
              ": kernel_size, stride, padding and dilation must each have 2 values");
  TORCH_CHECK(k[0] > 0 && k[1] > 0, op, ": kernel size should be greater than zero, but got kH: ", k[0],
              " kW: ", k[1]);
  TORCH_CHECK(s[0] > 0 && s[1] > 0, op, ": stride should be greater than zero, but got dH: ", s[0], " dW: ", s[1]);
  TORCH_CHECK(d[0] > 0 && d[1] > 0, op, ": dilation should be greater than zero, but got dilationH: ", d[0],
              " dilationW: ", d[1]);
  TORCH_CHECK(p[0] >= 0 && p[1] >= 0 && p[0] <= k[0] / 2 && p[1] <= k[1] / 2, op,
              ": pad should be smaller than or equal to half of kernel size, but got padW = ", p[1],
              ", padH = ", p[0], ", kW = ", k[1], ", kH = ", k[0]);
  return PoolGeometry{k[0], k[1], s[0], s[1], p[0], p[1], d[0], d[1]};
}

inline PoolShape pool_shape(const char* op, at::IntArrayRef size, const PoolGeometry& g, bool ceil_mode,
                            at::MemoryFormat format) {
  TORCH_CHECK(size.size() == 4, op, ": expects a 4-D [N, C, H, W] input, got ", size.size(), " dimensions");
  PoolShape s{g, size[0], size[1], size[2], size[3], 0, 0, format};
  TORCH_CHECK(s.C > 0 && s.H > 0 && s.W > 0, op, ": expects non-empty C, H, W, got shape ", size);
  s.OH = pool_output_size(s.H, g.KH, g.SH, g.PH, g.DH, ceil_mode);
  s.OW = pool_output_size(s.W, g.KW, g.SW, g.PW, g.DW, ceil_mode);
  TORCH_CHECK(s.OH >= 1 && s.OW >= 1, op, ": Given input size: (", s.C, "x", s.H, "x", s.W,
              "). Calculated output size: (", s.C, "x", s.OH, "x", s.OW, "). Output size is too small");
  return s;
}

inline void pool_check_float(const char* op, const at::Tensor& t, const char* what, bool allow_double) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || (allow_double && st == at::kDouble),
              op, ": ", what, " must be float32, float16 or bfloat16", allow_double ? " or float64" : "", ", got ",
              st);
}

// Forward: (shape, out, offsets) for `input`; out/offsets in input's suggested memory format (offsets empty
// without want_offsets).
inline std::tuple<PoolShape, at::Tensor, at::Tensor> pool_forward_outputs(const char* op, const at::Tensor& input,
                                                                          at::IntArrayRef k, at::IntArrayRef s,
                                                                          at::IntArrayRef p, at::IntArrayRef d,
                                                                          bool ceil_mode, bool want_offsets) {
  TORCH_CHECK(input.dim() == 4, op, ": expects a 4-D [N, C, H, W] input, got shape ", input.sizes());
  const PoolGeometry g = pool_geometry(op, k, s, p, d);
  PoolShape sh = pool_shape(op, input.sizes(), g, ceil_mode, input.suggest_memory_format());
  auto opts = input.options().memory_format(sh.format);
  at::Tensor out = at::empty({sh.N, sh.C, sh.OH, sh.OW}, opts);
  const auto off_dtype = pool_offsets_dtype(g.KH * g.KW);
  at::Tensor offsets = want_offsets ? at::empty({sh.N, sh.C, sh.OH, sh.OW}, opts.dtype(off_dtype))
                                    : at::empty({0}, input.options().dtype(off_dtype));
  return {sh, out, offsets};
}

// Backward: (shape, grad_input) after checking grad_output / offsets against the geometry.
inline std::tuple<PoolShape, at::Tensor> pool_backward_output(const char* op, const at::Tensor& grad_output,
                                                              const at::Tensor& offsets, at::IntArrayRef input_size,
                                                              at::IntArrayRef k, at::IntArrayRef s, at::IntArrayRef p,
                                                              at::IntArrayRef d, bool ceil_mode, bool channels_last) {
  const PoolGeometry g = pool_geometry(op, k, s, p, d);
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  PoolShape sh = pool_shape(op, input_size, g, ceil_mode, fmt);
  const std::vector<int64_t> out_size{sh.N, sh.C, sh.OH, sh.OW};
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(out_size) && offsets.sizes() == at::IntArrayRef(out_size), op,
              ": expected grad_output and offsets of shape ", at::IntArrayRef(out_size), ", got ",
              grad_output.sizes(), " and ", offsets.sizes());
  const auto ot = offsets.scalar_type();
  TORCH_CHECK(ot == at::kChar || ot == at::kShort || ot == at::kInt, op,
              ": offsets must be int8/int16/int32 taps, got ", ot);
  TORCH_CHECK(grad_output.device() == offsets.device(), op, ": grad_output and offsets must be on one device, got ",
              grad_output.device(), " and ", offsets.device());
  at::Tensor grad_input = at::empty(input_size, grad_output.options().memory_format(fmt));
  return {sh, grad_input};
}

}  // namespace fastconv
