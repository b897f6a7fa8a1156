// Schemas of the C++ training-mode BatchNorm ops (kernels: csrc/cpu/batch_norm.cpp,
// csrc/cuda/batch_norm_cuda.cpp). fastconv.ops.conv_bn_act calls them for backends 'cpu' / 'cuda' and
// registers their fake kernels. Statistics are fp32 (fp64 for fp64 tensors).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastconv, m) {
  // Per-[tile, channel] partials (count, mean, M2) of z: the layout the conv epilogue writes.
  m.def("ext_batch_norm_stats(Tensor z) -> (Tensor, Tensor, Tensor)");
  // Chan combination of [T, C] partials, then + bias: (mean, biased var).
  m.def("ext_batch_norm_finalize(Tensor count, Tensor mean, Tensor m2, Tensor? bias) -> (Tensor, Tensor)");
  // y = act((z - mean) / sqrt(var + eps) * weight + bias [+ residual]).
  m.def("ext_batch_norm_act(Tensor z, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, Tensor? residual, "
        "float eps, str activation) -> Tensor");
  // (grad_z, sum_g, sum_gx, grad_residual or an empty tensor).
  m.def("ext_batch_norm_act_backward(Tensor grad_y, Tensor z, Tensor mean, Tensor var, Tensor? weight, "
        "Tensor? bias, Tensor? residual, float eps, str activation, bool want_grad_residual) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}
