// Schemas of the C++ training-mode BatchNorm ops (kernels: csrc/cpu/batch_norm.cpp,
// csrc/cuda/batch_norm_cuda.cpp). fastconv.ops.conv_bn_act calls them for backends 'cpu' / 'cuda' and
// registers their fake kernels. Statistics are fp32 (fp64 for fp64 tensors).
#include <torch/library.h>

#include <vector>

#include "fastconv/batch_norm.h"

namespace {

// The passes combining T partial rows of C channels (finalize, the backward's sums), as the CUDA launcher
// and the CPU twin run them: per pass (rows, chunks, rows_per_chunk, channel_blocks, serial), where serial
// counts the merges one thread does in sequence (its lane's rows, then the tree steps).
std::vector<int64_t> batch_norm_plan(int64_t T, int64_t C) {
  TORCH_CHECK(T >= 0 && C >= 0, "fastconv::ext_batch_norm_plan: T and C must be >= 0, got ", T, ", ", C);
  int tree = 0;
  for (int s = fastconv::kBnCombineLanes / 2; s > 0; s /= 2) ++tree;
  std::vector<int64_t> plan;
  fastconv::bn_combine_passes(T, [&](int64_t rows, int64_t chunks) {
    const int64_t per_chunk = std::min(rows, fastconv::kBnCombineRows);
    plan.insert(plan.end(), {rows, chunks, per_chunk, fastconv::ceil_div(C, fastconv::kBnCombineChannels),
                             fastconv::ceil_div(per_chunk, fastconv::kBnCombineLanes) + tree});
  });
  return plan;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastconv, m) {
  // Per-[tile, channel] partials (count, mean, M2) of z: the layout the conv epilogue writes.
  m.def("ext_batch_norm_stats(Tensor z) -> (Tensor, Tensor, Tensor)");
  // Chan combination of [T, C] partials, then + bias: (mean, biased var). With running statistics, also
  // F.batch_norm's training update of them from these `values` per channel (bn_update_running).
  m.def("ext_batch_norm_finalize(Tensor count, Tensor mean, Tensor m2, Tensor? bias, "
        "Tensor(a!)? running_mean=None, Tensor(b!)? running_var=None, float momentum=0.1, "
        "Tensor? momentum_tensor=None, Tensor(c!)? num_batches_tracked=None, int values=0) -> (Tensor, Tensor)");
  // y = act((z - mean) / sqrt(var + eps) * weight + bias [+ residual]).
  m.def("ext_batch_norm_act(Tensor z, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, Tensor? residual, "
        "float eps, str activation) -> Tensor");
  // (grad_z, sum_g, sum_gx, grad_residual or an empty tensor).
  m.def("ext_batch_norm_act_backward(Tensor grad_y, Tensor z, Tensor mean, Tensor var, Tensor? weight, "
        "Tensor? bias, Tensor? residual, float eps, str activation, bool want_grad_residual) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // Geometry of the combination of T partial rows (finalize, backward sums): 5 ints per pass, see above.
  m.def("ext_batch_norm_plan(int T, int C) -> int[]", &batch_norm_plan);
}
