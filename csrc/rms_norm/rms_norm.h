// RMSNorm with an optional fused residual add, and its backward (torch.ops.qwen_cuda.rms_norm /
// add_rms_norm / rms_norm_backward).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace qk {

// x / sqrt(mean(x^2) + eps) * weight over the last dim; fp32 statistics, the normalised value
// rounded to x's dtype before the weight multiply. weight: x's dtype or float32.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

// r = x + residual (rounded to x's dtype); returns (rms_norm(r), r).
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps);

// The gradients (grad_x, grad_weight) of rms_norm(x, weight, eps) for the output gradient `grad`,
// plus `grad_residual` (add_rms_norm's sum output gradient) into grad_x where given. Statistics
// recomputed in fp32, fp32 sums, one rounding per output; grad_weight is a deterministic
// two-stage sum. grad_x contiguous in x's dtype, grad_weight in weight's.
std::tuple<at::Tensor, at::Tensor> rms_norm_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, double eps,
    const std::optional<at::Tensor>& grad_residual);

}  // namespace qk
