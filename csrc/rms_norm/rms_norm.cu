// RMSNorm and residual-add + RMSNorm. A block of 8 warps normalises 8 / warps_per_row rows: short
// rows get one warp each (shuffle-only reduction), long rows up to the whole block, so every
// thread moves a few 16-byte vectors whatever the hidden size. Two passes over the row: the first
// reads it (and, with the add, writes the rounded sum), the second re-reads what the same thread
// touched (an L1/L2 hit) and writes the output; HBM sees each input read once and each output
// written once, with no shared-memory staging.
#include <ATen/ops/empty.h>

#include <algorithm>

#include "common/dispatch.h"
#include "common/kernel.h"
#include "common/numeric.h"
#include "common/row_groups.h"
#include "common/torch_utils.h"
#include "rms_norm/norm_args.h"
#include "rms_norm/rms_norm.h"

namespace qk {
namespace {

template <class T, class W, int VEC, bool ADD>
__global__ void rms_norm_kernel(const T* __restrict__ x, int64_t x_stride,
                                const T* __restrict__ residual, int64_t residual_stride,
                                const W* __restrict__ weight, T* __restrict__ out,
                                T* __restrict__ residual_out, int64_t rows, int cols, float eps,
                                int warps_per_row) {
  __shared__ float warp_sums[kRowBlockWarps];
  const int group = threadIdx.x / 32 / warps_per_row;  // this thread's row within the block
  const int rank = threadIdx.x % (32 * warps_per_row);
  const int step = 32 * warps_per_row * VEC;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kRowBlockWarps / warps_per_row) + group;
  const bool active = row < rows;  // tail rows still reach the barrier below
  const T* x_row = x + row * x_stride;
  T* out_row = out + row * cols;
  T* summed_row = ADD ? residual_out + row * cols : nullptr;

  float square_sum = 0.0f;
  for (int i = rank * VEC; active && i < cols; i += step) {
    Pack<T, VEC> a = load_pack<T, VEC>(x_row + i);
    if constexpr (ADD) {
      // The model keeps its residual stream in the activation dtype: round the sum first.
      const Pack<T, VEC> r = load_pack<T, VEC>(residual + row * residual_stride + i);
#pragma unroll
      for (int j = 0; j < VEC; ++j) a.v[j] = from_float<T>(to_float(a.v[j]) + to_float(r.v[j]));
      store_pack<T, VEC>(summed_row + i, a);
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) square_sum += to_float(a.v[j]) * to_float(a.v[j]);
  }
  const float total = row_group_sum(square_sum, warp_sums, group, warps_per_row);
  if (!active) return;
  const float rstd = rsqrtf(total / static_cast<float>(cols) + eps);

  const T* source = ADD ? summed_row : x_row;
  for (int i = rank * VEC; i < cols; i += step) {
    const Pack<T, VEC> a = load_pack<T, VEC>(source + i);
    Pack<T, VEC> y;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float normed = to_float(from_float<T>(to_float(a.v[j]) * rstd));
      y.v[j] = from_float<T>(normed * to_float(weight[i + j]));
    }
    store_pack<T, VEC>(out_row + i, y);
  }
}

// Launches 8 / warps_per_row rows per block; `residual` and `residual_out` are defined only for
// the add.
void launch(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, double eps,
            at::Tensor& out, at::Tensor& residual_out) {
  const bool add = residual.defined();
  const at::Tensor x_rows = as_rows(x);
  const at::Tensor residual_rows = add ? as_rows(residual) : x_rows;
  const at::Tensor w = weight.contiguous();
  const int64_t rows = x_rows.size(0), cols = x_rows.size(1);
  if (rows == 0) return;

  DeviceGuard guard(x);
  QK_DISPATCH_FLOAT(x.scalar_type(), T, [&] {
    const int vec = vector_width(sizeof(T), cols,
                                 {x_rows.data_ptr(), residual_rows.data_ptr(), out.data_ptr(),
                                  add ? residual_out.data_ptr() : out.data_ptr()},
                                 {x_rows.stride(0), residual_rows.stride(0)});
    const int row_warps = warps_per_row(cols / vec);
    const int64_t rows_per_block = kRowBlockWarps / row_warps;
    const dim3 grid(static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block));
    const dim3 block(32 * kRowBlockWarps);
    auto run = [&](auto* w_ptr) {
      using W = std::remove_const_t<std::remove_pointer_t<decltype(w_ptr)>>;
      QK_DISPATCH_VEC(vec, VEC, [&] {
        const T* x_ptr = static_cast<const T*>(x_rows.data_ptr());
        const T* r_ptr = static_cast<const T*>(residual_rows.data_ptr());
        T* out_ptr = static_cast<T*>(out.data_ptr());
        if (add) {
          QK_LAUNCH((rms_norm_kernel<T, W, VEC, true>), grid, block, 0, current_stream(x), x_ptr,
                    x_rows.stride(0), r_ptr, residual_rows.stride(0), w_ptr, out_ptr,
                    static_cast<T*>(residual_out.data_ptr()), rows, static_cast<int>(cols),
                    static_cast<float>(eps), row_warps);
        } else {
          QK_LAUNCH((rms_norm_kernel<T, W, VEC, false>), grid, block, 0, current_stream(x), x_ptr,
                    x_rows.stride(0), r_ptr, int64_t{0}, w_ptr, out_ptr, static_cast<T*>(nullptr),
                    rows, static_cast<int>(cols), static_cast<float>(eps), row_warps);
        }
      });
    };
    if (w.scalar_type() == at::kFloat) {
      run(static_cast<const float*>(w.data_ptr()));
    } else {
      run(static_cast<const T*>(w.data_ptr()));
    }
  });
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm_args(x, weight);
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor none;
  launch(x, at::Tensor(), weight, eps, out, none);
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  check_norm_args(x, weight);
  check_same_device(residual, "residual", x, "x");
  check_dtype(residual, "residual", {x.scalar_type()});
  QK_CHECK_ARG(residual.sizes() == x.sizes(), "residual", "x's shape ", x.sizes(), " (got ",
               residual.sizes(), ")");
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor residual_out = at::empty(x.sizes(), x.options());
  launch(x, residual, weight, eps, out, residual_out);
  return {out, residual_out};
}

}  // namespace qk
