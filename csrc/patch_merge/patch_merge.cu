// The patch merge: RMSNorm of each token, the U = s * s tokens of a merge unit (s the spatial merge
// size: 2 in the released models) written as one [U*C] row, units gathered in unit_index order.
// Viewed as [M * U, C], the output is a row-gathered RMSNorm: token row r is x row
// U * unit_index[r / U] + r % U. A block of 8 warps normalises
// 8 / warps_per_row token rows (at C = 1280 in bf16: 160 vectors a token, 2 warps a token, one
// merge unit a block), each thread moving a few 16-byte vectors. Two passes over the token, the
// second re-reading what the same thread read (an L1/L2 hit), so HBM sees x read once and the
// output written once.
#include <ATen/ops/empty.h>

#include <cstdint>

#include "common/dispatch.h"
#include "common/kernel.h"
#include "common/numeric.h"
#include "common/row_groups.h"
#include "common/torch_utils.h"
#include "patch_merge/patch_merge.h"

namespace qk {
namespace {

template <class T, class W, class I>
struct PatchMergeParams {
  const T* x;
  int64_t x_stride;     // elements between consecutive tokens of x
  const W* weight;      // [C]
  const I* unit_index;  // [M], or nullptr: output unit i is unit i
  T* out;               // [M * U, C]
  int64_t out_rows;     // M * U
  int64_t units;        // T / U: valid values of unit_index
  int64_t unit;         // U = s * s tokens per merge unit
  int cols;             // C
  float eps;
  int warps_per_row;
  bool weight_packed;  // weight aligned for Pack<W, weight_vec<W, VEC>()> loads
};

template <class T, class W, class I, int VEC>
__global__ void patch_merge_kernel(const PatchMergeParams<T, W, I> p) {
  __shared__ float warp_sums[kRowBlockWarps];
  const int group = threadIdx.x / 32 / p.warps_per_row;  // this thread's token row within the block
  const int rank = threadIdx.x % (32 * p.warps_per_row);
  const int step = 32 * p.warps_per_row * VEC;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kRowBlockWarps / p.warps_per_row) + group;
  const bool active = row < p.out_rows;  // tail rows still reach the barrier below
  const int64_t unit = !active        ? 0
                       : p.unit_index ? static_cast<int64_t>(p.unit_index[row / p.unit])
                                      : row / p.unit;
  // A unit out of range (possible only when the caller skipped the op's value checks) reads
  // nothing: its row comes out NaN rather than from out-of-bounds memory.
  const bool valid = unit >= 0 && unit < p.units;
  const T* x_row = p.x + (unit * p.unit + row % p.unit) * p.x_stride;
  T* out_row = p.out + row * p.cols;

  float square_sum = 0.0f;
  for (int i = rank * VEC; active && valid && i < p.cols; i += step) {
    const Pack<T, VEC> a = load_pack<T, VEC>(x_row + i);
#pragma unroll
    for (int j = 0; j < VEC; ++j) square_sum += to_float(a.v[j]) * to_float(a.v[j]);
  }
  const float total = row_group_sum(square_sum, warp_sums, group, p.warps_per_row);
  if (!active) return;
  const float rstd =
      valid ? rsqrtf(total / static_cast<float>(p.cols) + p.eps) : __int_as_float(0x7fc00000);

  for (int i = rank * VEC; i < p.cols; i += step) {
    Pack<T, VEC> a;
    if (valid) {
      a = load_pack<T, VEC>(x_row + i);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) a.v[j] = from_float<T>(0.0f);
    }
    float w[VEC];
    load_weight<W, VEC>(p.weight + i, p.weight_packed, w);
    Pack<T, VEC> y;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float normed = to_float(from_float<T>(to_float(a.v[j]) * rstd));
      y.v[j] = from_float<T>(normed * w[j]);
    }
    store_pack<T, VEC>(out_row + i, y);
  }
}

void check_args(const at::Tensor& x, const at::Tensor& weight,
                const std::optional<at::Tensor>& unit_index, int64_t unit) {
  check_device(x, "x");
  check_dtype(x, "x", {at::kFloat, at::kHalf, at::kBFloat16});
  check_dim(x, "x", 2);
  QK_CHECK_ARG(x.size(1) > 0 && x.size(0) % unit == 0, "x",
               "[T, C] with C > 0 and T a multiple of ", unit, " (got shape ", x.sizes(), ")");
  QK_CHECK_ARG(x.size(1) <= INT32_MAX, "x", "rows shorter than 2^31 (got ", x.size(1), ")");
  check_same_device(weight, "weight", x, "x");
  check_dtype(weight, "weight", {x.scalar_type(), at::kFloat});
  QK_CHECK_ARG(weight.dim() == 1 && weight.size(0) == x.size(1), "weight", "shape [x.shape[1]] = [",
               x.size(1), "] (got ", weight.sizes(), ")");
  if (unit_index) {
    check_same_device(*unit_index, "unit_index", x, "x");
    check_dtype(*unit_index, "unit_index", {at::kInt, at::kLong});
    check_dim(*unit_index, "unit_index", 1);
  }
}

template <class T, class W, class I>
void launch(const at::Tensor& x_rows, const W* weight, const I* unit_index, double eps,
            int64_t unit, at::Tensor& out) {
  PatchMergeParams<T, W, I> p{static_cast<const T*>(x_rows.data_ptr()),
                              x_rows.stride(0),
                              weight,
                              unit_index,
                              static_cast<T*>(out.data_ptr()),
                              out.size(0) * unit,
                              x_rows.size(0) / unit,
                              unit,
                              static_cast<int>(x_rows.size(1)),
                              static_cast<float>(eps),
                              1,
                              false};
  const int vec = vector_width(sizeof(T), p.cols, {p.x, p.out}, {p.x_stride});
  p.warps_per_row = warps_per_row(p.cols / vec);
  const int64_t rows_per_block = kRowBlockWarps / p.warps_per_row;
  const dim3 grid(static_cast<unsigned>((p.out_rows + rows_per_block - 1) / rows_per_block));
  QK_DISPATCH_VEC(vec, VEC, [&] {
    p.weight_packed = weight_packs<W, VEC>(weight);
    QK_LAUNCH((patch_merge_kernel<T, W, I, VEC>), grid, dim3(32 * kRowBlockWarps), 0,
              current_stream(x_rows), p);
  });
}

}  // namespace

at::Tensor patch_merge(const at::Tensor& x, const at::Tensor& weight, double eps,
                       const std::optional<at::Tensor>& unit_index, int64_t merge_size) {
  QK_CHECK_ARG(merge_size >= 1 && merge_size <= 64, "merge_size", "a merge size in [1, 64] (got ",
               merge_size, ")");
  const int64_t unit = merge_size * merge_size;
  check_args(x, weight, unit_index, unit);
  const int64_t out_units = unit_index ? unit_index->size(0) : x.size(0) / unit;
  at::Tensor out = at::empty({out_units, unit * x.size(1)}, x.options());
  if (out.numel() == 0) return out;
  // Rows of x are read with unit column stride; anything else is copied once.
  const at::Tensor x_rows = x.stride(1) == 1 ? x : x.contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor index = unit_index ? unit_index->contiguous() : at::Tensor();

  DeviceGuard guard(x);
  QK_DISPATCH_FLOAT(x.scalar_type(), T, [&] {
    auto with_weight = [&](const auto* w_ptr) {
      using W = std::remove_const_t<std::remove_pointer_t<decltype(w_ptr)>>;
      if (!index.defined()) {
        launch<T, W, int64_t>(x_rows, w_ptr, nullptr, eps, unit, out);
      } else if (index.scalar_type() == at::kInt) {
        launch<T, W, int32_t>(x_rows, w_ptr, index.data_ptr<int32_t>(), eps, unit, out);
      } else {
        launch<T, W, int64_t>(x_rows, w_ptr, index.data_ptr<int64_t>(), eps, unit, out);
      }
    };
    if (w.scalar_type() == at::kFloat) {
      with_weight(static_cast<const float*>(w.data_ptr()));
    } else {
      with_weight(static_cast<const T*>(w.data_ptr()));
    }
  });
  return out;
}

}  // namespace qk
