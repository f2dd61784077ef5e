// Variable-length attention inside segments. One block takes a tile of query rows of one
// (segment, head) pair; the grid is (segments x heads, query blocks), heads of a segment adjacent
// so that blocks reading the same token rows of a packed qkv run together.
//
// fp16/bf16: Q, K and V tiles reach shared memory by 16-byte cp.async (rows past the segment end
// zero-filled), fragments come from ldmatrix, and warps run mma.m16n8k16: S = QK^T in fp32
// registers, keys past the segment end masked before the row max, P = exp2(S - max) rounded to
// the input dtype as the A operand of PV (as FlashAttention does), the row sum kept in fp32. The
// output goes through shared memory to 16-byte stores.
// - The window path (window_attn_mma_kernel, max_seqlen <= 64): 16 query rows per warp against
//   all keys at once, a single-pass softmax; warps whose rows lie past the segment end and key
//   tiles past it skip their mma. With the rotary flag (window_attn_rope) q and k are rotated in
//   shared memory once they land, so rotary and attention read qkv once.
// - The long path (window_attn_long_kernel): 32 query rows per warp as two m-tiles against key
//   tiles of 64, an online softmax with exp2 as one ex2.approx, the next K and V in flight,
//   copy offsets fixed before the loop, stages as constants (tiles run in pairs), and masking on
//   the last tile only. window_attn_rope rotates q and k once (mrope_pos) before it.
//
// fp32 (window_attn_fma_kernel): see WindowAttnFmaTraits.
#include <ATen/ops/empty.h>

#include <cmath>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/dispatch.h"
#include "common/kernel.h"
#include "common/numeric.h"
#include "common/rope.h"
#include "common/torch_utils.h"
#include "mrope/mrope.h"
#include "window_attn/kernel_traits.h"
#include "window_attn/launch_args.h"
#include "window_attn/params.h"
#include "window_attn/tiles.h"
#include "window_attn/variants.h"
#include "window_attn/window_attn.h"

namespace qk {
namespace {

// Rotates rows [0, rows) of staged tiles in place, rows starting at token first_token: x * cos
// + rotate_half(x) * sin in fp32 without contraction (the reference's two products and a sum),
// rounded once to T, as mrope_pos writes it. Given a second tile of the same tokens (the window
// path's q and k), each angle's position, frequency and sincos serve both.
template <class Traits, class T>
QK_DEVICE void rotate_tiles(T* tile, std::type_identity_t<T>* same_tokens, int rows,
                            int first_token, const WindowAttnParams& p) {
  constexpr int kHalf = Traits::kHeadDim / 2;
  for (int e = static_cast<int>(threadIdx.x); e < rows * kHalf; e += Traits::kThreads) {
    const int row = e / kHalf, i = e % kHalf;
    int axis = 0;
    while (axis + 1 < p.rope_axes && i >= p.rope_section_end[axis]) ++axis;
    const float position = static_cast<float>(p.positions[axis * p.tokens + first_token + row]);
    float sin_a, cos_a;
    rope_sincos(position, p.inv_freq[i], &sin_a, &cos_a);
    for (T* rotated : {tile, same_tokens}) {
      if (rotated == nullptr) continue;
      T* x = rotated + row * Traits::kRowStride;
      float x0 = to_float(x[i]), x1 = to_float(x[i + kHalf]);
      rotate_half_pair(x0, x1, cos_a, sin_a, cos_a, sin_a);
      x[i] = from_float<T>(x0);
      x[i + kHalf] = from_float<T>(x1);
    }
  }
}

// The natural log-sum-exp of a row from its max times scale_log2 (`shift`) and its sum of
// exp2(score * scale_log2 - shift): what window_attn_forward returns for the backward.
QK_DEVICE float log_sum_exp(float shift, float sum) {
  return (shift + log2f(sum)) * static_cast<float>(1.0 / kLog2e);
}

// Where a block writes its rows' log-sum-exp: lse of the segment's first token and this head,
// consecutive tokens `heads` apart; null when the launch wants none.
QK_DEVICE float* lse_of(const WindowAttnParams& p, int start, int head) {
  return p.lse == nullptr ? nullptr : p.lse + static_cast<int64_t>(start) * p.heads + head;
}

// Normalises 16 rows of O (one m-tile of a warp: rows g and g + 8 of each lane), rounds them once
// to T, stages them in `staged` (16 rows of a shared tile that only this warp reads from here on)
// and stores those of rows first_row.. that lie inside the segment as 16-byte vectors. With an
// `lse` (lse_of), also each row's log-sum-exp, from its `shift` (the max times scale_log2).
template <class Traits, class T>
QK_DEVICE void store_m_tile(const float (&o)[Traits::kDimTiles][4], const float (&row_sum)[2],
                            const float (&shift)[2], float* lse, int heads, T* staged, T* out,
                            int first_row, int seg_len, int64_t token_stride) {
  constexpr int kStride = Traits::kRowStride, kChunkElems = Traits::kChunkElems;
  const int lane = static_cast<int>(threadIdx.x) % 32, g = lane / 4, t = lane % 4;
  float inv_sum[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float sum = quad_sum(row_sum[h]);
    inv_sum[h] = 1.0f / sum;
    const int token = first_row + g + 8 * h;
    if (lse != nullptr && t == 0 && token < seg_len) {
      lse[static_cast<int64_t>(token) * heads] = log_sum_exp(shift[h], sum);
    }
  }
  __syncwarp();  // every lane is done reading these rows
#pragma unroll
  for (int d = 0; d < Traits::kDimTiles; ++d) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const std::uint32_t bits =
          pack_pair<T>(o[d][2 * h] * inv_sum[h], o[d][2 * h + 1] * inv_sum[h]);
      std::memcpy(staged + (g + 8 * h) * kStride + d * 8 + 2 * t, &bits, sizeof(bits));
    }
  }
  __syncwarp();
  constexpr int kChunks = 16 * Traits::kChunksPerRow;
  static_assert(kChunks % 32 == 0, "every lane stores the same count");
#pragma unroll
  for (int c = lane; c < kChunks; c += 32) {
    const int row = c / Traits::kChunksPerRow, col = c % Traits::kChunksPerRow * kChunkElems;
    const int token = first_row + row;
    if (token < seg_len) {
      store_pack<T, kChunkElems>(out + token * token_stride + col,
                                 load_pack<T, kChunkElems>(staged + row * kStride + col));
    }
  }
}

// The window path: one tile of 64 query rows against every key of the segment at once.
template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads)
    window_attn_mma_kernel(const WindowAttnParams p) {
  using T = typename Traits::Element;
  constexpr int kStride = Traits::kRowStride, kTile = Traits::kTileElems;
  QK_DYNAMIC_SMEM(T, smem);
  T* const sq = smem;
  T* const sk = sq + kTile;
  T* const sv = sk + kTile;

  const Segment seg = segment_of(p);
  const int m0 = static_cast<int>(blockIdx.y) * Traits::kBlockM;
  if (m0 >= seg.len) return;  // the whole block leaves before any barrier
  const T* q =
      static_cast<const T*>(p.q) + seg.start * p.q_token_stride + seg.head * p.q_head_stride;
  const T* k =
      static_cast<const T*>(p.k) + seg.start * p.k_token_stride + seg.head * p.k_head_stride;
  const T* v =
      static_cast<const T*>(p.v) + seg.start * p.v_token_stride + seg.head * p.v_head_stride;
  const int keys = min(seg.len, Traits::kBlockN);

  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int t = lane % 4;  // the accumulator columns 2t, 2t + 1
  const int warp_row = warp * 16;
  // Warps whose rows all lie past the segment end only join the barriers.
  const bool warp_active = m0 + warp_row < seg.len;

  // Groups: (Q, K), then V, which may still land while QK^T runs.
  load_tile<Traits, Traits::kBlockM>(sq, q + m0 * p.q_token_stride, p.q_token_stride, seg.len - m0);
  load_tile<Traits, Traits::kBlockN>(sk, k, p.k_token_stride, seg.len);
  cp_async_commit();
  load_tile<Traits, Traits::kBlockN>(sv, v, p.v_token_stride, seg.len);
  cp_async_commit();

  cp_async_wait<1>();
  __syncthreads();
  if constexpr (Traits::kRope) {
    // One query block (m0 = 0) holds the window's tokens: q and k rows are the same tokens.
    rotate_tiles<Traits>(sq, sk, keys, seg.start, p);
    __syncthreads();
  }
  float s[Traits::kKeyTiles][4];
  float row_sum[2] = {0.0f, 0.0f};  // this lane's share of rows g and g + 8
  float shift[2];                   // the max times scale_log2, subtracted inside one FMA per score
  if (warp_active) {
    std::uint32_t qf[Traits::kQkSteps][4];
#pragma unroll
    for (int ks = 0; ks < Traits::kQkSteps; ++ks) {
      const int row = warp_row + lane % 8 + lane / 8 % 2 * 8;
      ldmatrix_x4(qf[ks], sq + row * kStride + ks * 16 + lane / 16 * 8);
    }
    // S = Q K^T, two key tiles of 8 per ldmatrix.x4; tiles past the segment end stay -inf.
#pragma unroll
    for (int n = 0; n < Traits::kKeyTiles; n += 2) {
#pragma unroll
      for (int r = 0; r < 4; ++r) s[n][r] = s[n + 1][r] = n * 8 < keys ? 0.0f : -INFINITY;
      if (n * 8 >= keys) continue;
#pragma unroll
      for (int ks = 0; ks < Traits::kQkSteps; ++ks) {
        std::uint32_t kf[4];
        const int row = n * 8 + lane / 16 * 8 + lane % 8;
        ldmatrix_x4(kf, sk + row * kStride + ks * 16 + lane / 8 % 2 * 8);
        const std::uint32_t b0[2] = {kf[0], kf[1]}, b1[2] = {kf[2], kf[3]};
        mma<T>(s[n], qf[ks], b0);
        mma<T>(s[n + 1], qf[ks], b1);
      }
    }
    // Mask keys past the segment end before the max: every valid row keeps key 0.
    if (keys < Traits::kBlockN) {
#pragma unroll
      for (int n = 0; n < Traits::kKeyTiles; ++n) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          if (n * 8 + 2 * t + r % 2 >= keys) s[n][r] = -INFINITY;
        }
      }
    }
    float row_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < Traits::kKeyTiles; ++n) {
#pragma unroll
      for (int r = 0; r < 4; ++r) row_max[r / 2] = fmaxf(row_max[r / 2], s[n][r]);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) shift[h] = quad_max(row_max[h]) * p.scale_log2;
#pragma unroll
    for (int n = 0; n < Traits::kKeyTiles; ++n) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        s[n][r] = exp2f(fmaf(s[n][r], p.scale_log2, -shift[r / 2]));
        row_sum[r / 2] += s[n][r];
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();
  if (!warp_active) return;  // no barrier follows

  float o[Traits::kDimTiles][4];
#pragma unroll
  for (int d = 0; d < Traits::kDimTiles; ++d) {
#pragma unroll
    for (int r = 0; r < 4; ++r) o[d][r] = 0.0f;
  }
  // O = P V: the S accumulators of key tiles 2j, 2j + 1 are the A fragment of k-step j.
#pragma unroll
  for (int j = 0; j < Traits::kPvSteps; ++j) {
    if (j * 16 >= keys) continue;
    const std::uint32_t pf[4] = {pack_pair<T>(s[2 * j][0], s[2 * j][1]),
                                 pack_pair<T>(s[2 * j][2], s[2 * j][3]),
                                 pack_pair<T>(s[2 * j + 1][0], s[2 * j + 1][1]),
                                 pack_pair<T>(s[2 * j + 1][2], s[2 * j + 1][3])};
#pragma unroll
    for (int d = 0; d < Traits::kDimTiles; d += 2) {
      std::uint32_t vf[4];
      const int row = j * 16 + lane % 8 + lane / 8 % 2 * 8;
      ldmatrix_x4_trans(vf, sv + row * kStride + d * 8 + lane / 16 * 8);
      const std::uint32_t b0[2] = {vf[0], vf[1]}, b1[2] = {vf[2], vf[3]};
      mma<T>(o[d], pf, b0);
      mma<T>(o[d + 1], pf, b1);
    }
  }
  // This warp's rows of the Q tile are read by it alone, and no more.
  T* out = static_cast<T*>(p.out) + seg.start * p.out_token_stride + seg.head * p.out_head_stride;
  store_m_tile<Traits>(o, row_sum, shift, lse_of(p, seg.start, seg.head), p.heads,
                       sq + warp_row * kStride, out, m0 + warp_row, seg.len, p.out_token_stride);
}

// ---- The long path -------------------------------------------------------------------------

// Where this thread's 16-byte copies of a K or V tile go and come from, fixed for the whole
// loop: a copy then costs one address add, with no division by the chunks per row in the loop.
// Shared offsets are in bytes (what the copy's shared address adds), source offsets in elements
// from the tile's first token, one set for K and V (the launcher gives them one token stride),
// 32-bit (it copies inputs whose token stride would overflow them).
template <class Traits>
struct KvCopies {
  int smem_bytes[Traits::kKvCopies];
  int src[Traits::kKvCopies];

  QK_DEVICE explicit KvCopies(int64_t token_stride) {
    using T = typename Traits::Element;
#pragma unroll
    for (int i = 0; i < Traits::kKvCopies; ++i) {
      const int c = static_cast<int>(threadIdx.x) + i * Traits::kThreads;
      const int row = c / Traits::kChunksPerRow;
      const int col = c % Traits::kChunksPerRow * Traits::kChunkElems;
      smem_bytes[i] = (row * Traits::kRowStride + col) * static_cast<int>(sizeof(T));
      src[i] = row * static_cast<int>(token_stride) + col;
    }
  }
};

// Issues the copies of one K or V tile; with kPartial (the segment's last tile) only its first
// `rows` rows are read and the rest zero-filled, so masked keys meet zeros in V.
template <class Traits, bool kPartial, class T>
QK_DEVICE void copy_kv_tile(T* tile, const T* src, const KvCopies<Traits>& copies, int rows) {
  char* const tile_bytes = reinterpret_cast<char*>(tile);
#pragma unroll
  for (int i = 0; i < Traits::kKvCopies; ++i) {
    void* const to = tile_bytes + copies.smem_bytes[i];
    if constexpr (kPartial) {
      const int row =
          (static_cast<int>(threadIdx.x) + i * Traits::kThreads) / Traits::kChunksPerRow;
      const bool valid = row < rows;
      cp_async_16_zfill(to, valid ? src + copies.src[i] : src, valid);
    } else {
      cp_async_16(to, src + copies.src[i]);
    }
  }
}

// copy_kv_tile with its form chosen at run time: one uniform branch per tile.
template <class Traits, class T>
QK_DEVICE void copy_kv_tile(T* tile, const T* src, const KvCopies<Traits>& copies, int rows,
                            bool partial) {
  if (partial) {
    copy_kv_tile<Traits, true>(tile, src, copies, rows);
  } else {
    copy_kv_tile<Traits, false>(tile, src, copies, rows);
  }
}

// A long-path block's state: its pointers, and each lane's accumulators and softmax statistics
// for rows g and g + 8 of its warp's two m-tiles.
template <class Traits>
struct LongBlock {
  using T = typename Traits::Element;
  const WindowAttnParams& p;
  T* sq;
  T* sk;  // 2 stages
  T* sv;  // 2 stages
  const T* k;
  const T* v;
  KvCopies<Traits> copies;
  int seg_len, tiles, warp_row, lane;
  bool warp_active;
  float o[Traits::kMTiles][Traits::kDimTiles][4];
  float row_max[Traits::kMTiles][2];
  float row_sum[Traits::kMTiles][2];  // this lane's share; the quad's sum at the end
};

// One key tile: S = Q K^T for both m-tiles, the online softmax, O += P V. kStage (the shared
// stage holding this tile) is a constant, so every shared address is a base plus a constant;
// kLast marks the segment's last tile, the only one that masks keys and prefetches nothing.
template <class Traits, int kStage, bool kLast>
QK_DEVICE void long_step(LongBlock<Traits>& b, int tile) {
  using T = typename Traits::Element;
  constexpr int kStride = Traits::kRowStride, kKv = Traits::kKvTileElems;
  constexpr int kM = Traits::kMTiles, kN = Traits::kKeyTiles, kD = Traits::kDimTiles;
  const WindowAttnParams& p = b.p;
  const int lane = b.lane, t = lane % 4;
  const T* sk = b.sk + kStage * kKv;
  const T* sv = b.sv + kStage * kKv;
  const int kv0 = tile * Traits::kBlockN;
  const int next_rows = b.seg_len - kv0 - Traits::kBlockN;  // rows of the next tile, if any
  const bool next_partial = tile + 2 == b.tiles && next_rows < Traits::kBlockN;

  cp_async_wait<1>();  // K(tile) (and Q) have landed; V(tile) may be in flight
  __syncthreads();
  float s[kM][kN][4];
  if (b.warp_active) {
#pragma unroll
    for (int m = 0; m < kM; ++m) {
#pragma unroll
      for (int n = 0; n < kN; ++n) {
#pragma unroll
        for (int r = 0; r < 4; ++r) s[m][n][r] = 0.0f;
      }
    }
#pragma unroll
    for (int ks = 0; ks < Traits::kQkSteps; ++ks) {
      std::uint32_t qf[kM][4];
#pragma unroll
      for (int m = 0; m < kM; ++m) {
        const int row = b.warp_row + 16 * m + lane % 8 + lane / 8 % 2 * 8;
        ldmatrix_x4(qf[m], b.sq + row * kStride + ks * 16 + lane / 16 * 8);
      }
#pragma unroll
      for (int n = 0; n < kN; n += 2) {
        std::uint32_t kf[4];
        const int row = n * 8 + lane / 16 * 8 + lane % 8;
        ldmatrix_x4(kf, sk + row * kStride + ks * 16 + lane / 8 % 2 * 8);
        const std::uint32_t b0[2] = {kf[0], kf[1]}, b1[2] = {kf[2], kf[3]};
#pragma unroll
        for (int m = 0; m < kM; ++m) {
          mma<T>(s[m][n], qf[m], b0);
          mma<T>(s[m][n + 1], qf[m], b1);
        }
      }
    }
    if constexpr (kLast) {
      // Keys past the segment end leave the softmax; every row keeps key kv0.
      const int keys = b.seg_len - kv0;
#pragma unroll
      for (int m = 0; m < kM; ++m) {
#pragma unroll
        for (int n = 0; n < kN; ++n) {
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            if (n * 8 + 2 * t + r % 2 >= keys) s[m][n][r] = -INFINITY;
          }
        }
      }
    }
#pragma unroll
    for (int m = 0; m < kM; ++m) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float tile_max = -INFINITY;
#pragma unroll
        for (int n = 0; n < kN; ++n)
          tile_max = fmaxf(tile_max, fmaxf(s[m][n][2 * h], s[m][n][2 * h + 1]));
        const float new_max = fmaxf(b.row_max[m][h], quad_max(tile_max));
        const float shift = new_max * p.scale_log2;  // subtracted inside one FMA per score
        // exp2(-inf) = 0 on the first tile, where o and the sum are still zero.
        const float correction = ex2_approx_ftz(fmaf(b.row_max[m][h], p.scale_log2, -shift));
        b.row_max[m][h] = new_max;
        b.row_sum[m][h] *= correction;
#pragma unroll
        for (int d = 0; d < kD; ++d) {
          b.o[m][d][2 * h] *= correction;
          b.o[m][d][2 * h + 1] *= correction;
        }
#pragma unroll
        for (int n = 0; n < kN; ++n) {
#pragma unroll
          for (int r = 2 * h; r < 2 * h + 2; ++r) {
            s[m][n][r] = ex2_approx_ftz(fmaf(s[m][n][r], p.scale_log2, -shift));
            b.row_sum[m][h] += s[m][n][r];
          }
        }
      }
    }
  }

  if constexpr (!kLast) {
    // That stage's K was last read by QK^T of tile - 1, before the barrier above.
    T* const next = b.sk + (1 - kStage) * kKv;
    const T* src = b.k + (kv0 + Traits::kBlockN) * p.k_token_stride;
    copy_kv_tile(next, src, b.copies, next_rows, next_partial);
    cp_async_commit();
    cp_async_wait<1>();  // V(tile) has landed; K(tile + 1) may be in flight
  } else {
    cp_async_wait<0>();
  }
  __syncthreads();

  if (b.warp_active) {
    // O += P V: the S accumulators of key tiles 2j, 2j + 1 are the A fragment of k-step j,
    // each V fragment serving both m-tiles.
#pragma unroll
    for (int j = 0; j < Traits::kPvSteps; ++j) {
      std::uint32_t pf[kM][4];
#pragma unroll
      for (int m = 0; m < kM; ++m) {
        pf[m][0] = pack_pair<T>(s[m][2 * j][0], s[m][2 * j][1]);
        pf[m][1] = pack_pair<T>(s[m][2 * j][2], s[m][2 * j][3]);
        pf[m][2] = pack_pair<T>(s[m][2 * j + 1][0], s[m][2 * j + 1][1]);
        pf[m][3] = pack_pair<T>(s[m][2 * j + 1][2], s[m][2 * j + 1][3]);
      }
#pragma unroll
      for (int d = 0; d < kD; d += 2) {
        std::uint32_t vf[4];
        const int row = j * 16 + lane % 8 + lane / 8 % 2 * 8;
        ldmatrix_x4_trans(vf, sv + row * kStride + d * 8 + lane / 16 * 8);
        const std::uint32_t b0[2] = {vf[0], vf[1]}, b1[2] = {vf[2], vf[3]};
#pragma unroll
        for (int m = 0; m < kM; ++m) {
          mma<T>(b.o[m][d], pf[m], b0);
          mma<T>(b.o[m][d + 1], pf[m], b1);
        }
      }
    }
  }

  if constexpr (!kLast) {
    // That stage's V was last read by PV of tile - 1, before the first barrier above.
    T* const next = b.sv + (1 - kStage) * kKv;
    const T* src = b.v + (kv0 + Traits::kBlockN) * p.v_token_stride;
    copy_kv_tile(next, src, b.copies, next_rows, next_partial);
    cp_async_commit();
  }
}

template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads)
    window_attn_long_kernel(const WindowAttnParams p) {
  using T = typename Traits::Element;
  constexpr int kKv = Traits::kKvTileElems;
  QK_DYNAMIC_SMEM(T, smem);

  const Segment seg = segment_of(p);
  const int m0 = static_cast<int>(blockIdx.y) * Traits::kBlockM;
  if (m0 >= seg.len) return;  // the whole block leaves before any barrier
  const T* q =
      static_cast<const T*>(p.q) + seg.start * p.q_token_stride + seg.head * p.q_head_stride;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  LongBlock<Traits> b{
      p, smem, smem + Traits::kQTileElems, smem + Traits::kQTileElems + 2 * kKv,
      static_cast<const T*>(p.k) + seg.start * p.k_token_stride + seg.head * p.k_head_stride,
      static_cast<const T*>(p.v) + seg.start * p.v_token_stride + seg.head * p.v_head_stride,
      KvCopies<Traits>(p.k_token_stride), seg.len,
      (seg.len + Traits::kBlockN - 1) / Traits::kBlockN, warp * 16 * Traits::kMTiles,
      static_cast<int>(threadIdx.x) % 32,
      // Warps whose rows all lie past the segment end only join the barriers.
      m0 + warp * 16 * Traits::kMTiles < seg.len};
#pragma unroll
  for (int m = 0; m < Traits::kMTiles; ++m) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      b.row_max[m][h] = -INFINITY;
      b.row_sum[m][h] = 0.0f;
    }
#pragma unroll
    for (int d = 0; d < Traits::kDimTiles; ++d) {
#pragma unroll
      for (int r = 0; r < 4; ++r) b.o[m][d][r] = 0.0f;
    }
  }

  // Groups: (Q, K0), (V0); then K(i+1) and V(i+1) each as issued inside the steps.
  load_tile<Traits, Traits::kBlockM>(b.sq, q + m0 * p.q_token_stride, p.q_token_stride,
                                     seg.len - m0);
  copy_kv_tile(b.sk, b.k, b.copies, seg.len, b.tiles == 1);
  cp_async_commit();
  copy_kv_tile(b.sv, b.v, b.copies, seg.len, b.tiles == 1);
  cp_async_commit();

  // Tiles in pairs, so that each step's stage is a constant; the last one or two after.
  int tile = 0;
  for (; tile + 2 < b.tiles; tile += 2) {
    long_step<Traits, 0, false>(b, tile);
    long_step<Traits, 1, false>(b, tile + 1);
  }
  if (tile + 1 < b.tiles) {
    long_step<Traits, 0, false>(b, tile);
    long_step<Traits, 1, true>(b, tile + 1);
  } else {
    long_step<Traits, 0, true>(b, tile);
  }
  if (!b.warp_active) return;  // no barrier follows

  // Each warp's rows of the Q tile are read by it alone, and no more.
  T* out = static_cast<T*>(p.out) + seg.start * p.out_token_stride + seg.head * p.out_head_stride;
#pragma unroll
  for (int m = 0; m < Traits::kMTiles; ++m) {
    const int row = b.warp_row + 16 * m;
    const float shift[2] = {b.row_max[m][0] * p.scale_log2, b.row_max[m][1] * p.scale_log2};
    store_m_tile<Traits>(b.o[m], b.row_sum[m], shift, lse_of(p, seg.start, seg.head), p.heads,
                         b.sq + row * Traits::kRowStride, out, m0 + row, seg.len,
                         p.out_token_stride);
  }
}

template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads)
    window_attn_fma_kernel(const WindowAttnParams p) {
  constexpr int kCols = Traits::kColsPerThread, kGroup = Traits::kThreadsPerRow;
  constexpr int kStride = Traits::kRowStride, kTile = Traits::kTileElems;
  QK_DYNAMIC_SMEM(float, smem);
  float* const sq = smem;
  float* const sk = sq + kTile;
  float* const sv = sk + Traits::kKvTileElems;

  const Segment seg = segment_of(p);
  const int m0 = static_cast<int>(blockIdx.y) * Traits::kBlockM;
  if (m0 >= seg.len) return;
  const float* q =
      static_cast<const float*>(p.q) + seg.start * p.q_token_stride + seg.head * p.q_head_stride;
  const float* k =
      static_cast<const float*>(p.k) + seg.start * p.k_token_stride + seg.head * p.k_head_stride;
  const float* v =
      static_cast<const float*>(p.v) + seg.start * p.v_token_stride + seg.head * p.v_head_stride;
  // A group of kGroup adjacent lanes shares query row r, each lane kCols of its columns. Rows
  // past the segment end compute on zero-filled q (finite) and store nothing, so that every
  // lane of a warp reaches the shuffles.
  const int row = static_cast<int>(threadIdx.x) / kGroup;
  const int slice = static_cast<int>(threadIdx.x) % kGroup;
  const int col = slice * kCols;
  const float* my_q = sq + row * kStride + col;
  float* const scores = sv + Traits::kKvTileElems + row * Traits::kScoreStride;

  load_tile<Traits, Traits::kBlockM>(sq, q + m0 * p.q_token_stride, p.q_token_stride, seg.len - m0);
  float o[kCols];
#pragma unroll
  for (int d = 0; d < kCols; ++d) o[d] = 0.0f;
  float row_max = -INFINITY, row_sum = 0.0f;

  for (int kv0 = 0; kv0 < seg.len; kv0 += Traits::kBlockN) {
    const int keys = min(seg.len - kv0, Traits::kBlockN);
    __syncthreads();  // every thread is done with the previous K and V
    load_tile<Traits, Traits::kBlockN>(sk, k + kv0 * p.k_token_stride, p.k_token_stride, keys);
    load_tile<Traits, Traits::kBlockN>(sv, v + kv0 * p.v_token_stride, p.v_token_stride, keys);
    cp_async_wait_all();
    __syncthreads();
    if constexpr (Traits::kRope) {
      if (kv0 == 0) {
        rotate_tiles<Traits>(sq, nullptr, min(seg.len - m0, Traits::kBlockM), seg.start + m0, p);
      }
      rotate_tiles<Traits>(sk, nullptr, keys, seg.start + kv0, p);
      __syncthreads();
    }
    float tile_max = -INFINITY;
    for (int j = 0; j < keys; ++j) {
      const float* key = sk + j * kStride + col;
      float dot = 0.0f;
#pragma unroll
      for (int d = 0; d < kCols; ++d) dot = fmaf(my_q[d], key[d], dot);
      // The group's other slices: the same sum, bit for bit, in every lane of the group.
#pragma unroll
      for (int offset = 1; offset < kGroup; offset *= 2) {
        dot += __shfl_xor_sync(kFullMask, dot, offset);
      }
      const float score = dot * p.scale_log2;
      if (slice == 0) scores[j] = score;
      tile_max = fmaxf(tile_max, score);
    }
    __syncwarp();  // the group's scores are written
    const float new_max = fmaxf(row_max, tile_max);
    const float correction = exp2f(row_max - new_max);  // 0 on the first tile
    row_max = new_max;
    row_sum *= correction;
#pragma unroll
    for (int d = 0; d < kCols; ++d) o[d] *= correction;
    for (int j = 0; j < keys; ++j) {
      const float weight = exp2f(scores[j] - new_max);
      const float* value = sv + j * kStride + col;
      row_sum += weight;
#pragma unroll
      for (int d = 0; d < kCols; ++d) o[d] = fmaf(weight, value[d], o[d]);
    }
  }
  if (m0 + row >= seg.len) return;
  const float inv_sum = 1.0f / row_sum;
  if (float* lse = lse_of(p, seg.start, seg.head); lse != nullptr && slice == 0) {
    lse[static_cast<int64_t>(m0 + row) * p.heads] = log_sum_exp(row_max, row_sum);
  }
  float* out = static_cast<float*>(p.out) + (seg.start + m0 + row) * p.out_token_stride +
               seg.head * p.out_head_stride + col;
#pragma unroll
  for (int d = 0; d < kCols; d += 4) {
    Pack<float, 4> chunk;
#pragma unroll
    for (int e = 0; e < 4; ++e) chunk.v[e] = o[d + e] * inv_sum;
    store_pack<float, 4>(out + d, chunk);
  }
}

// ---- Host side ----------------------------------------------------------------------------------

// Whether the launch runs the long tensor-core kernel, which reads K and V tiles through one
// set of offsets (one token stride for both).
bool reads_kv_with_one_stride(const at::Tensor& q, int64_t max_seqlen) {
  return q.scalar_type() != at::kFloat && max_seqlen > kKeyTile;
}

// For that kernel: where the token strides of k and v differ, the one not contiguous (or both)
// is copied, which the first time warns.
void share_token_stride(at::Tensor& k, at::Tensor& v) {
  if (k.stride(0) == v.stride(0)) return;
  TORCH_WARN_ONCE("qwen_kernels: the CUDA window_attn long path copies k or v (token strides ",
                  k.stride(0), " and ", v.stride(0), ") to a contiguous tensor: its kernel reads ",
                  "K and V with one token stride. Warned once per process.");
  if (!k.is_contiguous()) k = k.contiguous();
  if (!v.is_contiguous()) v = v.contiguous();
}

// One block per (segment, head) pair and block of Traits::kBlockM query rows.
template <class Traits, class... P>
void launch_kernel(void (*kernel)(P...), const WindowAttnParams& params, cudaStream_t stream) {
  if (Traits::kSmemBytes > 48 * 1024) set_max_dynamic_smem(kernel, Traits::kSmemBytes);
  const int query_blocks = (params.max_seqlen + Traits::kBlockM - 1) / Traits::kBlockM;
  const dim3 grid(static_cast<unsigned>(params.segments * params.heads),
                  static_cast<unsigned>(query_blocks));
  QK_LAUNCH(kernel, grid, dim3(Traits::kThreads), Traits::kSmemBytes, stream, params);
}

template <class T, int kHeadDim, bool kRope>
void run(const WindowAttnParams& params, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    using Traits = WindowAttnFmaTraits<kHeadDim, kRope>;
    launch_kernel<Traits>(window_attn_fma_kernel<Traits>, params, stream);
  } else {
    // One key tile holds every key of a window: the single-pass variant.
    using Window = WindowAttnTraits<T, kHeadDim, kRope>;
    if (params.max_seqlen <= Window::kBlockN) {
      launch_kernel<Window>(window_attn_mma_kernel<Window>, params, stream);
    } else if constexpr (kRope) {
      TORCH_CHECK(false, "qwen_kernels: window_attn_rope rotates q and k before the long path");
    } else {
      using Long = WindowAttnLongTraits<T, kHeadDim>;
      launch_kernel<Long>(window_attn_long_kernel<Long>, params, stream);
    }
  }
}

// Dispatches on the head dim through the variant list, and on the rotary flag.
template <class T>
void run_head_dim(int head_dim, bool rope, const WindowAttnParams& params, cudaStream_t stream) {
  switch (head_dim) {
#define QK_WINDOW_ATTN_CASE(D) \
  case D:                      \
    return rope ? run<T, D, true>(params, stream) : run<T, D, false>(params, stream);
    QK_WINDOW_ATTN_HEAD_DIMS(QK_WINDOW_ATTN_CASE)
#undef QK_WINDOW_ATTN_CASE
    default:
      TORCH_CHECK(false, "qwen_kernels: window_attn has no kernel for head_dim ", head_dim);
  }
}

// The rotary arguments of window_attn_rope, checked and in the kernel's types.
struct Rope {
  at::Tensor positions;  // int32 [A, T], contiguous
  at::Tensor inv_freq;   // fp32 [D/2], contiguous
  std::vector<int64_t> section;
};

Rope check_rope(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& inv_freq,
                c10::IntArrayRef mrope_section) {
  const int64_t tokens = qkv.size(0), half = qkv.size(3) / 2;
  check_same_device(positions, "positions", qkv, "qkv");
  check_dtype(positions, "positions", {at::kInt, at::kLong});
  QK_CHECK_ARG(positions.dim() == 2 && positions.size(1) == tokens && positions.size(0) >= 1 &&
                   positions.size(0) <= kMaxRopeAxes,
               "positions", "shape [A, T] with T = ", tokens, " and 1 to ", kMaxRopeAxes,
               " axes (got ", positions.sizes(), ")");
  check_same_device(inv_freq, "inv_freq", qkv, "qkv");
  check_dtype(inv_freq, "inv_freq", {at::kFloat, at::kDouble});
  QK_CHECK_ARG(inv_freq.dim() == 1 && inv_freq.size(0) == half, "inv_freq", "shape [D/2] = [", half,
               "] (got ", inv_freq.sizes(), ")");
  int64_t total = 0;
  bool positive = true;
  for (int64_t size : mrope_section) {
    positive = positive && size > 0;
    total += size;
  }
  QK_CHECK_ARG(
      static_cast<int64_t>(mrope_section.size()) == positions.size(0) && positive && total == half,
      "mrope_section", positions.size(0), " positive sizes (one per position axis) ",
      "summing to D/2 = ", half, " (got ", mrope_section, ")");
  // The reference forms the angles in fp32 from positions and frequencies cast to fp32.
  return {positions.to(at::kInt).contiguous(), inv_freq.to(at::kFloat).contiguous(),
          mrope_section.vec()};
}

// The output, and each row's log-sum-exp where asked.
using Outputs = std::tuple<at::Tensor, at::Tensor>;

// Launches the variant for q's dtype and head dim; rope is null for plain attention. With
// `with_lse` (the training forwards), also returns each row's log-sum-exp (fp32 [T, H]; every
// row of a valid layout is written), else an undefined tensor in its place.
Outputs launch(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
               const at::Tensor& cu_seqlens_in, int64_t max_seqlen, double scale, const Rope* rope,
               bool with_lse) {
  at::Tensor out = at::empty(q_in.sizes(), q_in.options());
  at::Tensor lse = with_lse
                       ? at::empty({q_in.size(0), q_in.size(1)}, q_in.options().dtype(at::kFloat))
                       : at::Tensor();
  if (q_in.numel() == 0) return {out, lse};
  const at::Tensor q = with_aligned_rows(q_in, "q");
  at::Tensor k = with_aligned_rows(k_in, "k"), v = with_aligned_rows(v_in, "v");
  if (reads_kv_with_one_stride(q, max_seqlen)) share_token_stride(k, v);
  const at::Tensor cu_seqlens = cu_seqlens_in.contiguous();

  WindowAttnParams params = attention_params(q, k, v, out, cu_seqlens, max_seqlen, scale);
  params.lse = with_lse ? lse.data_ptr<float>() : nullptr;
  if (rope != nullptr) {
    params.positions = rope->positions.data_ptr<int>();
    params.inv_freq = rope->inv_freq.data_ptr<float>();
    params.rope_axes = static_cast<int>(rope->section.size());
    int end = 0;
    for (std::size_t a = 0; a < rope->section.size(); ++a) {
      end += static_cast<int>(rope->section[a]);
      params.rope_section_end[a] = end;
    }
  }

  DeviceGuard guard(q);
  QK_DISPATCH_FLOAT(q.scalar_type(), T, [&] {
    run_head_dim<T>(static_cast<int>(q.size(2)), rope != nullptr, params, current_stream(q));
  });
  return {out, lse};
}

Outputs launch_rope(const at::Tensor& qkv, const at::Tensor& cu_seqlens, int64_t max_seqlen,
                    const at::Tensor& positions, const at::Tensor& inv_freq,
                    c10::IntArrayRef mrope_section, double softmax_scale, bool with_lse) {
  check_device(qkv, "qkv");
  QK_CHECK_ARG(qkv.dim() == 4 && qkv.size(1) == 3, "qkv", "shape [T, 3, H, D] (got ", qkv.sizes(),
               ")");
  const at::Tensor q = qkv.select(1, 0), k = qkv.select(1, 1), v = qkv.select(1, 2);
  check_args(q, k, v, cu_seqlens, max_seqlen);
  const Rope rope = check_rope(qkv, positions, inv_freq, mrope_section);
  if (max_seqlen > kKeyTile) {
    // Past one key tile every block of queries would rotate every key tile again, forming its
    // angles inside the key loop: rotate q and k once (mrope_pos, so the rounding is the same)
    // and run the plain long path.
    const auto [q_rotated, k_rotated] =
        mrope_pos(q, k, rope.positions, rope.inv_freq, rope.section);
    // The rotated k is contiguous: v, a view of qkv, comes contiguous too where the kernel
    // reads both with one token stride (a copy expected here, so no warning).
    const at::Tensor v_alongside = reads_kv_with_one_stride(q, max_seqlen) ? v.contiguous() : v;
    return launch(q_rotated, k_rotated, v_alongside, cu_seqlens, max_seqlen, softmax_scale, nullptr,
                  with_lse);
  }
  return launch(q, k, v, cu_seqlens, max_seqlen, softmax_scale, &rope, with_lse);
}

}  // namespace

std::vector<int64_t> window_attn_head_dims() {
#define QK_WINDOW_ATTN_DIM(D) D,
  return {QK_WINDOW_ATTN_HEAD_DIMS(QK_WINDOW_ATTN_DIM)};
#undef QK_WINDOW_ATTN_DIM
}

at::Tensor window_attn(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& cu_seqlens, int64_t max_seqlen, double softmax_scale) {
  check_dim(q, "q", 3);
  check_args(q, k, v, cu_seqlens, max_seqlen);
  return std::get<0>(launch(q, k, v, cu_seqlens, max_seqlen, softmax_scale, nullptr, false));
}

std::tuple<at::Tensor, at::Tensor> window_attn_forward(const at::Tensor& q, const at::Tensor& k,
                                                       const at::Tensor& v,
                                                       const at::Tensor& cu_seqlens,
                                                       int64_t max_seqlen, double softmax_scale) {
  check_dim(q, "q", 3);
  check_args(q, k, v, cu_seqlens, max_seqlen);
  return launch(q, k, v, cu_seqlens, max_seqlen, softmax_scale, nullptr, true);
}

at::Tensor window_attn_rope(const at::Tensor& qkv, const at::Tensor& cu_seqlens, int64_t max_seqlen,
                            const at::Tensor& positions, const at::Tensor& inv_freq,
                            c10::IntArrayRef mrope_section, double softmax_scale) {
  return std::get<0>(launch_rope(qkv, cu_seqlens, max_seqlen, positions, inv_freq, mrope_section,
                                 softmax_scale, false));
}

std::tuple<at::Tensor, at::Tensor> window_attn_rope_forward(
    const at::Tensor& qkv, const at::Tensor& cu_seqlens, int64_t max_seqlen,
    const at::Tensor& positions, const at::Tensor& inv_freq, c10::IntArrayRef mrope_section,
    double softmax_scale) {
  return launch_rope(qkv, cu_seqlens, max_seqlen, positions, inv_freq, mrope_section, softmax_scale,
                     true);
}

}  // namespace qk
