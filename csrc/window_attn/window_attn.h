// Variable-length attention inside segments (torch.ops.qwen_cuda.window_attn and its rotary and
// training forms).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <tuple>
#include <vector>

namespace qk {

// Non-causal softmax(q k^T * scale) v inside each segment [cu_seqlens[s], cu_seqlens[s+1]) of the
// packed tokens. q, k, v: [T, H, D] of one dtype (fp16, bf16: tensor cores with fp32
// accumulation; fp32: fp32 FMA), any strides with a unit last one (views of a packed [T, 3, H, D]
// buffer need no copy); D one of window_attn_head_dims(). cu_seqlens: int32 [S+1]; max_seqlen
// bounds every segment (<= 64 picks the one-tile window path). softmax_scale comes resolved from
// the op layer (its default D^-0.5 is computed there, once). Returns a contiguous [T, H, D] in
// q's dtype.
at::Tensor window_attn(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& cu_seqlens, int64_t max_seqlen, double softmax_scale);

// window_attn on the q, k, v of a packed qkv [T, 3, H, D], with q and k rotated (rotate-half
// M-RoPE, as mrope_pos: the angle of frequency i of token t is positions[axis(i), t] *
// inv_freq[i] in fp32, mrope_section giving each axis's band of frequencies). For max_seqlen up
// to one key tile (64) they are rotated while staged in shared memory, so rotary and attention
// read qkv once; longer segments are rotated once by mrope_pos before the plain long path.
// positions: int32/int64 [A, T]; inv_freq: [D/2]; the rotated q and k are rounded to qkv's
// dtype, as mrope_pos stores them.
at::Tensor window_attn_rope(const at::Tensor& qkv, const at::Tensor& cu_seqlens, int64_t max_seqlen,
                            const at::Tensor& positions, const at::Tensor& inv_freq,
                            c10::IntArrayRef mrope_section, double softmax_scale);

// window_attn and each row's natural log-sum-exp (fp32 [T, H]): the training forward, whose
// lse the backward recomputes P from.
std::tuple<at::Tensor, at::Tensor> window_attn_forward(const at::Tensor& q, const at::Tensor& k,
                                                       const at::Tensor& v,
                                                       const at::Tensor& cu_seqlens,
                                                       int64_t max_seqlen, double softmax_scale);

// window_attn_rope and each row's log-sum-exp of the rotated q and k (fp32 [T, H]).
std::tuple<at::Tensor, at::Tensor> window_attn_rope_forward(
    const at::Tensor& qkv, const at::Tensor& cu_seqlens, int64_t max_seqlen,
    const at::Tensor& positions, const at::Tensor& inv_freq, c10::IntArrayRef mrope_section,
    double softmax_scale);

// The gradients (dq, dk, dv) of window_attn for the output gradient `grad` (any float dtype; one
// of another dtype than q is rounded to q's once), from the forward's output and log-sum-exp
// (window_attn_forward): contiguous [T, H, D] in q's dtype, every layout window_attn takes.
std::tuple<at::Tensor, at::Tensor, at::Tensor> window_attn_backward(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens, int64_t max_seqlen,
    double softmax_scale);

// The head dims the kernels are instantiated for (variants.h): the op layer reads them through
// torch.ops.<library>.window_attn_head_dims() instead of restating them.
std::vector<int64_t> window_attn_head_dims();

}  // namespace qk
