// The patch merge front of the merger (torch.ops.qwen_cuda.patch_merge).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace qk {

// RMSNorm of each token of x [T, C] (T a multiple of U = merge_size^2; fp32 statistics, the
// normalised value rounded to x's dtype before the weight multiply), the U tokens of each merge
// unit concatenated: out [M, U*C], row i from merge unit unit_index[i] (int32 or int64, values in
// [0, T/U)), or M = T/U units in order without unit_index. weight: x's dtype or float32.
at::Tensor patch_merge(const at::Tensor& x, const at::Tensor& weight, double eps,
                       const std::optional<at::Tensor>& unit_index, int64_t merge_size);

}  // namespace qk
