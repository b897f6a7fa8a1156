// Schemas of the C++ conv2d ops (kernels: csrc/cpu/conv2d.cpp, csrc/cuda/conv2d_cuda.cpp), and below them the
// eager C++ autograd node of a conv without an epilogue. Python's
// fastconv::conv2d / conv2d_input_grad / conv2d_weight_grad call these for the 'cpu' and 'cuda' backends and
// keep the autograd, fake (register_fake in fastconv/ops/conv2d.py) and autocast registrations.
//
// padding is (top, bottom, left, right); activation is the index into fastconv.ops.conv2d.ACTIVATIONS.
// ext_conv2d writes y into `out` (any strides) and, with stats=True, returns BatchNorm partials
// (count, mean, M2) of shape [ceil(N*OH*OW / 64), C_out] taken before the bias (else three [0, C_out]).
#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "conv2d.h"
#include "conv2d_grads.h"
#include "fastconv/common.h"

TORCH_LIBRARY_FRAGMENT(fastconv, m) {
  m.def(
      "ext_conv2d(Tensor input, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] dilation, "
      "int groups, Tensor? scale, Tensor? shift, Tensor? residual, int activation, bool stats, "
      "bool allow_tf32, Tensor(a!) out) -> (Tensor, Tensor, Tensor)");
  m.def(
      "ext_conv2d_input_grad(Tensor grad_output, Tensor weight, int[] stride, int[] padding, int[] dilation, "
      "int groups, bool allow_tf32, Tensor(a!) out) -> ()");
  m.def(
      "ext_conv2d_weight_grad(Tensor grad_output, Tensor input, int[] weight_size, int[] stride, "
      "int[] padding, int[] dilation, int groups, bool bias_grad, bool allow_tf32) -> (Tensor, Tensor)");
}

// ---------------------------------------------------------------------------------------------------------------
// The eager fast path of fastconv::conv2d without an epilogue on the C++ backends: z = conv(x, weight) + bias as one
// C++ autograd node (backward: dgrad and wgrad), bound as fastconv._C.conv2d_train. The Python autograd Function of
// fastconv.ops.conv2d runs the same ext ops; this drops its Python frames (see csrc/conv_bn_act.cpp).
namespace fastconv {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct ConvArgs {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;
  std::vector<int64_t> out_size;
  bool out_channels_last, allow_tf32;
};

struct Conv2dTrain : public torch::autograd::Function<Conv2dTrain> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, const ConvArgs& a) {
    auto out = at::empty(a.out_size, x.options().memory_format(a.out_channels_last ? at::MemoryFormat::ChannelsLast
                                                                                      : at::MemoryFormat::Contiguous));
    FASTCONV_HANDLE(ext::Conv2dFn, "fastconv::ext_conv2d");
    op.call(x, weight, bias, a.stride, a.padding, a.dilation, a.groups, c10::nullopt, c10::nullopt, c10::nullopt,
            static_cast<int64_t>(Act::identity), /*stats=*/false, a.allow_tf32, out);
    ctx->save_for_backward({x, weight});
    ctx->saved_data["geometry"] = conv_geometry(a.stride, a.padding, a.dilation, a.groups, x, weight);
    ctx->saved_data["bias"] = bias.has_value() && bias->defined();
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(4);  // x, weight, bias, ConvArgs
    if (!grads[0].defined()) return out;
    const auto saved = ctx->get_saved_variables();
    const bool want_b = ctx->saved_data["bias"].toBool() && ctx->needs_input_grad(2);
    std::tie(out[0], out[1], out[2]) = conv2d_grads(grads[0], saved[0], saved[1],
                                                    ctx->saved_data["geometry"].toIntVector(),
                                                    ctx->needs_input_grad(0), ctx->needs_input_grad(1), want_b);
    return out;
  }
};

}  // namespace

at::Tensor conv2d_train_eager(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                              std::vector<int64_t> stride, std::vector<int64_t> padding,
                              std::vector<int64_t> dilation, int64_t groups, std::vector<int64_t> out_size,
                              bool out_channels_last, bool allow_tf32) {
  TORCH_CHECK(stride.size() == 2 && padding.size() == 4 && dilation.size() == 2 && out_size.size() == 4 &&
                  x.dim() == 4 && weight.dim() == 4,
              "fastconv._C.conv2d_train: expects 4-D x and weight, stride[2], padding[4] (top, bottom, left, right), "
              "dilation[2], out_size[4]");
  const ConvArgs a{std::move(stride), std::move(padding), std::move(dilation), groups, std::move(out_size),
                   out_channels_last, allow_tf32};
  return Conv2dTrain::apply(x, weight, bias, a)[0];
}

}  // namespace fastconv
