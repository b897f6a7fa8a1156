// The eager fast path of fastconv::conv_bn_act_train on the C++ backends ('cpu', 'cuda'): the fused training
// block as one C++ autograd node (csrc/conv_bn_act.cpp), bound as fastconv._C.conv_bn_act_train.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

namespace fastconv {

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
