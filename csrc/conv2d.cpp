// Schemas of the C++ conv2d ops (kernels: csrc/cpu/conv2d.cpp, csrc/cuda/conv2d_cuda.cpp). Python's
// fastconv::conv2d / conv2d_input_grad / conv2d_weight_grad call these for the 'cpu' and 'cuda' backends and
// keep the autograd, fake (register_fake in fastconv/ops/conv2d.py) and autocast registrations.
//
// padding is (top, bottom, left, right); activation is the index into fastconv.ops.conv2d.ACTIVATIONS.
// ext_conv2d writes y into `out` (any strides) and, with stats=True, returns BatchNorm partials
// (count, mean, M2) of shape [ceil(N*OH*OW / 64), C_out] taken before the bias (else three [0, C_out]).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastconv, m) {
  m.def(
      "ext_conv2d(Tensor input, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] dilation, "
      "int groups, Tensor? scale, Tensor? shift, Tensor? residual, int activation, bool stats, "
      "bool allow_tf32, Tensor(a!) out) -> (Tensor, Tensor, Tensor)");
  m.def(
      "ext_conv2d_input_grad(Tensor grad_output, Tensor weight, int[] stride, int[] padding, int[] dilation, "
      "int groups, bool allow_tf32, Tensor(a!) out) -> ()");
  m.def(
      "ext_conv2d_weight_grad(Tensor grad_output, Tensor input, int[] weight_size, int[] stride, "
      "int[] padding, int[] dilation, int groups, bool bias_grad, bool allow_tf32) -> (Tensor, Tensor)");
}
