// The 2x2 patch merge front of the merger (torch.ops.qwen_cuda.patch_merge).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace qk {

// RMSNorm of each token of x [T, C] (T a multiple of 4; fp32 statistics, the normalised value
// rounded to x's dtype before the weight multiply), the 4 tokens of each merge unit concatenated:
// out [M, 4C], row i from merge unit unit_index[i] (int32 or int64, values in [0, T/4)), or
// M = T/4 units in order without unit_index. weight: x's dtype or float32.
at::Tensor patch_merge(const at::Tensor& x, const at::Tensor& weight, double eps,
                       const std::optional<at::Tensor>& unit_index);

}  // namespace qk
