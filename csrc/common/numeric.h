// Device helpers shared by the elementwise and row-wise kernels: conversions that round to
// nearest even, packed vector access, and a block-wide sum.
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

template <class T, int VEC>
QK_DEVICE Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <class T, int VEC>
QK_DEVICE void store_pack(T* p, const Pack<T, VEC>& pack) {
  *reinterpret_cast<Pack<T, VEC>*>(p) = pack;
}

QK_DEVICE float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Sum of x over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
// `scratch` is 32 floats of shared memory, free again when this returns.
QK_DEVICE float block_sum(float x, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  x = warp_sum(x);
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < warps ? scratch[lane] : 0.0f;
  x = warp_sum(x);
  __syncthreads();  // scratch may be reused by the caller right after
  return x;
}

}  // namespace qk
