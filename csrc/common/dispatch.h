// Host-side dispatch from runtime values to kernel template arguments: one place lists the
// instantiations every op gets.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "kernel.h"

// QK_DISPATCH_FLOAT(dtype, T, ...): runs the body with T = float, __half or __nv_bfloat16.
#define QK_DISPATCH_FLOAT(dtype, T, ...)                                     \
  [&] {                                                                      \
    switch (dtype) {                                                         \
      case at::ScalarType::Float: {                                          \
        using T = float;                                                     \
        return __VA_ARGS__();                                                \
      }                                                                      \
      case at::ScalarType::Half: {                                           \
        using T = __half;                                                    \
        return __VA_ARGS__();                                                \
      }                                                                      \
      case at::ScalarType::BFloat16: {                                       \
        using T = __nv_bfloat16;                                             \
        return __VA_ARGS__();                                                \
      }                                                                      \
      default:                                                               \
        TORCH_CHECK_VALUE(false, "qwen_kernels: unsupported dtype ", dtype); \
    }                                                                        \
  }()

// QK_DISPATCH_VEC(vec, VEC, ...): runs the body with the constant VEC = vec (1, 2, 4 or 8).
#define QK_DISPATCH_VEC(vec, VEC, ...) \
  [&] {                                \
    switch (vec) {                     \
      case 8: {                        \
        constexpr int VEC = 8;         \
        return __VA_ARGS__();          \
      }                                \
      case 4: {                        \
        constexpr int VEC = 4;         \
        return __VA_ARGS__();          \
      }                                \
      case 2: {                        \
        constexpr int VEC = 2;         \
        return __VA_ARGS__();          \
      }                                \
      default: {                       \
        constexpr int VEC = 1;         \
        return __VA_ARGS__();          \
      }                                \
    }                                  \
  }()

namespace qk {

// The widest vector (elements, at most 16 bytes) that divides `count` and keeps every given
// pointer and row stride aligned.
inline int vector_width(int64_t element_size, int64_t count,
                        std::initializer_list<const void*> pointers,
                        std::initializer_list<int64_t> strides = {}) {
  for (int vec = static_cast<int>(16 / element_size); vec > 1; vec /= 2) {
    const int64_t bytes = vec * element_size;
    bool ok = count % vec == 0;
    for (const void* p : pointers) ok = ok && reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
    for (int64_t s : strides) ok = ok && s % vec == 0;
    if (ok) return vec;
  }
  return 1;
}

}  // namespace qk

// QK_DISPATCH_GRAD(same, T, G, ...): runs the body with the gradient's element type G = T when
// `same` (the gradient has the activation's dtype), else G = float (the launcher brought the
// gradient to fp32, an exact conversion from any of the three dtypes).
#define QK_DISPATCH_GRAD(same, T, G, ...) \
  [&] {                                   \
    if (same) {                           \
      using G = T;                        \
      return __VA_ARGS__();               \
    }                                     \
    using G = float;                      \
    return __VA_ARGS__();                 \
  }()

namespace qk {

// A gradient of `dtype`'s tensor as its kernels read it: as it is when it has that dtype, else
// in fp32 (an exact conversion), so that kernels instantiate G = T or G = float only.
inline at::Tensor grad_for(const at::Tensor& grad, at::ScalarType dtype) {
  return grad.scalar_type() == dtype ? grad : grad.to(at::kFloat);
}

}  // namespace qk
