// Torch-side argument checks and conversions of the fastconv::ext_batch_norm_* ops, shared by the CPU
// (csrc/cpu/batch_norm.cpp) and CUDA (csrc/cuda/batch_norm_cuda.cpp) registrations.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>

#include "fastconv/batch_norm.h"

namespace fastconv {

// Whether an optional tensor argument was given (not None, not an undefined tensor).
inline bool bn_given(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

inline Act bn_parse_act(const char* op, const std::string& name) {
  if (name == "identity") return Act::identity;
  if (name == "relu") return Act::relu;
  if (name == "relu6") return Act::relu6;
  if (name == "silu") return Act::silu;
  if (name == "hardswish") return Act::hardswish;
  TORCH_CHECK(false, op, ": unknown activation '", name, "'; choose one of identity, relu, relu6, silu, hardswish");
}

// fp32 statistics, fp64 for fp64 tensors.
inline at::ScalarType bn_stat_dtype(const at::Tensor& z) {
  return z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The outputs' memory format: channels_last when z is channels_last-dense and not NCHW-dense (the rule of
// fastconv.ops.conv_bn_act._memory_format).
inline at::MemoryFormat bn_format(const at::Tensor& z) {
  return (!z.is_contiguous() && z.is_contiguous(at::MemoryFormat::ChannelsLast)) ? at::MemoryFormat::ChannelsLast
                                                                                  : at::MemoryFormat::Contiguous;
}

inline void bn_check_z(const char* op, const at::Tensor& z, bool allow_double) {
  TORCH_CHECK(z.dim() == 4, op, ": expects a 4-D [N, C, H, W] tensor, got shape ", z.sizes());
  const auto st = z.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || (allow_double && st == at::kDouble), op,
              ": tensors must be float32, float16 or bfloat16", allow_double ? " or float64" : "", ", got ", st);
}

// A per-channel vector as a contiguous [C] tensor of the statistics dtype on z's device (nullopt stays empty).
inline at::Tensor bn_channel_vector(const char* op, const c10::optional<at::Tensor>& t, const at::Tensor& z,
                                    const char* what) {
  if (!bn_given(t)) return at::Tensor();
  const int64_t C = z.size(1);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == C, op, ": ", what, " must have shape [", C, "], got ", t->sizes());
  TORCH_CHECK(t->device() == z.device(), op, ": ", what, " is on ", t->device(), " but z is on ", z.device());
  TORCH_CHECK(t->is_floating_point(), op, ": ", what, " must be a floating-point tensor, got ", t->scalar_type());
  return t->to(bn_stat_dtype(z)).contiguous();
}

// A tensor shaped like z (residual, grad_y) in z's dtype; any strides.
inline at::Tensor bn_like_z(const char* op, const c10::optional<at::Tensor>& t, const at::Tensor& z,
                            const char* what) {
  if (!bn_given(t)) return at::Tensor();
  TORCH_CHECK(t->sizes() == z.sizes(), op, ": ", what, " must have z's shape ", z.sizes(), ", got ", t->sizes());
  TORCH_CHECK(t->device() == z.device(), op, ": ", what, " is on ", t->device(), " but z is on ", z.device());
  return t->scalar_type() == z.scalar_type() ? *t : t->to(z.scalar_type());
}

struct BnInputs {
  at::Tensor mean, var, weight, bias, residual;  // weight/bias/residual undefined when absent
  Act act;
};

inline BnInputs bn_inputs(const char* op, const at::Tensor& z, const at::Tensor& mean, const at::Tensor& var,
                          const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                          const c10::optional<at::Tensor>& residual, const std::string& activation) {
  BnInputs in;
  in.mean = bn_channel_vector(op, mean, z, "mean");
  in.var = bn_channel_vector(op, var, z, "var");
  in.weight = bn_channel_vector(op, weight, z, "weight");
  in.bias = bn_channel_vector(op, bias, z, "bias");
  TORCH_CHECK(in.weight.defined() == in.bias.defined(), op, ": weight and bias must be given together");
  in.residual = bn_like_z(op, residual, z, "residual");
  in.act = bn_parse_act(op, activation);
  return in;
}

// [T, C] partials of the finalize op: three contiguous tensors of one statistics dtype.
inline void bn_check_partials(const char* op, const at::Tensor& cnt, const at::Tensor& mean, const at::Tensor& m2) {
  TORCH_CHECK(cnt.dim() == 2 && cnt.sizes() == mean.sizes() && cnt.sizes() == m2.sizes(), op,
              ": count, mean and M2 must be [T, C] tensors of one shape, got ", cnt.sizes(), ", ", mean.sizes(),
              ", ", m2.sizes());
  const auto st = cnt.scalar_type();
  TORCH_CHECK((st == at::kFloat || st == at::kDouble) && mean.scalar_type() == st && m2.scalar_type() == st, op,
              ": partials must all be float32 or all float64, got ", st, ", ", mean.scalar_type(), ", ",
              m2.scalar_type());
  TORCH_CHECK(mean.device() == cnt.device() && m2.device() == cnt.device(), op, ": partials on different devices");
}

// The unbiased-variance factor n / (n - 1) of `values` per channel (1 for a single value), as F.batch_norm's
// running_var update uses it.
inline double bn_unbias(int64_t values) {
  return static_cast<double>(values) / static_cast<double>(values > 1 ? values - 1 : 1);
}

// The running-statistics arguments of ext_batch_norm_finalize, checked: whether there is an update to do.
inline bool bn_check_running(const char* op, const at::Tensor& stats, int64_t values,
                             const c10::optional<at::Tensor>& running_mean,
                             const c10::optional<at::Tensor>& running_var,
                             const c10::optional<at::Tensor>& num_batches_tracked) {
  const bool has_mean = bn_given(running_mean), has_var = bn_given(running_var);
  TORCH_CHECK(has_mean == has_var, op, ": running_mean and running_var are given together or not at all");
  TORCH_CHECK(!bn_given(num_batches_tracked) || has_mean, op, ": num_batches_tracked is given with the running statistics");
  if (!has_mean) return false;
  TORCH_CHECK(values >= 0, op, ": values must be >= 0, got ", values);
  for (const at::Tensor* buf : {&*running_mean, &*running_var})
    TORCH_CHECK(buf->device() == stats.device(), op, ": running statistics are on ", buf->device(),
                " but the batch's are on ", stats.device());
  return true;
}

// F.batch_norm's running-statistics update in training, after the finalize: running = lerp(running, batch
// statistic, momentum) with the unbiased variance of `values` per channel, and num_batches_tracked += 1 when
// given; a 0-dim momentum_tensor (momentum=None's 1 / num_batches_tracked, counted by the caller) replaces
// `momentum`. ATen ops on the buffers (any float dtype, broadcastable to [C]): the general path, for what
// bn_running_in_kernel leaves out.
inline void bn_update_running(const char* op, const at::Tensor& mean, const at::Tensor& var, int64_t values,
                              const c10::optional<at::Tensor>& running_mean,
                              const c10::optional<at::Tensor>& running_var, double momentum,
                              const c10::optional<at::Tensor>& momentum_tensor,
                              const c10::optional<at::Tensor>& num_batches_tracked) {
  if (!bn_check_running(op, mean, values, running_mean, running_var, num_batches_tracked)) return;
  if (bn_given(num_batches_tracked)) num_batches_tracked->add_(1);
  const double unbias = bn_unbias(values);
  for (int i = 0; i < 2; ++i) {
    const at::Tensor& buf = i == 0 ? *running_mean : *running_var;
    const at::Tensor stat = (i == 0 ? mean : var.mul(unbias)).to(buf.scalar_type());
    if (bn_given(momentum_tensor))
      buf.lerp_(stat, momentum_tensor->to(buf.device(), buf.scalar_type()));
    else
      buf.lerp_(stat, momentum);
  }
}

// Whether a finalize kernel updates the running statistics itself (in its last pass: no op of its own) instead
// of bn_update_running: 1-D buffers of one floating dtype on the statistics' device, a 0-dim momentum tensor (if
// any) there too, an int64 num_batches_tracked (if any) there too. Checks the arguments first.
inline bool bn_running_in_kernel(const char* op, const at::Tensor& stats, int64_t values,
                                 const c10::optional<at::Tensor>& running_mean,
                                 const c10::optional<at::Tensor>& running_var,
                                 const c10::optional<at::Tensor>& momentum_tensor,
                                 const c10::optional<at::Tensor>& num_batches_tracked) {
  if (!bn_check_running(op, stats, values, running_mean, running_var, num_batches_tracked)) return false;
  const at::Tensor &rm = *running_mean, &rv = *running_var;
  const auto st = rm.scalar_type();
  const bool float_buffers = st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16;
  const bool momentum_ok = !bn_given(momentum_tensor) ||
                           (momentum_tensor->dim() == 0 && momentum_tensor->device() == stats.device());
  const bool count_ok = !bn_given(num_batches_tracked) ||
                        (num_batches_tracked->dim() == 0 && num_batches_tracked->scalar_type() == at::kLong &&
                         num_batches_tracked->device() == stats.device());
  return float_buffers && rv.scalar_type() == st && rm.dim() == 1 && rv.dim() == 1 &&
         rm.size(0) == stats.size(0) && rv.size(0) == stats.size(0) && momentum_ok && count_ok;
}

// The momentum a kernel's running update uses: a tensor momentum rounded to the buffers' dtype (as
// `buf.lerp_(stat, momentum_tensor.to(buf.dtype))`), then to the statistics' dtype; undefined for a float one.
inline at::Tensor bn_kernel_momentum(const c10::optional<at::Tensor>& momentum_tensor, const at::Tensor& buf,
                                     const at::Tensor& stats) {
  if (!bn_given(momentum_tensor)) return at::Tensor();
  return momentum_tensor->to(buf.scalar_type()).to(stats.scalar_type()).contiguous();
}

// Outputs of ext_batch_norm_act_backward: dz and (if wanted, else empty) dres in z's memory format, and the
// per-channel sums of g and g * xhat in the statistics dtype.
struct BnBackwardOutputs {
  at::Tensor dz, dres, sum_g, sum_gx;
};

inline BnBackwardOutputs bn_backward_outputs(const at::Tensor& z, bool want_grad_residual) {
  const auto opts = z.options().memory_format(bn_format(z));
  const auto sopts = z.options().dtype(bn_stat_dtype(z));
  return {at::empty(z.sizes(), opts), want_grad_residual ? at::empty(z.sizes(), opts) : z.new_empty({0}),
          at::empty({z.size(1)}, sopts), at::empty({z.size(1)}, sopts)};
}

}  // namespace fastconv
