// Schemas of the C++ max-pool ops (kernels: csrc/cpu/max_pool2d.cpp, csrc/cuda/max_pool2d_cuda.cpp).
// fastconv.ops.max_pool2d calls them for backends 'cpu' / 'cuda' and registers their fake kernels.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastconv, m) {
  // (out, offsets): offsets hold the argmax tap kh * KW + kw (int8/int16/int32 by window size), both in
  // the input's suggested memory format; with offsets=False (no backward follows) an empty tensor, not written.
  m.def("ext_max_pool2d(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
        "bool ceil_mode, bool offsets=True) -> (Tensor, Tensor)");
  // grad_input from grad_output and the forward's offsets alone (a deterministic gather, no atomics).
  m.def("ext_max_pool2d_input_grad(Tensor grad_output, Tensor offsets, int[4] input_size, int[2] kernel_size, "
        "int[2] stride, int[2] padding, int[2] dilation, bool ceil_mode, bool channels_last) -> Tensor");
}
