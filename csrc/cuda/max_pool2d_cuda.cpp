// CUDA registration of fastconv::ext_max_pool2d(_input_grad): checks, device guard, current stream, params,
// launch (csrc/cuda/max_pool2d.cu), launch-error check.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../max_pool2d.h"
#include "launch_check.h"
#include "max_pool2d_launch.h"

namespace fastconv {
namespace {

std::tuple<at::Tensor, at::Tensor> ext_max_pool2d_cuda(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                       at::IntArrayRef stride, at::IntArrayRef padding,
                                                       at::IntArrayRef dilation, bool ceil_mode, bool offsets) {
  constexpr const char* op = "fastconv::ext_max_pool2d (cuda)";
  check_cuda(input, "input", op);
  pool_check_float(op, input, "input", true);
  c10::cuda::CUDAGuard guard(input.device());
  auto [s, y, off] = pool_forward_outputs(op, input, kernel_size, stride, padding, dilation, ceil_mode, offsets);
  if (y.numel() == 0) return {y, off};
  MaxPool2dForwardParams p{};
  p.x = input.const_data_ptr();
  p.y = y.data_ptr();
  p.offsets = offsets ? off.data_ptr() : nullptr;
  p.N = s.N, p.C = s.C, p.H = s.H, p.W = s.W, p.OH = s.OH, p.OW = s.OW;
  for (int d = 0; d < 4; ++d) p.sx[d] = input.stride(d);
  p.g = s.g;
  p.channels_last = s.format == at::MemoryFormat::ChannelsLast;
  p.dtype = dtype_of(input);
  p.offsets_bytes = static_cast<int>(off.element_size());
  check_launch(launch_max_pool2d_forward(p, c10::cuda::getCurrentCUDAStream().stream()), op);
  return {y, off};
}

at::Tensor ext_max_pool2d_input_grad_cuda(const at::Tensor& grad_output, const at::Tensor& offsets,
                                          at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                          bool ceil_mode, bool channels_last) {
  constexpr const char* op = "fastconv::ext_max_pool2d_input_grad (cuda)";
  check_cuda(grad_output, "grad_output", op);
  pool_check_float(op, grad_output, "grad_output", true);
  c10::cuda::CUDAGuard guard(grad_output.device());
  auto [s, dx] = pool_backward_output(op, grad_output, offsets, input_size, kernel_size, stride, padding, dilation,
                                      ceil_mode, channels_last);
  if (dx.numel() == 0) return dx;
  MaxPool2dBackwardParams p{};
  p.dy = grad_output.const_data_ptr();
  p.offsets = offsets.const_data_ptr();
  p.dx = dx.data_ptr();
  p.N = s.N, p.C = s.C, p.H = s.H, p.W = s.W, p.OH = s.OH, p.OW = s.OW;
  for (int d = 0; d < 4; ++d) {
    p.sdy[d] = grad_output.stride(d);
    p.soff[d] = offsets.stride(d);
  }
  p.g = s.g;
  p.channels_last = channels_last;
  p.dtype = dtype_of(grad_output);
  p.offsets_bytes = static_cast<int>(offsets.element_size());
  check_launch(launch_max_pool2d_backward(p, c10::cuda::getCurrentCUDAStream().stream()), op);
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastconv, CUDA, m) {
  m.impl("ext_max_pool2d", &ext_max_pool2d_cuda);
  m.impl("ext_max_pool2d_input_grad", &ext_max_pool2d_input_grad_cuda);
}

}  // namespace fastconv
