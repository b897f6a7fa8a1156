// torch side of the conv2d CUDA kernels: validation, device guard, current stream, column-buffer chunking,
// and the three GEMM launches (forward with the fused epilogue, dgrad into columns + col2im gather, wgrad
// over the column buffer). Layout transforms of grad_output use ATen; every launch is checked.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "conv2d_launch.h"
#include "launch_check.h"
#include "fastconv/conv2d_args.h"
#include "fastconv/epilogue.h"

namespace fastconv {
namespace {

constexpr int64_t kColumnBytes = int64_t(256) << 20;

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// [rows, C_out] matrix of grad_output for images [n0, n0 + nb) (a view for channels_last, else a copy).
at::Tensor grad_matrix(const at::Tensor& dy, int64_t n0, int64_t nb) {
  return dy.narrow(0, n0, nb).permute({0, 2, 3, 1}).reshape({-1, dy.size(1)}).contiguous();
}

void run_im2col(const at::Tensor& x, const ConvGeom& g, int64_t m0, int64_t rows, at::Tensor& cols, cudaStream_t s,
                const char* op) {
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    Im2colParams p{};
    p.x = x.data_ptr();
    auto xs = strides4(x);
    for (int i = 0; i < 4; ++i) p.xs[i] = xs[i];
    p.g = g;
    p.group = grp;
    p.m0 = m0;
    p.rows = rows;
    p.cols = static_cast<char*>(cols.data_ptr()) + grp * rows * g.cols() * x.element_size();
    p.dtype = dtype_of(x);
    check_launch(launch_im2col(p, s), op, "im2col");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ext_conv2d_cuda(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& residual, int64_t activation,
    bool stats, bool allow_tf32, at::Tensor& out) {
  const char* op = "fastconv::ext_conv2d (cuda)";
  ConvGeom g = check_conv_forward(input, weight, bias, stride, padding, dilation, groups, scale, shift, residual,
                                  activation, out, op);
  check_cuda(input, "input", op);
  c10::cuda::CUDAGuard guard(input.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto result = stats_outputs(g, stats, input.scalar_type(), input.device(), kStatsRows);
  const int64_t M = g.rows(), K = g.cols();
  if (M == 0 || g.C_out == 0) return result;
  const auto acc = acc_type(input.scalar_type());
  auto w = weight.contiguous();
  auto b = epilogue_vector(bias, acc), sc = epilogue_vector(scale, acc), sh = epilogue_vector(shift, acc);
  at::Tensor res;
  if (residual.has_value()) res = residual->to(input.scalar_type());
  int64_t chunk = std::max<int64_t>(1, kColumnBytes / std::max<int64_t>(1, g.groups * K * input.element_size() * kGemmBM));
  chunk = std::min(chunk * kGemmBM, ceil_div(M, kGemmBM) * kGemmBM);
  auto cols = at::empty({g.groups, chunk, K}, input.options());
  for (int64_t m0 = 0; m0 < M; m0 += chunk) {
    const int64_t rows = std::min(chunk, M - m0);
    run_im2col(input, g, m0, rows, cols, stream, op);
    GemmParams p{};
    p.a = cols.data_ptr();
    p.sam = K, p.sak = 1, p.a_batch = rows * K;
    p.b = w.data_ptr();
    p.sbk = 1, p.sbn = K, p.b_batch = g.cout_g * K;
    p.M = rows, p.N = g.cout_g, p.K = K, p.batch = g.groups;
    p.dtype = dtype_of(input);
    p.allow_tf32 = allow_tf32;
    p.conv = true;
    p.g = g;
    p.m0 = m0;
    p.y = out.data_ptr();
    auto ys = strides4(out);
    for (int i = 0; i < 4; ++i) p.ys[i] = ys[i];
    p.bias = ptr_or_null(b), p.scale = ptr_or_null(sc), p.shift = ptr_or_null(sh);
    p.residual = ptr_or_null(res);
    if (res.defined()) {
      auto rs = strides4(res);
      for (int i = 0; i < 4; ++i) p.rs[i] = rs[i];
    }
    p.act = static_cast<Act>(activation);
    if (stats) {
      p.stat_count = std::get<0>(result).data_ptr();
      p.stat_mean = std::get<1>(result).data_ptr();
      p.stat_m2 = std::get<2>(result).data_ptr();
    }
    check_launch(launch_gemm(p, stream), op, "conv GEMM");
  }
  return result;
}

void ext_conv2d_input_grad_cuda(const at::Tensor& grad_output, const at::Tensor& weight, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool allow_tf32,
                                at::Tensor& out) {
  const char* op = "fastconv::ext_conv2d_input_grad (cuda)";
  const ConvGeom g = check_input_grad_args(grad_output, weight, out, stride, padding, dilation, groups, op);
  check_cuda(grad_output, "grad_output", op);
  check_cuda(weight, "weight", op);
  check_cuda(out, "out", op);
  c10::cuda::CUDAGuard guard(out.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (out.numel() == 0) return;
  const int64_t K = g.cols();
  if (g.cout_g == 0 || K == 0) {
    out.zero_();
    return;
  }
  const auto acc = acc_type(out.scalar_type());
  const int64_t acc_bytes = acc == at::kDouble ? 8 : 4;
  auto w = weight.contiguous();
  const int64_t per_image = std::max<int64_t>(1, g.OH * g.OW * g.groups * K * acc_bytes);
  const int64_t nb_max = std::max<int64_t>(1, std::min<int64_t>(g.N, kColumnBytes / per_image));
  auto dcols = at::empty({g.groups, nb_max * g.OH * g.OW, K}, out.options().dtype(acc));
  for (int64_t n0 = 0; n0 < g.N; n0 += nb_max) {
    const int64_t nb = std::min(nb_max, g.N - n0);
    const int64_t rows = nb * g.OH * g.OW;
    auto dy = grad_matrix(grad_output, n0, nb);
    GemmParams p{};
    p.a = dy.data_ptr();
    p.sam = g.C_out, p.sak = 1, p.a_batch = g.cout_g;
    p.b = w.data_ptr();
    p.sbk = K, p.sbn = 1, p.b_batch = g.cout_g * K;
    p.M = rows, p.N = K, p.K = g.cout_g, p.batch = g.groups;
    p.dtype = dtype_of(out);
    p.allow_tf32 = allow_tf32;
    p.c = dcols.data_ptr();
    p.scm = K, p.scn = 1, p.c_batch = rows * K;
    check_launch(launch_gemm(p, stream), op, "dgrad GEMM");
    Col2imParams q{};
    q.dcols = dcols.data_ptr();
    q.group_stride = rows * K;
    q.g = g;
    q.n0 = n0;
    q.nb = nb;
    q.dx = out.data_ptr();
    auto xs = strides4(out);
    for (int i = 0; i < 4; ++i) q.dxs[i] = xs[i];
    q.dtype = dtype_of(out);
    check_launch(launch_col2im(q, stream), op, "col2im");
  }
}

std::tuple<at::Tensor, at::Tensor> ext_conv2d_weight_grad_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                                               at::IntArrayRef weight_size, at::IntArrayRef stride,
                                                               at::IntArrayRef padding, at::IntArrayRef dilation,
                                                               int64_t groups, bool bias_grad, bool allow_tf32) {
  const char* op = "fastconv::ext_conv2d_weight_grad (cuda)";
  const ConvGeom g = check_weight_grad_args(grad_output, input, weight_size, stride, padding, dilation, groups, op);
  check_cuda(grad_output, "grad_output", op);
  check_cuda(input, "input", op);
  c10::cuda::CUDAGuard guard(input.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto acc = acc_type(input.scalar_type());
  const int64_t K = g.cols();
  auto dw = at::zeros({g.groups, g.cout_g, K}, input.options().dtype(acc));
  auto db = at::zeros({bias_grad ? g.C_out : 0}, input.options().dtype(acc));
  if (g.N > 0 && K > 0 && g.cout_g > 0) {
    const int64_t per_image = std::max<int64_t>(1, g.OH * g.OW * g.groups * K * input.element_size());
    const int64_t nb_max = std::max<int64_t>(1, std::min<int64_t>(g.N, kColumnBytes / per_image));
    auto cols = at::empty({g.groups, nb_max * g.OH * g.OW, K}, input.options());
    for (int64_t n0 = 0; n0 < g.N; n0 += nb_max) {
      const int64_t nb = std::min(nb_max, g.N - n0);
      const int64_t rows = nb * g.OH * g.OW;
      run_im2col(input, g, n0 * g.OH * g.OW, rows, cols, stream, op);
      auto dy = grad_matrix(grad_output, n0, nb);
      GemmParams p{};
      p.a = dy.data_ptr();  // A[co, row] = dy[row, grp * cout_g + co]
      p.sam = 1, p.sak = g.C_out, p.a_batch = g.cout_g;
      p.b = cols.data_ptr();  // B[row, k]
      p.sbk = K, p.sbn = 1, p.b_batch = rows * K;
      p.M = g.cout_g, p.N = K, p.K = rows, p.batch = g.groups;
      p.dtype = dtype_of(input);
      p.allow_tf32 = allow_tf32;
      p.c = dw.data_ptr();
      p.scm = K, p.scn = 1, p.c_batch = g.cout_g * K;
      p.accumulate = true;
      check_launch(launch_gemm(p, stream), op, "wgrad GEMM");
      if (bias_grad) db.add_(dy.sum(0, false, acc));
    }
  }
  return {dw.view(weight_size).to(input.scalar_type()).contiguous(), db.to(input.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastconv, CUDA, m) {
  m.impl("ext_conv2d", &ext_conv2d_cuda);
  m.impl("ext_conv2d_input_grad", &ext_conv2d_input_grad_cuda);
  m.impl("ext_conv2d_weight_grad", &ext_conv2d_weight_grad_cuda);
}

}  // namespace fastconv
