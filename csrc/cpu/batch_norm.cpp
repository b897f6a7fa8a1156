// CPU twin of the training-mode BatchNorm kernels (fastconv::ext_batch_norm_*) for CPU tensors. The per-element
// and per-channel math (Welford/Chan moments, normalize + affine + activation, the backward's g and dz) comes
// from fastconv/batch_norm.h, the header the CUDA kernels use.
//
// Reductions run over tiles of kTileRows pixels into [T, C] partials, combined in the passes, chunks, lanes
// and tree order of the CUDA kernels (fastconv/batch_norm.h), so results do not depend on the thread count.
// Inside a tile, and in the elementwise passes, the channel loop is innermost for channels_last tensors and
// outermost for the others, so memory is walked in order.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "../batch_norm.h"
#include "fastconv/dry_run.h"

namespace fastconv {
namespace {

constexpr int64_t kTileRows = kBnTileRowsCpu;  // pixels per statistics tile (fastconv/batch_norm.h)

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

struct Strides {
  int64_t n, c, h, w;
  explicit Strides(const at::Tensor& t) : n(t.stride(0)), c(t.stride(1)), h(t.stride(2)), w(t.stride(3)) {}
  Strides() : n(0), c(0), h(0), w(0) {}
  int64_t at(int64_t n_, int64_t c_, int64_t h_, int64_t w_) const { return n_ * n + c_ * c + h_ * h + w_ * w; }
};

// Calls f(std::integral_constant<Act, a>) for the runtime activation a: the per-element activation then
// compiles to straight-line code instead of a switch in every inner loop.
template <typename F>
void with_act(Act act, const F& f) {
  switch (act) {
    case Act::relu:
      return f(std::integral_constant<Act, Act::relu>{});
    case Act::relu6:
      return f(std::integral_constant<Act, Act::relu6>{});
    case Act::silu:
      return f(std::integral_constant<Act, Act::silu>{});
    case Act::hardswish:
      return f(std::integral_constant<Act, Act::hardswish>{});
    default:
      return f(std::integral_constant<Act, Act::identity>{});
  }
}

// Visit pixels p in [p0, p1) of an (N, H, W) raster as (n, h, w) without divisions per pixel.
template <typename F>
inline void for_pixels(int64_t p0, int64_t p1, int64_t H, int64_t W, const F& f) {
  int64_t w = p0 % W, t = p0 / W, h = t % H, n = t / H;
  for (int64_t p = p0; p < p1; ++p) {
    f(n, h, w);
    if (++w == W) {
      w = 0;
      if (++h == H) {
        h = 0;
        ++n;
      }
    }
  }
}

// The channel loop innermost pays when z's channel stride is its smallest (channels_last).
inline bool channels_inner(const at::Tensor& z) {
  return z.size(1) > 1 && z.stride(1) < z.stride(3) && z.stride(1) < z.stride(2);
}

template <typename Acc>
std::vector<BnChannel<Acc>> channels(const BnInputs& in, int64_t C, double eps) {
  std::vector<BnChannel<Acc>> ch(C);
  const Acc* w = in.weight.defined() ? in.weight.const_data_ptr<Acc>() : nullptr;
  const Acc* b = in.bias.defined() ? in.bias.const_data_ptr<Acc>() : nullptr;
  for (int64_t c = 0; c < C; ++c)
    ch[c] = bn_channel<Acc>(in.mean.const_data_ptr<Acc>(), in.var.const_data_ptr<Acc>(), w, b, static_cast<Acc>(eps), c);
  return ch;
}

// ---------------------------------------------------------------------------------------------------------
// combination of [rows, C] partial states: the passes of fastconv/batch_norm.h, a CUDA block's lanes and
// tree run serially per channel; (chunk, block of channels) pairs are spread over threads.

constexpr int64_t kCombineChannels = 64;  // channels of one parallel_for item

// One pass over row(r, c) -> S, r < rows: the [chunks, C] states.
template <typename S, typename Row>
std::vector<S> combine_pass(const Row& row, int64_t rows, int64_t C) {
  const int64_t chunks = bn_combine_chunks(rows), blocks = ceil_div(C, kCombineChannels);
  std::vector<S> out(chunks * C);
  at::parallel_for(0, chunks * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t k = b / blocks, c0 = (b % blocks) * kCombineChannels, c1 = std::min(C, c0 + kCombineChannels);
      const int64_t r0 = k * kBnCombineRows, r1 = std::min(rows, r0 + kBnCombineRows);
      for (int64_t c = c0; c < c1; ++c) {
        S lanes[kBnCombineLanes];
        for (int j = 0; j < kBnCombineLanes; ++j)
          lanes[j] = bn_combine_lane<S>([&](int64_t r) { return row(r, c); }, r0, r1, j);
        bn_combine_tree(lanes, kBnCombineLanes);
        out[k * C + c] = lanes[0];
      }
    }
  });
  return out;
}

// Every pass: the [C] per-channel states of T partial rows.
template <typename S, typename Row>
std::vector<S> combine_all(const Row& row, int64_t T, int64_t C) {
  std::vector<S> cur;
  bool first = true;  // the first pass reads the partials, the others the previous pass's states
  bn_combine_passes(T, [&](int64_t rows, int64_t) {
    std::vector<S> next = first ? combine_pass<S>(row, rows, C)
                                : combine_pass<S>([&](int64_t r, int64_t c) { return cur[r * C + c]; }, rows, C);
    cur.swap(next);
    first = false;
  });
  return cur;
}

// ---------------------------------------------------------------------------------------------------------
// statistics partials

template <typename T>
void stats_cpu(const at::Tensor& z, at::Tensor& cnt, at::Tensor& mean, at::Tensor& m2) {
  using Acc = acc_t<T>;
  const int64_t N = z.size(0), C = z.size(1), H = z.size(2), W = z.size(3), P = N * H * W;
  const T* zp = z.const_data_ptr<T>();
  const Strides sz(z);
  Acc* cp = cnt.data_ptr<Acc>();
  Acc* mp = mean.data_ptr<Acc>();
  Acc* qp = m2.data_ptr<Acc>();
  const bool inner = channels_inner(z);
  const int64_t T_ = cnt.size(0);
  at::parallel_for(0, T_, 1, [&](int64_t begin, int64_t end) {
    std::vector<Acc> sum(C), sq(C);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p0 = t * kTileRows, p1 = std::min(P, p0 + kTileRows);
      const Acc rows = static_cast<Acc>(std::max<int64_t>(p1 - p0, 0));
      std::fill(sum.begin(), sum.end(), Acc(0));
      std::fill(sq.begin(), sq.end(), Acc(0));
      // two passes over the (cache-resident) tile: the mean, then squared deviations from it
      if (inner) {
        for_pixels(p0, p1, H, W, [&](int64_t n, int64_t h, int64_t w) {
          const T* src = zp + sz.at(n, 0, h, w);
          for (int64_t c = 0; c < C; ++c) sum[c] += static_cast<Acc>(src[c * sz.c]);
        });
        for (int64_t c = 0; c < C; ++c) sum[c] = rows > 0 ? sum[c] / rows : Acc(0);
        for_pixels(p0, p1, H, W, [&](int64_t n, int64_t h, int64_t w) {
          const T* src = zp + sz.at(n, 0, h, w);
          for (int64_t c = 0; c < C; ++c) {
            const Acc d = static_cast<Acc>(src[c * sz.c]) - sum[c];
            sq[c] += d * d;
          }
        });
      } else {
        for (int64_t c = 0; c < C; ++c) {
          Acc s = 0;
          for_pixels(p0, p1, H, W, [&](int64_t n, int64_t h, int64_t w) { s += static_cast<Acc>(zp[sz.at(n, c, h, w)]); });
          const Acc mu = rows > 0 ? s / rows : Acc(0);
          Acc q = 0;
          for_pixels(p0, p1, H, W, [&](int64_t n, int64_t h, int64_t w) {
            const Acc d = static_cast<Acc>(zp[sz.at(n, c, h, w)]) - mu;
            q += d * d;
          });
          sum[c] = mu;
          sq[c] = q;
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        cp[t * C + c] = rows;
        mp[t * C + c] = sum[c];
        qp[t * C + c] = sq[c];
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ext_batch_norm_stats_cpu(const at::Tensor& z) {
  constexpr const char* op = "fastconv::ext_batch_norm_stats (cpu)";
  TORCH_CHECK(z.device().is_cpu(), op, ": expects a CPU tensor, got ", z.device());
  bn_check_z(op, z, true);
  const int64_t P = z.size(0) * z.size(2) * z.size(3), C = z.size(1);
  const int64_t T = std::max<int64_t>(1, (P + kTileRows - 1) / kTileRows);
  auto opts = z.options().dtype(bn_stat_dtype(z));
  at::Tensor cnt = at::empty({T, C}, opts), mean = at::empty({T, C}, opts), m2 = at::empty({T, C}, opts);
  if (C == 0 || dry_run()) return {cnt, mean, m2};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "ext_batch_norm_stats_cpu",
                                  [&] { stats_cpu<scalar_t>(z, cnt, mean, m2); });
  return {cnt, mean, m2};
}

// ---------------------------------------------------------------------------------------------------------
// finalize

template <typename Acc>
void finalize_cpu(const at::Tensor& cnt, const at::Tensor& mean_p, const at::Tensor& m2_p, const at::Tensor& bias,
                  at::Tensor& mean, at::Tensor& var) {
  const int64_t T = cnt.size(0), C = cnt.size(1);
  const Acc *cp = cnt.const_data_ptr<Acc>(), *mp = mean_p.const_data_ptr<Acc>(), *qp = m2_p.const_data_ptr<Acc>();
  const Acc* bp = bias.defined() ? bias.const_data_ptr<Acc>() : nullptr;
  Acc *mo = mean.data_ptr<Acc>(), *vo = var.data_ptr<Acc>();
  const auto m = combine_all<Moments<Acc>>([&](int64_t t, int64_t c) {
    const int64_t i = t * C + c;
    return Moments<Acc>{cp[i], mp[i], qp[i]};
  }, T, C);
  for (int64_t c = 0; c < C; ++c) {
    mo[c] = m[c].mean + (bp ? bp[c] : Acc(0));
    vo[c] = moments_var(m[c]);
  }
}

// F.batch_norm's running-statistics update (bn_running_lerp per channel), for buffers bn_running_in_kernel accepts.
template <typename Acc>
void running_update_cpu(const at::Tensor& mean, const at::Tensor& var, int64_t values, const at::Tensor& rm,
                        const at::Tensor& rv, double momentum, const at::Tensor& momentum_t) {
  const double w = momentum_t.defined() ? static_cast<double>(momentum_t.const_data_ptr<Acc>()[0]) : momentum;
  const Acc unbias = static_cast<Acc>(bn_unbias(values));
  const int64_t C = mean.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rm.scalar_type(), "running_update_cpu", [&] {
    using O = acc_t<scalar_t>;  // at::lerp's opmath type of the buffers
    const auto update = [&](const at::Tensor& buf, const Acc* stat, Acc factor) {
      scalar_t* p = buf.data_ptr<scalar_t>();
      const int64_t stride = buf.stride(0);
      for (int64_t c = 0; c < C; ++c) {
        const O st = static_cast<O>(static_cast<scalar_t>(stat[c] * factor));  // stat.to(buf.dtype)
        p[c * stride] = static_cast<scalar_t>(bn_running_lerp<O>(static_cast<O>(p[c * stride]), st,
                                                                 static_cast<O>(w)));
      }
    };
    update(rm, mean.const_data_ptr<Acc>(), Acc(1));
    update(rv, var.const_data_ptr<Acc>(), unbias);
  });
}

std::tuple<at::Tensor, at::Tensor> ext_batch_norm_finalize_cpu(
    const at::Tensor& count, const at::Tensor& mean, const at::Tensor& m2, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, double momentum,
    const c10::optional<at::Tensor>& momentum_tensor, const c10::optional<at::Tensor>& num_batches_tracked,
    int64_t values) {
  constexpr const char* op = "fastconv::ext_batch_norm_finalize (cpu)";
  bn_check_partials(op, count, mean, m2);
  TORCH_CHECK(count.device().is_cpu(), op, ": expects CPU tensors, got ", count.device());
  const int64_t C = count.size(1);
  at::Tensor b;
  if (bn_given(bias)) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C, op, ": bias must have shape [", C, "], got ", bias->sizes());
    TORCH_CHECK(bias->device() == count.device(), op, ": bias is on ", bias->device());
    b = bias->to(count.scalar_type()).contiguous();
  }
  at::Tensor c = count.contiguous(), mp = mean.contiguous(), qp = m2.contiguous();
  at::Tensor mean_out = at::empty({C}, count.options()), var_out = at::empty({C}, count.options());
  const bool in_loop = bn_running_in_kernel(op, mean_out, values, running_mean, running_var, momentum_tensor,
                                            num_batches_tracked);
  if (!dry_run()) {
    const at::Tensor w = in_loop ? bn_kernel_momentum(momentum_tensor, *running_mean, mean_out) : at::Tensor();
    const auto finalize = [&](auto acc) {
      using Acc = decltype(acc);
      finalize_cpu<Acc>(c, mp, qp, b, mean_out, var_out);
      if (in_loop) running_update_cpu<Acc>(mean_out, var_out, values, *running_mean, *running_var, momentum, w);
    };
    if (count.scalar_type() == at::kDouble)
      finalize(double{});
    else
      finalize(float{});
  }
  if (!in_loop) {
    bn_update_running(op, mean_out, var_out, values, running_mean, running_var, momentum, momentum_tensor,
                      num_batches_tracked);
  } else if (bn_given(num_batches_tracked)) {
    ++num_batches_tracked->data_ptr<int64_t>()[0];
  }
  return {mean_out, var_out};
}

// ---------------------------------------------------------------------------------------------------------
// y = act(bn(z) + residual)

template <typename T>
void act_cpu(const at::Tensor& z, const BnInputs& in, double eps, at::Tensor& y) {
  using Acc = acc_t<T>;
  const int64_t N = z.size(0), C = z.size(1), H = z.size(2), W = z.size(3);
  const auto ch = channels<Acc>(in, C, eps);
  const T* zp = z.const_data_ptr<T>();
  const T* rp = in.residual.defined() ? in.residual.const_data_ptr<T>() : nullptr;
  T* yp = y.data_ptr<T>();
  const Strides sz(z), sy(y), sr = rp ? Strides(in.residual) : Strides();
  with_act(in.act, [&](auto act_c) {
  constexpr Act act = decltype(act_c)::value;
  if (bn_format(y) == at::MemoryFormat::ChannelsLast) {
    at::parallel_for(0, N * H * W, 256, [&](int64_t begin, int64_t end) {
      for_pixels(begin, end, H, W, [&](int64_t n, int64_t h, int64_t w) {
        const T* zs = zp + sz.at(n, 0, h, w);
        const T* rs = rp ? rp + sr.at(n, 0, h, w) : nullptr;
        T* ys = yp + sy.at(n, 0, h, w);
        for (int64_t c = 0; c < C; ++c) {
          const Acc r = rs ? static_cast<Acc>(rs[c * sr.c]) : Acc(0);
          ys[c * sy.c] = static_cast<T>(bn_act_value(static_cast<Acc>(zs[c * sz.c]), ch[c], r, act));
        }
      });
    });
    return;
  }
  at::parallel_for(0, N * C * H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t h = row % H, c = (row / H) % C, n = row / (H * C);
      const T* zs = zp + sz.at(n, c, h, 0);
      const T* rs = rp ? rp + sr.at(n, c, h, 0) : nullptr;
      T* ys = yp + sy.at(n, c, h, 0);
      const BnChannel<Acc> k = ch[c];
      for (int64_t w = 0; w < W; ++w) {
        const Acc r = rs ? static_cast<Acc>(rs[w * sr.w]) : Acc(0);
        ys[w * sy.w] = static_cast<T>(bn_act_value(static_cast<Acc>(zs[w * sz.w]), k, r, act));
      }
    }
  });
  });
}

at::Tensor ext_batch_norm_act_cpu(const at::Tensor& z, const at::Tensor& mean, const at::Tensor& var,
                                  const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                  const c10::optional<at::Tensor>& residual, double eps, c10::string_view activation) {
  constexpr const char* op = "fastconv::ext_batch_norm_act (cpu)";
  TORCH_CHECK(z.device().is_cpu(), op, ": expects CPU tensors, got ", z.device());
  bn_check_z(op, z, true);
  const BnInputs in = bn_inputs(op, z, mean, var, weight, bias, residual, std::string(activation));
  at::Tensor y = at::empty(z.sizes(), z.options().memory_format(bn_format(z)));
  if (y.numel() == 0 || dry_run()) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "ext_batch_norm_act_cpu",
                                  [&] { act_cpu<scalar_t>(z, in, eps, y); });
  return y;
}

// ---------------------------------------------------------------------------------------------------------
// backward: reduce (sum_g, sum_gx) over tiles, then apply

// Visit the pixels [p0, p1) of an (N, H, W) raster as row segments (n, h, w0, w1).
template <typename F>
inline void for_row_segments(int64_t p0, int64_t p1, int64_t H, int64_t W, const F& f) {
  int64_t p = p0;
  while (p < p1) {
    const int64_t w0 = p % W, nh = p / W;
    const int64_t w1 = std::min(W, w0 + (p1 - p));
    f(nh / H, nh % H, w0, w1);
    p += w1 - w0;
  }
}

template <typename T>
void backward_cpu(const at::Tensor& dy, const at::Tensor& z, const BnInputs& in, double eps, at::Tensor& sum_g,
                  at::Tensor& sum_gx, at::Tensor& dz, at::Tensor* dres) {
  using Acc = acc_t<T>;
  const int64_t N = z.size(0), C = z.size(1), H = z.size(2), W = z.size(3), P = N * H * W;
  const auto ch = channels<Acc>(in, C, eps);
  const T* zp = z.const_data_ptr<T>();
  const T* dp = dy.const_data_ptr<T>();
  const T* rp = in.residual.defined() ? in.residual.const_data_ptr<T>() : nullptr;
  const Strides sz(z), sd(dy), sr = rp ? Strides(in.residual) : Strides();
  const bool inner = channels_inner(z);
  const int64_t T_ = std::max<int64_t>(1, (P + kTileRows - 1) / kTileRows);
  std::vector<GradSums<Acc>> part(T_ * C, GradSums<Acc>{0, 0});
  std::vector<Acc> mean_g(C), mean_gx(C);
  T* dzp = dz.data_ptr<T>();
  T* drp = dres ? dres->data_ptr<T>() : nullptr;
  const Strides sx(dz), sq = dres ? Strides(*dres) : Strides();
  with_act(in.act, [&](auto act_c) {
    constexpr Act act = decltype(act_c)::value;
    // g and xhat of the `count` elements of a run starting at (n, c, h, w) and advancing along `axis`
    // (1: channels, 3: columns): row pointers once, one multiply-add per element.
    auto run = [&](int64_t n, int64_t c, int64_t h, int64_t w, int64_t count, int axis, auto&& body) {
      const int64_t zs = axis == 1 ? sz.c : sz.w, ds = axis == 1 ? sd.c : sd.w, rs = axis == 1 ? sr.c : sr.w;
      const T* zb = zp + sz.at(n, c, h, w);
      const T* db = dp + sd.at(n, c, h, w);
      const T* rb = rp ? rp + sr.at(n, c, h, w) : nullptr;
      for (int64_t j = 0; j < count; ++j) {
        const int64_t cc = axis == 1 ? c + j : c;
        const Acc r = rb ? static_cast<Acc>(rb[j * rs]) : Acc(0);
        Acc xhat;
        const Acc g = bn_act_grad(static_cast<Acc>(db[j * ds]), static_cast<Acc>(zb[j * zs]), ch[cc], r, act, xhat);
        body(j, cc, g, xhat);
      }
    };
    at::parallel_for(0, T_, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t p0 = t * kTileRows, p1 = std::min(P, p0 + kTileRows);
        GradSums<Acc>* pt = part.data() + t * C;
        if (inner) {
          for_pixels(p0, p1, H, W, [&](int64_t n, int64_t h, int64_t w) {
            run(n, 0, h, w, C, 1, [&](int64_t, int64_t c, Acc g, Acc xhat) {
              pt[c].g += g;
              pt[c].gx += g * xhat;
            });
          });
        } else {
          for (int64_t c = 0; c < C; ++c) {
            Acc sg = 0, sgx = 0;
            for_row_segments(p0, p1, H, W, [&](int64_t n, int64_t h, int64_t w0, int64_t w1) {
              run(n, c, h, w0, w1 - w0, 3, [&](int64_t, int64_t, Acc g, Acc xhat) {
                sg += g;
                sgx += g * xhat;
              });
            });
            pt[c] = {sg, sgx};
          }
        }
      }
    });
    Acc* sg = sum_g.data_ptr<Acc>();
    Acc* sgx = sum_gx.data_ptr<Acc>();
    const auto sums = combine_all<GradSums<Acc>>([&](int64_t t, int64_t c) { return part[t * C + c]; }, T_, C);
    for (int64_t c = 0; c < C; ++c) {
      sg[c] = sums[c].g;
      sgx[c] = sums[c].gx;
      mean_g[c] = P > 0 ? sums[c].g / static_cast<Acc>(P) : Acc(0);
      mean_gx[c] = P > 0 ? sums[c].gx / static_cast<Acc>(P) : Acc(0);
    }
    if (P == 0) return;
    if (bn_format(dz) == at::MemoryFormat::ChannelsLast) {
      at::parallel_for(0, P, 256, [&](int64_t begin, int64_t end) {
        for_pixels(begin, end, H, W, [&](int64_t n, int64_t h, int64_t w) {
          T* xo = dzp + sx.at(n, 0, h, w);
          T* qo = drp ? drp + sq.at(n, 0, h, w) : nullptr;
          run(n, 0, h, w, C, 1, [&](int64_t j, int64_t c, Acc g, Acc xhat) {
            xo[j * sx.c] = static_cast<T>(bn_grad_z(g, xhat, ch[c], mean_g[c], mean_gx[c]));
            if (qo) qo[j * sq.c] = static_cast<T>(g);
          });
        });
      });
    } else {
      at::parallel_for(0, N * C * H, 16, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const int64_t h = row % H, c = (row / H) % C, n = row / (H * C);
          T* xo = dzp + sx.at(n, c, h, 0);
          T* qo = drp ? drp + sq.at(n, c, h, 0) : nullptr;
          run(n, c, h, 0, W, 3, [&](int64_t j, int64_t, Acc g, Acc xhat) {
            xo[j * sx.w] = static_cast<T>(bn_grad_z(g, xhat, ch[c], mean_g[c], mean_gx[c]));
            if (qo) qo[j * sq.w] = static_cast<T>(g);
          });
        }
      });
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ext_batch_norm_act_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& z, const at::Tensor& mean, const at::Tensor& var,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& residual, double eps, c10::string_view activation, bool want_grad_residual) {
  constexpr const char* op = "fastconv::ext_batch_norm_act_backward (cpu)";
  TORCH_CHECK(z.device().is_cpu(), op, ": expects CPU tensors, got ", z.device());
  bn_check_z(op, z, true);
  const BnInputs in = bn_inputs(op, z, mean, var, weight, bias, residual, std::string(activation));
  const at::Tensor dy = bn_like_z(op, grad_y, z, "grad_y");
  BnBackwardOutputs out = bn_backward_outputs(z, want_grad_residual);
  if (dry_run()) return {out.dz, out.sum_g, out.sum_gx, out.dres};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "ext_batch_norm_act_backward_cpu", [&] {
    backward_cpu<scalar_t>(dy, z, in, eps, out.sum_g, out.sum_gx, out.dz, want_grad_residual ? &out.dres : nullptr);
  });
  return {out.dz, out.sum_g, out.sum_gx, out.dres};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastconv, CPU, m) {
  m.impl("ext_batch_norm_stats", &ext_batch_norm_stats_cpu);
  m.impl("ext_batch_norm_finalize", &ext_batch_norm_finalize_cpu);
  m.impl("ext_batch_norm_act", &ext_batch_norm_act_cpu);
  m.impl("ext_batch_norm_act_backward", &ext_batch_norm_act_backward_cpu);
}

}  // namespace fastconv
