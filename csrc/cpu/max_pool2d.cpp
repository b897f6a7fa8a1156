// CPU twin of the max-pool kernels: fastconv::ext_max_pool2d and ext_max_pool2d_input_grad for CPU tensors.
// Window bounds, tap encoding and NaN rules come from fastconv/max_pool2d.h, the header the CUDA kernels use.
//
// Loop order follows the output's memory format: NCHW parallelises over (n, c) planes; channels_last over
// (n, row) with the channel loop innermost, so both read and write memory in order. Inputs are read through
// their strides (non-contiguous views need no copy).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include "fastconv/dry_run.h"

#include <initializer_list>
#include <limits>
#include <type_traits>
#include <vector>

#include "../max_pool2d.h"

namespace fastconv {
namespace {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Calls f(std::true_type) when every stride is 1 (so the channel loops below vectorise), else f(std::false_type).
template <typename F>
void with_unit_strides(std::initializer_list<int64_t> strides, const F& f) {
  for (int64_t s : strides) {
    if (s != 1) return f(std::false_type{});
  }
  f(std::true_type{});
}

// The windows containing each input position along one axis, from the shared mapping (window_range,
// window_tap), tabulated once per call: position i has windows o[j], taps k[j] for j in [start[i], start[i+1]),
// in increasing o. The backward then needs no division per element.
struct AxisWindows {
  std::vector<int64_t> start, o, k;
  AxisWindows(int64_t size, int64_t K, int64_t S, int64_t P, int64_t D, int64_t O) {
    start.reserve(size + 1);
    for (int64_t i = 0; i < size; ++i) {
      start.push_back(static_cast<int64_t>(o.size()));
      int64_t lo, hi;
      window_range(i, K, S, P, D, O, lo, hi);
      for (int64_t w = lo; w <= hi; ++w) {
        const int64_t t = window_tap(i, w, S, P, D);
        if (t >= 0) {
          o.push_back(w);
          k.push_back(t);
        }
      }
    }
    start.push_back(static_cast<int64_t>(o.size()));
  }
};

template <typename T, typename Off>
void forward_cpu(const at::Tensor& x, at::Tensor& y, at::Tensor& off, const PoolShape& s) {
  using Acc = acc_t<T>;
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.data_ptr<T>();
  Off* op = off.numel() ? off.data_ptr<Off>() : nullptr;  // nullptr: taps not wanted
  const int64_t sxn = x.stride(0), sxc = x.stride(1), sxh = x.stride(2), sxw = x.stride(3);
  const int64_t syn = y.stride(0), syc = y.stride(1), syh = y.stride(2), syw = y.stride(3);  // off: same strides
  const PoolGeometry g = s.g;
  if (s.format == at::MemoryFormat::ChannelsLast) {
    with_unit_strides({sxc, syc}, [&](auto unit) {
      const int64_t xc = unit ? 1 : sxc, yc = unit ? 1 : syc;
      at::parallel_for(0, s.N * s.OH, 1, [&](int64_t begin, int64_t end) {
        std::vector<Acc> best_v(s.C);
        std::vector<int32_t> tap_v(s.C);
        Acc* __restrict best = best_v.data();
        int32_t* __restrict tap = tap_v.data();
        for (int64_t row = begin; row < end; ++row) {
          const int64_t n = row / s.OH, oh = row % s.OH;
          const int64_t h0 = oh * g.SH - g.PH;
          int64_t kh_lo, kh_hi;
          tap_range(h0, s.H, g.KH, g.DH, kh_lo, kh_hi);
          for (int64_t ow = 0; ow < s.OW; ++ow) {
            const int64_t w0 = ow * g.SW - g.PW;
            int64_t kw_lo, kw_hi;
            tap_range(w0, s.W, g.KW, g.DW, kw_lo, kw_hi);
            const int32_t start = static_cast<int32_t>(initial_tap(h0, w0, g));
            for (int64_t c = 0; c < s.C; ++c) {
              best[c] = -std::numeric_limits<Acc>::infinity();
              tap[c] = start;
            }
            // taps outer, channels inner: every tap reads C consecutive values of a channels_last input
            for (int64_t kh = kh_lo; kh < kh_hi; ++kh) {
              for (int64_t kw = kw_lo; kw < kw_hi; ++kw) {
                const T* __restrict src = xp + n * sxn + (h0 + kh * g.DH) * sxh + (w0 + kw * g.DW) * sxw;
                const int32_t t = static_cast<int32_t>(kh * g.KW + kw);
                for (int64_t c = 0; c < s.C; ++c) fold_tap(static_cast<Acc>(src[c * xc]), t, best[c], tap[c]);
              }
            }
            T* __restrict dst = yp + n * syn + oh * syh + ow * syw;
            for (int64_t c = 0; c < s.C; ++c) dst[c * yc] = static_cast<T>(best[c]);
            if (op) {
              Off* __restrict odst = op + n * syn + oh * syh + ow * syw;
              for (int64_t c = 0; c < s.C; ++c) odst[c * yc] = static_cast<Off>(tap[c]);
            }
          }
        }
      });
    });
    return;
  }
  at::parallel_for(0, s.N * s.C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / s.C, c = plane % s.C;
      const T* xplane = xp + n * sxn + c * sxc;
      const int64_t o = n * syn + c * syc;
      for (int64_t oh = 0; oh < s.OH; ++oh) {
        for (int64_t ow = 0; ow < s.OW; ++ow) {
          Acc best;
          const int64_t t = window_argmax(xplane, sxh, sxw, s.H, s.W, oh, ow, g, CastLoad<Acc>(), best);
          yp[o + oh * syh + ow * syw] = static_cast<T>(best);
          if (op) op[o + oh * syh + ow * syw] = static_cast<Off>(t);
        }
      }
    }
  });
}

template <typename T, typename Off>
void backward_cpu(const at::Tensor& dy, const at::Tensor& off, at::Tensor& dx, const PoolShape& s) {
  using Acc = acc_t<T>;
  const T* dyp = dy.const_data_ptr<T>();
  const Off* op = off.const_data_ptr<Off>();
  T* dxp = dx.data_ptr<T>();
  const int64_t sdn = dy.stride(0), sdc = dy.stride(1), sdh = dy.stride(2), sdw = dy.stride(3);
  const int64_t son = off.stride(0), soc = off.stride(1), soh = off.stride(2), sow = off.stride(3);
  const int64_t sxn = dx.stride(0), sxc = dx.stride(1), sxh = dx.stride(2), sxw = dx.stride(3);
  const PoolGeometry g = s.g;
  const AxisWindows rows(s.H, g.KH, g.SH, g.PH, g.DH, s.OH), cols(s.W, g.KW, g.SW, g.PW, g.DW, s.OW);
  // Each dx element gathers, in (oh, ow) raster order, the grads of the windows whose argmax tap is it.
  if (s.format == at::MemoryFormat::ChannelsLast) {
    with_unit_strides({sdc, soc, sxc}, [&](auto unit) {
      const int64_t dc = unit ? 1 : sdc, oc = unit ? 1 : soc, xc = unit ? 1 : sxc;
      at::parallel_for(0, s.N * s.H, 1, [&](int64_t begin, int64_t end) {
        std::vector<Acc> acc_v(s.C);
        Acc* __restrict acc = acc_v.data();
        for (int64_t row = begin; row < end; ++row) {
          const int64_t n = row / s.H, h = row % s.H;
          for (int64_t w = 0; w < s.W; ++w) {
            for (int64_t c = 0; c < s.C; ++c) acc[c] = Acc(0);
            for (int64_t a = rows.start[h]; a < rows.start[h + 1]; ++a) {
              const int64_t oh = rows.o[a], kh = rows.k[a];
              for (int64_t b = cols.start[w]; b < cols.start[w + 1]; ++b) {
                const int64_t ow = cols.o[b];
                const Off t = static_cast<Off>(kh * g.KW + cols.k[b]);
                const Off* __restrict o = op + n * son + oh * soh + ow * sow;
                const T* __restrict d = dyp + n * sdn + oh * sdh + ow * sdw;
                for (int64_t c = 0; c < s.C; ++c) acc[c] += o[c * oc] == t ? static_cast<Acc>(d[c * dc]) : Acc(0);
              }
            }
            T* __restrict dst = dxp + n * sxn + h * sxh + w * sxw;
            for (int64_t c = 0; c < s.C; ++c) dst[c * xc] = static_cast<T>(acc[c]);
          }
        }
      });
    });
    return;
  }
  at::parallel_for(0, s.N * s.C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / s.C, c = plane % s.C;
      const Off* o = op + n * son + c * soc;
      const T* d = dyp + n * sdn + c * sdc;
      T* dst = dxp + n * sxn + c * sxc;
      for (int64_t h = 0; h < s.H; ++h) {
        for (int64_t w = 0; w < s.W; ++w) {
          Acc acc = 0;
          for (int64_t a = rows.start[h]; a < rows.start[h + 1]; ++a) {
            const int64_t oh = rows.o[a], kh = rows.k[a];
            for (int64_t b = cols.start[w]; b < cols.start[w + 1]; ++b) {
              const int64_t ow = cols.o[b];
              if (o[oh * soh + ow * sow] == kh * g.KW + cols.k[b]) acc += static_cast<Acc>(d[oh * sdh + ow * sdw]);
            }
          }
          dst[h * sxh + w * sxw] = static_cast<T>(acc);
        }
      }
    }
  });
}

template <typename F>
void dispatch_offsets(at::ScalarType st, const F& f) {
  switch (st) {
    case at::kChar:
      return f(int8_t{});
    case at::kShort:
      return f(int16_t{});
    default:
      return f(int32_t{});
  }
}

std::tuple<at::Tensor, at::Tensor> ext_max_pool2d_cpu(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                                      at::IntArrayRef dilation, bool ceil_mode, bool offsets) {
  constexpr const char* op = "fastconv::ext_max_pool2d (cpu)";
  TORCH_CHECK(input.device().is_cpu(), op, ": expects a CPU tensor, got ", input.device());
  pool_check_float(op, input, "input", true);
  auto [s, y, off] = pool_forward_outputs(op, input, kernel_size, stride, padding, dilation, ceil_mode, offsets);
  if (y.numel() == 0 || dry_run()) return {y, off};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "ext_max_pool2d_cpu", [&] {
    dispatch_offsets(off.scalar_type(), [&](auto o) { forward_cpu<scalar_t, decltype(o)>(input, y, off, s); });
  });
  return {y, off};
}

at::Tensor ext_max_pool2d_input_grad_cpu(const at::Tensor& grad_output, const at::Tensor& offsets,
                                         at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                         bool ceil_mode, bool channels_last) {
  constexpr const char* op = "fastconv::ext_max_pool2d_input_grad (cpu)";
  TORCH_CHECK(grad_output.device().is_cpu(), op, ": expects CPU tensors, got ", grad_output.device());
  pool_check_float(op, grad_output, "grad_output", true);
  auto [s, dx] = pool_backward_output(op, grad_output, offsets, input_size, kernel_size, stride, padding, dilation,
                                      ceil_mode, channels_last);
  if (dx.numel() == 0 || dry_run()) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(), "ext_max_pool2d_bwd_cpu", [&] {
    dispatch_offsets(offsets.scalar_type(),
                     [&](auto o) { backward_cpu<scalar_t, decltype(o)>(grad_output, offsets, dx, s); });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastconv, CPU, m) {
  m.impl("ext_max_pool2d", &ext_max_pool2d_cpu);
  m.impl("ext_max_pool2d_input_grad", &ext_max_pool2d_input_grad_cpu);
}

}  // namespace fastconv
