// Shared by the elementwise (one thread per element) kernels: grid size for a grid-stride loop, and the
// split of a flat index in a dense [N, C, H, W] tensor's memory order (NCHW or channels_last) into (n, c, h, w).
#pragma once

#include <cstdint>

namespace fastconv {

template <int Threads>
inline unsigned grid_stride_blocks(int64_t total) {
  constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride beyond this
  const int64_t blocks = (total + Threads - 1) / Threads;
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

template <typename Index, bool CL>
__device__ __forceinline__ void split_flat(Index i, Index C, Index H, Index W, Index& n, Index& c, Index& h, Index& w) {
  if (CL) {
    c = i % C;
    i /= C;
    w = i % W;
    i /= W;
    h = i % H;
    n = i / H;
  } else {
    w = i % W;
    i /= W;
    h = i % H;
    i /= H;
    c = i % C;
    n = i / C;
  }
}

}  // namespace fastconv
