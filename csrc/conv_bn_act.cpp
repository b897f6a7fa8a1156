// The eager fast path of fastconv::conv_bn_act_train on the C++ backends: the fused training block's forward
// (ext_conv2d with BatchNorm partials in its epilogue, ext_batch_norm_finalize, ext_batch_norm_act) and backward
// (ext_batch_norm_act_backward, the conv's dgrad and wgrad) as one C++ autograd node. The Python autograd
// Function that fastconv.ops.conv_bn_act registers runs the same ops in the same order; this one only drops its
// Python frames (forward, setup_context, backward, one Python entry per op): the host time of a fused block's
// training step is then below nn.Sequential(Conv2d, BatchNorm2d, ReLU)'s (bench/bench_overhead.py).
// torch.compile, dispatch modes, the profiler and autocast still take the custom op (fastconv/ops/_fastpath.py).
#include "conv_bn_act.h"

#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/variable.h>

#include "batch_norm.h"
#include "conv2d_grads.h"
#include "ext_ops.h"
#include "fastconv/common.h"

namespace fastconv {
namespace {

using ext::Tensor;
using ext::OptTensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : c10::nullopt; }

// What the node needs besides its differentiable inputs (kept out of autograd's edges).
struct Extra {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;
  double eps;
  std::string activation;
  OptTensor running_mean, running_var;
  double momentum;
  OptTensor momentum_tensor, num_batches_tracked;
  std::vector<int64_t> z_size;
  bool z_channels_last, allow_tf32;
  std::vector<OptTensor> producer;  // z, mean, var, bn_weight, bn_bias, residual; empty: none
  double producer_eps;
  std::string producer_activation;
};

// ctx->saved_data["edges"]: block_node::edges, then whether the node keeps a producer
using block_node::kBias;
using block_node::kBnBias;
using block_node::kBnWeight;
using block_node::kResidual;
constexpr size_t kProducer = 4;

Tensor batch_norm_act(const Tensor& z, const Tensor& mean, const Tensor& var, const OptTensor& weight,
                      const OptTensor& bias, const OptTensor& residual, double eps, const std::string& act) {
  FASTCONV_HANDLE(ext::BnActFn, "fastconv::ext_batch_norm_act");
  return op.call(z, mean, var, weight, bias, residual, eps, act);
}

struct ConvBnActTrain : public torch::autograd::Function<ConvBnActTrain> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                               const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& residual,
                               const Extra& e) {
    auto z = at::empty(e.z_size, x.options().memory_format(e.z_channels_last ? at::MemoryFormat::ChannelsLast
                                                                                : at::MemoryFormat::Contiguous));
    Tensor count, mean_p, m2_p;
    {
      FASTCONV_HANDLE(ext::Conv2dFn, "fastconv::ext_conv2d");
      std::tie(count, mean_p, m2_p) =
          op.call(x, weight, bias, e.stride, e.padding, e.dilation, e.groups, c10::nullopt, c10::nullopt,
                  c10::nullopt, static_cast<int64_t>(Act::identity), /*stats=*/true, e.allow_tf32, z);
    }
    Tensor mean, var;
    {
      FASTCONV_HANDLE(ext::BnFinalizeFn, "fastconv::ext_batch_norm_finalize");
      std::tie(mean, var) = op.call(count, mean_p, m2_p, bias, e.running_mean, e.running_var, e.momentum,
                                    e.momentum_tensor, e.num_batches_tracked, e.z_size[0] * e.z_size[2] * e.z_size[3]);
    }
    auto y = batch_norm_act(z, mean, var, bn_weight, bn_bias, residual, e.eps, e.activation);
    // the running statistics were updated in place: their version counters move as the custom op's would
    for (const auto* t : {&e.running_mean, &e.running_var, &e.num_batches_tracked}) {
      if (t->has_value() && (*t)->defined()) torch::autograd::impl::bump_version(**t);
    }

    ctx->mark_non_differentiable({z, mean, var});
    ctx->set_materialize_grads(false);  // z, mean, var get no gradient: no zero-filled tensors for them
    auto edges = block_node::edges(bias.has_value() && bias->defined(), bn_weight.has_value() && bn_weight->defined(),
                                   bn_bias.has_value() && bn_bias->defined(),
                                   residual.has_value() && residual->defined());
    const bool producer = !e.producer.empty();
    edges.push_back(producer);  // kProducer
    // the residual is read again only to rebuild u for a non-identity activation's derivative
    ctx->save_for_backward(block_node::saved(x, weight, bn_weight, bn_bias,
                                             e.activation != "identity" ? residual : c10::nullopt, z, mean, var,
                                             e.producer));
    ctx->saved_data["geometry"] = conv_geometry(e.stride, e.padding, e.dilation, e.groups, x, weight);
    ctx->saved_data["edges"] = std::move(edges);
    ctx->saved_data["eps"] = std::vector<double>{e.eps, e.producer_eps};
    ctx->saved_data["activation"] = e.activation;
    if (producer) ctx->saved_data["producer_activation"] = e.producer_activation;
    return {y, z, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(7);  // x, weight, bias, bn_weight, bn_bias, residual, Extra
    const auto& grad = grads[0];
    if (!grad.defined()) return out;  // y took no part in the loss
    const auto saved = ctx->get_saved_variables();
    const auto geometry = ctx->saved_data["geometry"].toIntVector();
    const auto edges = ctx->saved_data["edges"].toIntVector();
    const auto eps = ctx->saved_data["eps"].toDoubleVector();
    const auto activation = ctx->saved_data["activation"].toStringRef();
    const auto& weight = saved[1];
    const auto &z = saved[5], &mean = saved[6], &var = saved[7];
    auto needs = [&](int64_t edge) { return edge >= 0 && ctx->needs_input_grad(static_cast<size_t>(edge)); };

    Tensor x = saved[0];
    if (edges[kProducer]) {  // rebuild x from what its producer keeps
      x = batch_norm_act(saved[8], saved[9], saved[10], opt(saved[11]), opt(saved[12]), opt(saved[13]), eps[1],
                         ctx->saved_data["producer_activation"].toStringRef());
    }
    const bool want_residual = needs(edges[kResidual]);
    Tensor grad_z, sum_g, sum_gx, grad_residual;
    {
      FASTCONV_HANDLE(ext::BnActBackwardFn, "fastconv::ext_batch_norm_act_backward");
      std::tie(grad_z, sum_g, sum_gx, grad_residual) =
          op.call(grad.contiguous(bn_format(z)), z, mean, var, opt(saved[2]), opt(saved[3]), opt(saved[4]), eps[0],
                  activation, want_residual);
    }
    // the parameters' gradients in the parameters' dtypes (statistics are fp32)
    if (needs(edges[kBnWeight])) out[3] = sum_gx.to(saved[2].scalar_type());
    if (needs(edges[kBnBias])) out[4] = sum_g.to(saved[3].scalar_type());
    if (want_residual) out[5] = grad_residual;

    std::tie(out[0], out[1], out[2]) =
        conv2d_grads(grad_z, x, weight, geometry, needs(0), needs(1), needs(edges[kBias]));
    return out;
  }
};

}  // namespace

namespace block_node {

std::vector<int64_t> edges(bool bias, bool bn_weight, bool bn_bias, bool residual) {
  std::vector<int64_t> out;
  int64_t next = 2;  // x and weight are edges 0 and 1
  for (bool given : {bias, bn_weight, bn_bias, residual}) out.push_back(given ? next++ : -1);
  return out;
}

variable_list saved(const Tensor& x, const Tensor& weight, const OptTensor& bn_weight, const OptTensor& bn_bias,
                    const OptTensor& kept_residual, const Tensor& z, const Tensor& mean, const Tensor& var,
                    const std::vector<OptTensor>& producer) {
  auto value = [](const OptTensor& t) { return t.has_value() ? *t : Tensor(); };
  variable_list out = {producer.empty() ? x : Tensor(), weight, value(bn_weight), value(bn_bias),
                       value(kept_residual), z, mean, var};
  for (const auto& t : producer) out.push_back(value(t));
  return out;
}

}  // namespace block_node

std::vector<at::Tensor> conv_bn_act_train_eager(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias,
    const c10::optional<at::Tensor>& residual, std::vector<int64_t> stride, std::vector<int64_t> padding,
    std::vector<int64_t> dilation, int64_t groups, double eps, std::string activation,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, double momentum,
    const c10::optional<at::Tensor>& momentum_tensor, const c10::optional<at::Tensor>& num_batches_tracked,
    std::vector<int64_t> z_size, bool z_channels_last, bool allow_tf32,
    const c10::optional<at::Tensor>& producer_z, const c10::optional<at::Tensor>& producer_mean,
    const c10::optional<at::Tensor>& producer_var, const c10::optional<at::Tensor>& producer_bn_weight,
    const c10::optional<at::Tensor>& producer_bn_bias, const c10::optional<at::Tensor>& producer_residual,
    double producer_eps, std::string producer_activation) {
  TORCH_CHECK(stride.size() == 2 && padding.size() == 4 && dilation.size() == 2 && z_size.size() == 4 &&
                  x.dim() == 4 && weight.dim() == 4,
              "fastconv._C.conv_bn_act_train: expects 4-D x and weight, stride[2], padding[4] (top, bottom, left, "
              "right), dilation[2], z_size[4]");
  Extra e{std::move(stride), std::move(padding), std::move(dilation), groups, eps, std::move(activation),
          running_mean, running_var, momentum, momentum_tensor, num_batches_tracked, std::move(z_size),
          z_channels_last, allow_tf32, {}, producer_eps, std::move(producer_activation)};
  if (producer_z.has_value() && producer_z->defined()) {
    e.producer = {producer_z, producer_mean, producer_var, producer_bn_weight, producer_bn_bias, producer_residual};
  }
  return ConvBnActTrain::apply(x, weight, bias, bn_weight, bn_bias, residual, e);
}

}  // namespace fastconv
