// Registers patch_merge in this build's op library (qwen_cuda or qwen_emu).
#include <torch/library.h>

#include "common/torch_utils.h"
#include "patch_merge/patch_merge.h"

TORCH_LIBRARY_FRAGMENT(QK_OPS_NAMESPACE, m) {
  m.def(
      "patch_merge(Tensor x, Tensor weight, float eps, Tensor? unit_index, int merge_size) -> "
      "Tensor");
}

TORCH_LIBRARY_IMPL(QK_OPS_NAMESPACE, QK_DISPATCH_KEY, m) {
  m.impl("patch_merge", &qk::patch_merge);
}
