// The conv's gradients in the C++ eager autograd nodes (csrc/conv2d.cpp: a plain conv; csrc/conv_bn_act.cpp: the
// fused block): dgrad and wgrad through the ext ops, as fastconv.ops.conv2d.conv2d_grads runs them on backends
// cpu / cuda.
#pragma once

#include <ATen/Context.h>
#include <ATen/ops/empty.h>

#include "batch_norm.h"
#include "ext_ops.h"

namespace fastconv {

// fp32 GEMMs may use TF32 exactly when nn.Conv2d would (fastconv.ops.conv2d._allow_tf32).
inline bool allow_tf32(const at::Tensor& t) {
  return t.is_cuda() && t.scalar_type() == at::kFloat && at::globalContext().allowTF32CuDNN();
}

// geometry: stride (2), padding (4: top, bottom, left, right), dilation (2), groups, input size (4), weight size (4)
constexpr size_t kGeoGroups = 8, kGeoInputSize = 9, kGeoWeightSize = 13, kGeoLength = 17;

inline std::vector<int64_t> conv_geometry(const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                                          const std::vector<int64_t>& dilation, int64_t groups, const at::Tensor& x,
                                          const at::Tensor& weight) {
  std::vector<int64_t> g;
  g.reserve(kGeoLength);
  for (const auto* v : {&stride, &padding, &dilation}) g.insert(g.end(), v->begin(), v->end());
  g.push_back(groups);
  g.insert(g.end(), x.sizes().begin(), x.sizes().end());
  g.insert(g.end(), weight.sizes().begin(), weight.sizes().end());
  return g;
}

// (dx, dw, db) of z = conv(x, weight) + bias from grad_z, each undefined unless wanted: dx laid out like grad_z,
// dw like the weight (fastconv.ops.conv2d.conv2d_input_grad / conv2d_weight_grad).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_grads(const at::Tensor& grad_z, const at::Tensor& x,
                                                                   const at::Tensor& weight,
                                                                   const std::vector<int64_t>& geometry, bool want_x,
                                                                   bool want_w, bool want_b) {
  const at::IntArrayRef stride(geometry.data(), 2), padding(geometry.data() + 2, 4), dilation(geometry.data() + 6, 2),
      input_size(geometry.data() + kGeoInputSize, 4), weight_size(geometry.data() + kGeoWeightSize, 4);
  const int64_t groups = geometry[kGeoGroups];
  at::Tensor dx, dw, db;
  if (want_x) {
    dx = at::empty(input_size, grad_z.options().memory_format(bn_format(grad_z)));
    FASTCONV_HANDLE(ext::Conv2dInputGradFn, "fastconv::ext_conv2d_input_grad");
    op.call(grad_z, weight, stride, padding, dilation, groups, allow_tf32(grad_z), dx);
  }
  if (want_w || want_b) {
    FASTCONV_HANDLE(ext::Conv2dWeightGradFn, "fastconv::ext_conv2d_weight_grad");
    auto [w, b] = op.call(grad_z, x, weight_size, stride, padding, dilation, groups, want_b, allow_tf32(x));
    if (want_w) dw = w.contiguous(bn_format(weight));  // dw in the weight's layout
    if (want_b) db = b;
  }
  return {dx, dw, db};
}

}  // namespace fastconv
