// Registers swiglu and swiglu_backward in this build's op library (qwen_cuda or qwen_emu).
#include <torch/library.h>

#include "common/torch_utils.h"
#include "swiglu/swiglu.h"

TORCH_LIBRARY_FRAGMENT(QK_OPS_NAMESPACE, m) {
  m.def("swiglu(Tensor gate_up) -> Tensor");
  m.def("swiglu_backward(Tensor grad, Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(QK_OPS_NAMESPACE, QK_DISPATCH_KEY, m) {
  m.impl("swiglu", &qk::swiglu);
  m.impl("swiglu_backward", &qk::swiglu_backward);
}
