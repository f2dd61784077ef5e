// Host-side argument checks and layout fixes shared by the window_attn launchers, forward and
// backward.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "window_attn/params.h"

namespace qk {

// t itself, or a contiguous copy where its layout rules out the kernels' 16-byte row copies (a
// unit last stride, an aligned base and token and head strides, a token stride that the long
// path's 32-bit tile offsets hold). The copy costs a read and a write of t and its memory for the
// call, so it is not silent: the first one warns.
at::Tensor with_aligned_rows(const at::Tensor& t, const char* name);

// The checks memory safety needs (the op layer checks the rest, with the same messages, before it
// calls here): the kernels index by these shapes, dtypes, head dims and 32-bit counts. q is 3-D
// here: window_attn checks it, window_attn_rope selects it from a checked qkv.
void check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& cu_seqlens, int64_t max_seqlen);

// The fields every launch sets: the pointers and strides of q, k, v and out, the segments, the
// scale; lse (null here) and the rotary fields are the caller's.
WindowAttnParams attention_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& out, const at::Tensor& cu_seqlens,
                                  int64_t max_seqlen, double softmax_scale);

}  // namespace qk
