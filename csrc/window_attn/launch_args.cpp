// The host-side argument checks and layout fixes the window_attn launchers (forward and backward)
// share.
#include "window_attn/launch_args.h"

#include <c10/util/StringUtil.h>

#include <cstdint>
#include <utility>

#include "common/torch_utils.h"
#include "window_attn/kernel_traits.h"
#include "window_attn/window_attn.h"

namespace qk {
namespace {

// The long path addresses a key tile's rows by 32-bit offsets from its first token.
constexpr int64_t kMaxTokenStride = (int64_t{INT32_MAX} - 1024) / kKeyTile;

// Whether rows of t can move as 16-byte copies (a unit last stride, an aligned base and strides)
// and its token stride suits the long path's 32-bit tile offsets.
bool rows_aligned(const at::Tensor& t) {
  const int64_t chunk = 16 / t.element_size();
  return t.stride(2) == 1 && reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0 &&
         t.stride(0) % chunk == 0 && t.stride(1) % chunk == 0 && t.stride(0) <= kMaxTokenStride;
}

bool supported_head_dim(int64_t head_dim) {
  for (int64_t d : window_attn_head_dims()) {
    if (d == head_dim) return true;
  }
  return false;
}

}  // namespace

at::Tensor with_aligned_rows(const at::Tensor& t, const char* name) {
  if (rows_aligned(t)) return t;
  TORCH_WARN_ONCE(
      "qwen_kernels: the CUDA window_attn copies ", name, " (shape ", t.sizes(), ", strides ",
      t.strides(), ") to a contiguous tensor before the kernel: ", t.nbytes(),
      " bytes more memory and one more read and write of it per call. ",
      "Its kernels move rows as 16-byte copies, which need a unit last stride and a ",
      "base address and token and head strides that are multiples of 16 bytes (",
      16 / t.element_size(), " elements of ", t.scalar_type(), "), and a token stride of at most ",
      kMaxTokenStride, " elements. Warned once per process.");
  return t.clone(at::MemoryFormat::Contiguous);
}

void check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& cu_seqlens, int64_t max_seqlen) {
  check_device(q, "q");
  check_dtype(q, "q", {at::kFloat, at::kHalf, at::kBFloat16});
  QK_CHECK_ARG(supported_head_dim(q.size(2)), "q", "a head dim (q.shape[2]) of ",
               c10::Join(", ", window_attn_head_dims()), " (got shape ", q.sizes(), ")");
  for (const auto& [t, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    check_same_device(*t, name, q, "q");
    check_dtype(*t, name, {q.scalar_type()});
    QK_CHECK_ARG(t->sizes() == q.sizes(), name, "q's shape ", q.sizes(), " (got ", t->sizes(), ")");
  }
  check_same_device(cu_seqlens, "cu_seqlens", q, "q");
  check_dtype(cu_seqlens, "cu_seqlens", {at::kInt});
  QK_CHECK_ARG(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 2, "cu_seqlens",
               "shape [S+1] with at least one segment (got ", cu_seqlens.sizes(), ")");
  QK_CHECK_ARG(max_seqlen >= 1 && max_seqlen <= int64_t{65535} * 64, "max_seqlen",
               "a positive length up to ", int64_t{65535} * 64, " (got ", max_seqlen, ")");
  QK_CHECK_ARG(q.size(0) <= INT32_MAX, "q", "fewer than 2^31 tokens (got ", q.size(0), ")");
  QK_CHECK_ARG((cu_seqlens.size(0) - 1) * q.size(1) <= INT32_MAX, "cu_seqlens",
               "segments x heads below 2^31 (got ", cu_seqlens.size(0) - 1, " x ", q.size(1), ")");
}

WindowAttnParams attention_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& out, const at::Tensor& cu_seqlens,
                                  int64_t max_seqlen, double softmax_scale) {
  WindowAttnParams params{};
  params.q = q.data_ptr();
  params.k = k.data_ptr();
  params.v = v.data_ptr();
  params.out = out.data_ptr();
  params.q_token_stride = q.stride(0);
  params.q_head_stride = q.stride(1);
  params.k_token_stride = k.stride(0);
  params.k_head_stride = k.stride(1);
  params.v_token_stride = v.stride(0);
  params.v_head_stride = v.stride(1);
  params.out_token_stride = out.stride(0);
  params.out_head_stride = out.stride(1);
  params.cu_seqlens = cu_seqlens.data_ptr<int>();
  params.tokens = static_cast<int>(q.size(0));
  params.segments = static_cast<int>(cu_seqlens.size(0) - 1);
  params.heads = static_cast<int>(q.size(1));
  params.max_seqlen = static_cast<int>(max_seqlen);
  params.scale_log2 = static_cast<float>(softmax_scale * kLog2e);
  return params;
}

}  // namespace qk
