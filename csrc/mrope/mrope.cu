// M-RoPE: rotate-half rotary of q and k, from cos/sin tables or from integer positions with the
// angles formed in registers (sincosf, full range reduction), in place or into new tensors.
//
// One kernel per angle source serves both forms (the output pointers equal the inputs in place)
// and rotates q and k in one launch. A thread owns VEC consecutive frequencies of one token: it
// forms their cos/sin once, then rotates those VEC pairs (i, i + D/2) in every head of its head
// group (q heads first, then k heads; k may have fewer: GQA). The group's loads are all issued
// before the first store, so a thread keeps 2 x kHeadsPerGroup 16-byte loads in flight although
// the compiler cannot rule out that outputs alias inputs. Every tensor is addressed through its
// own strides ([B, S, H, D]; 3-D inputs get B = 1 and further leading dims are walked on the host),
// so q and k may be views into a packed qkv buffer in any layout.
#include <ATen/ops/empty.h>

#include <algorithm>
#include <functional>
#include <utility>
#include <vector>

#include "common/dispatch.h"
#include "common/kernel.h"
#include "common/numeric.h"
#include "common/rope.h"
#include "common/torch_utils.h"
#include "mrope/mrope.h"

namespace qk {
namespace {

// Axes a mrope_section may have (vision 2, text 3): three band boundaries.
constexpr int kMaxAxes = 4;

struct MropeTraits {
  static constexpr int kThreads = 128;      // threads a block aims for
  static constexpr int kHeadsPerGroup = 4;  // heads a block walks (grid.y covers the rest)
};

// q, k or an output, as [B, S, H, D] strides.
template <class P>
struct Strided {
  P* ptr;
  int64_t b, s, h, d;
};

// A table or the positions, as [A, B, S, D] strides (d unused for positions).
template <class P>
struct AxisStrided {
  const P* ptr;
  int64_t a, b, s, d;
};

template <class T>
struct MropeParams {
  Strided<const T> q, k;
  Strided<T> q_out, k_out;
  int64_t tokens, seq;
  int q_heads, k_heads, half;
  int bounds[kMaxAxes - 1];  // the first frequency of axes 1, 2, 3 (half where there is none)
};

// The position axis driving frequency `col`: the band of mrope_section that holds it.
QK_DEVICE int axis_of(const int (&bounds)[kMaxAxes - 1], int col) {
  int axis = 0;
#pragma unroll
  for (int j = 0; j < kMaxAxes - 1; ++j) axis += col >= bounds[j];
  return axis;
}

// cos/sin of the first (1) and second (2) half of the head for VEC frequencies.
template <int VEC>
struct Angles {
  float cos1[VEC], sin1[VEC], cos2[VEC], sin2[VEC];
};

// Angles read from composed ([1, B, S, D] here) or per-axis ([A, B, S, D]) tables.
template <class TableT>
struct TableSource {
  AxisStrided<TableT> cos, sin;

  template <int VEC>
  QK_DEVICE Angles<VEC> at(const int (&bounds)[kMaxAxes - 1], int half, int64_t b, int64_t s,
                           int col) const {
    Angles<VEC> r;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int64_t axis = axis_of(bounds, col + j);
      const TableT* c = cos.ptr + axis * cos.a + b * cos.b + s * cos.s + (col + j) * cos.d;
      const TableT* n = sin.ptr + axis * sin.a + b * sin.b + s * sin.s + (col + j) * sin.d;
      r.cos1[j] = to_float(c[0]);
      r.cos2[j] = to_float(c[half * cos.d]);
      r.sin1[j] = to_float(n[0]);
      r.sin2[j] = to_float(n[half * sin.d]);
    }
    return r;
  }
};

// Angles formed from integer positions [A, B, S]: as the fp32 reference, the position rounded to
// fp32 times the frequency (one rounding), then precise sin/cos (positions reach 10^6).
template <class P>
struct PositionSource {
  AxisStrided<P> positions;
  const float* inv_freq;

  template <int VEC>
  QK_DEVICE Angles<VEC> at(const int (&bounds)[kMaxAxes - 1], int /*half*/, int64_t b, int64_t s,
                           int col) const {
    Angles<VEC> r;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int64_t axis = axis_of(bounds, col + j);
      const P position = positions.ptr[axis * positions.a + b * positions.b + s * positions.s];
      rope_sincos(static_cast<float>(position), inv_freq[col + j], &r.sin1[j], &r.cos1[j]);
      r.sin2[j] = r.sin1[j];
      r.cos2[j] = r.cos1[j];
    }
    return r;
  }
};

template <class T, class Source, int VEC>
__global__ void __launch_bounds__(MropeTraits::kThreads)
    mrope_kernel(const MropeParams<T> p, const Source source) {
  constexpr int kGroup = MropeTraits::kHeadsPerGroup;
  const int vectors = p.half / VEC;  // threads per token
  const int slot = threadIdx.x / vectors;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * (blockDim.x / vectors) + slot;
  if (token >= p.tokens) return;
  const int64_t b = token / p.seq, s = token % p.seq;
  const int col = (threadIdx.x % vectors) * VEC;
  const Angles<VEC> angle = source.template at<VEC>(p.bounds, p.half, b, s, col);

  const int first = blockIdx.y * kGroup;
  const int count = std::min(kGroup, p.q_heads + p.k_heads - first);
  Pack<T, VEC> x1[kGroup], x2[kGroup];
#pragma unroll
  for (int i = 0; i < kGroup; ++i) {
    if (i >= count) break;
    const int h = first + i;
    const Strided<const T>& x = h < p.q_heads ? p.q : p.k;
    const int head = h < p.q_heads ? h : h - p.q_heads;
    const T* src = x.ptr + b * x.b + s * x.s + head * x.h + col * x.d;
    // The host picks VEC > 1 only for unit column strides; VEC 1 is a plain element access.
    x1[i] = load_pack<T, VEC>(src);
    x2[i] = load_pack<T, VEC>(src + p.half * x.d);
  }
#pragma unroll
  for (int i = 0; i < kGroup; ++i) {
    if (i >= count) break;
    const int h = first + i;
    const Strided<T>& out = h < p.q_heads ? p.q_out : p.k_out;
    const int head = h < p.q_heads ? h : h - p.q_heads;
    T* dst = out.ptr + b * out.b + s * out.s + head * out.h + col * out.d;
    Pack<T, VEC> y1, y2;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float a = to_float(x1[i].v[j]), z = to_float(x2[i].v[j]);
      rotate_half_pair(a, z, angle.cos1[j], angle.sin1[j], angle.cos2[j], angle.sin2[j]);
      y1.v[j] = from_float<T>(a);
      y2.v[j] = from_float<T>(z);
    }
    store_pack<T, VEC>(dst, y1);
    store_pack<T, VEC>(dst + p.half * out.d, y2);
  }
}

template <class P, class Tensor>
Strided<P> strided(const Tensor& t) {
  return {static_cast<P*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

template <class P>
AxisStrided<P> axis_strided(const at::Tensor& t) {
  return {static_cast<const P*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2),
          t.dim() > 3 ? t.stride(3) : int64_t{0}};
}

// One launch over [B, S, H, D] q, k and their outputs.
template <class T, class Source>
void launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_out,
            const at::Tensor& k_out, const Source& source, const std::vector<int>& bounds) {
  MropeParams<T> p{};
  p.q = strided<const T>(q);
  p.k = strided<const T>(k);
  p.q_out = strided<T>(q_out);
  p.k_out = strided<T>(k_out);
  p.seq = q.size(1);
  p.tokens = q.size(0) * p.seq;
  p.q_heads = static_cast<int>(q.size(2));
  p.k_heads = static_cast<int>(k.size(2));
  p.half = static_cast<int>(q.size(3) / 2);
  std::copy(bounds.begin(), bounds.end(), p.bounds);
  if (p.tokens == 0 || p.q_heads + p.k_heads == 0) return;

  const bool unit_columns =
      q.stride(3) == 1 && k.stride(3) == 1 && q_out.stride(3) == 1 && k_out.stride(3) == 1;
  std::vector<int64_t> row_strides;
  for (const at::Tensor* t : {&q, &k, &q_out, &k_out}) {
    for (int d = 0; d < 3; ++d) row_strides.push_back(t->stride(d));
  }
  int vec = 1;
  if (unit_columns) {
    vec = vector_width(sizeof(T), p.half,
                       {q.data_ptr(), k.data_ptr(), q_out.data_ptr(), k_out.data_ptr()}, {});
    for (int64_t stride : row_strides) {
      while (vec > 1 && stride % vec != 0) vec /= 2;
    }
  }
  DeviceGuard guard(q);
  QK_DISPATCH_VEC(vec, VEC, [&] {
    if constexpr (VEC * sizeof(T) <= 16) {  // vector_width never picks wider: no such kernel
      const int vectors = p.half / VEC;
      QK_CHECK_ARG(vectors <= MropeTraits::kThreads, "q",
                   "head_dim <= 256, or rows 16-byte aligned (got head_dim ", q.size(3), ")");
      const int64_t tokens_per_block = MropeTraits::kThreads / vectors;
      const int heads = p.q_heads + p.k_heads;
      const dim3 grid(static_cast<unsigned>((p.tokens + tokens_per_block - 1) / tokens_per_block),
                      static_cast<unsigned>((heads + MropeTraits::kHeadsPerGroup - 1) /
                                            MropeTraits::kHeadsPerGroup));
      const dim3 block(static_cast<unsigned>(tokens_per_block * vectors));
      QK_LAUNCH((mrope_kernel<T, Source, VEC>), grid, block, 0, current_stream(q), p, source);
    }
  });
}

using Body = std::function<void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const std::vector<at::Tensor>&)>;

// Calls `body` on 4-D [B, S, H, D] views: 3-D inputs get B = 1, more leading dims are walked one
// index at a time. `angles` carry an axis dim first, then q's batch dims.
void for_each_4d(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_out,
                 const at::Tensor& k_out, const std::vector<at::Tensor>& angles, const Body& body) {
  if (q.dim() == 4) {
    body(q, k, q_out, k_out, angles);
  } else if (q.dim() == 3) {
    std::vector<at::Tensor> lifted;
    for (const at::Tensor& a : angles) lifted.push_back(a.unsqueeze(1));
    body(q.unsqueeze(0), k.unsqueeze(0), q_out.unsqueeze(0), k_out.unsqueeze(0), lifted);
  } else {
    for (int64_t i = 0; i < q.size(0); ++i) {
      std::vector<at::Tensor> sliced;
      for (const at::Tensor& a : angles) sliced.push_back(a.select(1, i));
      for_each_4d(q.select(0, i), k.select(0, i), q_out.select(0, i), k_out.select(0, i), sliced,
                  body);
    }
  }
}

// [A, lead..., tail...] broadcast (stride 0) to [A, batch..., tail...].
at::Tensor expand_axes(const at::Tensor& t, at::IntArrayRef batch, int64_t trailing,
                       const char* arg) {
  const int64_t lead = t.dim() - 1 - trailing;
  QK_CHECK_ARG(lead >= 0 && lead <= static_cast<int64_t>(batch.size()), arg,
               "leading dims that broadcast to q's ", batch, " (got shape ", t.sizes(), ")");
  std::vector<int64_t> shape{t.size(0)}, full{t.size(0)};
  shape.insert(shape.end(), batch.size() - lead, 1);
  for (int64_t d = 1; d < t.dim(); ++d) shape.push_back(t.size(d));
  full.insert(full.end(), batch.begin(), batch.end());
  for (int64_t d = t.dim() - trailing; d < t.dim(); ++d) full.push_back(t.size(d));
  return t.reshape(shape).expand(full);
}

void check_qk(const at::Tensor& q, const at::Tensor& k) {
  check_device(q, "q");
  check_dtype(q, "q", {at::kFloat, at::kHalf, at::kBFloat16});
  check_same_device(k, "k", q, "q");
  check_dtype(k, "k", {q.scalar_type()});
  QK_CHECK_ARG(q.dim() >= 3 && q.size(-1) % 2 == 0, "q",
               "[..., S, H, D] with an even head_dim D (got shape ", q.sizes(), ")");
  QK_CHECK_ARG(k.dim() == q.dim() && k.size(-1) == q.size(-1) &&
                   k.sizes().slice(0, k.dim() - 2) == q.sizes().slice(0, q.dim() - 2),
               "k", "[..., S, H_k, D] with q's leading dims, S and D (got ", k.sizes(), ")");
}

// The first frequency of axes 1, 2, 3 (half where there is none) of `axes` bands.
std::vector<int> band_bounds(at::IntArrayRef section, int64_t axes, int64_t half) {
  QK_CHECK_ARG(static_cast<int64_t>(section.size()) == axes && axes >= 1 && axes <= kMaxAxes,
               "mrope_section", "one positive size per position axis (1 to ", kMaxAxes,
               " axes, here ", axes, "), summing to head_dim / 2 = ", half, " (got ", section, ")");
  std::vector<int> bounds;
  int64_t total = 0;
  for (int64_t size : section) {
    QK_CHECK_ARG(size > 0, "mrope_section", "positive sizes (got ", section, ")");
    total += size;
    if (static_cast<int64_t>(bounds.size()) < axes - 1) bounds.push_back(static_cast<int>(total));
  }
  QK_CHECK_ARG(total == half, "mrope_section", "sizes summing to head_dim / 2 = ", half, " (got ",
               section, ")");
  bounds.resize(kMaxAxes - 1, static_cast<int>(half));
  return bounds;
}

void rotate_tables(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                   const at::Tensor& sin, at::OptionalIntArrayRef mrope_section,
                   const at::Tensor& q_out, const at::Tensor& k_out) {
  check_qk(q, k);
  const int64_t half = q.size(-1) / 2;
  const bool per_axis = mrope_section.has_value();
  for (auto [t, name] : {std::pair{&cos, "cos"}, std::pair{&sin, "sin"}}) {
    check_same_device(*t, name, q, "q");
    check_dtype(*t, name, {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
    QK_CHECK_ARG(
        t->dim() >= (per_axis ? 3 : 2) && t->size(-2) == q.size(-3) && t->size(-1) == q.size(-1),
        name, per_axis ? "[A, ..., S, D]" : "[..., S, D]", " with q's S and D (got ", t->sizes(),
        ")");
  }
  QK_CHECK_ARG(sin.sizes() == cos.sizes(), "sin", "cos's shape ", cos.sizes(), " (got ",
               sin.sizes(), ")");
  const at::Tensor cos_axes = per_axis ? cos : cos.unsqueeze(0);
  const at::Tensor sin_axes = per_axis ? sin : sin.unsqueeze(0);
  const std::vector<int> bounds =
      per_axis ? band_bounds(*mrope_section, cos.size(0), half) : band_bounds({half}, 1, half);
  const at::IntArrayRef batch = q.sizes().slice(0, q.dim() - 3);
  // Tables in q's dtype or fp32 are read as they are; others are converted to fp32 once.
  const bool native = cos.scalar_type() == q.scalar_type() && sin.scalar_type() == q.scalar_type();
  const auto prepare = [&](const at::Tensor& t, const char* name) {
    return expand_axes(native ? t : t.to(at::kFloat), batch, 2, name);
  };
  const std::vector<at::Tensor> tables{prepare(cos_axes, "cos"), prepare(sin_axes, "sin")};
  QK_DISPATCH_FLOAT(q.scalar_type(), T, [&] {
    for_each_4d(q, k, q_out, k_out, tables, [&](auto& q4, auto& k4, auto& qo, auto& ko, auto& a) {
      const auto run = [&](auto* table_type) {
        using TableT = std::remove_pointer_t<decltype(table_type)>;
        const TableSource<TableT> source{axis_strided<TableT>(a[0]), axis_strided<TableT>(a[1])};
        launch<T>(q4, k4, qo, ko, source, bounds);
      };
      if (native) {
        run(static_cast<T*>(nullptr));
      } else {
        run(static_cast<float*>(nullptr));
      }
    });
  });
}

void rotate_positions(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                      const at::Tensor& inv_freq, at::IntArrayRef mrope_section,
                      const at::Tensor& q_out, const at::Tensor& k_out) {
  check_qk(q, k);
  const int64_t half = q.size(-1) / 2;
  check_same_device(positions, "positions", q, "q");
  check_dtype(positions, "positions", {at::kInt, at::kLong});
  QK_CHECK_ARG(positions.dim() >= 2 && positions.size(-1) == q.size(-3), "positions",
               "[A, ..., S] with q's S (got ", positions.sizes(), ")");
  check_same_device(inv_freq, "inv_freq", q, "q");
  check_dtype(inv_freq, "inv_freq", {at::kFloat, at::kDouble});
  QK_CHECK_ARG(inv_freq.dim() == 1 && inv_freq.size(0) == half, "inv_freq", "[D/2 = ", half,
               "] (got ", inv_freq.sizes(), ")");
  const std::vector<int> bounds = band_bounds(mrope_section, positions.size(0), half);
  const at::Tensor freqs = inv_freq.to(at::kFloat).contiguous();
  const std::vector<at::Tensor> angles{
      expand_axes(positions, q.sizes().slice(0, q.dim() - 3), 1, "positions")};
  QK_DISPATCH_FLOAT(q.scalar_type(), T, [&] {
    for_each_4d(q, k, q_out, k_out, angles, [&](auto& q4, auto& k4, auto& qo, auto& ko, auto& a) {
      const auto run = [&](auto* position_type) {
        using P = std::remove_pointer_t<decltype(position_type)>;
        const PositionSource<P> source{axis_strided<P>(a[0]),
                                       static_cast<const float*>(freqs.data_ptr())};
        launch<T>(q4, k4, qo, ko, source, bounds);
      };
      if (positions.scalar_type() == at::kInt) {
        run(static_cast<int32_t*>(nullptr));
      } else {
        run(static_cast<int64_t*>(nullptr));
      }
    });
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mrope(const at::Tensor& q, const at::Tensor& k,
                                         const at::Tensor& cos, const at::Tensor& sin,
                                         at::OptionalIntArrayRef mrope_section) {
  at::Tensor q_out = at::empty(q.sizes(), q.options());
  at::Tensor k_out = at::empty(k.sizes(), k.options());
  rotate_tables(q, k, cos, sin, mrope_section, q_out, k_out);
  return {q_out, k_out};
}

void mrope_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
            at::OptionalIntArrayRef mrope_section) {
  rotate_tables(q, k, cos, sin, mrope_section, q, k);
}

std::tuple<at::Tensor, at::Tensor> mrope_pos(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& positions,
                                             const at::Tensor& inv_freq,
                                             at::IntArrayRef mrope_section) {
  at::Tensor q_out = at::empty(q.sizes(), q.options());
  at::Tensor k_out = at::empty(k.sizes(), k.options());
  rotate_positions(q, k, positions, inv_freq, mrope_section, q_out, k_out);
  return {q_out, k_out};
}

void mrope_pos_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                const at::Tensor& inv_freq, at::IntArrayRef mrope_section) {
  rotate_positions(q, k, positions, inv_freq, mrope_section, q, k);
}

}  // namespace qk
