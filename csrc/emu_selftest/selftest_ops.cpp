// Registers the emulation self-test ops: torch.ops.qwen_cuda.selftest_* in the CUDA build,
// torch.ops.qwen_emu.selftest_* in the emulated one.
#include <torch/library.h>

#include "common/torch_utils.h"
#include "emu_selftest/selftest.h"

TORCH_LIBRARY_FRAGMENT(QK_OPS_NAMESPACE, m) {
  m.def("selftest_convert(Tensor x) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("selftest_ex2(Tensor x) -> Tensor");
  m.def("selftest_mma(Tensor a, Tensor b, Tensor c) -> Tensor");
  m.def("selftest_ldmatrix(Tensor src, int num, bool trans) -> Tensor");
  m.def("selftest_shuffle(Tensor x, Tensor table) -> (Tensor, Tensor)");
  m.def("selftest_vote(Tensor pred, int active) -> Tensor");
  m.def("selftest_atomics(Tensor xf, Tensor xi) -> (Tensor, Tensor)");
  m.def("selftest_block_sum(Tensor x) -> (Tensor, Tensor)");
  m.def("selftest_cp_async(Tensor x, int valid_rows, bool wait) -> Tensor");
  m.def("selftest_gemm(Tensor a, Tensor b, bool b_kn) -> Tensor");
  m.def("selftest_barriers(Tensor x, int rounds) -> Tensor");
  m.def("selftest_race(Tensor x, bool sync) -> Tensor");
  m.def("selftest_misuse(Tensor(a!) out, int mode) -> ()");
}

TORCH_LIBRARY_IMPL(QK_OPS_NAMESPACE, QK_DISPATCH_KEY, m) {
  m.impl("selftest_convert", &qk::selftest::convert);
  m.impl("selftest_ex2", &qk::selftest::ex2);
  m.impl("selftest_mma", &qk::selftest::mma);
  m.impl("selftest_ldmatrix", &qk::selftest::ldmatrix);
  m.impl("selftest_shuffle", &qk::selftest::shuffle);
  m.impl("selftest_vote", &qk::selftest::vote);
  m.impl("selftest_atomics", &qk::selftest::atomics);
  m.impl("selftest_block_sum", &qk::selftest::block_sum);
  m.impl("selftest_cp_async", &qk::selftest::cp_async);
  m.impl("selftest_gemm", &qk::selftest::gemm);
  m.impl("selftest_barriers", &qk::selftest::barriers);
  m.impl("selftest_race", &qk::selftest::race);
  m.impl("selftest_misuse", &qk::selftest::misuse);
}
