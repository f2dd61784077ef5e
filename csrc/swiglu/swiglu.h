// SwiGLU on packed gate/up (torch.ops.qwen_cuda.swiglu).
#pragma once

#include <ATen/core/Tensor.h>

namespace qk {

// silu(gate) * up with [gate | up] = gate_up along the last dim (of even size 2I); fp32 math,
// one rounding. Returns [..., I] contiguous in gate_up's dtype.
at::Tensor swiglu(const at::Tensor& gate_up);

}  // namespace qk
