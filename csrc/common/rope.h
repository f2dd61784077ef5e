// Rotary arithmetic shared by the M-RoPE kernels and the rotary-fused attention: the angle from
// an integer position and a frequency, and the rotate-half rotation of one pair of elements,
// both rounded step by step as the eager reference computes them.
#pragma once

#include "common/kernel.h"

namespace qk {

// cos and sin of position * inv_freq: the product rounded to fp32 first, as the reference forms
// the angle, then sincosf with full range reduction (positions reach 10^6).
QK_DEVICE void rope_sincos(float position, float inv_freq, float* sin_a, float* cos_a) {
  sincosf(__fmul_rn(position, inv_freq), sin_a, cos_a);
}

// x * cos + rotate_half(x) * sin on the pair (x0, x1) = (x[i], x[i + D/2]), rotate_half([a, z])
// = [-z, a]: each product rounded on its own (no FMA contraction). cos1/sin1 are frequency i's
// for the first half, cos2/sin2 for the second (tables may differ between the halves).
QK_DEVICE void rotate_half_pair(float& x0, float& x1, float cos1, float sin1, float cos2,
                                float sin2) {
  const float a = x0, z = x1;
  x0 = __fsub_rn(__fmul_rn(a, cos1), __fmul_rn(z, sin1));
  x1 = __fadd_rn(__fmul_rn(z, cos2), __fmul_rn(a, sin2));
}

}  // namespace qk
