// Device dtype helpers for the .cu files: storage type -> accumulation type, conversions, and a dispatch
// from the runtime DType tag to a typed lambda.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "dtype.h"

namespace fastconv {

template <typename T>
using acc_t = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

template <typename T>
__device__ __forceinline__ acc_t<T> to_acc(T v) {
  return static_cast<acc_t<T>>(v);
}
template <>
__device__ __forceinline__ float to_acc<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_acc<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return from_acc<T>(static_cast<acc_t<T>>(v));
}

template <typename T>
__device__ __forceinline__ acc_t<T> load(const T* p) {
  return to_acc<T>(*p);
}
template <typename T>
__device__ __forceinline__ void store(T* p, acc_t<T> v) {
  *p = from_acc<T>(v);
}
// load() as a callable, for the shared host/device index math that takes a loader
struct DeviceLoad {
  template <typename T>
  __device__ __forceinline__ acc_t<T> operator()(const T* p) const {
    return load(p);
  }
};

template <typename F>
cudaError_t dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case DType::f32:
      return f(float{});
    case DType::f64:
      return f(double{});
    case DType::f16:
      return f(__half{});
    case DType::bf16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastconv
