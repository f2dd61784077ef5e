// window_attn's backward, window path (fp16/bf16, max_seqlen <= 64): one block holds a whole
// (segment, head) window, so dQ, dK and dV need no atomics. From the saved log-sum-exp each warp
// recomputes S = Q K^T and P for its 16 query rows, dP = dO V^T and dS = P (dP - D) with
// D = rowsum(dO O), and dQ = scale dS K from registers; P and dS (rounded to the input dtype, as
// the forward rounds P) go through shared memory, so that each warp then forms dV = P^T dO and
// dK = scale dS^T Q for its 16 key rows. head_dim 80 runs as 5 k-steps of 16, unpadded.
#include <ATen/ops/empty.h>

#include "common/dispatch.h"
#include "common/kernel.h"
#include "common/numeric.h"
#include "common/torch_utils.h"
#include "window_attn/kernel_traits.h"
#include "window_attn/params.h"
#include "window_attn/tiles.h"
#include "window_attn/variants.h"
#include "window_attn/window_attn.h"

namespace qk {
namespace {

// The forward's arguments (q, k, v, out = O, lse, segments, scale) and the gradients'.
struct WindowAttnBackwardParams {
  WindowAttnParams fwd;
  const void* grad;  // dO
  int64_t grad_token_stride, grad_head_stride;
  void* dq;  // [T, H, D] contiguous, as are dk and dv
  void* dk;
  void* dv;
};

template <class T, int kHeadDim_>
struct WindowAttnBackwardTraits {
  using Element = T;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlock = kKeyTile;  // queries = keys = the window
  static constexpr int kWarps = kBlock / 16;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kQkSteps = kHeadDim / 16;
  static constexpr int kKeyTiles = kBlock / 8;
  static constexpr int kRowSteps = kBlock / 16;  // k-steps over the window's rows
  static constexpr int kDimTiles = kHeadDim / 8;
  static constexpr int kRowStride = kHeadDim + 8;
  static constexpr int kScoreStride = kBlock + 8;  // P and dS rows, padded like the others
  static constexpr int kChunkElems = 16 / sizeof(T);
  static constexpr int kChunksPerRow = kHeadDim / kChunkElems;
  static constexpr int kTileElems = kBlock * kRowStride;
  static constexpr int kScoreElems = kBlock * kScoreStride;
  // Q, K, V, dO, then P and dS, then D (fp32).
  static constexpr std::size_t kSmemBytes =
      (4 * kTileElems + 2 * kScoreElems) * sizeof(T) + kBlock * sizeof(float);
};

// Stages 16 rows of an fp32 accumulator times `factor` (rounded once to T) in `staged` (rows only
// this warp touches) and stores those of rows first_row.. inside the segment as 16-byte vectors.
template <class Traits, class T>
QK_DEVICE void store_rows(const float (&acc)[Traits::kDimTiles][4], float factor, T* staged, T* out,
                          int first_row, int seg_len, int64_t token_stride) {
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
    if (first_row + row < seg_len) {
      store_pack<T, kChunkElems>(out + (first_row + row) * token_stride + col,
                                 load_pack<T, kChunkElems>(staged + row * kStride + col));
    }
  }
  __syncwarp();
}

// acc[n] += A B^T over head_dim for 16 rows of `a` (from row `a_row`) against the 64 rows of `b`
// (8 key tiles of 8): S = Q K^T, dP = dO V^T.
template <class Traits, class T>
QK_DEVICE void rows_times_rows(float (&acc)[Traits::kKeyTiles][4], const T* a, int a_row,
                               const T* b, int keys) {
  constexpr int kStride = Traits::kRowStride;
  const int lane = static_cast<int>(threadIdx.x) % 32;
#pragma unroll
  for (int n = 0; n < Traits::kKeyTiles; ++n) {
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[n][r] = 0.0f;
  }
#pragma unroll
  for (int ks = 0; ks < Traits::kQkSteps; ++ks) {
    std::uint32_t af[4];
    ldmatrix_x4(af, a + (a_row + lane % 8 + lane / 8 % 2 * 8) * kStride + ks * 16 + lane / 16 * 8);
#pragma unroll
    for (int n = 0; n < Traits::kKeyTiles; n += 2) {
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

// acc += A^T B for 16 key rows (from `key_row`) of A^T, A a [query][key] score tile in shared
// memory (P or dS), B the [query][d] tile (dO or Q): dV = P^T dO, dK = dS^T Q.
template <class Traits, class T>
QK_DEVICE void scores_t_times_rows(float (&acc)[Traits::kDimTiles][4], const T* scores, int key_row,
                                   const T* b, int rows) {
  constexpr int kStride = Traits::kRowStride, kScore = Traits::kScoreStride;
  const int lane = static_cast<int>(threadIdx.x) % 32;
#pragma unroll
  for (int d = 0; d < Traits::kDimTiles; ++d) {
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[d][r] = 0.0f;
  }
#pragma unroll
  for (int j = 0; j < Traits::kRowSteps; ++j) {
    if (j * 16 >= rows) continue;
    std::uint32_t af[4];
    // A[m = key][k = query] = scores[query][key]: transposed 8x8 loads.
    ldmatrix_x4_trans(
        af, scores + (j * 16 + lane / 16 * 8 + lane % 8) * kScore + key_row + lane / 8 % 2 * 8);
#pragma unroll
    for (int d = 0; d < Traits::kDimTiles; d += 2) {
      std::uint32_t bf[4];
      ldmatrix_x4_trans(
          bf, b + (j * 16 + lane % 8 + lane / 8 % 2 * 8) * kStride + d * 8 + lane / 16 * 8);
      const std::uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
      mma<T>(acc[d], af, b0);
      mma<T>(acc[d + 1], af, b1);
    }
  }
}

template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads)
    window_attn_backward_kernel(const WindowAttnBackwardParams bp) {
  using T = typename Traits::Element;
  constexpr int kStride = Traits::kRowStride, kTile = Traits::kTileElems;
  constexpr int kScore = Traits::kScoreStride;
  const WindowAttnParams& p = bp.fwd;
  QK_DYNAMIC_SMEM(T, smem);
  T* const sq = smem;
  T* const sk = sq + kTile;
  T* const sv = sk + kTile;
  T* const sdo = sv + kTile;
  T* const sp = sdo + kTile;
  T* const sds = sp + Traits::kScoreElems;
  float* const s_delta = reinterpret_cast<float*>(sds + Traits::kScoreElems);

  const Segment seg = segment_of(p);
  if (seg.len == 0) return;
  auto at = [&](const void* base, int64_t token_stride, int64_t head_stride) {
    return static_cast<const T*>(base) + seg.start * token_stride + seg.head * head_stride;
  };
  load_tile<Traits, Traits::kBlock>(sq, at(p.q, p.q_token_stride, p.q_head_stride),
                                    p.q_token_stride, seg.len);
  load_tile<Traits, Traits::kBlock>(sk, at(p.k, p.k_token_stride, p.k_head_stride),
                                    p.k_token_stride, seg.len);
  load_tile<Traits, Traits::kBlock>(sv, at(p.v, p.v_token_stride, p.v_head_stride),
                                    p.v_token_stride, seg.len);
  load_tile<Traits, Traits::kBlock>(sdo, at(bp.grad, bp.grad_token_stride, bp.grad_head_stride),
                                    bp.grad_token_stride, seg.len);
  cp_async_commit();

  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int warp_row = warp * 16;
  const bool warp_active = warp_row < seg.len;
  // D = rowsum(dO O): two threads per row, each half of the head dim, O read from global memory.
  {
    const int row = tid / 2, half = tid % 2;
    const T* o = at(p.out, p.out_token_stride, p.out_head_stride) + row * p.out_token_stride;
    const T* grad =
        at(bp.grad, bp.grad_token_stride, bp.grad_head_stride) + row * bp.grad_token_stride;
    float sum = 0.0f;
    for (int c = half * Traits::kHeadDim / 2;
         row < seg.len && c < (half + 1) * Traits::kHeadDim / 2; ++c) {
      sum += to_float(grad[c]) * to_float(o[c]);
    }
    sum += __shfl_xor_sync(kFullMask, sum, 1);
    if (half == 0) s_delta[row] = sum;
  }
  cp_async_wait_all();
  __syncthreads();

  const float scale = p.scale_log2 * static_cast<float>(1.0 / kLog2e);
  float ds[Traits::kKeyTiles][4];
  if (warp_active) {
    float s[Traits::kKeyTiles][4];
    rows_times_rows<Traits>(s, sq, warp_row, sk, seg.len);
    float dp[Traits::kKeyTiles][4];
    rows_times_rows<Traits>(dp, sdo, warp_row, sv, seg.len);
    float lse_log2[2], delta[2];
    bool row_valid[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = warp_row + g + 8 * h;
      row_valid[h] = row < seg.len;
      lse_log2[h] = row_valid[h]
                        ? p.lse[static_cast<int64_t>(seg.start + row) * p.heads + seg.head] *
                              static_cast<float>(kLog2e)
                        : 0.0f;
      delta[h] = row_valid[h] ? s_delta[row] : 0.0f;
    }
#pragma unroll
    for (int n = 0; n < Traits::kKeyTiles; ++n) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int h = r / 2, key = n * 8 + 2 * t + r % 2;
        const float prob =
            row_valid[h] && key < seg.len ? exp2f(fmaf(s[n][r], p.scale_log2, -lse_log2[h])) : 0.0f;
        s[n][r] = prob;
        ds[n][r] = prob * (dp[n][r] - delta[h]);
      }
    }
    // P and dS of this warp's rows, rounded to T, for the key-row products after the barrier.
#pragma unroll
    for (int n = 0; n < Traits::kKeyTiles; ++n) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int offset = (warp_row + g + 8 * h) * kScore + n * 8 + 2 * t;
        const std::uint32_t pb = pack_pair<T>(s[n][2 * h], s[n][2 * h + 1]);
        const std::uint32_t db = pack_pair<T>(ds[n][2 * h], ds[n][2 * h + 1]);
        std::memcpy(sp + offset, &pb, sizeof(pb));
        std::memcpy(sds + offset, &db, sizeof(db));
      }
    }
  }
  float acc[Traits::kDimTiles][4];
  if (warp_active) {
    // dQ = scale dS K: dS's accumulators of key tiles 2j, 2j + 1 are the A fragment of k-step j.
#pragma unroll
    for (int d = 0; d < Traits::kDimTiles; ++d) {
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[d][r] = 0.0f;
    }
#pragma unroll
    for (int j = 0; j < Traits::kRowSteps; ++j) {
      if (j * 16 >= seg.len) continue;
      const std::uint32_t af[4] = {pack_pair<T>(ds[2 * j][0], ds[2 * j][1]),
                                   pack_pair<T>(ds[2 * j][2], ds[2 * j][3]),
                                   pack_pair<T>(ds[2 * j + 1][0], ds[2 * j + 1][1]),
                                   pack_pair<T>(ds[2 * j + 1][2], ds[2 * j + 1][3])};
#pragma unroll
      for (int d = 0; d < Traits::kDimTiles; d += 2) {
        std::uint32_t bf[4];
        ldmatrix_x4_trans(
            bf, sk + (j * 16 + lane % 8 + lane / 8 % 2 * 8) * kStride + d * 8 + lane / 16 * 8);
        const std::uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
        mma<T>(acc[d], af, b0);
        mma<T>(acc[d + 1], af, b1);
      }
    }
  }
  __syncthreads();           // P and dS complete; K and V read for the last time
  if (!warp_active) return;  // no barrier follows
  const int64_t out_row = static_cast<int64_t>(seg.start) * p.heads + seg.head;
  const int64_t out_stride = static_cast<int64_t>(p.heads) * Traits::kHeadDim;
  T* const dq = static_cast<T*>(bp.dq) + out_row * Traits::kHeadDim;
  T* const dk = static_cast<T*>(bp.dk) + out_row * Traits::kHeadDim;
  T* const dv = static_cast<T*>(bp.dv) + out_row * Traits::kHeadDim;
  // Staging in this warp's rows of K, which no warp reads any more.
  T* const staged = sk + warp_row * kStride;
  store_rows<Traits>(acc, scale, staged, dq, warp_row, seg.len, out_stride);
  scores_t_times_rows<Traits>(acc, sp, warp_row, sdo, seg.len);
  store_rows<Traits>(acc, 1.0f, staged, dv, warp_row, seg.len, out_stride);
  scores_t_times_rows<Traits>(acc, sds, warp_row, sq, seg.len);
  store_rows<Traits>(acc, scale, staged, dk, warp_row, seg.len, out_stride);
}

template <class T, int kHeadDim>
void run(const WindowAttnBackwardParams& bp, cudaStream_t stream) {
  using Traits = WindowAttnBackwardTraits<T, kHeadDim>;
  auto* kernel = window_attn_backward_kernel<Traits>;
  if (Traits::kSmemBytes > 48 * 1024) set_max_dynamic_smem(kernel, Traits::kSmemBytes);
  const dim3 grid(static_cast<unsigned>(bp.fwd.segments * bp.fwd.heads));
  QK_LAUNCH(kernel, grid, dim3(Traits::kThreads), Traits::kSmemBytes, stream, bp);
}

template <class T>
void run_head_dim(int head_dim, const WindowAttnBackwardParams& bp, cudaStream_t stream) {
  switch (head_dim) {
#define QK_WINDOW_ATTN_BACKWARD_CASE(D) \
  case D:                               \
    return run<T, D>(bp, stream);
    QK_WINDOW_ATTN_HEAD_DIMS(QK_WINDOW_ATTN_BACKWARD_CASE)
#undef QK_WINDOW_ATTN_BACKWARD_CASE
    default:
      TORCH_CHECK_VALUE(false, "qwen_kernels: no window_attn backward for head_dim ", head_dim);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> window_attn_backward(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens, int64_t max_seqlen,
    double softmax_scale) {
  check_device(q, "q");
  check_dim(q, "q", 3);
  check_dtype(q, "q", {at::kHalf, at::kBFloat16});
  QK_CHECK_ARG(max_seqlen >= 1 && max_seqlen <= kKeyTile, "max_seqlen", "segments of at most ",
               kKeyTile, " tokens for this kernel (got ", max_seqlen, ")");
  for (const auto& [t, name] :
       {std::pair{&k, "k"}, std::pair{&v, "v"}, std::pair{&grad, "grad"}, std::pair{&out, "out"}}) {
    check_same_device(*t, name, q, "q");
    check_dtype(*t, name, {q.scalar_type()});
    QK_CHECK_ARG(t->sizes() == q.sizes(), name, "q's shape ", q.sizes(), " (got ", t->sizes(), ")");
    QK_CHECK_ARG(t->stride(2) == 1, name, "a unit last stride (got ", t->strides(), ")");
  }
  check_same_device(lse, "lse", q, "q");
  check_dtype(lse, "lse", {at::kFloat});
  check_contiguous(lse, "lse");
  check_dtype(cu_seqlens, "cu_seqlens", {at::kInt});
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(q.sizes(), q.options());
  at::Tensor dv = at::empty(q.sizes(), q.options());
  if (q.numel() == 0) return {dq, dk, dv};
  const at::Tensor cu = cu_seqlens.contiguous();
  WindowAttnBackwardParams bp{};
  WindowAttnParams& p = bp.fwd;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.q_token_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  p.k_token_stride = k.stride(0);
  p.k_head_stride = k.stride(1);
  p.v_token_stride = v.stride(0);
  p.v_head_stride = v.stride(1);
  p.out_token_stride = out.stride(0);
  p.out_head_stride = out.stride(1);
  p.cu_seqlens = cu.data_ptr<int>();
  p.tokens = static_cast<int>(q.size(0));
  p.segments = static_cast<int>(cu.size(0) - 1);
  p.heads = static_cast<int>(q.size(1));
  p.max_seqlen = static_cast<int>(max_seqlen);
  p.scale_log2 = static_cast<float>(softmax_scale * kLog2e);
  bp.grad = grad.data_ptr();
  bp.grad_token_stride = grad.stride(0);
  bp.grad_head_stride = grad.stride(1);
  bp.dq = dq.data_ptr();
  bp.dk = dk.data_ptr();
  bp.dv = dv.data_ptr();
  DeviceGuard guard(q);
  if (q.scalar_type() == at::kHalf) {
    run_head_dim<__half>(static_cast<int>(q.size(2)), bp, current_stream(q));
  } else {
    run_head_dim<__nv_bfloat16>(static_cast<int>(q.size(2)), bp, current_stream(q));
  }
  return {dq, dk, dv};
}

}  // namespace qk
