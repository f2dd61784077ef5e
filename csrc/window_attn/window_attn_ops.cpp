// Registers window_attn, window_attn_rope and their training forms in this build's op library
// (qwen_cuda or qwen_emu).
#include <torch/library.h>

#include "common/torch_utils.h"
#include "window_attn/window_attn.h"

TORCH_LIBRARY_FRAGMENT(QK_OPS_NAMESPACE, m) {
  m.def(
      "window_attn(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int max_seqlen, "
      "float softmax_scale) -> Tensor");
  m.def(
      "window_attn_rope(Tensor qkv, Tensor cu_seqlens, int max_seqlen, Tensor positions, "
      "Tensor inv_freq, int[] mrope_section, float softmax_scale) -> Tensor");
  m.def(
      "window_attn_forward(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int max_seqlen, "
      "float softmax_scale) -> (Tensor, Tensor)");
  m.def(
      "window_attn_rope_forward(Tensor qkv, Tensor cu_seqlens, int max_seqlen, Tensor positions, "
      "Tensor inv_freq, int[] mrope_section, float softmax_scale) -> (Tensor, Tensor)");
  m.def(
      "window_attn_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor cu_seqlens, int max_seqlen, float softmax_scale) -> (Tensor, Tensor, Tensor)");
  // A fact of the build, not a kernel: no tensors, so no dispatch key.
  m.def("window_attn_head_dims() -> int[]", &qk::window_attn_head_dims);
}

TORCH_LIBRARY_IMPL(QK_OPS_NAMESPACE, QK_DISPATCH_KEY, m) {
  m.impl("window_attn", &qk::window_attn);
  m.impl("window_attn_rope", &qk::window_attn_rope);
  m.impl("window_attn_forward", &qk::window_attn_forward);
  m.impl("window_attn_backward", &qk::window_attn_backward);
  m.impl("window_attn_rope_forward", &qk::window_attn_rope_forward);
}
