// The eager fast path of fastconv::conv_bn_act_train on the C++ backends ('cpu', 'cuda'): the fused training
// block as one C++ autograd node (csrc/conv_bn_act.cpp), bound as fastconv._C.conv_bn_act_train.
#pragma once

#include <ATen/core/Tensor.h>

#include <c10/util/Optional.h>
#include <torch/csrc/autograd/variable.h>

#include <string>
#include <vector>

namespace fastconv {

// What the fused block's two eager autograd nodes (this file's, and the Triton one in csrc/triton_conv_bn_act.cpp)
// agree on, as fastconv.ops.conv_bn_act's _setup_context does.
namespace block_node {

// ctx->saved_data["edges"]: the autograd edge index of bias, bn_weight, bn_bias, residual (-1: not given); x and
// weight are edges 0 and 1.
constexpr size_t kBias = 0, kBnWeight = 1, kBnBias = 2, kResidual = 3;
std::vector<int64_t> edges(bool bias, bool bn_weight, bool bn_bias, bool residual);

// The saved tensors: x (undefined when a producer rebuilds it), weight, bn_weight, bn_bias, the residual where a
// non-identity activation's derivative reads it again (else undefined), z, mean, var, then the producer's z, mean,
// var, bn_weight, bn_bias, residual (none without a producer).
torch::autograd::variable_list saved(const at::Tensor& x, const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& bn_weight,
                                     const c10::optional<at::Tensor>& bn_bias,
                                     const c10::optional<at::Tensor>& kept_residual, const at::Tensor& z,
                                     const at::Tensor& mean, const at::Tensor& var,
                                     const std::vector<c10::optional<at::Tensor>>& producer);

}  // namespace block_node

// (y, z, mean, var) of y = act(bn(conv(x) + bias) [+ residual]) with batch statistics, running statistics updated
// as F.batch_norm does; one autograd node whose backward runs ext_batch_norm_act_backward, then the conv's dgrad
// and wgrad. `producer_*` (all given or none): the block that made x, x == act(bn(producer_z) [+
// producer_residual]); the node then keeps those tensors (kept by that block's node anyway) instead of x and
// rebuilds x in backward. Arguments are checked by the Python caller (fastconv.ops.conv_bn_act).
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
    double producer_eps, std::string producer_activation);

}  // namespace fastconv
