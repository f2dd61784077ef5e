// Variable-length attention inside segments (torch.ops.qwen_cuda.window_attn).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>

namespace qk {

// Non-causal softmax(q k^T * scale) v inside each segment [cu_seqlens[s], cu_seqlens[s+1]) of the
// packed tokens. q, k, v: [T, H, D] of one dtype (fp16, bf16: tensor cores with fp32
// accumulation; fp32: fp32 FMA), any strides with a unit last one (views of a packed [T, 3, H, D]
// buffer need no copy); D = 64, 80 or 128. cu_seqlens: int32 [S+1]; max_seqlen bounds every
// segment (<= 64 picks the one-tile window path). softmax_scale defaults to D^-0.5. Returns a
// contiguous [T, H, D] in q's dtype.
at::Tensor window_attn(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& cu_seqlens, int64_t max_seqlen,
                       std::optional<double> softmax_scale);

// window_attn on the q, k, v of a packed qkv [T, 3, H, D], with q and k rotated (rotate-half
// M-RoPE, as mrope_pos: the angle of frequency i of token t is positions[axis(i), t] *
// inv_freq[i] in fp32, mrope_section giving each axis's band of frequencies) while staged in
// shared memory: rotary and attention read qkv once. positions: int32/int64 [A, T]; inv_freq:
// [D/2]; the rotated q and k are rounded to qkv's dtype, as mrope_pos stores them.
at::Tensor window_attn_rope(const at::Tensor& qkv, const at::Tensor& cu_seqlens, int64_t max_seqlen,
                            const at::Tensor& positions, const at::Tensor& inv_freq,
                            c10::IntArrayRef mrope_section, std::optional<double> softmax_scale);

}  // namespace qk
