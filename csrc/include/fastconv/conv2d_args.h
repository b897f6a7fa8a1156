// Argument checks and geometry for the C++ conv2d ops (host side, shared by csrc/cpu and csrc/cuda .cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <array>
#include <tuple>

#include "fastconv/im2col.h"

namespace fastconv {

inline ConvGeom conv_geom(at::IntArrayRef in_size, at::IntArrayRef w_size, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, const char* op) {
  TORCH_CHECK(in_size.size() == 4, op, ": expected a 4-D (N, C, H, W) input, got size ", in_size);
  TORCH_CHECK(w_size.size() == 4, op, ": expected a 4-D (C_out, C_in/groups, kH, kW) weight, got size ", w_size);
  TORCH_CHECK(stride.size() == 2 && padding.size() == 4 && dilation.size() == 2, op,
              ": expected stride[2], padding[4] (top, bottom, left, right), dilation[2]; got ", stride.size(), ", ",
              padding.size(), ", ", dilation.size());
  TORCH_CHECK(groups > 0, op, ": groups must be positive, got ", groups);
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0, op, ": stride must be positive, got ", stride);
  TORCH_CHECK(dilation[0] > 0 && dilation[1] > 0, op, ": dilation must be positive, got ", dilation);
  for (auto p : padding) TORCH_CHECK(p >= 0, op, ": padding must be non-negative, got ", padding);
  ConvGeom g;
  g.N = in_size[0];
  g.C = in_size[1];
  g.H = in_size[2];
  g.W = in_size[3];
  g.C_out = w_size[0];
  g.KH = w_size[2];
  g.KW = w_size[3];
  g.groups = groups;
  TORCH_CHECK(g.C % groups == 0 && g.C_out % groups == 0, op, ": in_channels (", g.C, ") and out_channels (",
              g.C_out, ") must be divisible by groups (", groups, ")");
  g.cin_g = g.C / groups;
  g.cout_g = g.C_out / groups;
  TORCH_CHECK(w_size[1] == g.cin_g, op, ": weight of size ", w_size, " expects ", w_size[1] * groups,
              " input channels, but the input has ", g.C);
  g.sh = stride[0];
  g.sw = stride[1];
  g.pad_top = padding[0];
  g.pad_left = padding[2];
  g.dh = dilation[0];
  g.dw = dilation[1];
  g.OH = (g.H + padding[0] + padding[1] - g.dh * (g.KH - 1) - 1) / g.sh + 1;
  g.OW = (g.W + padding[2] + padding[3] - g.dw * (g.KW - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.OH > 0 && g.OW > 0, op, ": the (padded) input is smaller than the (dilated) kernel");
  return g;
}

inline void check_same(const at::Tensor& a, const at::Tensor& ref, const char* what, const char* op) {
  TORCH_CHECK(a.device() == ref.device(), op, ": ", what, " is on ", a.device(), " but the input is on ",
              ref.device());
}

inline void check_channel_vector(const c10::optional<at::Tensor>& t, int64_t C, const at::Tensor& ref,
                                 const char* what, const char* op) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == C, op, ": ", what, " must have shape [", C, "], got ", t->sizes());
  check_same(*t, ref, what, op);
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), op, ": ", what, " must be floating point, got ",
              t->scalar_type());
}

inline void check_float_dtype(const at::Tensor& t, const char* op) {
  auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, op,
              ": unsupported dtype ", s, " (float32, float64, float16, bfloat16 are supported)");
}

inline void check_grad_output(const at::Tensor& grad_output, const ConvGeom& g, const char* op) {
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == g.N && grad_output.size(1) == g.C_out &&
                  grad_output.size(2) == g.OH && grad_output.size(3) == g.OW,
              op, ": grad_output has size ", grad_output.sizes(), ", expected [", g.N, ", ", g.C_out, ", ", g.OH,
              ", ", g.OW, "]");
}

// Device-independent checks of ext_conv2d_input_grad (each backend checks the device after).
inline ConvGeom check_input_grad_args(const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& out,
                                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                      int64_t groups, const char* op) {
  ConvGeom g = conv_geom(out.sizes(), weight.sizes(), stride, padding, dilation, groups, op);
  check_float_dtype(grad_output, op);
  TORCH_CHECK(weight.scalar_type() == grad_output.scalar_type() && out.scalar_type() == grad_output.scalar_type(),
              op, ": grad_output, weight and out must have the same dtype");
  check_grad_output(grad_output, g, op);
  return g;
}

// Device-independent checks of ext_conv2d_weight_grad (each backend checks the device after).
inline ConvGeom check_weight_grad_args(const at::Tensor& grad_output, const at::Tensor& input,
                                       at::IntArrayRef weight_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                       at::IntArrayRef dilation, int64_t groups, const char* op) {
  ConvGeom g = conv_geom(input.sizes(), weight_size, stride, padding, dilation, groups, op);
  check_float_dtype(input, op);
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), op, ": grad_output and input must have the same dtype");
  check_grad_output(grad_output, g, op);
  return g;
}

inline std::array<int64_t, 4> strides4(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Validates the forward's tensors against the geometry; returns it.
inline ConvGeom check_conv_forward(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                   int64_t groups, const c10::optional<at::Tensor>& scale,
                                   const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& residual,
                                   int64_t activation, const at::Tensor& out, const char* op) {
  ConvGeom g = conv_geom(x.sizes(), w.sizes(), stride, padding, dilation, groups, op);
  check_float_dtype(x, op);
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), op, ": input (", x.scalar_type(), ") and weight (",
              w.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), op, ": out must have the input's dtype");
  check_same(w, x, "weight", op);
  check_same(out, x, "out", op);
  TORCH_CHECK(out.dim() == 4 && out.size(0) == g.N && out.size(1) == g.C_out && out.size(2) == g.OH &&
                  out.size(3) == g.OW,
              op, ": out has size ", out.sizes(), ", expected [", g.N, ", ", g.C_out, ", ", g.OH, ", ", g.OW, "]");
  check_channel_vector(bias, g.C_out, x, "bias", op);
  check_channel_vector(scale, g.C_out, x, "scale", op);
  check_channel_vector(shift, g.C_out, x, "shift", op);
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == out.sizes(), op, ": residual must have the output's size ", out.sizes(),
                ", got ", residual->sizes());
    check_same(*residual, x, "residual", op);
  }
  TORCH_CHECK(valid_act(activation), op, ": unknown activation code ", activation);
  return g;
}

// fp32 vectors of the epilogue (fp64 for fp64 inputs), or an undefined tensor.
inline at::Tensor epilogue_vector(const c10::optional<at::Tensor>& t, at::ScalarType acc) {
  return t.has_value() ? t->to(acc).contiguous() : at::Tensor();
}

inline at::ScalarType acc_type(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> stats_outputs(const ConvGeom& g, bool stats,
                                                                    at::ScalarType dtype, at::Device dev,
                                                                    int64_t rows_per_tile) {
  int64_t T = stats ? ceil_div(g.rows(), rows_per_tile) : 0;
  auto opts = at::TensorOptions().dtype(acc_type(dtype)).device(dev);
  return {at::empty({T, g.C_out}, opts), at::empty({T, g.C_out}, opts), at::empty({T, g.C_out}, opts)};
}

}  // namespace fastconv
