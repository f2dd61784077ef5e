// Host-side helpers for launchers and op registration, in both builds: the CUDA extension
// (namespace qwen_cuda, dispatch key CUDA) and the CPU emulation (qwen_emu, CPU).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <initializer_list>
#include <string>

#ifndef QK_EMULATE
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#else
#include "../emu/cuda_emu.h"
#endif

// The build defines these; the defaults follow QK_EMULATE.
#ifndef QK_OPS_NAMESPACE
#ifdef QK_EMULATE
#define QK_OPS_NAMESPACE qwen_emu
#else
#define QK_OPS_NAMESPACE qwen_cuda
#endif
#endif
#ifndef QK_DISPATCH_KEY
#ifdef QK_EMULATE
#define QK_DISPATCH_KEY CPU
#else
#define QK_DISPATCH_KEY CUDA
#endif
#endif

// QK_CHECK_ARG(cond, "arg", "what was expected", details...): a ValueError naming the argument,
// e.g. "qwen_kernels: argument 'q': expected a contiguous last dimension (got strides [..])".
#define QK_CHECK_ARG(cond, arg, expected, ...) \
  TORCH_CHECK_VALUE(cond, "qwen_kernels: argument '", arg, "': expected ", expected, ##__VA_ARGS__)

namespace qk {

// The device type this build's kernels run on.
#ifdef QK_EMULATE
constexpr c10::DeviceType kDeviceType = c10::DeviceType::CPU;
#else
constexpr c10::DeviceType kDeviceType = c10::DeviceType::CUDA;
#endif

// The stream to launch on: the current CUDA stream of the tensor's device (none when emulated).
inline cudaStream_t current_stream([[maybe_unused]] const at::Tensor& t) {
#ifdef QK_EMULATE
  return nullptr;
#else
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
#endif
}

// Makes the tensor's device current for the guard's lifetime: `qk::DeviceGuard guard(q);`.
class DeviceGuard {
 public:
  explicit DeviceGuard([[maybe_unused]] const at::Tensor& t)
#ifndef QK_EMULATE
      : guard_(t.device())
#endif
  {
  }

 private:
#ifndef QK_EMULATE
  c10::cuda::CUDAGuard guard_;
#endif
};

// The tensor lives on this build's device type.
inline void check_device(const at::Tensor& t, const char* arg) {
  QK_CHECK_ARG(t.device().type() == kDeviceType, arg, "a ", c10::DeviceTypeName(kDeviceType),
               " tensor (got ", t.device(), ")");
}

// Both tensors live on the same device.
inline void check_same_device(const at::Tensor& t, const char* arg, const at::Tensor& ref,
                              const char* ref_arg) {
  QK_CHECK_ARG(t.device() == ref.device(), arg, "the device of '", ref_arg, "' (", ref.device(),
               ", got ", t.device(), ")");
}

// The tensor has one of the dtypes.
inline void check_dtype(const at::Tensor& t, const char* arg,
                        std::initializer_list<c10::ScalarType> dtypes) {
  bool ok = false;
  std::string names;
  for (auto it = dtypes.begin(); it != dtypes.end(); ++it) {
    ok = ok || t.scalar_type() == *it;
    if (std::find(dtypes.begin(), it, *it) != it) continue;  // listed twice (e.g. x's dtype)
    names += (names.empty() ? "" : " or ") + std::string(c10::toString(*it));
  }
  QK_CHECK_ARG(ok, arg, "dtype ", names, " (got ", t.scalar_type(), ")");
}

// The tensor has `dim` dimensions.
inline void check_dim(const at::Tensor& t, const char* arg, int64_t dim) {
  QK_CHECK_ARG(t.dim() == dim, arg, dim, " dimensions (got shape ", t.sizes(), ")");
}

// t as rows [N, t.shape[-1]] with a unit column stride: a view where the layout allows, else a
// contiguous copy.
inline at::Tensor as_rows(const at::Tensor& t) {
  at::Tensor rows = t.reshape({-1, t.size(-1)});
  return rows.stride(-1) == 1 ? rows : rows.contiguous();
}

// The tensor is contiguous.
inline void check_contiguous(const at::Tensor& t, const char* arg) {
  QK_CHECK_ARG(t.is_contiguous(), arg, "a contiguous tensor (got strides ", t.strides(), ")");
}

}  // namespace qk
