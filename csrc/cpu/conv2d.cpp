// C++ CPU twin of the conv2d kernels: im2col / col2im with the shared index math (fastconv/im2col.h), the
// GEMMs by ATen's BLAS (at::mm / addmm_), and the fused epilogue (fastconv/epilogue.h). Work is chunked so
// the column buffer stays under kColumnBytes. fp16/bf16 compute in fp32; fp64 in fp64.
// Per-operator headers instead of <ATen/ATen.h>: this file compiles several times faster.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "fastconv/conv2d_args.h"
#include "fastconv/dry_run.h"
#include "fastconv/epilogue.h"
#include "fastconv/im2col.h"

namespace fastconv {
namespace {

constexpr int64_t kColumnBytes = int64_t(32) << 20;

int64_t grain_for(int64_t work_per_item) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, work_per_item)); }

// cols[r, k] = x-tap for rows m0 .. m0 + rows of group `group`, row-major [rows, K], in Acc.
template <typename scalar_t, typename Acc>
void im2col(const scalar_t* x, const std::array<int64_t, 4>& xs, const ConvGeom& g, int64_t group, int64_t m0,
            int64_t rows, Acc* cols) {
  const int64_t K = g.cols();
  at::parallel_for(0, rows, grain_for(K), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      Acc* dst = cols + r * K;
      for (int64_t k = 0; k < K; ++k) {
        int64_t off = im2col_offset(m0 + r, k, group, g, xs.data());
        dst[k] = off < 0 ? Acc(0) : static_cast<Acc>(x[off]);
      }
    }
  });
}

// Rows [m0, m0 + rows) of grad_output as a [rows, C_out] matrix in the accumulation type (whole images).
at::Tensor grad_matrix(const at::Tensor& dy, int64_t n0, int64_t nb, at::ScalarType acc) {
  auto part = dy.narrow(0, n0, nb).permute({0, 2, 3, 1});
  return part.reshape({-1, dy.size(1)}).to(acc).contiguous();
}

int64_t images_per_chunk(const ConvGeom& g, int64_t bytes_per_row) {
  int64_t per_image = std::max<int64_t>(1, g.OH * g.OW * bytes_per_row);
  return std::max<int64_t>(1, std::min<int64_t>(g.N, kColumnBytes / per_image));
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(const at::Tensor& x, const at::Tensor& weight,
                                                            const ConvGeom& g, const at::Tensor& bias,
                                                            const at::Tensor& scale, const at::Tensor& shift,
                                                            const at::Tensor& residual, Act act, bool want_stats,
                                                            at::Tensor& out) {
  using Acc = at::opmath_type<scalar_t>;
  const auto acc_dtype = acc_type(x.scalar_type());
  auto stats = stats_outputs(g, want_stats, x.scalar_type(), x.device(), kStatsRows);
  const int64_t M = g.rows(), K = g.cols();
  if (M == 0 || g.C_out == 0 || dry_run()) return stats;
  auto w = weight.to(acc_dtype).contiguous().view({g.groups, g.cout_g, K});
  const auto xs = strides4(x);
  const auto ys = strides4(out);
  const auto rs = residual.defined() ? strides4(residual) : std::array<int64_t, 4>{0, 0, 0, 0};
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* yp = out.data_ptr<scalar_t>();
  const scalar_t* rp = residual.defined() ? residual.data_ptr<scalar_t>() : nullptr;
  EpilogueParams<Acc> ep{bias.defined() ? bias.data_ptr<Acc>() : nullptr,
                         scale.defined() ? scale.data_ptr<Acc>() : nullptr,
                         shift.defined() ? shift.data_ptr<Acc>() : nullptr, act};
  Acc* cnt = want_stats ? std::get<0>(stats).data_ptr<Acc>() : nullptr;
  Acc* mean = want_stats ? std::get<1>(stats).data_ptr<Acc>() : nullptr;
  Acc* m2 = want_stats ? std::get<2>(stats).data_ptr<Acc>() : nullptr;

  // Row chunks are whole stats tiles, so each tile's partials come from one GEMM result.
  int64_t chunk = std::max<int64_t>(1, kColumnBytes / (std::max<int64_t>(K, 1) * int64_t(sizeof(Acc)) * kStatsRows));
  chunk *= kStatsRows;
  auto cols = at::empty({std::min(chunk, M), K}, x.options().dtype(acc_dtype));
  for (int64_t m0 = 0; m0 < M; m0 += chunk) {
    const int64_t rows = std::min(chunk, M - m0);
    auto cols_view = cols.narrow(0, 0, rows);
    for (int64_t grp = 0; grp < g.groups; ++grp) {
      im2col(xp, xs, g, grp, m0, rows, cols_view.data_ptr<Acc>());
      auto acc = at::mm(cols_view, w[grp].t()).contiguous();  // [rows, cout_g]
      const Acc* ap = acc.data_ptr<Acc>();
      const int64_t tiles = ceil_div(rows, kStatsRows);
      at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t r0 = t * kStatsRows, r1 = std::min(rows, r0 + kStatsRows);
          const int64_t tile = (m0 + r0) / kStatsRows;
          for (int64_t co = 0; co < g.cout_g; ++co) {
            const int64_t c = grp * g.cout_g + co;
            if (want_stats) {
              Acc s = 0;
              for (int64_t r = r0; r < r1; ++r) s += ap[r * g.cout_g + co];
              const Acc mu = s / Acc(r1 - r0);
              Acc q = 0;
              for (int64_t r = r0; r < r1; ++r) {
                Acc d = ap[r * g.cout_g + co] - mu;
                q += d * d;
              }
              cnt[tile * g.C_out + c] = Acc(r1 - r0);
              mean[tile * g.C_out + c] = mu;
              m2[tile * g.C_out + c] = q;
            }
            for (int64_t r = r0; r < r1; ++r) {
              Pixel p = split_row(m0 + r, g);
              Acc res = rp ? static_cast<Acc>(rp[p.n * rs[0] + c * rs[1] + p.h * rs[2] + p.w * rs[3]]) : Acc(0);
              Acc v = epilogue_value<Acc>(ap[r * g.cout_g + co], c, ep, rp != nullptr, res);
              yp[p.n * ys[0] + c * ys[1] + p.h * ys[2] + p.w * ys[3]] = static_cast<scalar_t>(v);
            }
          }
        }
      });
    }
  }
  return stats;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ext_conv2d_cpu(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& residual, int64_t activation,
    bool stats, bool /*allow_tf32*/, at::Tensor& out) {
  const char* op = "fastconv::ext_conv2d (cpu)";
  ConvGeom g = check_conv_forward(input, weight, bias, stride, padding, dilation, groups, scale, shift, residual,
                                  activation, out, op);
  TORCH_CHECK(input.device().is_cpu(), op, ": expected CPU tensors, got ", input.device());
  const auto acc = acc_type(input.scalar_type());
  at::Tensor res;
  if (residual.has_value()) res = residual->scalar_type() == input.scalar_type() ? *residual : residual->to(input.scalar_type());
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "ext_conv2d_cpu", [&] {
    result = forward_impl<scalar_t>(input, weight, g, epilogue_vector(bias, acc), epilogue_vector(scale, acc),
                                    epilogue_vector(shift, acc), res, static_cast<Act>(activation), stats, out);
  });
  return result;
}

void ext_conv2d_input_grad_cpu(const at::Tensor& grad_output, const at::Tensor& weight, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                               bool /*allow_tf32*/, at::Tensor& out) {
  const char* op = "fastconv::ext_conv2d_input_grad (cpu)";
  const ConvGeom g = check_input_grad_args(grad_output, weight, out, stride, padding, dilation, groups, op);
  TORCH_CHECK(grad_output.device().is_cpu() && weight.device().is_cpu() && out.device().is_cpu(), op,
              ": expected CPU tensors");
  if (out.numel() == 0 || dry_run()) return;
  const auto acc_dtype = acc_type(out.scalar_type());
  const int64_t K = g.cols();
  if (g.cout_g == 0 || K == 0) {
    out.zero_();
    return;
  }
  auto w = weight.to(acc_dtype).contiguous().view({g.groups, g.cout_g, K});
  const int64_t nb_max = images_per_chunk(g, g.groups * K * (acc_dtype == at::kDouble ? 8 : 4));
  const auto xs = strides4(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "ext_conv2d_input_grad_cpu", [&] {
    using Acc = at::opmath_type<scalar_t>;
    scalar_t* dx = out.data_ptr<scalar_t>();
    for (int64_t n0 = 0; n0 < g.N; n0 += nb_max) {
      const int64_t nb = std::min(nb_max, g.N - n0);
      auto dy = grad_matrix(grad_output, n0, nb, acc_dtype);  // [rows, C_out]
      // dcols[grp] = dY_grp [rows, cout_g] @ W_grp [cout_g, K]
      auto dcols = at::empty({g.groups, nb * g.OH * g.OW, K}, dy.options());
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        auto dcols_grp = dcols[grp];
        at::mm_out(dcols_grp, dy.narrow(1, grp * g.cout_g, g.cout_g), w[grp]);
      }
      const Acc* dc = dcols.data_ptr<Acc>();
      const int64_t group_stride = nb * g.OH * g.OW * K;
      // One item per input row (n, c, h): gather every w of it.
      at::parallel_for(0, nb * g.C * g.H, grain_for(g.W * g.KH * g.KW), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t h = i % g.H;
          const int64_t c = (i / g.H) % g.C;
          const int64_t n = i / (g.H * g.C);
          const int64_t grp = c / g.cin_g, ci = c % g.cin_g;
          for (int64_t wi = 0; wi < g.W; ++wi) {
            Acc v = col2im_gather<Acc>(dc + grp * group_stride, K, n, ci, h, wi, g);
            dx[(n0 + n) * xs[0] + c * xs[1] + h * xs[2] + wi * xs[3]] = static_cast<scalar_t>(v);
          }
        }
      });
    }
  });
}

std::tuple<at::Tensor, at::Tensor> ext_conv2d_weight_grad_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                                              at::IntArrayRef weight_size, at::IntArrayRef stride,
                                                              at::IntArrayRef padding, at::IntArrayRef dilation,
                                                              int64_t groups, bool bias_grad, bool /*allow_tf32*/) {
  const char* op = "fastconv::ext_conv2d_weight_grad (cpu)";
  const ConvGeom g = check_weight_grad_args(grad_output, input, weight_size, stride, padding, dilation, groups, op);
  TORCH_CHECK(grad_output.device().is_cpu() && input.device().is_cpu(), op, ": expected CPU tensors");
  const auto acc_dtype = acc_type(input.scalar_type());
  const int64_t K = g.cols();
  auto dw = at::zeros({g.groups, g.cout_g, K}, input.options().dtype(acc_dtype));
  auto db = at::zeros({bias_grad ? g.C_out : 0}, input.options().dtype(acc_dtype));
  const int64_t nb_max = images_per_chunk(g, std::max<int64_t>(K, 1) * (acc_dtype == at::kDouble ? 8 : 4));
  const auto xs = strides4(input);
  if (g.N > 0 && K > 0 && g.cout_g > 0 && !dry_run()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "ext_conv2d_weight_grad_cpu", [&] {
      using Acc = at::opmath_type<scalar_t>;
      auto cols = at::empty({nb_max * g.OH * g.OW, K}, input.options().dtype(acc_dtype));
      for (int64_t n0 = 0; n0 < g.N; n0 += nb_max) {
        const int64_t nb = std::min(nb_max, g.N - n0);
        const int64_t rows = nb * g.OH * g.OW;
        auto dy = grad_matrix(grad_output, n0, nb, acc_dtype);  // [rows, C_out]
        auto cols_view = cols.narrow(0, 0, rows);
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          im2col(input.data_ptr<scalar_t>(), xs, g, grp, n0 * g.OH * g.OW, rows, cols_view.data_ptr<Acc>());
          dw[grp].addmm_(dy.narrow(1, grp * g.cout_g, g.cout_g).t(), cols_view);
        }
        if (bias_grad) db.add_(dy.sum(0));
      }
    });
  }
  return {dw.view(weight_size).to(input.scalar_type()).contiguous(), db.to(input.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastconv, CPU, m) {
  m.impl("ext_conv2d", &ext_conv2d_cpu);
  m.impl("ext_conv2d_input_grad", &ext_conv2d_input_grad_cpu);
  m.impl("ext_conv2d_weight_grad", &ext_conv2d_weight_grad_cpu);
}

}  // namespace fastconv
