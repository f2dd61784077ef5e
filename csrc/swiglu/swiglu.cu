// SwiGLU: a pure streaming kernel. Blocks own (row, column chunk) pairs so that rows of any
// length keep all threads busy; each thread moves one vector of gate, one of up, one of out.
#include <ATen/ops/empty.h>

#include "common/dispatch.h"
#include "common/kernel.h"
#include "common/numeric.h"
#include "common/torch_utils.h"
#include "swiglu/gate_up_rows.h"
#include "swiglu/swiglu.h"

namespace qk {
namespace {

template <class T, int VEC>
__global__ void swiglu_kernel(const T* __restrict__ gate_up, int64_t row_stride,
                              T* __restrict__ out, int cols) {
  const int64_t row = blockIdx.x;
  const int col = (blockIdx.y * blockDim.x + threadIdx.x) * VEC;
  if (col >= cols) return;
  const T* gate_row = gate_up + row * row_stride;
  const Pack<T, VEC> gate = load_pack<T, VEC>(gate_row + col);
  const Pack<T, VEC> up = load_pack<T, VEC>(gate_row + cols + col);
  Pack<T, VEC> y;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const float g = to_float(gate.v[j]);
    // expf, not __expf: the fp32 path must stay within 2x of eager PyTorch's error.
    y.v[j] = from_float<T>(g / (1.0f + expf(-g)) * to_float(up.v[j]));
  }
  store_pack<T, VEC>(out + row * cols + col, y);
}

}  // namespace

at::Tensor swiglu(const at::Tensor& gate_up) {
  check_gate_up(gate_up);
  at::Tensor out = at::empty(swiglu_shape(gate_up), gate_up.options());
  if (out.numel() == 0) return out;
  const at::Tensor rows = gate_up_rows(gate_up);
  const int64_t n_rows = rows.size(0), cols = rows.size(1) / 2;

  DeviceGuard guard(gate_up);
  QK_DISPATCH_FLOAT(gate_up.scalar_type(), T, [&] {
    const int vec =
        vector_width(sizeof(T), cols, {rows.data_ptr(), out.data_ptr()}, {rows.stride(0)});
    QK_DISPATCH_VEC(vec, VEC, [&] {
      const dim3 grid(n_rows, (cols / VEC + kSwigluThreads - 1) / kSwigluThreads);
      QK_LAUNCH((swiglu_kernel<T, VEC>), grid, dim3(kSwigluThreads), 0, current_stream(gate_up),
                static_cast<const T*>(rows.data_ptr()), rows.stride(0),
                static_cast<T*>(out.data_ptr()), static_cast<int>(cols));
    });
  });
  return out;
}

}  // namespace qk
