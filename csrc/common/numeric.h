// Device helpers shared by the elementwise and row-wise kernels: conversions that round to
// nearest even, packed vector access, and a warp-wide sum.
#pragma once

#include "kernel.h"

namespace qk {

QK_DEVICE float to_float(float x) { return x; }
QK_DEVICE float to_float(__half x) { return __half2float(x); }
QK_DEVICE float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T>
QK_DEVICE T from_float(float x);
template <>
QK_DEVICE float from_float<float>(float x) {
  return x;
}
template <>
QK_DEVICE __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
QK_DEVICE __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// VEC consecutive elements moved as one access (16 bytes at most): VEC * sizeof(T) alignment.
template <class T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

#ifdef QK_EMULATE
// A GPU faults on a misaligned vector access; the CPU would not, so the emulation checks.
template <class T, int VEC>
void check_pack_alignment(const void* p, const std::source_location& site) {
  if (reinterpret_cast<std::uintptr_t>(p) % sizeof(Pack<T, VEC>) != 0) {
    throw qk_emu::Error("misaligned " + std::to_string(sizeof(Pack<T, VEC>)) +
                        "-byte vector access at " + qk_emu::where(site));
  }
}
#define QK_CHECK_PACK_ALIGNMENT(p) check_pack_alignment<T, VEC>(p, site)
#define QK_PACK_SITE , const std::source_location& site = std::source_location::current()
#else
#define QK_CHECK_PACK_ALIGNMENT(p)
#define QK_PACK_SITE
#endif

template <class T, int VEC>
QK_DEVICE Pack<T, VEC> load_pack(const T* p QK_PACK_SITE) {
  QK_CHECK_PACK_ALIGNMENT(p);
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <class T, int VEC>
QK_DEVICE void store_pack(T* p, const Pack<T, VEC>& pack QK_PACK_SITE) {
  QK_CHECK_PACK_ALIGNMENT(p);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pack;
}

QK_DEVICE float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

}  // namespace qk
