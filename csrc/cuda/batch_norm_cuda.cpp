// CUDA registration of the fastconv::ext_batch_norm_* ops: checks, device guard, current stream, params,
// launch (csrc/cuda/batch_norm.cu), launch-error check.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../batch_norm.h"
#include "batch_norm_launch.h"
#include "launch_check.h"

namespace fastconv {
namespace {

BnView view(const at::Tensor& t) {
  BnView v{nullptr, {0, 0, 0, 0}};
  if (!t.defined()) return v;
  v.ptr = t.const_data_ptr();
  for (int d = 0; d < 4; ++d) v.s[d] = t.stride(d);
  return v;
}

bool channels_fast(const at::Tensor& z) {
  return z.size(1) > 1 && z.stride(1) < z.stride(3) && z.stride(1) < z.stride(2);
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

// Workspace of the combination passes (the caching allocator makes it cheap); may be empty.
at::Tensor workspace(int64_t bytes, const at::Tensor& like) { return at::empty({bytes}, like.options().dtype(at::kByte)); }

void check_channels(const char* op, int64_t C) {
  TORCH_CHECK(C <= kBnMaxChannels, op, ": at most ", kBnMaxChannels, " channels, got ", C);
}

BatchNormChannelParams channel_params(const BnInputs& in, double eps) {
  return BatchNormChannelParams{in.mean.const_data_ptr(), in.var.const_data_ptr(), ptr_or_null(in.weight),
                                ptr_or_null(in.bias), eps, in.act};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ext_batch_norm_stats_cuda(const at::Tensor& z) {
  constexpr const char* op = "fastconv::ext_batch_norm_stats (cuda)";
  check_cuda(z, "z", op);
  bn_check_z(op, z, true);
  c10::cuda::CUDAGuard guard(z.device());
  const int64_t P = z.size(0) * z.size(2) * z.size(3), C = z.size(1);
  const int64_t T = std::max<int64_t>(1, (P + kBnTileRows - 1) / kBnTileRows);
  TORCH_CHECK(T < (int64_t(1) << 31), op, ": too many pixels (", P, ")");
  auto opts = z.options().dtype(bn_stat_dtype(z));
  at::Tensor cnt = at::empty({T, C}, opts), mean = at::empty({T, C}, opts), m2 = at::empty({T, C}, opts);
  BatchNormStatsParams p{view(z), z.size(0), C, z.size(2), z.size(3), T, cnt.data_ptr(), mean.data_ptr(),
                         m2.data_ptr(), dtype_of(z), channels_fast(z)};
  check_launch(launch_batch_norm_stats(p, c10::cuda::getCurrentCUDAStream().stream()), op);
  return {cnt, mean, m2};
}

std::tuple<at::Tensor, at::Tensor> ext_batch_norm_finalize_cuda(
    const at::Tensor& count, const at::Tensor& mean, const at::Tensor& m2, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, double momentum,
    const c10::optional<at::Tensor>& momentum_tensor, const c10::optional<at::Tensor>& num_batches_tracked,
    int64_t values) {
  constexpr const char* op = "fastconv::ext_batch_norm_finalize (cuda)";
  bn_check_partials(op, count, mean, m2);
  check_cuda(count, "count", op);
  c10::cuda::CUDAGuard guard(count.device());
  const int64_t T = count.size(0), C = count.size(1);
  check_channels(op, C);
  at::Tensor b;
  if (bn_given(bias)) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C, op, ": bias must have shape [", C, "], got ", bias->sizes());
    TORCH_CHECK(bias->device() == count.device(), op, ": bias is on ", bias->device());
    b = bias->to(count.scalar_type()).contiguous();
  }
  at::Tensor c = count.contiguous(), mp = mean.contiguous(), qp = m2.contiguous();
  at::Tensor mean_out = at::empty({C}, count.options()), var_out = at::empty({C}, count.options());
  const bool f64 = count.scalar_type() == at::kDouble;
  at::Tensor ws = workspace(bn_finalize_workspace_bytes(T, C, f64), count);
  BatchNormFinalizeParams p{c.const_data_ptr(), mp.const_data_ptr(), qp.const_data_ptr(), ptr_or_null(b),
                            mean_out.data_ptr(), var_out.data_ptr(), ws.data_ptr(), T, C, f64};
  // the running statistics: updated by the finalize's last pass where bn_running_in_kernel allows
  const bool in_kernel = bn_running_in_kernel(op, mean_out, values, running_mean, running_var, momentum_tensor,
                                              num_batches_tracked) && T > 0;
  at::Tensor w;
  if (in_kernel) {
    w = bn_kernel_momentum(momentum_tensor, *running_mean, mean_out);
    p.running_mean = running_mean->data_ptr();
    p.running_var = running_var->data_ptr();
    p.running_mean_stride = running_mean->stride(0);
    p.running_var_stride = running_var->stride(0);
    p.running_dtype = dtype_of(*running_mean);
    p.unbias = bn_unbias(values);
    p.momentum = momentum;
    p.momentum_ptr = w.defined() ? w.const_data_ptr() : nullptr;
    p.num_batches_tracked = bn_given(num_batches_tracked) ? num_batches_tracked->data_ptr<int64_t>() : nullptr;
  }
  check_launch(launch_batch_norm_finalize(p, c10::cuda::getCurrentCUDAStream().stream()), op);
  if (!in_kernel) {
    bn_update_running(op, mean_out, var_out, values, running_mean, running_var, momentum, momentum_tensor,
                      num_batches_tracked);
  }
  return {mean_out, var_out};
}

at::Tensor ext_batch_norm_act_cuda(const at::Tensor& z, const at::Tensor& mean, const at::Tensor& var,
                                   const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                   const c10::optional<at::Tensor>& residual, double eps,
                                   c10::string_view activation) {
  constexpr const char* op = "fastconv::ext_batch_norm_act (cuda)";
  check_cuda(z, "z", op);
  bn_check_z(op, z, true);
  c10::cuda::CUDAGuard guard(z.device());
  const BnInputs in = bn_inputs(op, z, mean, var, weight, bias, residual, std::string(activation));
  const auto fmt = bn_format(z);
  at::Tensor y = at::empty(z.sizes(), z.options().memory_format(fmt));
  BatchNormActParams p{view(z), view(in.residual), y.data_ptr(), z.size(0), z.size(1), z.size(2), z.size(3),
                       channel_params(in, eps), dtype_of(z), fmt == at::MemoryFormat::ChannelsLast};
  check_launch(launch_batch_norm_act(p, c10::cuda::getCurrentCUDAStream().stream()), op);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ext_batch_norm_act_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& z, const at::Tensor& mean, const at::Tensor& var,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& residual, double eps, c10::string_view activation, bool want_grad_residual) {
  constexpr const char* op = "fastconv::ext_batch_norm_act_backward (cuda)";
  check_cuda(z, "z", op);
  bn_check_z(op, z, true);
  c10::cuda::CUDAGuard guard(z.device());
  const BnInputs in = bn_inputs(op, z, mean, var, weight, bias, residual, std::string(activation));
  const at::Tensor dy = bn_like_z(op, grad_y, z, "grad_y");
  const auto fmt = bn_format(z);
  auto [dz, dres, sum_g, sum_gx] = bn_backward_outputs(z, want_grad_residual);
  const int64_t P = z.size(0) * z.size(2) * z.size(3), C = z.size(1);
  const int64_t T = (P + kBnTileRows - 1) / kBnTileRows;
  TORCH_CHECK(T < (int64_t(1) << 31), op, ": too many pixels (", P, ")");
  check_channels(op, C);
  auto sopts = z.options().dtype(bn_stat_dtype(z));
  at::Tensor part_g = at::empty({T, C}, sopts), part_gx = at::empty({T, C}, sopts);
  at::Tensor ws = workspace(bn_backward_workspace_bytes(T, C, z.scalar_type() == at::kDouble), z);
  BatchNormBackwardParams p{view(dy), view(z), view(in.residual), z.size(0), C, z.size(2), z.size(3), T,
                            channel_params(in, eps), part_g.data_ptr(), part_gx.data_ptr(), sum_g.data_ptr(),
                            sum_gx.data_ptr(), ws.data_ptr(), dz.data_ptr(),
                            want_grad_residual ? dres.data_ptr() : nullptr, dtype_of(z), channels_fast(z),
                            fmt == at::MemoryFormat::ChannelsLast};
  check_launch(launch_batch_norm_backward(p, c10::cuda::getCurrentCUDAStream().stream()), op);
  return {dz, sum_g, sum_gx, dres};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastconv, CUDA, m) {
  m.impl("ext_batch_norm_stats", &ext_batch_norm_stats_cuda);
  m.impl("ext_batch_norm_finalize", &ext_batch_norm_finalize_cuda);
  m.impl("ext_batch_norm_act", &ext_batch_norm_act_cuda);
  m.impl("ext_batch_norm_act_backward", &ext_batch_norm_act_backward_cuda);
}

}  // namespace fastconv
