// Registers rms_norm, add_rms_norm and rms_norm_backward in this build's op library (qwen_cuda or
// qwen_emu).
#include <torch/library.h>

#include "common/torch_utils.h"
#include "rms_norm/rms_norm.h"

TORCH_LIBRARY_FRAGMENT(QK_OPS_NAMESPACE, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def(
      "rms_norm_backward(Tensor grad, Tensor x, Tensor weight, float eps, Tensor? "
      "grad_residual=None)"
      " -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(QK_OPS_NAMESPACE, QK_DISPATCH_KEY, m) {
  m.impl("rms_norm", &qk::rms_norm);
  m.impl("add_rms_norm", &qk::add_rms_norm);
  m.impl("rms_norm_backward", &qk::rms_norm_backward);
}
