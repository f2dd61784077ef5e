// SwiGLU on packed gate/up and its backward (torch.ops.qwen_cuda.swiglu / swiglu_backward).
#pragma once

#include <ATen/core/Tensor.h>

namespace qk {

// silu(gate) * up with [gate | up] = gate_up along the last dim (of even size 2I); fp32 math,
// one rounding. Returns [..., I] contiguous in gate_up's dtype.
at::Tensor swiglu(const at::Tensor& gate_up);

// The gradient of swiglu(gate_up) for the output gradient `grad` ([..., I], any of the three
// float dtypes): [grad_gate | grad_up], [..., 2I] contiguous in gate_up's dtype; fp32 math with
// the sigmoid recomputed, one rounding per element.
at::Tensor swiglu_backward(const at::Tensor& grad, const at::Tensor& gate_up);

}  // namespace qk
