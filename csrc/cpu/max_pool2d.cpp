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

#include <vector>

#include "../max_pool2d.h"

namespace fastconv {
namespace {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T, typename Off>
void forward_cpu(const at::Tensor& x, at::Tensor& y, at::Tensor& off, const PoolShape& s) {
  using Acc = acc_t<T>;
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.data_ptr<T>();
  Off* op = off.data_ptr<Off>();
  const int64_t sxn = x.stride(0), sxc = x.stride(1), sxh = x.stride(2), sxw = x.stride(3);
  const int64_t syn = y.stride(0), syc = y.stride(1), syh = y.stride(2), syw = y.stride(3);  // off: same strides
  const PoolGeometry g = s.g;
  if (s.format == at::MemoryFormat::ChannelsLast) {
    at::parallel_for(0, s.N * s.OH, 1, [&](int64_t begin, int64_t end) {
      std::vector<Acc> best(s.C);
      std::vector<int64_t> tap(s.C);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / s.OH, oh = row % s.OH;
        const int64_t h0 = oh * g.SH - g.PH;
        int64_t kh_lo, kh_hi;
        tap_range(h0, s.H, g.KH, g.DH, kh_lo, kh_hi);
        for (int64_t ow = 0; ow < s.OW; ++ow) {
          const int64_t w0 = ow * g.SW - g.PW;
          int64_t kw_lo, kw_hi;
          tap_range(w0, s.W, g.KW, g.DW, kw_lo, kw_hi);
          const int64_t start = initial_tap(h0, w0, g);
          for (int64_t c = 0; c < s.C; ++c) {
            best[c] = -std::numeric_limits<Acc>::infinity();
            tap[c] = start;
          }
          // taps outer, channels inner: every tap reads C consecutive values of a channels_last input
          for (int64_t kh = kh_lo; kh < kh_hi; ++kh) {
            for (int64_t kw = kw_lo; kw < kw_hi; ++kw) {
              const T* src = xp + n * sxn + (h0 + kh * g.DH) * sxh + (w0 + kw * g.DW) * sxw;
              const int64_t t = kh * g.KW + kw;
              for (int64_t c = 0; c < s.C; ++c) fold_tap(static_cast<Acc>(src[c * sxc]), t, best[c], tap[c]);
            }
          }
          const int64_t o = n * syn + oh * syh + ow * syw;
          for (int64_t c = 0; c < s.C; ++c) {
            yp[o + c * syc] = static_cast<T>(best[c]);
            op[o + c * syc] = static_cast<Off>(tap[c]);
          }
        }
      }
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
          op[o + oh * syh + ow * syw] = static_cast<Off>(t);
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
  // Each dx element gathers, in (oh, ow) raster order, the grads of the windows whose argmax tap is it.
  if (s.format == at::MemoryFormat::ChannelsLast) {
    at::parallel_for(0, s.N * s.H, 1, [&](int64_t begin, int64_t end) {
      std::vector<Acc> acc(s.C);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / s.H, h = row % s.H;
        int64_t oh_lo, oh_hi;
        window_range(h, g.KH, g.SH, g.PH, g.DH, s.OH, oh_lo, oh_hi);
        for (int64_t w = 0; w < s.W; ++w) {
          int64_t ow_lo, ow_hi;
          window_range(w, g.KW, g.SW, g.PW, g.DW, s.OW, ow_lo, ow_hi);
          std::fill(acc.begin(), acc.end(), Acc(0));
          for (int64_t oh = oh_lo; oh <= oh_hi; ++oh) {
            const int64_t kh = window_tap(h, oh, g.SH, g.PH, g.DH);
            if (kh < 0) continue;
            for (int64_t ow = ow_lo; ow <= ow_hi; ++ow) {
              const int64_t kw = window_tap(w, ow, g.SW, g.PW, g.DW);
              if (kw < 0) continue;
              const Off t = static_cast<Off>(kh * g.KW + kw);
              const Off* o = op + n * son + oh * soh + ow * sow;
              const T* d = dyp + n * sdn + oh * sdh + ow * sdw;
              for (int64_t c = 0; c < s.C; ++c) {
                if (o[c * soc] == t) acc[c] += static_cast<Acc>(d[c * sdc]);
              }
            }
          }
          T* dst = dxp + n * sxn + h * sxh + w * sxw;
          for (int64_t c = 0; c < s.C; ++c) dst[c * sxc] = static_cast<T>(acc[c]);
        }
      }
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
        int64_t oh_lo, oh_hi;
        window_range(h, g.KH, g.SH, g.PH, g.DH, s.OH, oh_lo, oh_hi);
        for (int64_t w = 0; w < s.W; ++w) {
          int64_t ow_lo, ow_hi;
          window_range(w, g.KW, g.SW, g.PW, g.DW, s.OW, ow_lo, ow_hi);
          Acc acc = 0;
          for (int64_t oh = oh_lo; oh <= oh_hi; ++oh) {
            const int64_t kh = window_tap(h, oh, g.SH, g.PH, g.DH);
            if (kh < 0) continue;
            for (int64_t ow = ow_lo; ow <= ow_hi; ++ow) {
              const int64_t kw = window_tap(w, ow, g.SW, g.PW, g.DW);
              if (kw >= 0 && o[oh * soh + ow * sow] == kh * g.KW + kw) acc += static_cast<Acc>(d[oh * sdh + ow * sdw]);
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
                                                      at::IntArrayRef dilation, bool ceil_mode) {
  constexpr const char* op = "fastconv::ext_max_pool2d (cpu)";
  TORCH_CHECK(input.device().is_cpu(), op, ": expects a CPU tensor, got ", input.device());
  pool_check_float(op, input, "input", true);
  auto [s, y, off] = pool_forward_outputs(op, input, kernel_size, stride, padding, dilation, ceil_mode);
  if (y.numel() == 0) return {y, off};
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
  if (dx.numel() == 0) return dx;
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
