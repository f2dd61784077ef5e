// Row groups: the block layout of the RMSNorm kernels (rms_norm, its backward, patch_merge). A
// block of kRowBlockWarps warps normalises kRowBlockWarps / warps_per_row rows: short rows get one
// warp each (a shuffle-only reduction), long rows up to the whole block, so every thread moves a
// few vectors whatever the row length.
#pragma once

#include <cstdint>

#include "common/kernel.h"
#include "common/numeric.h"

namespace qk {

constexpr int kRowBlockWarps = 8;
// Vectors per thread a row group aims for before it takes more warps.
constexpr int kVectorsPerThread = 4;

// Warps per row of `vectors` vectors: enough that each thread moves about kVectorsPerThread of
// them, a power of two dividing the block.
inline int warps_per_row(int64_t vectors) {
  int warps = 1;
  while (warps < kRowBlockWarps && vectors > int64_t{32} * warps * kVectorsPerThread) warps *= 2;
  return warps;
}

// The sum of `partial` over the threads of row group `group`, returned to every thread of the
// block. Every thread must call it (it synchronises the block), tail rows included;
// `warp_sums` is the block's __shared__ float[kRowBlockWarps].
QK_DEVICE float row_group_sum(float partial, float* warp_sums, int group, int warps_per_row) {
  partial = warp_sum(partial);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = partial;
  __syncthreads();
  float total = 0.0f;
  for (int w = group * warps_per_row; w < (group + 1) * warps_per_row; ++w) total += warp_sums[w];
  return total;
}

// Weights per vector load: VEC, or as many as 16 bytes hold (fp32 weights of 8 bf16 values).
template <class W, int VEC>
constexpr int weight_vec() {
  return VEC * sizeof(W) <= 16 ? VEC : static_cast<int>(16 / sizeof(W));
}

// Whether `weight` is aligned for load_weight's vector loads (host side).
template <class W, int VEC>
inline bool weight_packs(const W* weight) {
  return reinterpret_cast<std::uintptr_t>(weight) % sizeof(Pack<W, weight_vec<W, VEC>()>) == 0;
}

// weight[0, VEC) as floats: vector loads when the weight is aligned for them (the weight stays in
// L1, but scalar loads would cost VEC instructions per 16-byte vector of x).
template <class W, int VEC>
QK_DEVICE void load_weight(const W* weight, bool packed, float (&w)[VEC]) {
  constexpr int kWVec = weight_vec<W, VEC>();
  if (packed) {
#pragma unroll
    for (int k = 0; k < VEC; k += kWVec) {
      const Pack<W, kWVec> pack = load_pack<W, kWVec>(weight + k);
#pragma unroll
      for (int j = 0; j < kWVec; ++j) w[k + j] = to_float(pack.v[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) w[j] = to_float(weight[j]);
  }
}

}  // namespace qk
