// Self-test kernels of the CUDA emulation layer (see tests/emu/test_emulation.py). They run
// unchanged on the GPU, so comparing both builds checks the emulated fragment layouts and
// collectives against the hardware.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace qk::selftest {

// x (float, even length) rounded to half and to bfloat16 by the pairwise conversions, and both
// converted back to float: (half, bfloat16, float, float).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> convert(const at::Tensor& x);

// ex2.approx.ftz.f32 (qk::ex2_approx_ftz) of every element of x (float).
at::Tensor ex2(const at::Tensor& x);

// d = a @ b.T + c with per-lane fragment loads from global memory (one warp per 16x8 tile).
at::Tensor mma(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c);

// The 32 x num registers that ldmatrix .x{num}{.trans} gives each lane for src (int16
// [8 * num, 8]: the rows of the num matrices).
at::Tensor ldmatrix(const at::Tensor& src, int64_t num, bool trans);

// For each (mode, arg, width) row of table (mode 0..3: idx, up, down, xor), every thread's
// shuffle of x (int32) and of a 64-bit value built from x.
std::tuple<at::Tensor, at::Tensor> shuffle(const at::Tensor& x, const at::Tensor& table);

// Ballot, any and all of pred ([3, n]) in one block of n threads of which the first `active`
// take part; the others exit first and keep their poisoned output.
at::Tensor vote(const at::Tensor& pred, int64_t active);

// Atomics over xf (float) and xi (int32) across several blocks: float bins, integer sum, max,
// min, or, xor, count, exchange, and a float max through atomicCAS.
std::tuple<at::Tensor, at::Tensor> atomics(const at::Tensor& xf, const at::Tensor& xi);

// Per-block sums of x in blocks of 1024 elements (shared-memory tree, then shuffles) and the
// per-block __syncthreads_count of threads with a positive partial sum.
std::tuple<at::Tensor, at::Tensor> block_sum(const at::Tensor& x);

// Copies x (float [rows, 32], rows a multiple of 16) through a two-stage cp.async pipeline;
// rows from valid_rows on arrive zero-filled. With wait = false the kernel skips
// cp.async.wait_group (a bug: the result is undefined).
at::Tensor cp_async(const at::Tensor& x, int64_t valid_rows, bool wait);

// a @ b.T (b [N, K]) or a @ b (b [K, N], b_kn) in fp32: cp.async + ldmatrix + mma, 32x32 tiles.
at::Tensor gemm(const at::Tensor& a, const at::Tensor& b, bool b_kn);

// Blocks of 128 threads doing `rounds` times: v += v of the right neighbour (wrapping), with
// one __syncthreads() per round.
at::Tensor barriers(const at::Tensor& x, int64_t rounds);

// out[i] = x[i + 32] (wrapping) through shared memory, with or without the __syncthreads()
// between the write and the read (a bug: the result is undefined).
at::Tensor race(const at::Tensor& x, bool sync);

// Kernels that break the rules (one block of 128 threads writing out, int32 [128]); each raises
// an error naming its call site when emulated, and the CUDA build refuses to run them.
// mode 0: __syncthreads() in both branches of a divergent if; 1: __syncthreads() after half the
// block returned; 2: a full-mask shuffle naming lanes that returned; 3: lanes return while the
// rest of their warp waits for them in a shuffle; 4: a launch with 64 KiB of dynamic shared
// memory without raising the kernel's limit.
void misuse(at::Tensor& out, int64_t mode);

}  // namespace qk::selftest
