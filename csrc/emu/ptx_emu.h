// CPU bodies of the inline-PTX wrappers in common/ptx.h. mma and ldmatrix are warp-collective:
// every lane stages its own operands, the last lane to arrive computes all 32 results, and each
// lane reads back its own fragment. The fragment layouts are those of the PTX ISA ("Matrix
// Fragments for mma.m16n8k16 with floating point type", "Warp-level matrix load instruction:
// ldmatrix").
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <source_location>
#include <string>

#include "cuda_emu.h"

namespace qk_emu {

template <class T>
float lo_half(std::uint32_t r) {
  return to_float(T{static_cast<unsigned short>(r & 0xFFFFu)});
}
template <class T>
float hi_half(std::uint32_t r) {
  return to_float(T{static_cast<unsigned short>(r >> 16)});
}

struct MmaIn {
  std::uint32_t a[4];
  std::uint32_t b[2];
  float c[4];
};
struct Floats4 {
  float v[4];
};

// In every fragment, lane = 4 * group + tig ("thread in group"); a register holds two
// consecutive elements of a row (A, C, D) or column (B), the lower index in the lower half.
template <class T>
void mma_m16n8k16_fn(Thread* const* lanes, unsigned) {
  float a[16][16], b[16][8], c[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const MmaIn in = operands<MmaIn>(lanes[lane]);
    const int g = lane / 4, k = 2 * (lane % 4);
    for (int r = 0; r < 4; ++r) {  // a0..a3: rows g, g+8, g, g+8; columns k, k, k+8, k+8
      const int row = g + 8 * (r % 2), col = k + 8 * (r / 2);
      a[row][col] = lo_half<T>(in.a[r]);
      a[row][col + 1] = hi_half<T>(in.a[r]);
    }
    for (int r = 0; r < 2; ++r) {  // b0, b1: rows (k dimension) k, k+8; column g
      b[k + 8 * r][g] = lo_half<T>(in.b[r]);
      b[k + 8 * r + 1][g] = hi_half<T>(in.b[r]);
    }
    for (int r = 0; r < 4; ++r) c[g + 8 * (r / 2)][k + r % 2] = in.c[r];  // c0..c3
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, k = 2 * (lane % 4);
    Floats4 d;
    for (int r = 0; r < 4; ++r) {
      const int row = g + 8 * (r / 2), col = k + r % 2;
      double acc = c[row][col];
      for (int i = 0; i < 16; ++i) acc += static_cast<double>(a[row][i]) * b[i][col];
      d.v[r] = static_cast<float>(acc);
    }
    set_result(lanes[lane], d);
  }
}

template <class T>
void mma_m16n8k16(float (&d)[4], const std::uint32_t (&a)[4], const std::uint32_t (&b)[2],
                  const float (&c)[4], const std::source_location& site) {
  Thread& t = stage(MmaIn{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}, {c[0], c[1], c[2], c[3]}});
  active().warp_collective(
      std::same_as<T, __nv_bfloat16> ? "mma.sync.m16n8k16.bf16" : "mma.sync.m16n8k16.f16",
      &mma_m16n8k16_fn<T>, 0xFFFFFFFFu, site);
  const Floats4 r = result<Floats4>(t);
  for (int i = 0; i < 4; ++i) d[i] = r.v[i];
}

struct Regs4 {
  std::uint32_t r[4];
};

// Lanes 8i..8i+7 give the row addresses of matrix i (8 rows of 8 b16); lane = 4 * group + tig
// receives in register i the elements (group, 2 tig) and (group, 2 tig + 1) of matrix i, or of
// its transpose with .trans.
template <int kNum, bool kTrans>
void ldmatrix_fn(Thread* const* lanes, unsigned) {
  std::uint16_t m[kNum][8][8];
  for (int i = 0; i < kNum; ++i) {
    for (int row = 0; row < 8; ++row) {
      const Thread* t = lanes[8 * i + row];
      const auto* p = operands<const unsigned char*>(t);
      if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0) {
        active().fail("ldmatrix at " + where(t->site) + ": row address of thread " +
                      std::to_string(t->linear) + " is not 16-byte aligned");
      }
      std::memcpy(m[i][row], p, 16);
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, k = 2 * (lane % 4);
    Regs4 out{};
    for (int i = 0; i < kNum; ++i) {
      const std::uint32_t lo = kTrans ? m[i][k][g] : m[i][g][k];
      const std::uint32_t hi = kTrans ? m[i][k + 1][g] : m[i][g][k + 1];
      out.r[i] = lo | hi << 16;
    }
    set_result(lanes[lane], out);
  }
}

template <int kNum, bool kTrans>
void ldmatrix(std::uint32_t (&r)[kNum], const void* row, const std::source_location& site) {
  Thread& t = stage(static_cast<const unsigned char*>(row));
  active().warp_collective(kTrans ? "ldmatrix.trans" : "ldmatrix", &ldmatrix_fn<kNum, kTrans>,
                           0xFFFFFFFFu, site);
  const Regs4 out = result<Regs4>(t);
  for (int i = 0; i < kNum; ++i) r[i] = out.r[i];
}

// cp.async is deferred until the wait that covers it, so a read of the destination before
// that wait sees stale data, as it may on the GPU.
inline void cp_async(void* dst, const void* src, unsigned size, unsigned src_size,
                     const std::source_location& site) {
  Scheduler& s = active();
  Thread& t = s.current();
  if (reinterpret_cast<std::uintptr_t>(dst) % size != 0 ||
      (src_size != 0 && reinterpret_cast<std::uintptr_t>(src) % size != 0)) {
    s.fail("cp.async at " + where(site) + " in thread " + std::to_string(t.linear) +
           ": addresses must be aligned to the copy size (" + std::to_string(size) + " bytes)");
  }
  t.copies.push_back({dst, src, size, src_size, t.cp_group});
}

inline void cp_async_commit() { ++active().current().cp_group; }

inline void cp_async_wait(unsigned n) {
  Scheduler& s = active();
  Thread& t = s.current();
  s.complete_copies(t, t.cp_group >= n ? t.cp_group - n : 0);
}

// ex2.approx.ftz.f32 per thread: 2^x rounded to nearest, subnormal inputs and results flushed
// to zero. The hardware's approximation may differ from it by up to 2 ulp (see ptx.h); a
// correctly rounded result is one of those it may give.
inline float ex2_approx_ftz(float x) {
  if (std::fpclassify(x) == FP_SUBNORMAL) x = std::copysign(0.0f, x);
  const float y = static_cast<float>(std::exp2(static_cast<double>(x)));
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.0f : y;
}

}  // namespace qk_emu
