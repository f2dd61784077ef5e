// RMSNorm with an optional fused residual add (torch.ops.qwen_cuda.rms_norm / add_rms_norm).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace qk {

// x / sqrt(mean(x^2) + eps) * weight over the last dim; fp32 statistics, the normalised value
// rounded to x's dtype before the weight multiply. weight: x's dtype or float32.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

// r = x + residual (rounded to x's dtype); returns (rms_norm(r), r).
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps);

}  // namespace qk
