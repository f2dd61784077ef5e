// Registers mrope, mrope_pos and their in-place forms in this build's op library (qwen_cuda or
// qwen_emu).
#include <torch/library.h>

#include "common/torch_utils.h"
#include "mrope/mrope.h"

TORCH_LIBRARY_FRAGMENT(QK_OPS_NAMESPACE, m) {
  m.def(
      "mrope(Tensor q, Tensor k, Tensor cos, Tensor sin, int[]? mrope_section) -> (Tensor, "
      "Tensor)");
  m.def("mrope_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, int[]? mrope_section) -> ()");
  m.def(
      "mrope_pos(Tensor q, Tensor k, Tensor positions, Tensor inv_freq, int[] mrope_section) -> "
      "(Tensor, Tensor)");
  m.def(
      "mrope_pos_(Tensor(a!) q, Tensor(b!) k, Tensor positions, Tensor inv_freq, int[] "
      "mrope_section) -> ()");
}

TORCH_LIBRARY_IMPL(QK_OPS_NAMESPACE, QK_DISPATCH_KEY, m) {
  m.impl("mrope", &qk::mrope);
  m.impl("mrope_", &qk::mrope_);
  m.impl("mrope_pos", &qk::mrope_pos);
  m.impl("mrope_pos_", &qk::mrope_pos_);
}
