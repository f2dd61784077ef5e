// The arguments of one window_attn launch, shared by every kernel variant (the role of
// FlashAttention's Flash_fwd_params): plain pointers and element strides, so q, k and v may be
// views into one packed [T, 3, H, D] buffer.
#pragma once

#include <cstdint>

namespace qk {

// The kernels exponentiate with exp2: scores are scaled by softmax_scale * log2(e).
constexpr double kLog2e = 1.4426950408889634;

// Position axes of the rotary-fused form (M-RoPE uses 3, the vision tower 2).
constexpr int kMaxRopeAxes = 4;

struct WindowAttnParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  // window_attn_forward only: each row's natural log-sum-exp, fp32 [T, H] contiguous; else null.
  float* lse;
  // Element strides between consecutive tokens and heads; the head dim is contiguous.
  int64_t q_token_stride, q_head_stride;
  int64_t k_token_stride, k_head_stride;
  int64_t v_token_stride, v_head_stride;
  int64_t out_token_stride, out_head_stride;
  // Segment s is tokens [cu_seqlens[s], cu_seqlens[s+1]) (int32, on the device).
  const int* cu_seqlens;
  int tokens;        // T: segment bounds are clamped to it, so bad values never read out of bounds
  int segments;      // S
  int heads;         // H
  int max_seqlen;    // segments are cut to this length (the launch covers no more rows)
  float scale_log2;  // softmax_scale * log2(e): the kernels exponentiate with exp2

  // window_attn_rope only: q and k are rotated (rotate-half) once staged in shared memory. The
  // angle of frequency i < D/2 of token t is positions[axis * T + t] * inv_freq[i] in fp32,
  // axis the first with i < rope_section_end[axis] (mrope_section, accumulated).
  const int* positions;   // int32 [A, T], contiguous
  const float* inv_freq;  // fp32 [D/2]
  int rope_axes;          // A
  int rope_section_end[kMaxRopeAxes];
};

}  // namespace qk
