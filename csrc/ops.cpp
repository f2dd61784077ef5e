// Root of the op library: the CUDA build registers it as `qwen_cuda`, the CPU emulation build as
// `qwen_emu` (QK_OPS_NAMESPACE). Each op folder adds its schemas and kernels with
// TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL in its own registration file.
#include <torch/library.h>

#include <string>

#ifndef QK_OPS_NAMESPACE
#error "QK_OPS_NAMESPACE must name the op library (qwen_cuda or qwen_emu)"
#endif
#ifndef QK_CUDA_ARCHS
#define QK_CUDA_ARCHS "emulated"
#endif

namespace {

// The compute capabilities compiled into this build, for `qwen-kernels info`.
std::string build_info() { return QK_CUDA_ARCHS; }

}  // namespace

// Indirection so that QK_OPS_NAMESPACE is expanded before TORCH_LIBRARY pastes tokens.
#define QK_ROOT_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
QK_ROOT_LIBRARY(QK_OPS_NAMESPACE, m) { m.def("build_info() -> str", &build_info); }

#ifndef QK_EMULATE
#include <Python.h>

// `import qwen_kernels._C` loads the library (and so registers the ops); the module is empty.
PyMODINIT_FUNC PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
#endif
