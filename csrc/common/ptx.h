// Wrappers for the inline PTX the kernels use (sm_80+): each has a CUDA body (the instruction)
// and an emulation body (csrc/emu/ptx_emu.h) that follows the PTX ISA's fragment layouts.
// Included by kernel.h; kernels use inline PTX only through these.
#pragma once

#include <cstdint>

#ifdef QK_EMULATE
#include "../emu/ptx_emu.h"
// The emulation reports errors with the caller's file:line; the GPU build has no such argument.
#define QK_SITE_PARAM , const std::source_location& site = std::source_location::current()
#else
#define QK_SITE_PARAM
#endif

namespace qk {

#ifndef QK_EMULATE
QK_DEVICE std::uint32_t smem_address(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// ---- mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 ----------------------------
// d = a * b + c over a 16x8x16 tile, warp-wide. With lane = 4 * g + t:
//   a[0..3] = A[g][2t..2t+1], A[g+8][2t..2t+1], A[g][2t+8..2t+9], A[g+8][2t+8..2t+9]  (A: 16x16)
//   b[0..1] = B[2t..2t+1][g], B[2t+8..2t+9][g]                                        (B: 16x8)
//   c, d    = C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1]                          (C: 16x8)
// Each 32-bit register holds two 16-bit values, the lower index in the lower half.

QK_DEVICE void mma_m16n8k16_bf16(float (&d)[4], const std::uint32_t (&a)[4],
                                 const std::uint32_t (&b)[2], const float (&c)[4] QK_SITE_PARAM) {
#ifdef QK_EMULATE
  qk_emu::mma_m16n8k16<__nv_bfloat16>(d, a, b, c, site);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
        "f"(c[2]), "f"(c[3]));
#endif
}

QK_DEVICE void mma_m16n8k16_f16(float (&d)[4], const std::uint32_t (&a)[4],
                                const std::uint32_t (&b)[2], const float (&c)[4] QK_SITE_PARAM) {
#ifdef QK_EMULATE
  qk_emu::mma_m16n8k16<__half>(d, a, b, c, site);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
        "f"(c[2]), "f"(c[3]));
#endif
}

// ---- ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{,.trans}.shared.b16 ----------------------------------
// Loads 1, 2 or 4 8x8 matrices of 16-bit elements from shared memory, warp-wide. Lanes
// 8i..8i+7 pass the (16-byte aligned) addresses of rows 0..7 of matrix i; the other lanes'
// addresses are ignored. Lane 4g + t receives in r[i] elements (g, 2t) and (g, 2t+1) of matrix i
// (of its transpose with .trans): the layout of an mma A/B/C fragment.

QK_DEVICE void ldmatrix_x1(std::uint32_t (&r)[1], const void* row QK_SITE_PARAM) {
#ifdef QK_EMULATE
  qk_emu::ldmatrix<1, false>(r, row, site);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
               : "=r"(r[0])
               : "r"(smem_address(row)));
#endif
}

QK_DEVICE void ldmatrix_x2(std::uint32_t (&r)[2], const void* row QK_SITE_PARAM) {
#ifdef QK_EMULATE
  qk_emu::ldmatrix<2, false>(r, row, site);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_address(row)));
#endif
}

QK_DEVICE void ldmatrix_x4(std::uint32_t (&r)[4], const void* row QK_SITE_PARAM) {
#ifdef QK_EMULATE
  qk_emu::ldmatrix<4, false>(r, row, site);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row)));
#endif
}

QK_DEVICE void ldmatrix_x1_trans(std::uint32_t (&r)[1], const void* row QK_SITE_PARAM) {
#ifdef QK_EMULATE
  qk_emu::ldmatrix<1, true>(r, row, site);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
               : "=r"(r[0])
               : "r"(smem_address(row)));
#endif
}

QK_DEVICE void ldmatrix_x2_trans(std::uint32_t (&r)[2], const void* row QK_SITE_PARAM) {
#ifdef QK_EMULATE
  qk_emu::ldmatrix<2, true>(r, row, site);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_address(row)));
#endif
}

QK_DEVICE void ldmatrix_x4_trans(std::uint32_t (&r)[4], const void* row QK_SITE_PARAM) {
#ifdef QK_EMULATE
  qk_emu::ldmatrix<4, true>(r, row, site);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row)));
#endif
}

// ---- ex2.approx.ftz.f32 -------------------------------------------------------------------------
// 2^x in one MUFU.EX2, subnormal inputs and results flushed to zero (exp2(-inf) = 0). Within 2
// ulp of 2^x: the CUDA C Programming Guide's bound for exp2f, which nvcc builds from this same
// instruction plus a guard that rescales inputs below -126 (an FSETP and two FMULs per call, the
// reason to call it directly where subnormal results may become zero, as softmax weights can).
QK_DEVICE float ex2_approx_ftz(float x) {
#ifdef QK_EMULATE
  return qk_emu::ex2_approx_ftz(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
#endif
}

// ---- cp.async -----------------------------------------------------------------------------------
// Asynchronous global -> shared copies, per thread. Copies issued since the last commit form a
// group; cp_async_wait<N>() waits until at most N committed groups are still in flight; the data
// is visible to other threads only after the wait and a __syncthreads(). Addresses must be
// aligned to the copy size.

// 16 bytes, cached in L2 only (.cg).
QK_DEVICE void cp_async_16(void* smem, const void* gmem QK_SITE_PARAM) {
#ifdef QK_EMULATE
  qk_emu::cp_async(smem, gmem, 16, 16, site);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_address(smem)), "l"(gmem));
#endif
}

// 16 bytes (.cg) if valid, else 16 zero bytes without reading gmem (src-size 0).
QK_DEVICE void cp_async_16_zfill(void* smem, const void* gmem, bool valid QK_SITE_PARAM) {
#ifdef QK_EMULATE
  qk_emu::cp_async(smem, gmem, 16, valid ? 16 : 0, site);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(smem)),
               "l"(gmem), "r"(valid ? 16 : 0));
#endif
}

// kBytes = 4, 8 or 16, cached in L1 and L2 (.ca).
template <int kBytes>
QK_DEVICE void cp_async_ca(void* smem, const void* gmem QK_SITE_PARAM) {
  static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16, "cp.async.ca copies 4, 8 or 16 bytes");
#ifdef QK_EMULATE
  qk_emu::cp_async(smem, gmem, kBytes, kBytes, site);
#else
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(smem_address(smem)), "l"(gmem),
               "n"(kBytes));
#endif
}

QK_DEVICE void cp_async_commit() {
#ifdef QK_EMULATE
  qk_emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int kPending>
QK_DEVICE void cp_async_wait() {
#ifdef QK_EMULATE
  qk_emu::cp_async_wait(kPending);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

// Commits the open group and waits for all of them.
QK_DEVICE void cp_async_wait_all() {
#ifdef QK_EMULATE
  qk_emu::cp_async_commit();
  qk_emu::cp_async_wait(0);
#else
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

}  // namespace qk

#undef QK_SITE_PARAM
