// The extension module fastconv._C: importing it loads this library, whose static initialisers register
// the torch.ops.fastconv.ext_* ops; the module's functions are their direct entry points (csrc/bindings.cpp).
#include <torch/extension.h>

#include <string>

#include <torch/library.h>

#include "fastconv/batch_norm.h"
#include "fastconv/epilogue.h"

#ifdef FASTCONV_WITH_CUDA
// Defined in csrc/cuda/build_info.cu (compiled by nvcc): the toolkit and the architectures it targeted.
extern "C" const char* fastconv_cuda_build_info();
#endif

namespace {

#define FASTCONV_STR2(...) #__VA_ARGS__
#define FASTCONV_STR(...) FASTCONV_STR2(__VA_ARGS__)

std::string build_info() {
  std::string json = "{\"cuda\": ";
#ifdef FASTCONV_WITH_CUDA
  json += "true, ";
  json += fastconv_cuda_build_info();  // "\"cuda_version\": ..., \"nvcc\": ..., \"archs\": [...]"
#else
  json += "false, \"cuda_version\": null, \"nvcc\": null, \"archs\": []";
#endif
#if defined(__clang__)
  json += ", \"cxx\": \"clang " __clang_version__ "\"";
#elif defined(__GNUC__)
  json += ", \"cxx\": \"gcc " __VERSION__ "\"";
#else
  json += ", \"cxx\": \"unknown\"";
#endif
  // Constants the Python side needs for the ops' fake kernels (shapes of the statistics partials).
  json += ", \"stats_rows\": " + std::to_string(fastconv::kStatsRows);
  json += ", \"bn_tile_rows\": {\"cpu\": " + std::to_string(fastconv::kBnTileRowsCpu) +
          ", \"cuda\": " + std::to_string(fastconv::kBnTileRowsCuda) + "}";
  json += "}";
  return json;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastconv, m) {
  m.def("ext_build_info() -> str", &build_info);
}

namespace fastconv {
void bind_ops(pybind11::module_& m);  // csrc/bindings.cpp
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastconv C++/CUDA ops: torch.ops.fastconv.ext_* and their direct entry points";
  fastconv::bind_ops(m);
}
