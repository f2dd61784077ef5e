// Multimodal rotary embedding (torch.ops.qwen_cuda.mrope / mrope_ / mrope_pos / mrope_pos_).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/OptionalArrayRef.h>

#include <tuple>

namespace qk {

// Rotate-half rotary of q [..., S, H, D] and k [..., S, H_k, D] (any strides) by cos/sin tables:
// composed [..., S, D], or per axis [A, ..., S, D] with mrope_section (A band sizes summing to
// D/2; band j of each half comes from axis j). Returns new contiguous tensors.
std::tuple<at::Tensor, at::Tensor> mrope(const at::Tensor& q, const at::Tensor& k,
                                         const at::Tensor& cos, const at::Tensor& sin,
                                         at::OptionalIntArrayRef mrope_section);

// mrope rotating q and k where they lie.
void mrope_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
            at::OptionalIntArrayRef mrope_section);

// The same rotation with angle i = float(positions[axis(i), ..., s]) * inv_freq[i], formed in fp32
// registers: positions int32/int64 [A, ..., S], inv_freq [D/2].
std::tuple<at::Tensor, at::Tensor> mrope_pos(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& positions,
                                             const at::Tensor& inv_freq,
                                             at::IntArrayRef mrope_section);

// mrope_pos rotating q and k where they lie.
void mrope_pos_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                const at::Tensor& inv_freq, at::IntArrayRef mrope_section);

}  // namespace qk
