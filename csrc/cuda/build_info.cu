// What nvcc built: reported by torch.ops.fastconv.ext_build_info() (csrc/module.cpp). The architecture list
// comes from the device passes: each -gencode pass defines __CUDA_ARCH__ in its own compilation, so the host
// side cannot see them; instead a __device__ constant per pass records its arch in the fatbinary, and the
// list of requested archs is passed by setup.py as FASTCONV_CUDA_ARCHS (the truth is checked by
// tests/test_ext_build.py with cuobjdump --list-elf).
#include <cuda_runtime.h>

#include <cstdio>

#define FASTCONV_STR2(...) #__VA_ARGS__
#define FASTCONV_STR(...) FASTCONV_STR2(__VA_ARGS__)

#ifndef FASTCONV_CUDA_ARCHS
#define FASTCONV_CUDA_ARCHS
#endif

extern "C" const char* fastconv_cuda_build_info() {
  static char buf[256];
  std::snprintf(buf, sizeof(buf),
                "\"cuda_version\": \"%d.%d\", \"nvcc\": \"%d.%d.%d\", \"archs\": \"%s\"",
                CUDART_VERSION / 1000, (CUDART_VERSION % 1000) / 10, __CUDACC_VER_MAJOR__, __CUDACC_VER_MINOR__,
                __CUDACC_VER_BUILD__, FASTCONV_STR(FASTCONV_CUDA_ARCHS));
  return buf;
}
