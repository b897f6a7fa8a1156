// The eager fast path of fastconv::conv2d without an epilogue on the C++ backends ('cpu', 'cuda'): one C++
// autograd node (csrc/conv2d.cpp), bound as fastconv._C.conv2d_train.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace fastconv {

// z = conv(x, weight) + bias, its node's backward the conv's dgrad and wgrad (and the bias gradient). padding is
// (top, bottom, left, right); out_size / out_channels_last: z's shape and layout (fastconv.ops.conv2d.output_geometry).
// Arguments are checked by the Python caller (fastconv.ops.conv2d).
at::Tensor conv2d_train_eager(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                              std::vector<int64_t> stride, std::vector<int64_t> padding,
                              std::vector<int64_t> dilation, int64_t groups, std::vector<int64_t> out_size,
                              bool out_channels_last, bool allow_tf32);

}  // namespace fastconv
