// The registered signatures of the torch.ops.fastconv.ext_* ops (schemas: csrc/<op>.cpp; csrc/cpu/*.cpp and
// csrc/cuda/*_cuda.cpp implement exactly these) and the typed dispatcher handle C++ callers use: the Python
// entry points (csrc/bindings.cpp) and the eager autograd node of the fused block (csrc/conv_bn_act.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <tuple>

namespace fastconv {
namespace ext {

using Tensor = at::Tensor;
using OptTensor = c10::optional<at::Tensor>;
using Ints = at::IntArrayRef;

// The registered signatures (csrc/cpu/*.cpp, csrc/cuda/*_cuda.cpp implement exactly these).
using Conv2dFn = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, Ints, Ints,
                                                    Ints, int64_t, const OptTensor&, const OptTensor&,
                                                    const OptTensor&, int64_t, bool, bool, Tensor&);
using Conv2dInputGradFn = void(const Tensor&, const Tensor&, Ints, Ints, Ints, int64_t, bool, Tensor&);
using Conv2dWeightGradFn = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, Ints, Ints, Ints, Ints,
                                                      int64_t, bool, bool);
using BnStatsFn = std::tuple<Tensor, Tensor, Tensor>(const Tensor&);
using BnFinalizeFn = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                                 const OptTensor&, const OptTensor&, double, const OptTensor&,
                                                 const OptTensor&, int64_t);
using BnActFn = Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                       const OptTensor&, double, c10::string_view);
using BnActBackwardFn = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                   const Tensor&, const OptTensor&,
                                                                   const OptTensor&, const OptTensor&, double,
                                                                   c10::string_view, bool);
using MaxPoolFn = std::tuple<Tensor, Tensor>(const Tensor&, Ints, Ints, Ints, Ints, bool, bool);
using MaxPoolInputGradFn = Tensor(const Tensor&, const Tensor&, Ints, Ints, Ints, Ints, Ints, bool, bool);

// A function-local static per entry point: the op's typed handle, looked up on its first call (all ops are
// registered by then: they register when the library loads).
#define FASTCONV_HANDLE(Fn, name) \
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>()

}  // namespace ext
}  // namespace fastconv
