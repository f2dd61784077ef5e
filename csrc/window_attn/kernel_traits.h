// Compile-time shape of the window_attn kernels (the role of FlashAttention's kernel_traits.h).
// Every variant is listed once in variants.h.
#pragma once

#include <cstddef>

namespace qk {

// Segments up to one key tile run the window path; longer ones the long path.
constexpr int kKeyTile = 64;

// Tensor-core window path (fp16, bf16; max_seqlen <= kKeyTile): a block of 4 warps takes 64
// query rows, each warp 16 (the m of mma.m16n8k16), against the one key tile that holds every
// key of a window, with a single-pass softmax. QK^T is head_dim/16 k-steps x 8 key tiles per
// warp; PV is 4 k-steps x head_dim/8 value tiles; head_dim 80 runs as 5 k-steps of 16,
// unpadded. kRope rotates q and k in shared memory as they land (window_attn_rope).
template <class T, int kHeadDim_, bool kRope_>
struct WindowAttnTraits {
  using Element = T;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr bool kRope = kRope_;
  static constexpr int kBlockM = 64;        // query rows per block
  static constexpr int kBlockN = kKeyTile;  // keys
  static constexpr int kWarps = kBlockM / 16;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kQkSteps = kHeadDim / 16;  // k-steps of QK^T
  static constexpr int kKeyTiles = kBlockN / 8;   // n-tiles of S per warp
  static constexpr int kPvSteps = kBlockN / 16;   // k-steps of PV
  static constexpr int kDimTiles = kHeadDim / 8;  // n-tiles of O per warp
  // Shared-memory rows padded by 16 bytes: the 8 row addresses of an ldmatrix then fall in
  // distinct bank groups for head_dim 64, 80 and 128.
  static constexpr int kRowStride = kHeadDim + 8;
  static constexpr int kChunkElems = 16 / sizeof(T);  // elements per 16-byte copy
  static constexpr int kChunksPerRow = kHeadDim / kChunkElems;
  static constexpr int kTileElems = kBlockM * kRowStride;
  // Q, K, V.
  static constexpr std::size_t kSmemBytes = 3 * kTileElems * sizeof(T);

  static_assert(kHeadDim % 16 == 0 && kDimTiles % 2 == 0, "head_dim must be a multiple of 16");
  static_assert(kBlockM == kBlockN, "Q, K and V tiles have one size (kTileElems)");
};

// Tensor-core long path (fp16, bf16; max_seqlen > kKeyTile), the shape of FlashAttention-2's
// forward: a block of 4 warps takes 128 query rows, each warp 32 as two m-tiles, so every K and
// V fragment read from shared memory feeds two mma (head_dim 128 keeps one m-tile: two would
// not fit their accumulators in 255 registers); an online softmax over key tiles of 64, with
// the next K and V tiles in flight through cp.async in the other of two stages. q and k come
// rotated beforehand for window_attn_rope (rotating every key tile in every query block would
// form each angle seqlen / 128 times).
template <class T, int kHeadDim_>
struct WindowAttnLongTraits {
  using Element = T;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kMTiles = kHeadDim >= 128 ? 1 : 2;  // m-tiles of 16 query rows per warp
  static constexpr int kBlockM = 16 * kMTiles * kWarps;
  static constexpr int kBlockN = kKeyTile;
  static constexpr int kQkSteps = kHeadDim / 16;
  static constexpr int kKeyTiles = kBlockN / 8;
  static constexpr int kPvSteps = kBlockN / 16;
  static constexpr int kDimTiles = kHeadDim / 8;
  static constexpr int kRowStride = kHeadDim + 8;
  static constexpr int kChunkElems = 16 / sizeof(T);
  static constexpr int kChunksPerRow = kHeadDim / kChunkElems;
  // The 16-byte copies each thread issues per K or V tile: fixed offsets, computed once.
  static constexpr int kKvCopies = kBlockN * kChunksPerRow / kThreads;
  static constexpr int kQTileElems = kBlockM * kRowStride;
  static constexpr int kKvTileElems = kBlockN * kRowStride;
  // Q, then 2 stages of K, then 2 of V.
  static constexpr std::size_t kSmemBytes = (kQTileElems + 4 * kKvTileElems) * sizeof(T);

  static_assert(kHeadDim % 16 == 0 && kDimTiles % 2 == 0, "head_dim must be a multiple of 16");
  static_assert(kBlockN * kChunksPerRow % kThreads == 0, "every thread copies the same count");
};

// fp32 variants: computed in fp32 with FMA, never rounded to 16 bits (tensor cores would take
// tf32 or 16-bit inputs). 2 threads per query row (4 for head_dim 128), each holding a slice of
// the head dim, so q and the accumulators fit in registers without spills, over 64-key tiles: a
// first pass writes the scaled scores to shared memory and finds the tile max, a second rescales
// once and accumulates p * v. Simple rather than fast: the model runs in bf16.
template <int kHeadDim_, bool kRope_>
struct WindowAttnFmaTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr bool kRope = kRope_;
  static constexpr int kBlockM = 64;  // query rows per block
  // Keys per tile: 32 for head_dim 128 keeps the shared memory (74 KiB) within the 99 KiB of
  // the sm_86/sm_89 GPUs that run the build's PTX.
  static constexpr int kBlockN = kHeadDim >= 128 ? 32 : 64;
  static constexpr int kThreadsPerRow = kHeadDim >= 128 ? 4 : 2;
  static constexpr int kThreads = kThreadsPerRow * kBlockM;
  static constexpr int kColsPerThread = kHeadDim / kThreadsPerRow;
  static constexpr int kRowStride = kHeadDim + 4;   // floats; rows stay 16-byte aligned
  static constexpr int kScoreStride = kBlockN + 1;  // one row per query row, conflict-free
  static constexpr int kChunksPerRow = kHeadDim / 4;
  static constexpr int kTileElems = kBlockM * kRowStride;    // Q
  static constexpr int kKvTileElems = kBlockN * kRowStride;  // K or V
  // Q, K, V, then the scores.
  static constexpr std::size_t kSmemBytes =
      (kTileElems + 2 * kKvTileElems + kBlockM * kScoreStride) * sizeof(float);

  static_assert(kColsPerThread % 4 == 0, "each slice moves as 16-byte chunks");
};

}  // namespace qk
