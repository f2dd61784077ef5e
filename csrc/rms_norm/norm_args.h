// The argument checks the RMSNorm launchers share (forward and backward).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "common/torch_utils.h"

namespace qk {

// x: a float tensor with a non-empty last dim (rows shorter than 2^31) on this build's device;
// weight: [x.shape[-1]] in x's dtype or fp32, on x's device.
inline void check_norm_args(const at::Tensor& x, const at::Tensor& weight) {
  check_device(x, "x");
  check_dtype(x, "x", {at::kFloat, at::kHalf, at::kBFloat16});
  QK_CHECK_ARG(x.dim() >= 1 && x.size(-1) > 0, "x",
               "at least 1 dimension and a non-empty last one (got shape ", x.sizes(), ")");
  QK_CHECK_ARG(x.size(-1) <= INT32_MAX, "x", "rows shorter than 2^31 (got ", x.size(-1), ")");
  check_same_device(weight, "weight", x, "x");
  check_dtype(weight, "weight", {x.scalar_type(), at::kFloat});
  QK_CHECK_ARG(weight.dim() == 1 && weight.size(0) == x.size(-1), "weight",
               "shape [x.shape[-1]] = [", x.size(-1), "] (got ", weight.sizes(), ")");
}

}  // namespace qk
