// Torch-side helpers shared by the csrc/cuda/*_cuda.cpp wrappers: the DType tag of a tensor for the launchers'
// params structs, the CUDA-device check of an argument, and the check that turns a launcher's cudaError_t
// into a TORCH_CHECK naming the op.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include "dtype.h"

namespace fastconv {

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::f32;
    case at::kDouble:
      return DType::f64;
    case at::kHalf:
      return DType::f16;
    case at::kBFloat16:
      return DType::bf16;
    default:
      TORCH_CHECK(false, "fastconv cuda: unsupported dtype ", t.scalar_type());
  }
}

inline void check_cuda(const at::Tensor& t, const char* what, const char* op) {
  TORCH_CHECK(t.is_cuda(), op, ": expected CUDA tensors, but ", what, " is on ", t.device());
}

// `kernel` names the launch when an op makes several.
inline void check_launch(cudaError_t err, const char* op, const char* kernel = "CUDA kernel") {
  TORCH_CHECK(err == cudaSuccess, op, ": launching ", kernel, " failed: ", cudaGetErrorString(err));
}

}  // namespace fastconv
