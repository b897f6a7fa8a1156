// Runtime dtype tag that the torch-side wrappers put in every launcher's params struct (plain C++: no torch,
// no CUDA types). dtype_dispatch.cuh turns it into a typed call; launch_check.h maps at::ScalarType to it.
#pragma once

namespace fastconv {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2, f64 = 3 };

}  // namespace fastconv
