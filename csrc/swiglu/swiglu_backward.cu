// SwiGLU's backward: the forward's streaming shape (blocks own (row, column chunk) pairs), each
// thread reading one vector of gate, up and the output gradient and writing one of each half of
// [grad_gate | grad_up]. The sigmoid is recomputed from gate; nothing else was saved.
#include <ATen/ops/empty.h>

#include <algorithm>

#include "common/dispatch.h"
#include "common/kernel.h"
#include "common/numeric.h"
#include "common/torch_utils.h"
#include "swiglu/gate_up_rows.h"
#include "swiglu/swiglu.h"

namespace qk {
namespace {

template <class T, class G, int VEC>
__global__ void swiglu_backward_kernel(const G* __restrict__ grad, int64_t grad_row_stride,
                                       const T* __restrict__ gate_up, int64_t row_stride,
                                       T* __restrict__ grad_gate_up, int cols) {
  const int64_t row = blockIdx.x;
  const int col = (blockIdx.y * blockDim.x + threadIdx.x) * VEC;
  if (col >= cols) return;
  const T* gate_row = gate_up + row * row_stride;
  const Pack<T, VEC> gate = load_pack<T, VEC>(gate_row + col);
  const Pack<T, VEC> up = load_pack<T, VEC>(gate_row + cols + col);
  const Pack<G, VEC> g = load_pack<G, VEC>(grad + row * grad_row_stride + col);
  Pack<T, VEC> grad_gate, grad_up;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const float x = to_float(gate.v[j]), dy = to_float(g.v[j]);
    // expf, not __expf, as in the forward: fp32 gradients stay within eager's error.
    const float sig = 1.0f / (1.0f + expf(-x));
    // silu'(x) = s (1 + x (1 - s))
    grad_gate.v[j] = from_float<T>(dy * to_float(up.v[j]) * sig * (1.0f + x * (1.0f - sig)));
    grad_up.v[j] = from_float<T>(dy * x * sig);
  }
  T* out_row = grad_gate_up + row * 2 * cols;
  store_pack<T, VEC>(out_row + col, grad_gate);
  store_pack<T, VEC>(out_row + cols + col, grad_up);
}

}  // namespace

at::Tensor swiglu_backward(const at::Tensor& grad, const at::Tensor& gate_up) {
  check_gate_up(gate_up);
  check_same_device(grad, "grad", gate_up, "gate_up");
  check_dtype(grad, "grad", {at::kFloat, at::kHalf, at::kBFloat16});
  const std::vector<int64_t> grad_shape = swiglu_shape(gate_up);
  QK_CHECK_ARG(grad.sizes() == at::IntArrayRef(grad_shape), "grad", "the output's shape ",
               at::IntArrayRef(grad_shape), " (got ", grad.sizes(), ")");
  at::Tensor out = at::empty(gate_up.sizes(), gate_up.options());
  if (out.numel() == 0) return out;
  const at::Tensor rows = gate_up_rows(gate_up);
  const int64_t n_rows = rows.size(0), cols = rows.size(1) / 2;
  const at::Tensor grad_rows = as_rows(grad_for(grad, gate_up.scalar_type()));

  DeviceGuard guard(gate_up);
  QK_DISPATCH_FLOAT(gate_up.scalar_type(), T, [&] {
    QK_DISPATCH_GRAD(grad_rows.scalar_type() == gate_up.scalar_type(), T, G, [&] {
      // One vector width for all three: the widest whose packs of T and of G fit 16 bytes.
      const int vec = vector_width(std::max(sizeof(T), sizeof(G)), cols,
                                   {rows.data_ptr(), grad_rows.data_ptr(), out.data_ptr()},
                                   {rows.stride(0), grad_rows.stride(0)});
      QK_DISPATCH_VEC(vec, VEC, [&] {
        if constexpr (VEC * sizeof(G) <= 16) {
          const dim3 grid(n_rows, (cols / VEC + kSwigluThreads - 1) / kSwigluThreads);
          QK_LAUNCH((swiglu_backward_kernel<T, G, VEC>), grid, dim3(kSwigluThreads), 0,
                    current_stream(gate_up), static_cast<const G*>(grad_rows.data_ptr()),
                    grad_rows.stride(0), static_cast<const T*>(rows.data_ptr()), rows.stride(0),
                    static_cast<T*>(out.data_ptr()), static_cast<int>(cols));
        }
      });
    });
  });
  return out;
}

}  // namespace qk
