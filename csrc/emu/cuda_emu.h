// CPU emulation of the CUDA device language, for compiling kernel sources with a C++20 host
// compiler (QK_EMULATE). See README.md in this folder for the rules kernels must follow.
#pragma once

#include <math.h>

#include <atomic>
#include <bit>
#include <concepts>
#include <cstdint>
#include <cstring>
#include <source_location>
#include <tuple>
#include <type_traits>
#include <utility>

#include "fiber.h"
#include "fp16.h"
#include "runtime.h"
#include "vector_types.h"

// ---- Keywords -----------------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// One OS thread runs all fibers of a block, so a thread-local is per block. It is not
// reinitialised per block: __shared__ variables must not have initialisers.
#define __shared__ static thread_local

using cudaStream_t = struct CUstream_st*;

// ---- Synchronisation ----------------------------------------------------------------------------

inline void __syncthreads(std::source_location site = std::source_location::current()) {
  qk_emu::active().barrier("__syncthreads()", qk_emu::BarrierOp::kNone, 0, site);
}
inline int __syncthreads_count(int pred,
                               std::source_location site = std::source_location::current()) {
  return qk_emu::active().barrier("__syncthreads_count()", qk_emu::BarrierOp::kCount, pred, site);
}
inline int __syncthreads_and(int pred,
                             std::source_location site = std::source_location::current()) {
  return qk_emu::active().barrier("__syncthreads_and()", qk_emu::BarrierOp::kAnd, pred, site);
}
inline int __syncthreads_or(int pred, std::source_location site = std::source_location::current()) {
  return qk_emu::active().barrier("__syncthreads_or()", qk_emu::BarrierOp::kOr, pred, site);
}

// Fibers of a block share one OS thread; blocks do not overlap, so fences only need to keep the
// compiler from moving memory accesses across them.
inline void __threadfence_block() { std::atomic_signal_fence(std::memory_order_seq_cst); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

namespace qk_emu {

inline void syncwarp_fn(Thread* const*, unsigned) {}

// Warp collectives exchange through Thread::in / Thread::out; a lane's operands go in before
// it blocks and its result is read after it resumes.
template <class In>
Thread& stage(const In& in) {
  static_assert(sizeof(In) <= sizeof(Thread::in) && std::is_trivially_copyable_v<In>);
  Thread& t = active().current();
  std::memcpy(t.in, &in, sizeof(In));
  return t;
}
template <class In>
In operands(const Thread* t) {
  In in;
  std::memcpy(&in, t->in, sizeof(In));
  return in;
}
template <class Out>
void set_result(Thread* t, const Out& out) {
  static_assert(sizeof(Out) <= sizeof(Thread::out) && std::is_trivially_copyable_v<Out>);
  std::memcpy(t->out, &out, sizeof(Out));
}
template <class Out>
Out result(const Thread& t) {
  Out out;
  std::memcpy(&out, t.out, sizeof(Out));
  return out;
}

// shfl.sync as the PTX ISA specifies it: c packs the segment mask (bits 8-12) and the clamp.
enum class ShflMode { kIdx, kUp, kDown, kBfly };
template <class T>
struct ShflIn {
  T value;
  int b, c;
};
template <class T, ShflMode mode>
void shfl_fn(Thread* const* lanes, unsigned mask) {
  for (unsigned m = mask; m != 0; m &= m - 1) {
    const int lane = __builtin_ctz(m);
    const auto in = operands<ShflIn<T>>(lanes[lane]);
    const int b = in.b & 31, clamp = in.c & 31, seg = (in.c >> 8) & 31;
    const int max_lane = (lane & seg) | (clamp & ~seg), min_lane = lane & seg;
    int j;
    bool ok;
    switch (mode) {
      case ShflMode::kUp:
        j = lane - b;
        ok = j >= max_lane;
        break;
      case ShflMode::kDown:
        j = lane + b;
        ok = j <= max_lane;
        break;
      case ShflMode::kBfly:
        j = lane ^ b;
        ok = j <= max_lane;
        break;
      default:
        j = min_lane | (b & ~seg);
        ok = j <= max_lane;
        break;
    }
    if (!ok) j = lane;
    // Reading a lane outside the mask is undefined on the GPU: give a poison value (NaN, -1).
    T value;
    if (mask & (1u << j)) {
      value = operands<ShflIn<T>>(lanes[j]).value;
    } else {
      std::memset(&value, 0xFF, sizeof value);
    }
    set_result(lanes[lane], value);
  }
}

template <class T>
concept ShflType = std::same_as<T, int> || std::same_as<T, unsigned> || std::same_as<T, long> ||
                   std::same_as<T, unsigned long> || std::same_as<T, long long> ||
                   std::same_as<T, unsigned long long> || std::same_as<T, float> ||
                   std::same_as<T, double> || std::same_as<T, __half> || std::same_as<T, __half2> ||
                   std::same_as<T, __nv_bfloat16> || std::same_as<T, __nv_bfloat162>;

template <ShflMode mode, class T>
T shfl(const char* op, unsigned mask, T var, int b, int width, bool up,
       const std::source_location& site) {
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    active().fail(std::string(op) + " at " + where(site) + ": width " + std::to_string(width) +
                  " is not a power of 2 in [1, 32]");
  }
  const int c = ((32 - width) << 8) | (up ? 0 : 31);
  Thread& t = stage(ShflIn<T>{var, b, c});
  active().warp_collective(op, &shfl_fn<T, mode>, mask, site);
  return result<T>(t);
}

enum class VoteMode { kBallot, kAny, kAll };
template <VoteMode mode>
void vote_fn(Thread* const* lanes, unsigned mask) {
  unsigned ballot = 0;
  for (unsigned m = mask; m != 0; m &= m - 1) {
    const int lane = __builtin_ctz(m);
    ballot |= operands<int>(lanes[lane]) != 0 ? 1u << lane : 0u;
  }
  const unsigned r = mode == VoteMode::kBallot ? ballot
                     : mode == VoteMode::kAny  ? unsigned{ballot != 0}
                                               : unsigned{ballot == mask};
  for (unsigned m = mask; m != 0; m &= m - 1) set_result(lanes[__builtin_ctz(m)], r);
}

template <VoteMode mode>
unsigned vote(const char* op, unsigned mask, int pred, const std::source_location& site) {
  Thread& t = stage(pred);
  active().warp_collective(op, &vote_fn<mode>, mask, site);
  return result<unsigned>(t);
}

}  // namespace qk_emu

inline void __syncwarp(unsigned mask = 0xFFFFFFFFu,
                       std::source_location site = std::source_location::current()) {
  qk_emu::active().warp_collective("__syncwarp()", &qk_emu::syncwarp_fn, mask, site);
}

template <qk_emu::ShflType T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
              std::source_location site = std::source_location::current()) {
  return qk_emu::shfl<qk_emu::ShflMode::kIdx>("__shfl_sync()", mask, var, src_lane, width, false,
                                              site);
}
template <qk_emu::ShflType T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                 std::source_location site = std::source_location::current()) {
  return qk_emu::shfl<qk_emu::ShflMode::kUp>("__shfl_up_sync()", mask, var, static_cast<int>(delta),
                                             width, true, site);
}
template <qk_emu::ShflType T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                   std::source_location site = std::source_location::current()) {
  return qk_emu::shfl<qk_emu::ShflMode::kDown>("__shfl_down_sync()", mask, var,
                                               static_cast<int>(delta), width, false, site);
}
template <qk_emu::ShflType T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                  std::source_location site = std::source_location::current()) {
  return qk_emu::shfl<qk_emu::ShflMode::kBfly>("__shfl_xor_sync()", mask, var, lane_mask, width,
                                               false, site);
}

inline unsigned __ballot_sync(unsigned mask, int pred,
                              std::source_location site = std::source_location::current()) {
  return qk_emu::vote<qk_emu::VoteMode::kBallot>("__ballot_sync()", mask, pred, site);
}
inline int __any_sync(unsigned mask, int pred,
                      std::source_location site = std::source_location::current()) {
  return static_cast<int>(qk_emu::vote<qk_emu::VoteMode::kAny>("__any_sync()", mask, pred, site));
}
inline int __all_sync(unsigned mask, int pred,
                      std::source_location site = std::source_location::current()) {
  return static_cast<int>(qk_emu::vote<qk_emu::VoteMode::kAll>("__all_sync()", mask, pred, site));
}

// ---- Atomics ------------------------------------------------------------------------------------
// Real atomics, although the blocks of a launch run one at a time: cheap, and safe should the
// host ever run blocks on several threads.

namespace qk_emu {
template <class T, class F>
T atomic_update(T* address, F f) {
  using Bits = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;
  auto* p = reinterpret_cast<Bits*>(address);
  Bits old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (!__atomic_compare_exchange_n(p, &old, std::bit_cast<Bits>(f(std::bit_cast<T>(old))), false,
                                      __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return std::bit_cast<T>(old);
}
}  // namespace qk_emu

// Plain overloads, not templates, so that arguments convert as they do with CUDA's.
#define QK_EMU_ATOMIC(name, T, expr)                                                     \
  inline T name(T* address, T val) {                                                     \
    return qk_emu::atomic_update(address, [=]([[maybe_unused]] T old) { return expr; }); \
  }
#define QK_EMU_ATOMIC_INT(T)                                                     \
  QK_EMU_ATOMIC(atomicAdd, T, old + val)                                         \
  QK_EMU_ATOMIC(atomicMax, T, old > val ? old : val)                             \
  QK_EMU_ATOMIC(atomicMin, T, old < val ? old : val)                             \
  QK_EMU_ATOMIC(atomicExch, T, val)                                              \
  QK_EMU_ATOMIC(atomicAnd, T, old& val)                                          \
  QK_EMU_ATOMIC(atomicOr, T, old | val)                                          \
  QK_EMU_ATOMIC(atomicXor, T, old ^ val)                                         \
  inline T atomicCAS(T* address, T compare, T val) {                             \
    __atomic_compare_exchange_n(address, &compare, val, false, __ATOMIC_RELAXED, \
                                __ATOMIC_RELAXED);                               \
    return compare;                                                              \
  }
QK_EMU_ATOMIC_INT(int)
QK_EMU_ATOMIC_INT(unsigned int)
QK_EMU_ATOMIC_INT(unsigned long long)
QK_EMU_ATOMIC(atomicSub, int, old - val)
QK_EMU_ATOMIC(atomicSub, unsigned int, old - val)
QK_EMU_ATOMIC(atomicMax, long long, old > val ? old : val)
QK_EMU_ATOMIC(atomicMin, long long, old < val ? old : val)
QK_EMU_ATOMIC(atomicAdd, float, old + val)
QK_EMU_ATOMIC(atomicExch, float, val)
QK_EMU_ATOMIC(atomicAdd, double, old + val)
QK_EMU_ATOMIC(atomicAdd, __half2, __hadd2(old, val))
QK_EMU_ATOMIC(atomicAdd, __nv_bfloat162, __hadd2(old, val))
#undef QK_EMU_ATOMIC_INT
#undef QK_EMU_ATOMIC
inline unsigned short atomicCAS(unsigned short* address, unsigned short compare,
                                unsigned short val) {
  __atomic_compare_exchange_n(address, &compare, val, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return compare;
}

// ---- Math and bit intrinsics --------------------------------------------------------------------

inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return exp10f(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) { sincosf(x, s, c); }
inline float __tanhf(float x) { return tanhf(x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fdividef(float x, float y) { return x / y; }
inline float __fdiv_rn(float x, float y) { return x / y; }
inline float __fadd_rn(float x, float y) { return x + y; }
inline float __fsub_rn(float x, float y) { return x - y; }
inline float __fmul_rn(float x, float y) { return x * y; }
inline float __fmaf_rn(float x, float y, float z) { return fmaf(x, y, z); }
inline float __saturatef(float x) { return x != x ? 0.0f : fminf(fmaxf(x, 0.0f), 1.0f); }
inline int __float2int_rn(float x) { return static_cast<int>(nearbyintf(x)); }
inline int __float2int_rz(float x) { return static_cast<int>(x); }
inline unsigned __float2uint_rn(float x) { return static_cast<unsigned>(nearbyintf(x)); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline float __uint2float_rn(unsigned x) { return static_cast<float>(x); }

inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline long long __double_as_longlong(double x) { return std::bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return std::bit_cast<double>(x); }

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) {
  return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x));
}
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0F0F0F0Fu) | ((x & 0x0F0F0F0Fu) << 4);
  return __builtin_bswap32(x);
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const unsigned long long bytes = (static_cast<unsigned long long>(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= ((bytes >> (((s >> (4 * i)) & 7) * 8)) & 0xFF) << (8 * i);
  return r;
}

// CUDA declares these integer overloads in the global namespace for device code.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

template <class T>
T __ldg(const T* p) {
  return *p;
}

// ---- Launch -------------------------------------------------------------------------------------

namespace qk_emu {

// Runs kernel over the grid. Arguments convert to the kernel's parameter types as in a <<<>>>
// launch, and every thread gets its own copy of the parameters.
template <class... P, class... A>
void launch(const char* file, int line, void (*kernel)(P...), dim3 grid, dim3 block,
            std::size_t smem, cudaStream_t /*stream*/, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "wrong number of kernel arguments");
  const std::string site = where(file, static_cast<unsigned>(line));
  const std::size_t limit = max_dynamic_smem(reinterpret_cast<const void*>(kernel));
  if (smem > limit) {
    throw Error("kernel launched at " + site + ": " + std::to_string(smem) +
                " bytes of dynamic shared memory exceed the kernel's limit of " +
                std::to_string(limit) + " (raise it with qk::set_max_dynamic_smem)");
  }
  struct Call {
    void (*kernel)(P...);
    std::tuple<std::decay_t<P>...> params;
  } call{kernel, {static_cast<std::decay_t<P>>(std::forward<A>(args))...}};
  thread_scheduler().run(
      grid, block, smem,
      [](void* arg) {
        auto* c = static_cast<Call*>(arg);
        std::apply(c->kernel, c->params);
      },
      &call, site);
}

}  // namespace qk_emu
