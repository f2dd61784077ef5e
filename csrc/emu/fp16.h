// __half and __nv_bfloat16 for the CUDA emulation, bit-exact with cuda_fp16.h / cuda_bf16.h:
// conversions round to nearest even, NaN converts to the canonical 0x7FFF.
//
// Like torch's CUDA builds (-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
// -D__CUDA_NO_BFLOAT16_CONVERSIONS__), these types have no operators and no implicit
// conversions: kernels use the intrinsics, so code that compiles here compiles under nvcc.
#pragma once

#include <bit>
#include <cmath>
#include <concepts>
#include <cstdint>

#include "vector_types.h"

struct alignas(2) __half {
  unsigned short __x;
};
struct alignas(4) __half2 {
  __half x, y;
};
struct alignas(2) __nv_bfloat16 {
  unsigned short __x;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
using half = __half;
using half2 = __half2;
using nv_bfloat16 = __nv_bfloat16;
using nv_bfloat162 = __nv_bfloat162;

namespace qk_emu {

inline std::uint16_t float_to_half_bits(float f) {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  const std::uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return 0x7FFF;
  if (a >= 0x477FF000u) return static_cast<std::uint16_t>(sign | 0x7C00u);  // >= 65520: inf
  std::uint32_t q, rem, halfway;
  if (a >= 0x38800000u) {  // normal in half: rebias the exponent, drop 13 mantissa bits
    q = (a - 0x38000000u) >> 13;
    rem = a & 0x1FFFu;
    halfway = 0x1000u;
  } else {  // subnormal in half: count units of 2^-24
    const std::uint32_t e = a >> 23;
    if (e < 102) return static_cast<std::uint16_t>(sign);  // below 2^-25 (ties go to zero)
    const std::uint32_t m = (a & 0x7FFFFFu) | 0x800000u;
    const std::uint32_t shift = 126 - e;
    q = m >> shift;
    rem = m & ((1u << shift) - 1);
    halfway = 1u << (shift - 1);
  }
  if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
  return static_cast<std::uint16_t>(sign | q);
}

inline float half_bits_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t e = (h >> 10) & 0x1Fu;
  const std::uint32_t m = h & 0x3FFu;
  if (e == 0) {
    const float v = static_cast<float>(m) * 0x1p-24f;
    return std::bit_cast<float>(std::bit_cast<std::uint32_t>(v) | sign);
  }
  const std::uint32_t bits = e == 31 ? 0x7F800000u | (m << 13) : ((e + 112) << 23) | (m << 13);
  return std::bit_cast<float>(sign | bits);
}

inline std::uint16_t float_to_bf16_bits(float f) {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FFF;
  return static_cast<std::uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline float bf16_bits_to_float(std::uint16_t b) {
  return std::bit_cast<float>(static_cast<std::uint32_t>(b) << 16);
}

inline float to_float(__half h) { return half_bits_to_float(h.__x); }
inline float to_float(__nv_bfloat16 b) { return bf16_bits_to_float(b.__x); }
template <class T>
T from_float(float f);
template <>
inline __half from_float<__half>(float f) {
  return {float_to_half_bits(f)};
}
template <>
inline __nv_bfloat16 from_float<__nv_bfloat16>(float f) {
  return {float_to_bf16_bits(f)};
}

// Arithmetic on 16-bit floats: compute in double (products of 16-bit values are exact, sums lose
// only bits far below 16-bit precision), round to odd in float, then to nearest even in 16 bits;
// round-to-odd makes the two roundings one.
template <class T>
T round_from_double(double d) {
  float f = static_cast<float>(d);
  if (static_cast<double>(f) != d && d == d) {
    if (std::fabs(static_cast<double>(f)) > std::fabs(d)) f = std::nextafter(f, 0.0f);
    f = std::bit_cast<float>(std::bit_cast<std::uint32_t>(f) | 1u);
  }
  return from_float<T>(f);
}

}  // namespace qk_emu

// Conversions.
inline __half __float2half_rn(float f) { return {qk_emu::float_to_half_bits(f)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __half2float(__half h) { return qk_emu::to_float(h); }
inline __half2 __floats2half2_rn(float a, float b) {
  return {__float2half_rn(a), __float2half_rn(b)};
}
inline __half2 __float2half2_rn(float a) { return __floats2half2_rn(a, a); }
inline __half2 __halves2half2(__half a, __half b) { return {a, b}; }
inline __half2 __half2half2(__half a) { return {a, a}; }
inline __half __low2half(__half2 v) { return v.x; }
inline __half __high2half(__half2 v) { return v.y; }
inline float __low2float(__half2 v) { return __half2float(v.x); }
inline float __high2float(__half2 v) { return __half2float(v.y); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) { return {u}; }

inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {qk_emu::float_to_bf16_bits(f)}; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return qk_emu::to_float(b); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
inline __nv_bfloat162 __float2bfloat162_rn(float a) { return __floats2bfloat162_rn(a, a); }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return {a, b}; }
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 a) { return {a, a}; }
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 v) { return v.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 v) { return v.y; }
inline float __low2float(__nv_bfloat162 v) { return __bfloat162float(v.x); }
inline float __high2float(__nv_bfloat162 v) { return __bfloat162float(v.y); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return {u}; }

// Arithmetic intrinsics, scalar and 2-wide, for both 16-bit types.
#define QK_EMU_FP16_BINARY(name, name2, expr)                                             \
  template <class T>                                                                      \
    requires(std::same_as<T, __half> || std::same_as<T, __nv_bfloat16>)                   \
  inline T name(T a, T b) {                                                               \
    const double x = qk_emu::to_float(a), y = qk_emu::to_float(b);                        \
    return qk_emu::round_from_double<T>(expr);                                            \
  }                                                                                       \
  inline __half2 name2(__half2 a, __half2 b) { return {name(a.x, b.x), name(a.y, b.y)}; } \
  inline __nv_bfloat162 name2(__nv_bfloat162 a, __nv_bfloat162 b) {                       \
    return {name(a.x, b.x), name(a.y, b.y)};                                              \
  }
QK_EMU_FP16_BINARY(__hadd, __hadd2, x + y)
QK_EMU_FP16_BINARY(__hsub, __hsub2, x - y)
QK_EMU_FP16_BINARY(__hmul, __hmul2, x* y)
#undef QK_EMU_FP16_BINARY

template <class T>
  requires(std::same_as<T, __half> || std::same_as<T, __nv_bfloat16>)
inline T __hfma(T a, T b, T c) {
  const double x = qk_emu::to_float(a), y = qk_emu::to_float(b), z = qk_emu::to_float(c);
  return qk_emu::round_from_double<T>(x * y + z);
}
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
  return {__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)};
}
inline __nv_bfloat162 __hfma2(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c) {
  return {__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)};
}

// __hmax/__hmin return the other operand when one is NaN, as on the GPU.
template <class T>
  requires(std::same_as<T, __half> || std::same_as<T, __nv_bfloat16>)
inline T __hmax(T a, T b) {
  const float x = qk_emu::to_float(a), y = qk_emu::to_float(b);
  if (x != x) return y != y ? T{0x7FFF} : b;
  if (y != y) return a;
  return x >= y ? a : b;
}
template <class T>
  requires(std::same_as<T, __half> || std::same_as<T, __nv_bfloat16>)
inline T __hmin(T a, T b) {
  const float x = qk_emu::to_float(a), y = qk_emu::to_float(b);
  if (x != x) return y != y ? T{0x7FFF} : b;
  if (y != y) return a;
  return x <= y ? a : b;
}
inline __half2 __hmax2(__half2 a, __half2 b) { return {__hmax(a.x, b.x), __hmax(a.y, b.y)}; }
inline __half2 __hmin2(__half2 a, __half2 b) { return {__hmin(a.x, b.x), __hmin(a.y, b.y)}; }
inline __nv_bfloat162 __hmax2(__nv_bfloat162 a, __nv_bfloat162 b) {
  return {__hmax(a.x, b.x), __hmax(a.y, b.y)};
}
inline __nv_bfloat162 __hmin2(__nv_bfloat162 a, __nv_bfloat162 b) {
  return {__hmin(a.x, b.x), __hmin(a.y, b.y)};
}
inline __half __hneg(__half a) { return {static_cast<unsigned short>(a.__x ^ 0x8000u)}; }
inline __nv_bfloat16 __hneg(__nv_bfloat16 a) {
  return {static_cast<unsigned short>(a.__x ^ 0x8000u)};
}

inline float2 __half22float2(__half2 v) { return {__half2float(v.x), __half2float(v.y)}; }
inline __half2 __float22half2_rn(float2 v) { return __floats2half2_rn(v.x, v.y); }
inline float2 __bfloat1622float2(__nv_bfloat162 v) {
  return {__bfloat162float(v.x), __bfloat162float(v.y)};
}
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return __floats2bfloat162_rn(v.x, v.y); }
