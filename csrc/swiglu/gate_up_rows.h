// The launchers' view of a gate_up argument, shared by swiglu and its backward.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "common/torch_utils.h"

namespace qk {

constexpr int kSwigluThreads = 256;

// gate_up is a float tensor [..., 2I] on this build's device.
inline void check_gate_up(const at::Tensor& gate_up) {
  check_device(gate_up, "gate_up");
  check_dtype(gate_up, "gate_up", {at::kFloat, at::kHalf, at::kBFloat16});
  QK_CHECK_ARG(gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0, "gate_up",
               "an even last dimension [..., 2I] (got shape ", gate_up.sizes(), ")");
}

// A non-empty gate_up as rows [N, 2I] with a unit column stride (copied otherwise).
inline at::Tensor gate_up_rows(const at::Tensor& gate_up) {
  at::Tensor rows = as_rows(gate_up);
  QK_CHECK_ARG(rows.size(1) / 2 <= INT32_MAX && rows.size(0) <= INT32_MAX, "gate_up",
               "fewer than 2^31 rows and columns (got shape ", gate_up.sizes(), ")");
  return rows;
}

// The shape of swiglu's output for gate_up: [..., I].
inline std::vector<int64_t> swiglu_shape(const at::Tensor& gate_up) {
  std::vector<int64_t> shape(gate_up.sizes().begin(), gate_up.sizes().end());
  shape.back() /= 2;
  return shape;
}

}  // namespace qk
