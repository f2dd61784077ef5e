// The one header every kernel source (.cu) includes.
//
// Each .cu is compiled twice: by nvcc for the GPU, and by a C++20 host compiler with QK_EMULATE
// defined, against the CPU emulation in csrc/emu (see csrc/emu/README.md). This header gives
// both builds the same launch and shared-memory macros and the inline-PTX wrappers (ptx.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>

#ifdef QK_EMULATE
#include "../emu/cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#endif

// Inline device function.
#define QK_DEVICE __device__ __forceinline__

// QK_LAUNCH(kernel, grid, block, smem_bytes, stream, args...): the one way to launch a kernel.
// The kernel may be a template specialisation with commas (QK_LAUNCH(k<T, 64>, ...)). Launch
// errors throw std::runtime_error naming the call site.
#define QK_LAUNCH(...) ::qk::launch(__FILE__, __LINE__, __VA_ARGS__)

// QK_DYNAMIC_SMEM(type, name): declares `type* name` pointing at the block's dynamic shared
// memory (16-byte aligned). The emulation fills it with 0xFF bytes (NaN) before each block.
#ifdef QK_EMULATE
#define QK_DYNAMIC_SMEM(type, name) \
  type* name = reinterpret_cast<type*>(::qk_emu::active().dynamic_smem())
#else
#define QK_DYNAMIC_SMEM(type, name)                                 \
  extern __shared__ __align__(16) unsigned char qk_dynamic_smem_[]; \
  type* name = reinterpret_cast<type*>(qk_dynamic_smem_)
#endif

namespace qk {

#ifdef QK_EMULATE

template <class... P, class... A>
void launch(const char* file, int line, void (*kernel)(P...), dim3 grid, dim3 block,
            std::size_t smem_bytes, cudaStream_t stream, A&&... args) {
  qk_emu::launch(file, line, kernel, grid, block, smem_bytes, stream, std::forward<A>(args)...);
}

// Lets kernel use up to `bytes` of dynamic shared memory (above the default 48 KiB) on the
// current device. The emulation enforces the same limit at launch.
template <class... P>
void set_max_dynamic_smem(void (*kernel)(P...), std::size_t bytes) {
  if (bytes > 227 * 1024) {
    throw qk_emu::Error("set_max_dynamic_smem: " + std::to_string(bytes) +
                        " bytes exceed the 227 KiB a block may use");
  }
  qk_emu::max_dynamic_smem(reinterpret_cast<const void*>(kernel), bytes);
}

#else

inline void check_cuda(cudaError_t err, const char* what, const char* file, int line) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(what) + " at " + file + ":" + std::to_string(line) +
                             " failed: " + cudaGetErrorString(err));
  }
}

template <class... P, class... A>
void launch(const char* file, int line, void (*kernel)(P...), dim3 grid, dim3 block,
            std::size_t smem_bytes, cudaStream_t stream, A&&... args) {
  // clang-format reads .h files as C++ and would split the launch chevrons.
  // clang-format off
  kernel<<<grid, block, smem_bytes, stream>>>(std::forward<A>(args)...);
  // clang-format on
  check_cuda(cudaGetLastError(), "kernel launch", file, line);
}

template <class... P>
void set_max_dynamic_smem(void (*kernel)(P...), std::size_t bytes) {
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(bytes)),
             "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)", __FILE__, __LINE__);
}

#endif

}  // namespace qk

#include "ptx.h"
