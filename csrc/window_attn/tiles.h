// Tile helpers of the tensor-core window_attn kernels, forward and backward: the block's segment,
// cp.async tile loads, fp32 pairs packed as mma operands, the mma itself and the quad reductions
// over an accumulator row.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/kernel.h"
#include "common/numeric.h"
#include "window_attn/params.h"

namespace qk {

constexpr unsigned kFullMask = 0xFFFFFFFFu;

// The segment and head of this block and the segment's bounds, clamped to [0, T] and to
// max_seqlen.
struct Segment {
  int head;
  int start;
  int len;
};

QK_DEVICE Segment segment_of(const WindowAttnParams& p) {
  const int pair = static_cast<int>(blockIdx.x);
  const int segment = pair / p.heads;
  const int start = min(max(p.cu_seqlens[segment], 0), p.tokens);
  const int end = min(max(p.cu_seqlens[segment + 1], start), p.tokens);
  return {pair % p.heads, start, min(end - start, p.max_seqlen)};
}

// Issues the cp.async copies of `rows` valid rows (of kRows) into a padded shared tile; the
// other rows are zero-filled, so masked keys meet zeros in V rather than stale NaN.
template <class Traits, int kRows, class T>
QK_DEVICE void load_tile(T* tile, const T* src, int64_t token_stride, int rows) {
  constexpr int kChunks = kRows * Traits::kChunksPerRow;
  static_assert(kChunks % Traits::kThreads == 0, "every thread copies the same count");
  constexpr int kChunkElems = 16 / sizeof(T);
#pragma unroll
  for (int c = static_cast<int>(threadIdx.x); c < kChunks; c += Traits::kThreads) {
    const int row = c / Traits::kChunksPerRow, col = c % Traits::kChunksPerRow * kChunkElems;
    const bool valid = row < rows;
    const T* from = valid ? src + row * token_stride + col : src;
    cp_async_16_zfill(tile + row * Traits::kRowStride + col, from, valid);
  }
}

// Two fp32 values as one register of two 16-bit values, rounded to nearest, the first low.
template <class T>
QK_DEVICE std::uint32_t pack_pair(float lo, float hi) {
  std::uint32_t bits;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    std::memcpy(&bits, &v, sizeof(bits));
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    std::memcpy(&bits, &v, sizeof(bits));
  }
  return bits;
}

template <class T>
QK_DEVICE void mma(float (&acc)[4], const std::uint32_t (&a)[4], const std::uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    mma_m16n8k16_bf16(acc, a, b, acc);
  } else {
    mma_m16n8k16_f16(acc, a, b, acc);
  }
}

// Max and sum over the 4 lanes (t = lane % 4) that hold one row of an mma accumulator.
QK_DEVICE float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(kFullMask, x, 1));
  return fmaxf(x, __shfl_xor_sync(kFullMask, x, 2));
}

QK_DEVICE float quad_sum(float x) {
  x += __shfl_xor_sync(kFullMask, x, 1);
  return x + __shfl_xor_sync(kFullMask, x, 2);
}

}  // namespace qk
