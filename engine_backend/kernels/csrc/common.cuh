// Shared device helpers: element types, 16-byte vectors, fast math.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>
#include <stdint.h>

#define EB_DEVICE __device__ __forceinline__

namespace eb {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Conversions between the storage types we support and float.
template <typename T> struct Elem;
template <> struct Elem<half> {
  using Pair = half2;
  static EB_DEVICE float to_float(half x) { return __half2float(x); }
  static EB_DEVICE half from_float(float x) { return __float2half_rn(x); }
  static EB_DEVICE float2 to_float2(half2 x) { return __half22float2(x); }
  static EB_DEVICE half2 from_float2(float a, float b) { return __floats2half2_rn(a, b); }
};
template <> struct Elem<__nv_bfloat16> {
  using Pair = __nv_bfloat162;
  static EB_DEVICE float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static EB_DEVICE __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  static EB_DEVICE float2 to_float2(__nv_bfloat162 x) { return __bfloat1622float2(x); }
  static EB_DEVICE __nv_bfloat162 from_float2(float a, float b) { return __floats2bfloat162_rn(a, b); }
};

// Eight 16-bit elements moved as one 16-byte access.
template <typename T> struct alignas(16) Vec8 {
  typename Elem<T>::Pair v[4];
  EB_DEVICE void load(const T* p) { *reinterpret_cast<uint4*>(this) = *reinterpret_cast<const uint4*>(p); }
  EB_DEVICE void store(T* p) const { *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(this); }
  EB_DEVICE void to_float(float* f) const {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 x = Elem<T>::to_float2(v[i]);
      f[2 * i] = x.x;
      f[2 * i + 1] = x.y;
    }
  }
  EB_DEVICE void from_float(const float* f) {
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = Elem<T>::from_float2(f[2 * i], f[2 * i + 1]);
  }
};

// One MUFU instruction each (exp2f/log2f add denormal handling around it); -inf -> 0 and
// flush-to-zero of tiny results are what softmax wants anyway.
EB_DEVICE float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
EB_DEVICE float fast_log2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace eb
