// RMSNorm's backward, in the forward's row groups (a block of 8 warps, 8 / warps_per_row rows at a
// time). Each group runs kRowsPerGroup rows, two passes over each: the first sums x^2 and
// grad * w * x (the statistics are recomputed, nothing but x was saved), the second re-reads what
// the same thread read (an L1/L2 hit), writes grad_x and adds grad * normed into the thread's
// weight-gradient accumulators for its columns, which stay the same from row to row.
//
// The weight gradient is a two-stage reduction without atomics, so it is deterministic: each
// group writes its fp32 partial row, and column_sum_kernel sums the partial rows in a fixed order.
// The accumulators live in registers (kMaxAccumulators per thread: rows up to 8 * 32 * 32 = 8192
// features); wider rows keep them in the group's partial row itself (each column belongs to one
// thread, so the read-modify-write needs no atomics either).
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

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

// Rows each group runs: more rows per partial row make the second stage cheaper, fewer make
// more blocks to hide memory latency with (at 16k rows of 1280 bf16: 512 blocks, 2048 partials).
constexpr int kRowsPerGroup = 8;
// fp32 weight-gradient accumulators per thread held in registers.
constexpr int kMaxAccumulators = 32;

template <class T, class W, class G>
struct NormBackwardParams {
  const G* grad;
  int64_t grad_stride;
  const T* x;
  int64_t x_stride;
  const W* weight;
  const G* grad_residual;  // nullptr: no residual gradient to add
  int64_t grad_residual_stride;
  T* grad_x;       // [rows, cols] contiguous
  float* partial;  // [blocks * groups, cols]: one weight-gradient partial row per group
  int64_t rows;
  int cols;
  float eps;
  int warps_per_row;
  bool weight_packed;
};

template <class T, class G, int VEC>
QK_DEVICE void load_floats(const T* x, const G* g, float (&xf)[VEC], float (&gf)[VEC]) {
  const Pack<T, VEC> a = load_pack<T, VEC>(x);
  const Pack<G, VEC> b = load_pack<G, VEC>(g);
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    xf[j] = to_float(a.v[j]);
    gf[j] = to_float(b.v[j]);
  }
}

template <class T, class W, class G, int VEC, bool WIDE>
__global__ void rms_norm_backward_kernel(const NormBackwardParams<T, W, G> p) {
  __shared__ float warp_sums[2][kRowBlockWarps];  // one per statistic: no barrier between them
  const int groups = kRowBlockWarps / p.warps_per_row;
  const int group = threadIdx.x / 32 / p.warps_per_row;
  const int rank = threadIdx.x % (32 * p.warps_per_row);
  const int step = 32 * p.warps_per_row * VEC;
  constexpr int kVectors = kMaxAccumulators / VEC;
  float* partial_row = p.partial + (static_cast<int64_t>(blockIdx.x) * groups + group) * p.cols;
  float acc[kVectors][VEC] = {};

  for (int t = 0; t < kRowsPerGroup; ++t) {
    const int64_t first = (static_cast<int64_t>(blockIdx.x) * kRowsPerGroup + t) * groups;
    if (first >= p.rows) break;  // the same for the whole block: no thread skips a barrier
    const int64_t row = first + group;
    const bool active = row < p.rows;
    const T* x_row = p.x + row * p.x_stride;
    const G* grad_row = p.grad + row * p.grad_stride;

    float square_sum = 0.0f, dot = 0.0f;  // sum x^2, sum grad * w * x
    for (int i = rank * VEC; active && i < p.cols; i += step) {
      float x[VEC], g[VEC], w[VEC];
      load_floats<T, G, VEC>(x_row + i, grad_row + i, x, g);
      load_weight<W, VEC>(p.weight + i, p.weight_packed, w);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        square_sum += x[j] * x[j];
        dot += g[j] * w[j] * x[j];
      }
    }
    const float total_square = row_group_sum(square_sum, warp_sums[0], group, p.warps_per_row);
    const float total_dot = row_group_sum(dot, warp_sums[1], group, p.warps_per_row);
    if (!active) continue;
    const float rstd = rsqrtf(total_square / static_cast<float>(p.cols) + p.eps);
    // mean(grad * w * normed) with normed = x * rstd
    const float mean_dot = total_dot * rstd / static_cast<float>(p.cols);

    auto column_step = [&](int i, float (&acc_k)[VEC]) {
      float x[VEC], g[VEC], w[VEC];
      load_floats<T, G, VEC>(x_row + i, grad_row + i, x, g);
      load_weight<W, VEC>(p.weight + i, p.weight_packed, w);
      float r[VEC] = {};
      if (p.grad_residual != nullptr) {
        const Pack<G, VEC> b =
            load_pack<G, VEC>(p.grad_residual + row * p.grad_residual_stride + i);
#pragma unroll
        for (int j = 0; j < VEC; ++j) r[j] = to_float(b.v[j]);
      }
      Pack<T, VEC> out;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float normed = x[j] * rstd;
        out.v[j] = from_float<T>(rstd * (g[j] * w[j] - normed * mean_dot) + r[j]);
        // The forward multiplies the weight by the normalised value rounded to x's dtype.
        acc_k[j] += g[j] * to_float(from_float<T>(normed));
      }
      store_pack<T, VEC>(p.grad_x + row * p.cols + i, out);
    };
    if constexpr (WIDE) {
      for (int i = rank * VEC; i < p.cols; i += step) {
        float (&acc_k)[VEC] = *reinterpret_cast<float (*)[VEC]>(partial_row + i);
        column_step(i, acc_k);
      }
    } else {
#pragma unroll
      for (int k = 0; k < kVectors; ++k) {
        const int i = rank * VEC + k * step;
        if (i < p.cols) column_step(i, acc[k]);
      }
    }
  }
  if constexpr (!WIDE) {
#pragma unroll
    for (int k = 0; k < kVectors; ++k) {
      const int i = rank * VEC + k * step;
      if (i >= p.cols) continue;
#pragma unroll
      for (int j = 0; j < VEC; ++j) partial_row[i + j] = acc[k][j];
    }
  }
}

constexpr int kSumWarps = 8;

// grad_weight[c] = sum over p of partial[p, c], in the order of p: a block of 8 warps owns 32
// columns, warp w sums the partial rows w, w + 8, ... and warp 0 adds the 8 sums in order.
template <class W>
__global__ void column_sum_kernel(const float* __restrict__ partial, int64_t parts, int cols,
                                  W* __restrict__ out) {
  __shared__ float sums[kSumWarps][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int col = blockIdx.x * 32 + lane;
  float sum = 0.0f;
  for (int64_t part = warp; col < cols && part < parts; part += kSumWarps) {
    sum += partial[part * cols + col];
  }
  sums[warp][lane] = sum;
  __syncthreads();
  if (warp != 0 || col >= cols) return;
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < kSumWarps; ++w) total += sums[w][lane];
  out[col] = from_float<W>(total);
}

template <class T, class W, class G>
void launch(NormBackwardParams<T, W, G> p, int vec, at::Tensor& grad_weight,
            const at::Tensor& like) {
  p.warps_per_row = warps_per_row(p.cols / vec);
  const int groups = kRowBlockWarps / p.warps_per_row;
  const int64_t rows_per_block = int64_t{groups} * kRowsPerGroup;
  const int64_t blocks = (p.rows + rows_per_block - 1) / rows_per_block;
  const int64_t parts = blocks * groups;
  const int64_t step = int64_t{32} * p.warps_per_row * vec;
  const bool wide = (p.cols + step - 1) / step > kMaxAccumulators / vec;
  // The wide form accumulates in the partial rows, so they start at zero.
  const auto options = like.options().dtype(at::kFloat);
  at::Tensor partial =
      wide ? at::zeros({parts, p.cols}, options) : at::empty({parts, p.cols}, options);
  p.partial = partial.data_ptr<float>();
  cudaStream_t stream = current_stream(like);
  QK_DISPATCH_VEC(vec, VEC, [&] {
    if constexpr (VEC * sizeof(G) <= 16) {
      p.weight_packed = weight_packs<W, VEC>(p.weight);
      const dim3 grid(static_cast<unsigned>(blocks)), block(32 * kRowBlockWarps);
      if (wide) {
        QK_LAUNCH((rms_norm_backward_kernel<T, W, G, VEC, true>), grid, block, 0, stream, p);
      } else {
        QK_LAUNCH((rms_norm_backward_kernel<T, W, G, VEC, false>), grid, block, 0, stream, p);
      }
    }
  });
  QK_LAUNCH((column_sum_kernel<W>), dim3(static_cast<unsigned>((p.cols + 31) / 32)),
            dim3(32 * kSumWarps), 0, stream, static_cast<const float*>(p.partial), parts, p.cols,
            static_cast<W*>(grad_weight.data_ptr()));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, double eps,
    const std::optional<at::Tensor>& grad_residual) {
  check_norm_args(x, weight);
  for (const auto& [t, name] :
       {std::pair{&grad, "grad"},
        std::pair{grad_residual ? &*grad_residual : nullptr, "grad_residual"}}) {
    if (t == nullptr) continue;
    check_same_device(*t, name, x, "x");
    check_dtype(*t, name, {at::kFloat, at::kHalf, at::kBFloat16});
    QK_CHECK_ARG(t->sizes() == x.sizes(), name, "x's shape ", x.sizes(), " (got ", t->sizes(), ")");
  }
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_weight = at::empty(weight.sizes(), weight.options());
  if (x.numel() == 0) return {grad_x, grad_weight.zero_()};
  // Both gradients are read as one element type G: grad's dtype when the two agree and equal
  // x's, else fp32 (exact conversions).
  const bool residual = grad_residual.has_value();
  const bool same = grad.scalar_type() == x.scalar_type() &&
                    (!residual || grad_residual->scalar_type() == x.scalar_type());
  const at::ScalarType g_dtype = same ? x.scalar_type() : at::kFloat;
  const at::Tensor x_rows = as_rows(x);
  const at::Tensor grad_rows = as_rows(grad.to(g_dtype));
  const at::Tensor residual_rows = residual ? as_rows(grad_residual->to(g_dtype)) : at::Tensor();
  const at::Tensor w = weight.contiguous();

  DeviceGuard guard(x);
  QK_DISPATCH_FLOAT(x.scalar_type(), T, [&] {
    QK_DISPATCH_GRAD(same, T, G, [&] {
      auto run = [&](const auto* w_ptr) {
        using W = std::remove_const_t<std::remove_pointer_t<decltype(w_ptr)>>;
        NormBackwardParams<T, W, G> p{
            static_cast<const G*>(grad_rows.data_ptr()),
            grad_rows.stride(0),
            static_cast<const T*>(x_rows.data_ptr()),
            x_rows.stride(0),
            w_ptr,
            residual ? static_cast<const G*>(residual_rows.data_ptr()) : nullptr,
            residual ? residual_rows.stride(0) : 0,
            static_cast<T*>(grad_x.data_ptr()),
            nullptr,
            x_rows.size(0),
            static_cast<int>(x_rows.size(1)),
            static_cast<float>(eps),
            1,
            false};
        const int vec =
            vector_width(std::max(sizeof(T), sizeof(G)), p.cols,
                         {p.x, p.grad, p.grad_x, residual ? residual_rows.data_ptr() : p.grad},
                         {p.x_stride, p.grad_stride, p.grad_residual_stride});
        launch<T, W, G>(p, vec, grad_weight, x);
      };
      if (w.scalar_type() == at::kFloat) {
        run(static_cast<const float*>(w.data_ptr()));
      } else {
        run(static_cast<const T*>(w.data_ptr()));
      }
    });
  });
  return {grad_x, grad_weight};
}

}  // namespace qk
