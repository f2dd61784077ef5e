// Self-test kernels of the CUDA emulation layer; see selftest.h for what each computes.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>

#include <climits>
#include <cmath>
#include <type_traits>

#include "common/kernel.h"
#include "common/torch_utils.h"
#include "emu_selftest/selftest.h"

namespace qk::selftest {
namespace {

constexpr unsigned kFullMask = 0xFFFFFFFFu;

__global__ void convert_kernel(const float2* x, int pairs, __half2* h, __nv_bfloat162* b,
                               float2* hf, float2* bf) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= pairs) return;
  const __half2 hv = __floats2half2_rn(x[i].x, x[i].y);
  const __nv_bfloat162 bv = __float22bfloat162_rn(x[i]);
  h[i] = hv;
  b[i] = bv;
  hf[i] = make_float2(__half2float(__low2half(hv)), __high2float(hv));
  bf[i] = __bfloat1622float2(bv);
}

__global__ void ex2_kernel(const float* x, int n, float* y) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = qk::ex2_approx_ftz(x[i]);
}

template <class T>
QK_DEVICE void mma_16816(float (&acc)[4], const std::uint32_t (&a)[4],
                         const std::uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    qk::mma_m16n8k16_bf16(acc, a, b, acc);
  } else {
    qk::mma_m16n8k16_f16(acc, a, b, acc);
  }
}

// Two consecutive 16-bit elements as one register, the first in the lower half.
template <class T>
QK_DEVICE std::uint32_t load_pair(const T* p) {
  return *reinterpret_cast<const std::uint32_t*>(p);
}

// Fragments are built from global memory with the PTX ISA layout spelled out, so that on the GPU
// this checks the layout documented in ptx.h and under emulation the emulated mma against it.
template <class T>
__global__ void mma_kernel(const T* a, const T* b, const float* c, float* d, int n, int k) {
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  const int m0 = blockIdx.y * 16, n0 = blockIdx.x * 8;
  float acc[4];
  for (int r = 0; r < 4; ++r) acc[r] = c[(m0 + g + 8 * (r / 2)) * n + n0 + 2 * t + r % 2];
  for (int k0 = 0; k0 < k; k0 += 16) {
    std::uint32_t af[4], bf[2];
    for (int r = 0; r < 4; ++r) {
      af[r] = load_pair(a + (m0 + g + 8 * (r % 2)) * k + k0 + 2 * t + 8 * (r / 2));
    }
    for (int r = 0; r < 2; ++r) bf[r] = load_pair(b + (n0 + g) * k + k0 + 2 * t + 8 * r);
    mma_16816<T>(acc, af, bf);
  }
  for (int r = 0; r < 4; ++r) d[(m0 + g + 8 * (r / 2)) * n + n0 + 2 * t + r % 2] = acc[r];
}

// Row r of the input goes to a scattered, padded shared-memory row, so each lane's address is
// its own; lanes whose address ldmatrix ignores point at row 0.
template <int kNum, bool kTrans>
__global__ void ldmatrix_kernel(const std::uint16_t* src, std::int32_t* out) {
  constexpr int kStride = 24;  // elements: 48-byte rows keep 16-byte alignment
  __shared__ __align__(16) std::uint16_t tile[32 * kStride];
  const int lane = threadIdx.x;
  auto row_of = [](int r) { return (5 * r + 3) % 32 * kStride; };
  if (lane < 8 * kNum) {
    for (int c = 0; c < 8; ++c) tile[row_of(lane) + c] = src[lane * 8 + c];
  }
  __syncwarp();
  const std::uint16_t* row = &tile[row_of(lane < 8 * kNum ? lane : 0)];
  std::uint32_t r[kNum];
  if constexpr (kNum == 1) {
    kTrans ? qk::ldmatrix_x1_trans(r, row) : qk::ldmatrix_x1(r, row);
  } else if constexpr (kNum == 2) {
    kTrans ? qk::ldmatrix_x2_trans(r, row) : qk::ldmatrix_x2(r, row);
  } else {
    kTrans ? qk::ldmatrix_x4_trans(r, row) : qk::ldmatrix_x4(r, row);
  }
  for (int i = 0; i < kNum; ++i) out[lane * kNum + i] = static_cast<std::int32_t>(r[i]);
}

// idx mode reads lane (lane * arg + 3) % 64, to cover source lanes past the width and the warp.
__global__ void shuffle_kernel(const int* x, const int* table, int variants, int* out32,
                               long long* out64) {
  const int tid = threadIdx.x, n = blockDim.x, lane = tid % 32;
  const int v = x[tid];
  const long long w = static_cast<long long>(v) << 32 | static_cast<unsigned>(~v);
  for (int i = 0; i < variants; ++i) {
    const int mode = table[3 * i], arg = table[3 * i + 1], width = table[3 * i + 2];
    int r;
    long long r64;
    if (mode == 0) {
      r = __shfl_sync(kFullMask, v, (lane * arg + 3) % 64, width);
      r64 = __shfl_sync(kFullMask, w, (lane * arg + 3) % 64, width);
    } else if (mode == 1) {
      r = __shfl_up_sync(kFullMask, v, arg, width);
      r64 = __shfl_up_sync(kFullMask, w, arg, width);
    } else if (mode == 2) {
      r = __shfl_down_sync(kFullMask, v, arg, width);
      r64 = __shfl_down_sync(kFullMask, w, arg, width);
    } else {
      r = __shfl_xor_sync(kFullMask, v, arg, width);
      r64 = __shfl_xor_sync(kFullMask, w, arg, width);
    }
    out32[i * n + tid] = r;
    out64[i * n + tid] = r64;
  }
}

__global__ void vote_kernel(const int* pred, int active, int* out) {
  const int tid = threadIdx.x, n = blockDim.x;
  if (tid >= active) return;
  const int lanes = min(32, active - tid / 32 * 32);
  const unsigned mask = lanes == 32 ? kFullMask : (1u << lanes) - 1;
  const int p = pred[tid];
  __syncwarp(mask);
  out[tid] = static_cast<int>(__ballot_sync(mask, p));
  out[n + tid] = __any_sync(mask, p);
  out[2 * n + tid] = __all_sync(mask, p);
}

__global__ void atomics_kernel(const float* xf, const int* xi, int n, float* fout, int* iout) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    atomicAdd(&fout[i % 8], xf[i]);
    atomicAdd(&iout[0], xi[i]);
    atomicMax(&iout[1], xi[i]);
    atomicMin(&iout[2], xi[i]);
    atomicOr(reinterpret_cast<unsigned*>(&iout[3]), static_cast<unsigned>(xi[i]));
    atomicXor(&iout[4], xi[i]);
    atomicAdd(reinterpret_cast<unsigned*>(&iout[5]), 1u);
    atomicExch(&iout[6], i);
    // Float max through compare-and-swap on the bits.
    int* bits = reinterpret_cast<int*>(&fout[8]);
    int old = atomicOr(bits, 0);
    while (xf[i] > __int_as_float(old)) {
      const int seen = atomicCAS(bits, old, __float_as_int(xf[i]));
      if (seen == old) break;
      old = seen;
    }
  }
}

__global__ void block_sum_kernel(const float* x, int n, float* sums, int* positive) {
  QK_DYNAMIC_SMEM(float, partial);
  const int tid = threadIdx.x, threads = blockDim.x;
  float v = 0.0f;
  for (int j = 0; j < 4; ++j) {
    const int i = blockIdx.x * threads * 4 + j * threads + tid;
    if (i < n) v += x[i];
  }
  partial[tid] = v;
  const int count = __syncthreads_count(v > 0.0f);
  for (int s = threads / 2; s >= 32; s /= 2) {
    if (tid < s) partial[tid] += partial[tid + s];
    __syncthreads();
  }
  if (tid < 32) {
    v = partial[tid];
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(kFullMask, v, offset);
    if (tid == 0) {
      sums[blockIdx.x] = v;
      positive[blockIdx.x] = count;
    }
  }
}

// 64 threads move tiles of 16 rows x 32 floats (128 chunks of 16 bytes); chunk 6 of a row goes
// as four 4-byte copies and chunk 7 as two 8-byte copies, to cover every copy size.
__global__ void cp_async_kernel(const float* x, int rows, int valid_rows, bool wait, float* out) {
  constexpr int kTileFloats = 16 * 32;
  QK_DYNAMIC_SMEM(float, stage);
  const int tid = threadIdx.x, tiles = rows / 16;
  auto issue = [&](int tile) {
    float* dst = stage + tile % 2 * kTileFloats;
    for (int c = tid; c < 128; c += 64) {
      const int row = tile * 16 + c / 8, offset = c / 8 * 32 + c % 8 * 4;
      const float* src = x + tile * kTileFloats + offset;
      if (row >= valid_rows) {
        qk::cp_async_16_zfill(dst + offset, src, false);
      } else if (c % 8 == 6) {
        for (int e = 0; e < 4; ++e) qk::cp_async_ca<4>(dst + offset + e, src + e);
      } else if (c % 8 == 7) {
        for (int e = 0; e < 4; e += 2) qk::cp_async_ca<8>(dst + offset + e, src + e);
      } else {
        qk::cp_async_16(dst + offset, src);
      }
    }
    qk::cp_async_commit();
  };
  issue(0);
  for (int t = 0; t < tiles; ++t) {
    if (t + 1 < tiles) {
      issue(t + 1);
      if (wait) qk::cp_async_wait<1>();
    } else if (wait) {
      qk::cp_async_wait<0>();
    }
    __syncthreads();
    const float* src = stage + t % 2 * kTileFloats;
    for (int i = tid; i < kTileFloats; i += 64) out[t * kTileFloats + i] = src[i];
    __syncthreads();
  }
}

// 4 warps per 32x32 tile of c, each 16x16 (two m16n8k16 tiles); k in steps of 32 through a
// two-stage cp.async pipeline; fragments with ldmatrix (.trans for b given as [K, N]).
template <class T, bool kBKn>
__global__ void gemm_kernel(const T* a, const T* b, float* c, int n, int k) {
  constexpr int kTile = 32, kLd = kTile + 8;  // padded rows: 80 bytes, 16-byte aligned
  __shared__ __align__(16) T sa[2][kTile][kLd];
  __shared__ __align__(16) T sb[2][kTile][kLd];  // [n][k], or [k][n] with kBKn
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int m0 = blockIdx.y * kTile, n0 = blockIdx.x * kTile;
  const int wm = warp / 2 * 16, wn = warp % 2 * 16;
  auto issue = [&](int kt) {
    const int s = kt % 2, row = tid / 4, col = tid % 4 * 8, k0 = kt * kTile;
    qk::cp_async_16(&sa[s][row][col], a + (m0 + row) * k + k0 + col);
    if constexpr (kBKn) {
      qk::cp_async_16(&sb[s][row][col], b + (k0 + row) * n + n0 + col);
    } else {
      qk::cp_async_16(&sb[s][row][col], b + (n0 + row) * k + k0 + col);
    }
    qk::cp_async_commit();
  };
  float acc[2][4] = {};
  const int ktiles = k / kTile;
  issue(0);
  for (int kt = 0; kt < ktiles; ++kt) {
    if (kt + 1 < ktiles) {
      issue(kt + 1);
      qk::cp_async_wait<1>();
    } else {
      qk::cp_async_wait<0>();
    }
    __syncthreads();
    const int s = kt % 2;
    for (int kk = 0; kk < kTile; kk += 16) {
      std::uint32_t af[4];
      qk::ldmatrix_x4(af, &sa[s][wm + lane % 8 + lane / 8 % 2 * 8][kk + lane / 16 * 8]);
      for (int j = 0; j < 2; ++j) {
        std::uint32_t bf[2];
        if constexpr (kBKn) {
          qk::ldmatrix_x2_trans(bf, &sb[s][kk + lane % 16][wn + j * 8]);
        } else {
          qk::ldmatrix_x2(bf, &sb[s][wn + j * 8 + lane % 8][kk + lane / 8 % 2 * 8]);
        }
        mma_16816<T>(acc[j], af, bf);
      }
    }
    __syncthreads();
  }
  const int g = lane / 4, t = lane % 4;
  for (int j = 0; j < 2; ++j) {
    for (int r = 0; r < 4; ++r) {
      c[(m0 + wm + g + 8 * (r / 2)) * n + n0 + wn + j * 8 + 2 * t + r % 2] = acc[j][r];
    }
  }
}

// Each round writes a slot, waits, and adds the right neighbour's slot; double-buffered slots
// need one barrier per round.
__global__ void barriers_kernel(const float* x, int rounds, float* out) {
  __shared__ float slots[2][128];
  const int tid = threadIdx.x, base = blockIdx.x * 128;
  float v = x[base + tid];
  for (int r = 0; r < rounds; ++r) {
    slots[r % 2][tid] = v;
    __syncthreads();
    v += slots[r % 2][(tid + 1) % 128];
  }
  out[base + tid] = v;
}

__global__ void race_kernel(const float* x, bool sync, float* out) {
  QK_DYNAMIC_SMEM(float, s);
  const int tid = threadIdx.x, n = blockDim.x, base = blockIdx.x * n;
  s[tid] = x[base + tid];
  if (sync) __syncthreads();
  out[base + tid] = s[(tid + 32) % n];
}

#ifdef QK_EMULATE
// The tests find the lines of these call sites by their "misuse:" comments.
__global__ void misuse_kernel(int mode, int* out) {
  const int tid = threadIdx.x;
  if (mode == 0) {
    if (tid < 64) {
      __syncthreads();  // misuse: divergent-then
    } else {
      __syncthreads();  // misuse: divergent-else
    }
  } else if (mode == 1) {
    if (tid >= 64) return;
    __syncthreads();  // misuse: after-return
  } else if (mode == 2) {
    if (tid % 32 < 16) return;
    out[tid] = __shfl_xor_sync(kFullMask, tid, 1);  // misuse: mask-names-exited
  } else if (mode == 3) {
    if (tid % 32 >= 16) return;
    out[tid] = __shfl_xor_sync(kFullMask, tid, 1);  // misuse: exit-while-awaited
  }
  out[tid] = 1;
}
#endif

template <class T>
const T* ptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}
template <class T>
T* mut_ptr(at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

void check_input(const at::Tensor& t, const char* arg) {
  check_device(t, arg);
  check_contiguous(t, arg);
}

template <int kNum>
void launch_ldmatrix(const at::Tensor& src, bool trans, at::Tensor& out) {
  const cudaStream_t stream = current_stream(src);
  if (trans) {
    QK_LAUNCH(ldmatrix_kernel<kNum, true>, 1, 32, 0, stream, ptr<std::uint16_t>(src),
              mut_ptr<std::int32_t>(out));
  } else {
    QK_LAUNCH(ldmatrix_kernel<kNum, false>, 1, 32, 0, stream, ptr<std::uint16_t>(src),
              mut_ptr<std::int32_t>(out));
  }
}

template <class T>
void launch_gemm(const at::Tensor& a, const at::Tensor& b, bool b_kn, at::Tensor& c) {
  const int n = static_cast<int>(c.size(1)), k = static_cast<int>(a.size(1));
  const dim3 grid(static_cast<unsigned>(n / 32), static_cast<unsigned>(c.size(0) / 32));
  const cudaStream_t stream = current_stream(a);
  if (b_kn) {
    QK_LAUNCH(gemm_kernel<T, true>, grid, 128, 0, stream, ptr<T>(a), ptr<T>(b), mut_ptr<float>(c),
              n, k);
  } else {
    QK_LAUNCH(gemm_kernel<T, false>, grid, 128, 0, stream, ptr<T>(a), ptr<T>(b), mut_ptr<float>(c),
              n, k);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> convert(const at::Tensor& x) {
  check_input(x, "x");
  check_dtype(x, "x", {at::kFloat});
  check_dim(x, "x", 1);
  QK_CHECK_ARG(x.size(0) % 2 == 0 && x.size(0) > 0, "x", "a positive even length (got ", x.size(0),
               ")");
  QK_CHECK_ARG(reinterpret_cast<std::uintptr_t>(x.data_ptr()) % 8 == 0, "x",
               "an 8-byte aligned data pointer");
  DeviceGuard guard(x);
  at::Tensor h = at::empty_like(x, x.options().dtype(at::kHalf));
  at::Tensor b = at::empty_like(x, x.options().dtype(at::kBFloat16));
  at::Tensor hf = at::empty_like(x);
  at::Tensor bf = at::empty_like(x);
  const int pairs = static_cast<int>(x.size(0) / 2);
  QK_LAUNCH(convert_kernel, static_cast<unsigned>((pairs + 127) / 128), 128, 0, current_stream(x),
            ptr<float2>(x), pairs, mut_ptr<__half2>(h), mut_ptr<__nv_bfloat162>(b),
            mut_ptr<float2>(hf), mut_ptr<float2>(bf));
  return {h, b, hf, bf};
}

at::Tensor ex2(const at::Tensor& x) {
  check_input(x, "x");
  check_dtype(x, "x", {at::kFloat});
  check_dim(x, "x", 1);
  DeviceGuard guard(x);
  at::Tensor y = at::empty_like(x);
  const int n = static_cast<int>(x.size(0));
  if (n == 0) return y;
  QK_LAUNCH(ex2_kernel, static_cast<unsigned>((n + 127) / 128), 128, 0, current_stream(x),
            ptr<float>(x), n, mut_ptr<float>(y));
  return y;
}

at::Tensor mma(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
  check_input(a, "a");
  check_input(b, "b");
  check_input(c, "c");
  check_same_device(b, "b", a, "a");
  check_same_device(c, "c", a, "a");
  check_dtype(a, "a", {at::kBFloat16, at::kHalf});
  check_dtype(b, "b", {a.scalar_type()});
  check_dtype(c, "c", {at::kFloat});
  check_dim(a, "a", 2);
  check_dim(b, "b", 2);
  check_dim(c, "c", 2);
  const int64_t m = a.size(0), k = a.size(1), n = b.size(0);
  QK_CHECK_ARG(m % 16 == 0 && k % 16 == 0 && m > 0 && k > 0, "a",
               "a shape [M, K] with M and K positive multiples of 16 (got ", a.sizes(), ")");
  QK_CHECK_ARG(b.size(1) == k && n % 8 == 0 && n > 0, "b",
               "shape [N, K] with N a positive multiple of 8 (got ", b.sizes(), ")");
  QK_CHECK_ARG(c.size(0) == m && c.size(1) == n, "c", "shape [M, N] (got ", c.sizes(), ")");
  DeviceGuard guard(a);
  at::Tensor d = at::empty({m, n}, c.options());
  const dim3 grid(static_cast<unsigned>(n / 8), static_cast<unsigned>(m / 16));
  if (a.scalar_type() == at::kBFloat16) {
    QK_LAUNCH(mma_kernel<__nv_bfloat16>, grid, 32, 0, current_stream(a), ptr<__nv_bfloat16>(a),
              ptr<__nv_bfloat16>(b), ptr<float>(c), mut_ptr<float>(d), n, k);
  } else {
    QK_LAUNCH(mma_kernel<__half>, grid, 32, 0, current_stream(a), ptr<__half>(a), ptr<__half>(b),
              ptr<float>(c), mut_ptr<float>(d), n, k);
  }
  return d;
}

at::Tensor ldmatrix(const at::Tensor& src, int64_t num, bool trans) {
  check_input(src, "src");
  check_dtype(src, "src", {at::kShort});
  QK_CHECK_ARG(num == 1 || num == 2 || num == 4, "num", "1, 2 or 4 (got ", num, ")");
  QK_CHECK_ARG(src.dim() == 2 && src.size(0) == 8 * num && src.size(1) == 8, "src",
               "shape [8 * num, 8] (got ", src.sizes(), ")");
  DeviceGuard guard(src);
  at::Tensor out = at::empty({32, num}, src.options().dtype(at::kInt));
  if (num == 1) {
    launch_ldmatrix<1>(src, trans, out);
  } else if (num == 2) {
    launch_ldmatrix<2>(src, trans, out);
  } else {
    launch_ldmatrix<4>(src, trans, out);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> shuffle(const at::Tensor& x, const at::Tensor& table) {
  check_input(x, "x");
  check_input(table, "table");
  check_same_device(table, "table", x, "x");
  check_dtype(x, "x", {at::kInt});
  check_dtype(table, "table", {at::kInt});
  check_dim(x, "x", 1);
  QK_CHECK_ARG(x.size(0) % 32 == 0 && x.size(0) > 0 && x.size(0) <= 1024, "x",
               "a length that is a multiple of 32 up to 1024 (got ", x.size(0), ")");
  QK_CHECK_ARG(table.dim() == 2 && table.size(1) == 3, "table", "shape [V, 3] (got ", table.sizes(),
               ")");
  DeviceGuard guard(x);
  const int64_t n = x.size(0), variants = table.size(0);
  at::Tensor out32 = at::empty({variants, n}, x.options());
  at::Tensor out64 = at::empty({variants, n}, x.options().dtype(at::kLong));
  QK_LAUNCH(shuffle_kernel, 1, static_cast<unsigned>(n), 0, current_stream(x), ptr<int>(x),
            ptr<int>(table), static_cast<int>(variants), mut_ptr<int>(out32),
            mut_ptr<long long>(out64));
  return {out32, out64};
}

at::Tensor vote(const at::Tensor& pred, int64_t active) {
  check_input(pred, "pred");
  check_dtype(pred, "pred", {at::kInt});
  check_dim(pred, "pred", 1);
  const int64_t n = pred.size(0);
  QK_CHECK_ARG(n > 0 && n <= 1024, "pred", "1 to 1024 elements (got ", n, ")");
  QK_CHECK_ARG(active >= 0 && active <= n, "active", "a value in [0, len(pred)] (got ", active,
               ")");
  DeviceGuard guard(pred);
  at::Tensor out = at::full({3, n}, -7, pred.options());
  QK_LAUNCH(vote_kernel, 1, static_cast<unsigned>(n), 0, current_stream(pred), ptr<int>(pred),
            static_cast<int>(active), mut_ptr<int>(out));
  return out;
}

std::tuple<at::Tensor, at::Tensor> atomics(const at::Tensor& xf, const at::Tensor& xi) {
  check_input(xf, "xf");
  check_input(xi, "xi");
  check_same_device(xi, "xi", xf, "xf");
  check_dtype(xf, "xf", {at::kFloat});
  check_dtype(xi, "xi", {at::kInt});
  check_dim(xf, "xf", 1);
  QK_CHECK_ARG(xi.sizes() == xf.sizes(), "xi", "the shape of xf (got ", xi.sizes(), ")");
  DeviceGuard guard(xf);
  at::Tensor fout = at::zeros({9}, xf.options());
  fout[8].fill_(-INFINITY);
  at::Tensor iout = at::zeros({7}, xi.options());
  iout[1].fill_(INT_MIN);
  iout[2].fill_(INT_MAX);
  iout[6].fill_(-1);
  const int n = static_cast<int>(xf.size(0));
  QK_LAUNCH(atomics_kernel, 3, 128, 0, current_stream(xf), ptr<float>(xf), ptr<int>(xi), n,
            mut_ptr<float>(fout), mut_ptr<int>(iout));
  return {fout, iout};
}

std::tuple<at::Tensor, at::Tensor> block_sum(const at::Tensor& x) {
  check_input(x, "x");
  check_dtype(x, "x", {at::kFloat});
  check_dim(x, "x", 1);
  QK_CHECK_ARG(x.size(0) > 0, "x", "at least one element");
  DeviceGuard guard(x);
  constexpr int kThreads = 256;
  const int64_t n = x.size(0), blocks = (n + 4 * kThreads - 1) / (4 * kThreads);
  at::Tensor sums = at::empty({blocks}, x.options());
  at::Tensor positive = at::empty({blocks}, x.options().dtype(at::kInt));
  QK_LAUNCH(block_sum_kernel, static_cast<unsigned>(blocks), kThreads, kThreads * sizeof(float),
            current_stream(x), ptr<float>(x), static_cast<int>(n), mut_ptr<float>(sums),
            mut_ptr<int>(positive));
  return {sums, positive};
}

at::Tensor cp_async(const at::Tensor& x, int64_t valid_rows, bool wait) {
  check_input(x, "x");
  check_dtype(x, "x", {at::kFloat});
  QK_CHECK_ARG(x.dim() == 2 && x.size(1) == 32 && x.size(0) % 16 == 0 && x.size(0) > 0, "x",
               "shape [rows, 32] with rows a positive multiple of 16 (got ", x.sizes(), ")");
  DeviceGuard guard(x);
  at::Tensor out = at::empty_like(x);
  QK_LAUNCH(cp_async_kernel, 1, 64, 2 * 16 * 32 * sizeof(float), current_stream(x), ptr<float>(x),
            static_cast<int>(x.size(0)), static_cast<int>(valid_rows), wait, mut_ptr<float>(out));
  return out;
}

at::Tensor gemm(const at::Tensor& a, const at::Tensor& b, bool b_kn) {
  check_input(a, "a");
  check_input(b, "b");
  check_same_device(b, "b", a, "a");
  check_dtype(a, "a", {at::kBFloat16, at::kHalf});
  check_dtype(b, "b", {a.scalar_type()});
  check_dim(a, "a", 2);
  check_dim(b, "b", 2);
  const int64_t m = a.size(0), k = a.size(1), n = b_kn ? b.size(1) : b.size(0);
  QK_CHECK_ARG(m % 32 == 0 && k % 32 == 0 && m > 0 && k > 0, "a",
               "shape [M, K] with M and K positive multiples of 32 (got ", a.sizes(), ")");
  QK_CHECK_ARG(n % 32 == 0 && n > 0 && b.size(b_kn ? 0 : 1) == k, "b",
               b_kn ? "shape [K, N]" : "shape [N, K]", " with N a positive multiple of 32 (got ",
               b.sizes(), ")");
  DeviceGuard guard(a);
  at::Tensor c = at::empty({m, n}, a.options().dtype(at::kFloat));
  if (a.scalar_type() == at::kBFloat16) {
    launch_gemm<__nv_bfloat16>(a, b, b_kn, c);
  } else {
    launch_gemm<__half>(a, b, b_kn, c);
  }
  return c;
}

at::Tensor barriers(const at::Tensor& x, int64_t rounds) {
  check_input(x, "x");
  check_dtype(x, "x", {at::kFloat});
  check_dim(x, "x", 1);
  QK_CHECK_ARG(x.size(0) % 128 == 0 && x.size(0) > 0, "x",
               "a length that is a positive multiple of 128 (got ", x.size(0), ")");
  QK_CHECK_ARG(rounds >= 0, "rounds", "a non-negative count (got ", rounds, ")");
  DeviceGuard guard(x);
  at::Tensor out = at::empty_like(x);
  QK_LAUNCH(barriers_kernel, static_cast<unsigned>(x.size(0) / 128), 128, 0, current_stream(x),
            ptr<float>(x), static_cast<int>(rounds), mut_ptr<float>(out));
  return out;
}

at::Tensor race(const at::Tensor& x, bool sync) {
  check_input(x, "x");
  check_dtype(x, "x", {at::kFloat});
  check_dim(x, "x", 1);
  QK_CHECK_ARG(x.size(0) % 128 == 0 && x.size(0) > 0, "x",
               "a length that is a positive multiple of 128 (got ", x.size(0), ")");
  DeviceGuard guard(x);
  at::Tensor out = at::empty_like(x);
  QK_LAUNCH(race_kernel, static_cast<unsigned>(x.size(0) / 128), 128, 128 * sizeof(float),
            current_stream(x), ptr<float>(x), sync, mut_ptr<float>(out));
  return out;
}

void misuse(at::Tensor& out, int64_t mode) {
  check_input(out, "out");
  check_dtype(out, "out", {at::kInt});
  QK_CHECK_ARG(out.numel() == 128, "out", "128 elements (got ", out.numel(), ")");
  QK_CHECK_ARG(mode >= 0 && mode <= 4, "mode", "0 to 4 (got ", mode, ")");
#ifdef QK_EMULATE
  const int m = static_cast<int>(mode);
  int* o = mut_ptr<int>(out);
  const cudaStream_t stream = current_stream(out);
  if (mode < 4) {
    QK_LAUNCH(misuse_kernel, 1, 128, 0, stream, m, o);
  } else {
    constexpr std::size_t kSmem = 64 * 1024;                // above the default limit, never raised
    QK_LAUNCH(misuse_kernel, 1, 128, kSmem, stream, m, o);  // misuse: smem-limit
  }
#else
  TORCH_CHECK(false, "qwen_kernels: selftest_misuse breaks the CUDA programming rules on purpose ",
              "and only runs under the emulation");
#endif
}

}  // namespace qk::selftest
