// window_attn's backward (torch.ops.qwen_cuda.window_attn_backward), FlashAttention-2's: nothing
// of the forward is kept but O and each row's log-sum-exp, from which P is recomputed. Per
// segment and head, with scale c, S = c Q K^T, P = exp(S - lse), D = rowsum(dO O):
//
//     dV = P^T dO,  dP = dO V^T,  dS = P (dP - D),  dQ = c dS K,  dK = c dS^T Q.
//
// fp16/bf16 run mma.m16n8k16 on tiles staged by cp.async and read by ldmatrix (transposed where
// a product takes P, dS, K or the row tiles as its other side); P and dS are rounded to the input
// dtype before their products, as the forward rounds P and as FlashAttention does; D, the
// softmax and every sum are fp32, each gradient is rounded once. head_dim 80 runs as 5 k-steps
// of 16, unpadded.
// - The window path (max_seqlen <= 64, window_attn_backward_kernel): one block holds a whole
//   (segment, head) window, so dQ, dK and dV need no atomics and no second pass. Each warp
//   recomputes S and P for its 16 query rows, dP and dS, and dQ from registers; P and dS go
//   through shared memory, so that each warp then forms dV and dK for its 16 key rows. D comes
//   from O and dO inside the block.
// - The long path: a pre-pass writes D [T, H] (attn_delta_kernel); one block per key block of 64
//   walks the segment's query blocks for that block's dK and dV (window_attn_backward_dkdv_kernel),
//   and one block per query block walks the key blocks for dQ (window_attn_backward_dq_kernel).
//   Recomputing S and dP there costs two products per tile pair more than adding dQ up with
//   fp32 atomics, and buys a dQ that is the same on every run, with no fp32 scratch.
// fp32 (window_attn_backward_fma_dq_kernel, ..._dkdv_kernel): FMA, never rounded to 16 bits, one
// warp per row, its lanes holding columns lane, lane + 32, ...: the dQ kernel's warps take query
// rows and walk the keys, the dK/dV kernel's take key rows and walk the queries, both after the
// D pre-pass. Simple rather than fast: the model trains in bf16.
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

#include "common/dispatch.h"
#include "common/kernel.h"
#include "common/numeric.h"
#include "common/torch_utils.h"
#include "window_attn/kernel_traits.h"
#include "window_attn/launch_args.h"
#include "window_attn/params.h"
#include "window_attn/tiles.h"
#include "window_attn/variants.h"
#include "window_attn/window_attn.h"

namespace qk {
namespace {

// The forward's arguments (q, k, v, out = O, lse, segments, scale) and the gradients'.
struct WindowAttnBackwardParams {
  WindowAttnParams fwd;
  const void* grad;  // dO, in q's dtype
  int64_t grad_token_stride, grad_head_stride;
  const float* delta;  // D [T, H] of the pre-pass (long and fp32 paths); null on the window path
  void* dq;            // [T, H, D] contiguous, as are dk and dv
  void* dk;
  void* dv;
};

// The shape of the tensor-core kernels: tiles of 64 query rows and 64 keys, 4 warps of 16 rows.
template <class T, int kHeadDim_>
struct WindowAttnBackwardTraits {
  using Element = T;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlock = kKeyTile;  // query rows and keys per tile
  static constexpr int kWarps = kBlock / 16;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kQkSteps = kHeadDim / 16;
  static constexpr int kKeyTiles = kBlock / 8;
  static constexpr int kRowSteps = kBlock / 16;  // k-steps over a tile's rows
  static constexpr int kDimTiles = kHeadDim / 8;
  static constexpr int kRowStride = kHeadDim + 8;
  static constexpr int kScoreStride = kBlock + 8;  // P and dS rows, padded like the others
  static constexpr int kChunkElems = 16 / sizeof(T);
  static constexpr int kChunksPerRow = kHeadDim / kChunkElems;
  static constexpr int kTileElems = kBlock * kRowStride;
  static constexpr int kScoreElems = kBlock * kScoreStride;
  // Q, K, V, dO, then P and dS, then D (fp32, the window path's).
  static constexpr std::size_t kSmemBytes =
      (4 * kTileElems + 2 * kScoreElems) * sizeof(T) + kBlock * sizeof(float);

  static_assert(kHeadDim % 16 == 0 && kDimTiles % 2 == 0, "head_dim must be a multiple of 16");
};

// The shared tiles, in the order of kSmemBytes: Q, K, V, dO, P, dS, then D (the window path's).
template <class Traits>
struct Tiles {
  using T = typename Traits::Element;
  T* q;
  T* k;
  T* v;
  T* grad;
  T* p;
  T* ds;
  float* delta;
};

template <class Traits>
QK_DEVICE Tiles<Traits> tiles_of(typename Traits::Element* smem) {
  constexpr int kTile = Traits::kTileElems, kScore = Traits::kScoreElems;
  return {smem,
          smem + kTile,
          smem + 2 * kTile,
          smem + 3 * kTile,
          smem + 4 * kTile,
          smem + 4 * kTile + kScore,
          reinterpret_cast<float*>(smem + 4 * kTile + 2 * kScore)};
}

// The rows of one head of a [T, H, D] tensor from the segment's first token.
template <class T>
QK_DEVICE const T* head_rows(const void* base, const Segment& seg, int64_t token_stride,
                             int64_t head_stride) {
  return static_cast<const T*>(base) + seg.start * token_stride + seg.head * head_stride;
}

template <int kTiles>
QK_DEVICE void zero(float (&acc)[kTiles][4]) {
#pragma unroll
  for (int i = 0; i < kTiles; ++i) {
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[i][r] = 0.0f;
  }
}

// acc = A B^T over head_dim for 16 rows of `a` (from row `a_row`) against kTiles * 8 rows of `b`
// (key tiles of 8, those from `keys` on skipped): S = Q K^T, dP = dO V^T.
template <class Traits, int kTiles, class T>
QK_DEVICE void rows_times_rows(float (&acc)[kTiles][4], const T* a, int a_row, const T* b,
                               int keys) {
  constexpr int kStride = Traits::kRowStride;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  zero(acc);
#pragma unroll
  for (int ks = 0; ks < Traits::kQkSteps; ++ks) {
    std::uint32_t af[4];
    ldmatrix_x4(af, a + (a_row + lane % 8 + lane / 8 % 2 * 8) * kStride + ks * 16 + lane / 16 * 8);
#pragma unroll
    for (int n = 0; n < kTiles; n += 2) {
      if (n * 8 >= keys) continue;
      std::uint32_t bf[4];
      ldmatrix_x4(bf,
                  b + (n * 8 + lane / 16 * 8 + lane % 8) * kStride + ks * 16 + lane / 8 % 2 * 8);
      const std::uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
      mma<T>(acc[n], af, b0);
      mma<T>(acc[n + 1], af, b1);
    }
  }
}

// P and dS = P (dP - D) of this warp's 16 query rows (from `warp_row` of the Q and dO tiles)
// against kTiles * 8 rows of K and V (from sk, sv): rows from `rows` and keys from `keys` on get
// P = dS = 0. `lse` and `delta` point at the tile's first row, consecutive rows `heads` and
// `delta_stride` apart.
template <class Traits, int kTiles, class T>
QK_DEVICE void score_grads(float (&prob)[kTiles][4], float (&ds)[kTiles][4], const T* sq,
                           const T* sdo, const T* sk, const T* sv, int warp_row, int rows, int keys,
                           const float* lse, int heads, const float* delta, int64_t delta_stride,
                           float scale_log2) {
  const int lane = static_cast<int>(threadIdx.x) % 32, g = lane / 4, t = lane % 4;
  rows_times_rows<Traits, kTiles>(prob, sq, warp_row, sk, keys);  // S, unscaled
  rows_times_rows<Traits, kTiles>(ds, sdo, warp_row, sv, keys);   // dP
  float lse_log2[2], row_delta[2];
  bool row_valid[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = warp_row + g + 8 * h;
    row_valid[h] = row < rows;
    lse_log2[h] =
        row_valid[h] ? lse[static_cast<int64_t>(row) * heads] * static_cast<float>(kLog2e) : 0.0f;
    row_delta[h] = row_valid[h] ? delta[row * delta_stride] : 0.0f;
  }
#pragma unroll
  for (int n = 0; n < kTiles; ++n) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int h = r / 2, key = n * 8 + 2 * t + r % 2;
      const float p =
          row_valid[h] && key < keys ? exp2f(fmaf(prob[n][r], scale_log2, -lse_log2[h])) : 0.0f;
      prob[n][r] = p;
      ds[n][r] = p * (ds[n][r] - row_delta[h]);
    }
  }
}

// P and dS of this warp's 16 rows and kTiles * 8 keys into the shared score tiles (from the
// columns sp, sds point at), rounded to T, for the key-row products after the next barrier.
template <class Traits, int kTiles, class T>
QK_DEVICE void stage_scores(const float (&prob)[kTiles][4], const float (&ds)[kTiles][4], T* sp,
                            T* sds, int warp_row) {
  const int lane = static_cast<int>(threadIdx.x) % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int n = 0; n < kTiles; ++n) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int offset = (warp_row + g + 8 * h) * Traits::kScoreStride + n * 8 + 2 * t;
      const std::uint32_t pb = pack_pair<T>(prob[n][2 * h], prob[n][2 * h + 1]);
      const std::uint32_t db = pack_pair<T>(ds[n][2 * h], ds[n][2 * h + 1]);
      std::memcpy(sp + offset, &pb, sizeof(pb));
      std::memcpy(sds + offset, &db, sizeof(db));
    }
  }
}

// acc += A B over k-step j: A the 16 x 16 fragment `af`, B rows 16j.. of a [row][d] tile in shared
// memory (K, dO or Q), read transposed.
template <class Traits, class T>
QK_DEVICE void add_step_times_rows(float (&acc)[Traits::kDimTiles][4], const std::uint32_t (&af)[4],
                                   const T* b, int j) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
#pragma unroll
  for (int d = 0; d < Traits::kDimTiles; d += 2) {
    std::uint32_t bf[4];
    ldmatrix_x4_trans(bf, b + (j * 16 + lane % 8 + lane / 8 % 2 * 8) * Traits::kRowStride + d * 8 +
                              lane / 16 * 8);
    const std::uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
    mma<T>(acc[d], af, b0);
    mma<T>(acc[d + 1], af, b1);
  }
}

// acc += dS K for this warp's 16 query rows: dS's accumulators of key tiles 2j, 2j + 1 are the
// A fragment of k-step j (rounded to T), K comes transposed from its tile.
template <class Traits, class T>
QK_DEVICE void add_scores_times_keys(float (&acc)[Traits::kDimTiles][4],
                                     const float (&ds)[Traits::kKeyTiles][4], const T* sk,
                                     int keys) {
#pragma unroll
  for (int j = 0; j < Traits::kRowSteps; ++j) {
    if (j * 16 >= keys) continue;
    const std::uint32_t af[4] = {pack_pair<T>(ds[2 * j][0], ds[2 * j][1]),
                                 pack_pair<T>(ds[2 * j][2], ds[2 * j][3]),
                                 pack_pair<T>(ds[2 * j + 1][0], ds[2 * j + 1][1]),
                                 pack_pair<T>(ds[2 * j + 1][2], ds[2 * j + 1][3])};
    add_step_times_rows<Traits>(acc, af, sk, j);
  }
}

// acc += A^T B for 16 key rows (from `key_row`) of A^T, A a [query][key] score tile in shared
// memory (P or dS), B the [query][d] tile (dO or Q), over its first `rows` query rows: dV = P^T
// dO, dK = dS^T Q.
template <class Traits, class T>
QK_DEVICE void add_scores_t_times_rows(float (&acc)[Traits::kDimTiles][4], const T* scores,
                                       int key_row, const T* b, int rows) {
  constexpr int kScore = Traits::kScoreStride;
  const int lane = static_cast<int>(threadIdx.x) % 32;
#pragma unroll
  for (int j = 0; j < Traits::kRowSteps; ++j) {
    if (j * 16 >= rows) continue;
    std::uint32_t af[4];
    // A[m = key][k = query] = scores[query][key]: transposed 8x8 loads.
    ldmatrix_x4_trans(
        af, scores + (j * 16 + lane / 16 * 8 + lane % 8) * kScore + key_row + lane / 8 % 2 * 8);
    add_step_times_rows<Traits>(acc, af, b, j);
  }
}

// Stages 16 rows of an fp32 accumulator times `factor` (rounded once to T) in `staged` (rows only
// this warp touches) and stores those of rows first_row.. below `row_end` as 16-byte vectors.
template <class Traits, class T>
QK_DEVICE void store_rows(const float (&acc)[Traits::kDimTiles][4], float factor, T* staged, T* out,
                          int first_row, int row_end, int64_t token_stride) {
  constexpr int kStride = Traits::kRowStride, kChunkElems = Traits::kChunkElems;
  const int lane = static_cast<int>(threadIdx.x) % 32, g = lane / 4, t = lane % 4;
  __syncwarp();
#pragma unroll
  for (int d = 0; d < Traits::kDimTiles; ++d) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const std::uint32_t bits = pack_pair<T>(acc[d][2 * h] * factor, acc[d][2 * h + 1] * factor);
      std::memcpy(staged + (g + 8 * h) * kStride + d * 8 + 2 * t, &bits, sizeof(bits));
    }
  }
  __syncwarp();
  constexpr int kChunks = 16 * Traits::kChunksPerRow;
#pragma unroll
  for (int c = lane; c < kChunks; c += 32) {
    const int row = c / Traits::kChunksPerRow, col = c % Traits::kChunksPerRow * kChunkElems;
    if (first_row + row < row_end) {
      store_pack<T, kChunkElems>(out + (first_row + row) * token_stride + col,
                                 load_pack<T, kChunkElems>(staged + row * kStride + col));
    }
  }
  __syncwarp();
}

// Where the gradients of the segment's first token and this head go ([T, H, D] contiguous).
template <class Traits, class T>
QK_DEVICE T* grad_rows(void* base, const WindowAttnParams& p, const Segment& seg) {
  return static_cast<T*>(base) +
         (static_cast<int64_t>(seg.start) * p.heads + seg.head) * Traits::kHeadDim;
}

// The window path: one block per (segment, head), the whole window at once.
template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads)
    window_attn_backward_kernel(const WindowAttnBackwardParams bp) {
  using T = typename Traits::Element;
  constexpr int kStride = Traits::kRowStride;
  const WindowAttnParams& p = bp.fwd;
  QK_DYNAMIC_SMEM(T, smem);
  const auto [sq, sk, sv, sdo, sp, sds, s_delta] = tiles_of<Traits>(smem);

  const Segment seg = segment_of(p);
  if (seg.len == 0) return;
  const T* const grad = head_rows<T>(bp.grad, seg, bp.grad_token_stride, bp.grad_head_stride);
  load_tile<Traits, Traits::kBlock>(sq, head_rows<T>(p.q, seg, p.q_token_stride, p.q_head_stride),
                                    p.q_token_stride, seg.len);
  load_tile<Traits, Traits::kBlock>(sk, head_rows<T>(p.k, seg, p.k_token_stride, p.k_head_stride),
                                    p.k_token_stride, seg.len);
  load_tile<Traits, Traits::kBlock>(sv, head_rows<T>(p.v, seg, p.v_token_stride, p.v_head_stride),
                                    p.v_token_stride, seg.len);
  load_tile<Traits, Traits::kBlock>(sdo, grad, bp.grad_token_stride, seg.len);
  cp_async_commit();

  const int tid = static_cast<int>(threadIdx.x);
  const int warp_row = tid / 32 * 16;
  const bool warp_active = warp_row < seg.len;
  // D = rowsum(dO O) while the tiles land: two threads per row, each half of the head dim, O read
  // from global memory (only D needs it).
  {
    const int row = tid / 2, half = tid % 2;
    const T* o =
        head_rows<T>(p.out, seg, p.out_token_stride, p.out_head_stride) + row * p.out_token_stride;
    const T* grad_row = grad + row * bp.grad_token_stride;
    float sum = 0.0f;
    for (int c = half * Traits::kHeadDim / 2;
         row < seg.len && c < (half + 1) * Traits::kHeadDim / 2; ++c) {
      sum += to_float(grad_row[c]) * to_float(o[c]);
    }
    sum += __shfl_xor_sync(kFullMask, sum, 1);
    if (half == 0) s_delta[row] = sum;
  }
  cp_async_wait_all();
  __syncthreads();

  const float scale = p.scale_log2 * static_cast<float>(1.0 / kLog2e);
  float acc[Traits::kDimTiles][4];
  if (warp_active) {
    float prob[Traits::kKeyTiles][4], ds[Traits::kKeyTiles][4];
    score_grads<Traits, Traits::kKeyTiles>(
        prob, ds, sq, sdo, sk, sv, warp_row, seg.len, seg.len,
        p.lse + static_cast<int64_t>(seg.start) * p.heads + seg.head, p.heads, s_delta, 1,
        p.scale_log2);
    stage_scores<Traits, Traits::kKeyTiles>(prob, ds, sp, sds, warp_row);
    zero(acc);
    add_scores_times_keys<Traits>(acc, ds, sk, seg.len);
  }
  __syncthreads();           // P and dS complete; K and V read for the last time
  if (!warp_active) return;  // no barrier follows
  const int64_t out_stride = static_cast<int64_t>(p.heads) * Traits::kHeadDim;
  // Staging in this warp's rows of K, which no warp reads any more.
  T* const staged = sk + warp_row * kStride;
  store_rows<Traits>(acc, scale, staged, grad_rows<Traits, T>(bp.dq, p, seg), warp_row, seg.len,
                     out_stride);
  zero(acc);
  add_scores_t_times_rows<Traits>(acc, sp, warp_row, sdo, seg.len);
  store_rows<Traits>(acc, 1.0f, staged, grad_rows<Traits, T>(bp.dv, p, seg), warp_row, seg.len,
                     out_stride);
  zero(acc);
  add_scores_t_times_rows<Traits>(acc, sds, warp_row, sq, seg.len);
  store_rows<Traits>(acc, scale, staged, grad_rows<Traits, T>(bp.dk, p, seg), warp_row, seg.len,
                     out_stride);
}

// The long path's pre-pass: D = rowsum(dO O) of every (token, head) row, fp32 [T, H]; 4 lanes
// per row, each every 4th column (so a quad reads consecutive elements).
template <class T, int kHeadDim>
__global__ void __launch_bounds__(128)
    attn_delta_kernel(const WindowAttnBackwardParams bp, float* delta) {
  const WindowAttnParams& p = bp.fwd;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x / 4;
  const int part = static_cast<int>(threadIdx.x) % 4;
  const bool valid = row < static_cast<int64_t>(p.tokens) * p.heads;
  const int64_t token = valid ? row / p.heads : 0, head = valid ? row % p.heads : 0;
  const T* o = static_cast<const T*>(p.out) + token * p.out_token_stride + head * p.out_head_stride;
  const T* grad =
      static_cast<const T*>(bp.grad) + token * bp.grad_token_stride + head * bp.grad_head_stride;
  float sum = 0.0f;
  for (int c = part; valid && c < kHeadDim; c += 4) sum += to_float(grad[c]) * to_float(o[c]);
  sum = quad_sum(sum);
  if (valid && part == 0) delta[row] = sum;
}

// The long path's dK and dV of one block of 64 keys: walks the segment's query blocks.
template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads)
    window_attn_backward_dkdv_kernel(const WindowAttnBackwardParams bp) {
  using T = typename Traits::Element;
  constexpr int kStride = Traits::kRowStride;
  const WindowAttnParams& p = bp.fwd;
  QK_DYNAMIC_SMEM(T, smem);
  const auto [sq, sk, sv, sdo, sp, sds, s_delta] = tiles_of<Traits>(smem);

  const Segment seg = segment_of(p);
  const int n0 = static_cast<int>(blockIdx.y) * Traits::kBlock;
  if (n0 >= seg.len) return;  // the whole block leaves before any barrier
  const int keys = min(seg.len - n0, Traits::kBlock);
  const T* const q = head_rows<T>(p.q, seg, p.q_token_stride, p.q_head_stride);
  const T* const grad = head_rows<T>(bp.grad, seg, bp.grad_token_stride, bp.grad_head_stride);
  const float* const lse = p.lse + static_cast<int64_t>(seg.start) * p.heads + seg.head;
  const float* const delta = bp.delta + static_cast<int64_t>(seg.start) * p.heads + seg.head;
  load_tile<Traits, Traits::kBlock>(
      sk, head_rows<T>(p.k, seg, p.k_token_stride, p.k_head_stride) + n0 * p.k_token_stride,
      p.k_token_stride, keys);
  load_tile<Traits, Traits::kBlock>(
      sv, head_rows<T>(p.v, seg, p.v_token_stride, p.v_head_stride) + n0 * p.v_token_stride,
      p.v_token_stride, keys);

  const int warp_row = static_cast<int>(threadIdx.x) / 32 * 16;
  float dk[Traits::kDimTiles][4], dv[Traits::kDimTiles][4];
  zero(dk);
  zero(dv);
  for (int m0 = 0; m0 < seg.len; m0 += Traits::kBlock) {
    const int rows = min(seg.len - m0, Traits::kBlock);
    load_tile<Traits, Traits::kBlock>(sq, q + m0 * p.q_token_stride, p.q_token_stride, rows);
    load_tile<Traits, Traits::kBlock>(sdo, grad + m0 * bp.grad_token_stride, bp.grad_token_stride,
                                      rows);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    if (warp_row < rows) {
      // Half the keys at a time: dK and dV stay live across the loop, and the scores of all 64
      // keys beside them would not fit the registers at head_dim 128. A half past the block's
      // keys is skipped: no warp reads those columns after the barrier.
      constexpr int kHalf = Traits::kKeyTiles / 2;
#pragma unroll 1
      for (int key0 = 0; key0 < Traits::kBlock && key0 < keys; key0 += 8 * kHalf) {
        float prob[kHalf][4], ds[kHalf][4];
        score_grads<Traits, kHalf>(
            prob, ds, sq, sdo, sk + key0 * kStride, sv + key0 * kStride, warp_row, rows,
            keys - key0, lse + static_cast<int64_t>(m0) * p.heads, p.heads,
            delta + static_cast<int64_t>(m0) * p.heads, p.heads, p.scale_log2);
        stage_scores<Traits, kHalf>(prob, ds, sp + key0, sds + key0, warp_row);
      }
    }
    __syncthreads();  // P and dS of every query row of the block
    if (warp_row < keys) {
      add_scores_t_times_rows<Traits>(dv, sp, warp_row, sdo, rows);
      add_scores_t_times_rows<Traits>(dk, sds, warp_row, sq, rows);
    }
    __syncthreads();  // the tiles are free for the next query block
  }
  if (warp_row >= keys) return;
  const float scale = p.scale_log2 * static_cast<float>(1.0 / kLog2e);
  const int64_t out_stride = static_cast<int64_t>(p.heads) * Traits::kHeadDim;
  T* const staged = sk + warp_row * kStride;
  store_rows<Traits>(dv, 1.0f, staged, grad_rows<Traits, T>(bp.dv, p, seg) + n0 * out_stride,
                     warp_row, keys, out_stride);
  store_rows<Traits>(dk, scale, staged, grad_rows<Traits, T>(bp.dk, p, seg) + n0 * out_stride,
                     warp_row, keys, out_stride);
}

// The long path's dQ of one block of 64 queries: walks the segment's key blocks.
template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads)
    window_attn_backward_dq_kernel(const WindowAttnBackwardParams bp) {
  using T = typename Traits::Element;
  constexpr int kStride = Traits::kRowStride;
  const WindowAttnParams& p = bp.fwd;
  QK_DYNAMIC_SMEM(T, smem);
  const auto [sq, sk, sv, sdo, sp, sds, s_delta] = tiles_of<Traits>(smem);

  const Segment seg = segment_of(p);
  const int m0 = static_cast<int>(blockIdx.y) * Traits::kBlock;
  if (m0 >= seg.len) return;
  const int rows = min(seg.len - m0, Traits::kBlock);
  const T* const k = head_rows<T>(p.k, seg, p.k_token_stride, p.k_head_stride);
  const T* const v = head_rows<T>(p.v, seg, p.v_token_stride, p.v_head_stride);
  const int64_t first = static_cast<int64_t>(seg.start + m0) * p.heads + seg.head;
  load_tile<Traits, Traits::kBlock>(
      sq, head_rows<T>(p.q, seg, p.q_token_stride, p.q_head_stride) + m0 * p.q_token_stride,
      p.q_token_stride, rows);
  load_tile<Traits, Traits::kBlock>(
      sdo,
      head_rows<T>(bp.grad, seg, bp.grad_token_stride, bp.grad_head_stride) +
          m0 * bp.grad_token_stride,
      bp.grad_token_stride, rows);

  const int warp_row = static_cast<int>(threadIdx.x) / 32 * 16;
  float dq[Traits::kDimTiles][4];
  zero(dq);
  for (int n0 = 0; n0 < seg.len; n0 += Traits::kBlock) {
    const int keys = min(seg.len - n0, Traits::kBlock);
    load_tile<Traits, Traits::kBlock>(sk, k + n0 * p.k_token_stride, p.k_token_stride, keys);
    load_tile<Traits, Traits::kBlock>(sv, v + n0 * p.v_token_stride, p.v_token_stride, keys);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    if (warp_row < rows) {
      float prob[Traits::kKeyTiles][4], ds[Traits::kKeyTiles][4];
      score_grads<Traits, Traits::kKeyTiles>(prob, ds, sq, sdo, sk, sv, warp_row, rows, keys,
                                             p.lse + first, p.heads, bp.delta + first, p.heads,
                                             p.scale_log2);
      add_scores_times_keys<Traits>(dq, ds, sk, keys);
    }
    __syncthreads();  // K and V are free for the next key block
  }
  if (warp_row >= rows) return;
  const float scale = p.scale_log2 * static_cast<float>(1.0 / kLog2e);
  const int64_t out_stride = static_cast<int64_t>(p.heads) * Traits::kHeadDim;
  store_rows<Traits>(dq, scale, sk + warp_row * kStride,
                     grad_rows<Traits, T>(bp.dq, p, seg) + m0 * out_stride, warp_row, rows,
                     out_stride);
}

// ---- fp32 -------------------------------------------------------------------------------------

// The fp32 kernels' shape: one warp per row, 4 warps per block, lanes holding columns lane,
// lane + 32, ... (kCols of them; those past the head dim hold zeros).
template <int kHeadDim_>
struct WindowAttnBackwardFmaTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kCols = (kHeadDim + 31) / 32;
};

// This lane's columns of one row of fp32 values.
template <class Traits>
QK_DEVICE void load_columns(float (&x)[Traits::kCols], const float* row) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
#pragma unroll
  for (int i = 0; i < Traits::kCols; ++i) {
    const int c = lane + 32 * i;
    x[i] = c < Traits::kHeadDim ? row[c] : 0.0f;
  }
}

template <class Traits>
QK_DEVICE void store_columns(const float (&x)[Traits::kCols], float factor, float* row) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
#pragma unroll
  for (int i = 0; i < Traits::kCols; ++i) {
    if (const int c = lane + 32 * i; c < Traits::kHeadDim) row[c] = x[i] * factor;
  }
}

// The dot product of two rows held as columns, summed over the warp (every lane gets it).
template <class Traits>
QK_DEVICE float warp_dot(const float (&a)[Traits::kCols], const float (&b)[Traits::kCols]) {
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < Traits::kCols; ++i) sum = fmaf(a[i], b[i], sum);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(kFullMask, sum, offset);
  return sum;
}

// Each warp's rows of the segment: blockIdx.y's first, then every gridDim.y-th block of rows
// (the grid's y dimension holds at most 65535 blocks).
struct WarpRows {
  int first, step;
};

QK_DEVICE WarpRows warp_rows() {
  return {static_cast<int>(blockIdx.y * blockDim.x + threadIdx.x) / 32,
          static_cast<int>(gridDim.y * blockDim.x) / 32};
}

// fp32 dQ: each warp a query row, walking the segment's keys.
template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads)
    window_attn_backward_fma_dq_kernel(const WindowAttnBackwardParams bp) {
  const WindowAttnParams& p = bp.fwd;
  const Segment seg = segment_of(p);
  const float* const q = head_rows<float>(p.q, seg, p.q_token_stride, p.q_head_stride);
  const float* const k = head_rows<float>(p.k, seg, p.k_token_stride, p.k_head_stride);
  const float* const v = head_rows<float>(p.v, seg, p.v_token_stride, p.v_head_stride);
  const float* const grad =
      head_rows<float>(bp.grad, seg, bp.grad_token_stride, bp.grad_head_stride);
  const float scale = p.scale_log2 * static_cast<float>(1.0 / kLog2e);
  for (WarpRows w = warp_rows(); w.first < seg.len; w.first += w.step) {
    const int row = w.first;
    const int64_t stat = static_cast<int64_t>(seg.start + row) * p.heads + seg.head;
    const float lse_log2 = p.lse[stat] * static_cast<float>(kLog2e), delta = bp.delta[stat];
    float q_row[Traits::kCols], grad_row[Traits::kCols], dq[Traits::kCols] = {};
    load_columns<Traits>(q_row, q + row * p.q_token_stride);
    load_columns<Traits>(grad_row, grad + row * bp.grad_token_stride);
    for (int key = 0; key < seg.len; ++key) {
      float k_row[Traits::kCols], v_row[Traits::kCols];
      load_columns<Traits>(k_row, k + key * p.k_token_stride);
      load_columns<Traits>(v_row, v + key * p.v_token_stride);
      const float prob = exp2f(fmaf(warp_dot<Traits>(q_row, k_row), p.scale_log2, -lse_log2));
      const float ds = prob * (warp_dot<Traits>(grad_row, v_row) - delta);
#pragma unroll
      for (int i = 0; i < Traits::kCols; ++i) dq[i] = fmaf(ds, k_row[i], dq[i]);
    }
    store_columns<Traits>(dq, scale, static_cast<float*>(bp.dq) + stat * Traits::kHeadDim);
  }
}

// fp32 dK and dV: each warp a key row, walking the segment's queries.
template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads)
    window_attn_backward_fma_dkdv_kernel(const WindowAttnBackwardParams bp) {
  const WindowAttnParams& p = bp.fwd;
  const Segment seg = segment_of(p);
  const float* const q = head_rows<float>(p.q, seg, p.q_token_stride, p.q_head_stride);
  const float* const k = head_rows<float>(p.k, seg, p.k_token_stride, p.k_head_stride);
  const float* const v = head_rows<float>(p.v, seg, p.v_token_stride, p.v_head_stride);
  const float* const grad =
      head_rows<float>(bp.grad, seg, bp.grad_token_stride, bp.grad_head_stride);
  const float scale = p.scale_log2 * static_cast<float>(1.0 / kLog2e);
  const int64_t first = static_cast<int64_t>(seg.start) * p.heads + seg.head;
  for (WarpRows w = warp_rows(); w.first < seg.len; w.first += w.step) {
    const int key = w.first;
    float k_row[Traits::kCols], v_row[Traits::kCols];
    float dk[Traits::kCols] = {}, dv[Traits::kCols] = {};
    load_columns<Traits>(k_row, k + key * p.k_token_stride);
    load_columns<Traits>(v_row, v + key * p.v_token_stride);
    for (int row = 0; row < seg.len; ++row) {
      const int64_t stat = first + static_cast<int64_t>(row) * p.heads;
      float q_row[Traits::kCols], grad_row[Traits::kCols];
      load_columns<Traits>(q_row, q + row * p.q_token_stride);
      load_columns<Traits>(grad_row, grad + row * bp.grad_token_stride);
      const float prob = exp2f(fmaf(warp_dot<Traits>(q_row, k_row), p.scale_log2,
                                    -p.lse[stat] * static_cast<float>(kLog2e)));
      const float ds = prob * (warp_dot<Traits>(grad_row, v_row) - bp.delta[stat]);
#pragma unroll
      for (int i = 0; i < Traits::kCols; ++i) {
        dv[i] = fmaf(prob, grad_row[i], dv[i]);
        dk[i] = fmaf(ds, q_row[i], dk[i]);
      }
    }
    const int64_t out = (first + static_cast<int64_t>(key) * p.heads) * Traits::kHeadDim;
    store_columns<Traits>(dk, scale, static_cast<float*>(bp.dk) + out);
    store_columns<Traits>(dv, 1.0f, static_cast<float*>(bp.dv) + out);
  }
}

// ---- Host side ----------------------------------------------------------------------------------

// One block per (segment, head) pair and block of `rows_per_block` rows, at most 65535 of them
// (the fp32 kernels' warps walk the rest).
template <class... P>
void launch_rows(void (*kernel)(P...), int rows_per_block, int threads, std::size_t smem_bytes,
                 const WindowAttnBackwardParams& bp, cudaStream_t stream) {
  if (smem_bytes > 48 * 1024) set_max_dynamic_smem(kernel, smem_bytes);
  const int blocks = (bp.fwd.max_seqlen + rows_per_block - 1) / rows_per_block;
  const dim3 grid(static_cast<unsigned>(bp.fwd.segments * bp.fwd.heads),
                  static_cast<unsigned>(std::min(blocks, 65535)));
  QK_LAUNCH(kernel, grid, dim3(threads), smem_bytes, stream, bp);
}

// The pre-pass of the long and fp32 paths, into `delta` (fp32 [T, H]).
template <class T, int kHeadDim>
void launch_delta(const WindowAttnBackwardParams& bp, float* delta, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(bp.fwd.tokens) * bp.fwd.heads;
  QK_LAUNCH(attn_delta_kernel<T, kHeadDim>, dim3(static_cast<unsigned>((rows + 31) / 32)),
            dim3(128), 0, stream, bp, delta);
}

template <class T, int kHeadDim>
void run(WindowAttnBackwardParams bp, at::Tensor& delta, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    using Fma = WindowAttnBackwardFmaTraits<kHeadDim>;
    launch_delta<T, kHeadDim>(bp, delta.data_ptr<float>(), stream);
    bp.delta = delta.data_ptr<float>();
    launch_rows(window_attn_backward_fma_dq_kernel<Fma>, Fma::kWarps, Fma::kThreads, 0, bp, stream);
    launch_rows(window_attn_backward_fma_dkdv_kernel<Fma>, Fma::kWarps, Fma::kThreads, 0, bp,
                stream);
  } else {
    using Traits = WindowAttnBackwardTraits<T, kHeadDim>;
    if (bp.fwd.max_seqlen <= Traits::kBlock) {
      launch_rows(window_attn_backward_kernel<Traits>, Traits::kBlock, Traits::kThreads,
                  Traits::kSmemBytes, bp, stream);
      return;
    }
    launch_delta<T, kHeadDim>(bp, delta.data_ptr<float>(), stream);
    bp.delta = delta.data_ptr<float>();
    launch_rows(window_attn_backward_dkdv_kernel<Traits>, Traits::kBlock, Traits::kThreads,
                Traits::kSmemBytes, bp, stream);
    launch_rows(window_attn_backward_dq_kernel<Traits>, Traits::kBlock, Traits::kThreads,
                Traits::kSmemBytes, bp, stream);
  }
}

template <class T>
void run_head_dim(int head_dim, const WindowAttnBackwardParams& bp, at::Tensor& delta,
                  cudaStream_t stream) {
  switch (head_dim) {
#define QK_WINDOW_ATTN_BACKWARD_CASE(D) \
  case D:                               \
    return run<T, D>(bp, delta, stream);
    QK_WINDOW_ATTN_HEAD_DIMS(QK_WINDOW_ATTN_BACKWARD_CASE)
#undef QK_WINDOW_ATTN_BACKWARD_CASE
    default:
      TORCH_CHECK(false, "qwen_kernels: window_attn_backward has no kernel for head_dim ",
                  head_dim);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> window_attn_backward(
    const at::Tensor& grad_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    const at::Tensor& cu_seqlens_in, int64_t max_seqlen, double softmax_scale) {
  check_dim(q_in, "q", 3);
  check_args(q_in, k_in, v_in, cu_seqlens_in, max_seqlen);
  for (const auto& [t, name] : {std::pair{&grad_in, "grad"}, std::pair{&out_in, "out"}}) {
    check_same_device(*t, name, q_in, "q");
    QK_CHECK_ARG(t->sizes() == q_in.sizes(), name, "q's shape ", q_in.sizes(), " (got ", t->sizes(),
                 ")");
  }
  check_dtype(grad_in, "grad", {at::kDouble, at::kFloat, at::kHalf, at::kBFloat16});
  check_dtype(out_in, "out", {q_in.scalar_type()});
  check_same_device(lse_in, "lse", q_in, "q");
  check_dtype(lse_in, "lse", {at::kFloat});
  QK_CHECK_ARG(
      lse_in.dim() == 2 && lse_in.size(0) == q_in.size(0) && lse_in.size(1) == q_in.size(1), "lse",
      "shape [T, H] = [", q_in.size(0), ", ", q_in.size(1), "] (got ", lse_in.sizes(), ")");
  at::Tensor dq = at::empty(q_in.sizes(), q_in.options());
  at::Tensor dk = at::empty(q_in.sizes(), q_in.options());
  at::Tensor dv = at::empty(q_in.sizes(), q_in.options());
  if (q_in.numel() == 0) return {dq, dk, dv};
  // dO is an operand of dP = dO V^T and dV = P^T dO, which take q's dtype: a gradient of another
  // dtype is rounded to it once (exactly where it is the narrower).
  const at::Tensor grad = with_aligned_rows(
      grad_in.scalar_type() == q_in.scalar_type() ? grad_in : grad_in.to(q_in.scalar_type()),
      "grad");
  const at::Tensor q = with_aligned_rows(q_in, "q"), k = with_aligned_rows(k_in, "k");
  const at::Tensor v = with_aligned_rows(v_in, "v"), out = with_aligned_rows(out_in, "out");
  const at::Tensor lse = lse_in.contiguous(), cu = cu_seqlens_in.contiguous();
  const bool pre_pass = q.scalar_type() == at::kFloat || max_seqlen > kKeyTile;
  at::Tensor delta = pre_pass ? at::empty({q.size(0), q.size(1)}, lse.options()) : at::Tensor();

  WindowAttnBackwardParams bp{};
  bp.fwd = attention_params(q, k, v, out, cu, max_seqlen, softmax_scale);
  bp.fwd.lse = lse.data_ptr<float>();
  bp.grad = grad.data_ptr();
  bp.grad_token_stride = grad.stride(0);
  bp.grad_head_stride = grad.stride(1);
  bp.dq = dq.data_ptr();
  bp.dk = dk.data_ptr();
  bp.dv = dv.data_ptr();
  DeviceGuard guard(q);
  QK_DISPATCH_FLOAT(q.scalar_type(), T, [&] {
    run_head_dim<T>(static_cast<int>(q.size(2)), bp, delta, current_stream(q));
  });
  return {dq, dk, dv};
}

}  // namespace qk
