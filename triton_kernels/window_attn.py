"""Triton attention inside the segments of a packed sequence (``window_attn``), optionally with the
2D/3D rotary of q and k fused into the loads (``window_attn_rope``).

One kernel, two paths picked by the launch configuration (``attn_config``):

* window path (segments of at most 64 tokens, 28 of the tower's 32 layers): one program per
  (segment, group of heads) holds the segment's Q, K and V tiles (16, 32 or 64 rows, sized by
  ``max_seqlen``), computes all scores at once and a single-pass softmax, no rescaling;
* long path (whole frames, up to 16k+ tokens): one program per (segment, block of query rows,
  head) walks the segment's K/V blocks with the online softmax of FlashAttention-2.

head_dim is split into a power-of-two main block and a tail block (80 = 64 + 16, each a ``tl.dot``
of its own, accumulated), so 80 is not padded to 128; 64 and 128 are one block.

Numerics: fp16/bf16 inputs go into ``tl.dot`` as they are with fp32 accumulation; the softmax is
fp32 and its probabilities P are rounded (to nearest even) to the input dtype for the PV product,
as FlashAttention does; the row sums use the unrounded fp32 P. fp32 inputs use fp32 products
(``input_precision="ieee"``: no TF32). The output is rounded once to the input dtype.

With the rotary fused, the window path rotates q and k while their tiles are loaded: angles in
fp32 from ``positions[axis(i)] * inv_freq[i]`` (libdevice cos/sin on the GPU), rotate-half,
rounded to the input dtype exactly where ``mrope_pos`` would store them, so the attention sees the
values the unfused chain sees. The rotated copy of a tile reads its partner half from the same
cache lines, so qkv is read from memory once. The long path, bound by its matrix products and
reading every key block once per block of queries, rotates q and k once in a pre-pass instead
(``_rotate_qk_kernel``) rather than forming each key's angles ``seqlen / block_m`` times.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._common import (
    INTERPRETING,
    Arch,
    band_bounds,
    launch,
    launch_arch,
    needs_constexpr_trip_counts,
    round_to,
)

# Segments up to this many tokens take the single-pass window path.
WINDOW_MAX_SEQLEN = 64
# Widest head the kernel's registers hold (main block + tail block).
MAX_HEAD_DIM = 256
LOG2_E = math.log2(math.e)
LOG2E = tl.constexpr(LOG2_E)


@dataclasses.dataclass(frozen=True)
class AttnConfig:
    """How one call is launched (QuACK style: derived from the problem by ``attn_config``).

    Attributes:
        block_m: query rows per program.
        block_n: key/value rows per step of the inner loop.
        one_pass: the window path: one K/V block covers the longest segment (``block_n >=
            max_seqlen``, ``block_m == block_n``), so the softmax runs in one pass.
        heads_per_program: heads one program handles in turn (they share the rotary angles).
        num_warps: warps per program.
        num_stages: software-pipelining depth of the K/V loop (long path).
    """

    block_m: int
    block_n: int
    one_pass: bool
    heads_per_program: int
    num_warps: int
    num_stages: int


def head_dim_blocks(head_dim: int) -> tuple[int, int]:
    """(main, tail) column blocks covering ``head_dim``: powers of two of at least 16 (tl.dot's
    minimum), e.g. 80 -> (64, 16), 64 -> (64, 0), 96 -> (64, 32)."""
    main = max(16, 1 << (head_dim.bit_length() - 1))
    if main >= head_dim:
        return main, 0
    return main, max(16, triton.next_power_of_2(head_dim - main))


def attn_config(
    max_seqlen: int,
    head_dim: int,
    dtype: torch.dtype,
    arch: Arch,
    heads: int = 1,
    rotary: bool = False,
) -> AttnConfig:
    """The launch configuration for segments of at most ``max_seqlen`` tokens.

    Window path for fp16/bf16 and ``max_seqlen <= 64``: the smallest tile of 16, 32 or 64 rows
    that holds a segment, one warp per 16 query rows. Long path: 128x64 tiles with 8 warps for
    fp16/bf16 (128x128 with 2 stages on sm_90+ up to head_dim 80), 64x32 for heads over 128,
    and 64x32 with 8 warps for fp32 at any segment length (its products run on FMA units, not
    tensor cores, and a whole 64-row fp32 window spills thousands of words at head_dim 64 and
    128); 3 pipeline stages on sm_90+ and on sm_80 up to head_dim 80, 2 elsewhere (shared
    memory, and registers: 128x64 at head_dim 128 spills with 3 stages on sm_80). Compiled
    offline for sm_80 and sm_90 at head_dim 64, 80 and 128, these spill no registers, but fp32
    at head_dim 128 on sm_80 (a few words; so does head_dim 256).

    Heads per program: one on the GPU (sharing the rotary angles between 2 or 4 heads costs
    their registers: 255 per thread against 168 for one head). Under the interpreter, where
    programs run one by one, up to 4 heads per program with the rotary, and one configuration
    (64x64 on the long path: fewer, larger numpy steps) without pipelining.
    """
    interpreted = arch is None
    if max_seqlen <= WINDOW_MAX_SEQLEN and (interpreted or dtype != torch.float32):
        block = max(16, triton.next_power_of_2(max_seqlen))
        shared = rotary and interpreted
        per_program = next(n for n in (4, 2, 1) if heads % n == 0) if shared else 1
        return AttnConfig(block, block, True, per_program, max(1, block // 16), 1)
    if interpreted:
        return AttnConfig(64, 64, False, 1, 4, 1)
    if dtype == torch.float32:
        block_m, block_n, warps = 64, 32, 8
    elif head_dim > 128:
        block_m, block_n, warps = 64, 32, 4
    elif arch[0] >= 9 and head_dim <= 80:
        # Hopper's wgmma over 64x128 score tiles per warpgroup: 0.84 main-loop instructions per
        # kFLOP (bench/STATIC.md) against 1.11 for 128x64 (compiled offline for sm_90a). Its 216
        # registers hold one block (8 warps) per SM; the 2 blocks of 128x64 cost a third more
        # instructions per FLOP.
        return AttnConfig(128, 128, False, 1, 8, 2)
    else:
        block_m, block_n, warps = 128, 64, 8
    major, minor = arch
    stages = 3 if major >= 9 or ((major, minor) == (8, 0) and head_dim <= 80) else 2
    return AttnConfig(block_m, block_n, False, 1, warps, stages)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _cos_sin(angle):
    if INTERPRETING:
        return tl.cos(angle), tl.sin(angle)
    else:
        # libdevice's correctly range-reduced cosf/sinf (what torch's CUDA cos/sin call), not
        # the approximate hardware instructions: angles reach hundreds of radians.
        return libdevice.cos(angle), libdevice.sin(angle)


@triton.jit
def _angles(
    positions_ptr,
    inv_freq_ptr,
    tokens,
    token_mask,
    cols,
    stride_pa,
    stride_pt,
    HEAD_DIM: tl.constexpr,
    AXES: tl.constexpr,
    BOUND_1: tl.constexpr,
    BOUND_2: tl.constexpr,
    BOUND_3: tl.constexpr,
):
    """cos and sin ``[rows, cols]`` of ``positions[axis(f), token] * inv_freq[f]`` (fp32), with
    f = col mod D/2 and axis(f) the band of ``mrope_section`` holding f (bands end at BOUND_i)."""
    freq = cols % (HEAD_DIM // 2)
    col_ok = cols < HEAD_DIM
    inv_freq = tl.load(inv_freq_ptr + freq, mask=col_ok, other=0.0)
    pos_ptrs = positions_ptr + tokens.to(tl.int64) * stride_pt
    position = tl.load(pos_ptrs, mask=token_mask, other=0).to(tl.float32)[:, None]
    if AXES > 1:
        axis_1 = tl.load(pos_ptrs + stride_pa, mask=token_mask, other=0).to(tl.float32)
        position = tl.where((freq >= BOUND_1)[None, :], axis_1[:, None], position)
    if AXES > 2:
        axis_2 = tl.load(pos_ptrs + 2 * stride_pa, mask=token_mask, other=0).to(tl.float32)
        position = tl.where((freq >= BOUND_2)[None, :], axis_2[:, None], position)
    if AXES > 3:
        axis_3 = tl.load(pos_ptrs + 3 * stride_pa, mask=token_mask, other=0).to(tl.float32)
        position = tl.where((freq >= BOUND_3)[None, :], axis_3[:, None], position)
    return _cos_sin(position * inv_freq[None, :])


@triton.jit
def _tile_mask(token_mask, cols, HEAD_DIM: tl.constexpr, MASK_COLS: tl.constexpr):
    """Rows inside the segment; columns inside the head only where the blocks overhang it."""
    if MASK_COLS:
        return token_mask[:, None] & (cols < HEAD_DIM)[None, :]
    else:
        return token_mask[:, None]


@triton.jit
def _load_tile(
    ptr,
    tokens,
    token_mask,
    stride_t,
    cols,
    cos,
    sin,
    HEAD_DIM: tl.constexpr,
    MASK_COLS: tl.constexpr,
    ROTATE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Rows ``tokens`` x columns ``cols`` of one head (zeros outside the masks), rotated with
    ``cos``/``sin`` and rounded to the input dtype when ``ROTATE``; fp32 when ``UPCAST``."""
    rows = tokens.to(tl.int64)[:, None] * stride_t
    mask = _tile_mask(token_mask, cols, HEAD_DIM, MASK_COLS)
    x = tl.load(ptr + rows + cols[None, :], mask=mask, other=0.0)
    if ROTATE:
        # rotate_half([a, b]) = [-b, a]: column c pairs with c +- D/2.
        half: tl.constexpr = HEAD_DIM // 2
        partner = tl.load(ptr + rows + ((cols + half) % HEAD_DIM)[None, :], mask=mask, other=0.0)
        sign = tl.where(cols < half, -1.0, 1.0)[None, :]
        rotated = x.to(tl.float32) * cos + (sign * partner.to(tl.float32)) * sin
        x = round_to(rotated, ptr.dtype.element_ty)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _load_head(
    ptr,
    tokens,
    token_mask,
    stride_t,
    cols_a,
    cols_b,
    cos_a,
    sin_a,
    cos_b,
    sin_b,
    HEAD_DIM: tl.constexpr,
    D_TAIL: tl.constexpr,
    MASK_COLS: tl.constexpr,
    ROTATE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``_load_tile`` of both column blocks of a head (64 + 16 for head_dim 80); without a tail
    block the second is the first."""
    x_a = _load_tile(
        ptr, tokens, token_mask, stride_t, cols_a, cos_a, sin_a, HEAD_DIM, MASK_COLS, ROTATE,
        UPCAST,
    )  # fmt: skip
    x_b = x_a
    if D_TAIL > 0:
        x_b = _load_tile(
            ptr, tokens, token_mask, stride_t, cols_b, cos_b, sin_b, HEAD_DIM, MASK_COLS, ROTATE,
            UPCAST,
        )  # fmt: skip
    return x_a, x_b


@triton.jit
def _dots(q_a, q_b, k_a, k_b, D_TAIL: tl.constexpr, IEEE: tl.constexpr):
    """``q k^T`` over both column blocks, unscaled."""
    s = _dot(q_a, tl.trans(k_a), tl.zeros((q_a.shape[0], k_a.shape[0]), tl.float32), IEEE)
    if D_TAIL > 0:
        s = _dot(q_b, tl.trans(k_b), s, IEEE)
    return s


@triton.jit
def _scores(q_a, q_b, k_a, k_b, key_mask, qk_scale, D_TAIL: tl.constexpr, IEEE: tl.constexpr):
    """``q k^T * scale * log2(e)`` over both column blocks, -inf at keys outside the segment."""
    s = _dots(q_a, q_b, k_a, k_b, D_TAIL, IEEE)
    return tl.where(key_mask[None, :], s * qk_scale, float("-inf"))


@triton.jit
def _kv_step(
    acc_a,
    acc_b,
    m_i,
    l_i,
    q_a,
    q_b,
    k_head,
    v_head,
    start,
    seqlen,
    n0,
    stride_kt,
    stride_vt,
    qk_scale,
    cols_a,
    cols_b,
    HEAD_DIM: tl.constexpr,
    D_TAIL: tl.constexpr,
    MASK_COLS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    MASKED: tl.constexpr,
):
    """One K/V block of the online softmax (long path): rescale the running sums, add P V.
    Only a block that the segment's end cuts (``MASKED``) masks its keys; the scale enters the
    exponent inside one multiply-add per score (m is kept scaled)."""
    keys = n0 + tl.arange(0, BLOCK_N)
    # A block the segment fills gets a constant mask, which the compiler folds away.
    key_mask = tl.full((BLOCK_N,), True, tl.int1)
    if MASKED:
        key_mask = keys < seqlen
    tokens = start + keys
    k_a, k_b = _load_head(
        k_head, tokens, key_mask, stride_kt, cols_a, cols_b, 0.0, 0.0, 0.0, 0.0, HEAD_DIM,
        D_TAIL, MASK_COLS, False, UPCAST,
    )  # fmt: skip
    s = _dots(q_a, q_b, k_a, k_b, D_TAIL, IEEE)
    if MASKED:
        s = tl.where(key_mask[None, :], s, float("-inf"))
    # Keys past the segment are -inf; the block's first key is inside it, so m stays finite.
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    p_in = round_to(p, v_head.dtype.element_ty)
    if UPCAST:
        p_in = p_in.to(tl.float32)
    v_a, v_b = _load_head(
        v_head, tokens, key_mask, stride_vt, cols_a, cols_b, 0.0, 0.0, 0.0, 0.0, HEAD_DIM,
        D_TAIL, MASK_COLS, False, UPCAST,
    )  # fmt: skip
    acc_a = _dot(p_in, v_a, acc_a * alpha[:, None], IEEE)
    if D_TAIL > 0:
        acc_b = _dot(p_in, v_b, acc_b * alpha[:, None], IEEE)
    return acc_a, acc_b, m_new, l_i


@triton.jit
def _window_attn_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
    cu_seqlens_ptr,
    positions_ptr,
    inv_freq_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_pa,
    stride_pt,
    heads,
    m_blocks,
    n_tokens,
    max_seqlen,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    D_MAIN: tl.constexpr,
    D_TAIL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_PASS: tl.constexpr,
    KV_BLOCKS: tl.constexpr,
    HEADS_PER_PROGRAM: tl.constexpr,
    ROTARY: tl.constexpr,
    AXES: tl.constexpr,
    BOUND_1: tl.constexpr,
    BOUND_2: tl.constexpr,
    BOUND_3: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    STORE_LSE: tl.constexpr,
):
    # The rotary is fused on the window path only (the launcher rotates first otherwise).
    tl.static_assert(ONE_PASS or not ROTARY)
    segment = tl.program_id(0) // m_blocks
    m_block = tl.program_id(0) % m_blocks
    # Bounds clamped to [0, T] and cut at max_seqlen, as every backend does: a layout the op's
    # value checks would refuse (skipped by the caller) never reads or writes out of bounds.
    start = tl.minimum(tl.maximum(tl.load(cu_seqlens_ptr + segment), 0), n_tokens)
    end = tl.minimum(tl.maximum(tl.load(cu_seqlens_ptr + segment + 1), start), n_tokens)
    seqlen = tl.minimum(end - start, max_seqlen)
    if m_block * BLOCK_M >= seqlen:  # an empty segment, or rows past the end of this one
        return
    MASK_COLS: tl.constexpr = D_MAIN + D_TAIL != HEAD_DIM
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < seqlen
    tokens = start + rows
    cols_a = tl.arange(0, D_MAIN)
    cols_b = cols_a
    if D_TAIL > 0:
        cols_b = D_MAIN + tl.arange(0, D_TAIL)
    # Rotary angles of the query rows: shared by the heads of this program and, on the window
    # path (the keys are the same tokens), by k.
    cos_a, sin_a, cos_b, sin_b = qk_scale, qk_scale, qk_scale, qk_scale  # unused without rotary
    if ROTARY:
        cos_a, sin_a = _angles(
            positions_ptr, inv_freq_ptr, tokens, row_mask, cols_a, stride_pa, stride_pt,
            HEAD_DIM, AXES, BOUND_1, BOUND_2, BOUND_3,
        )  # fmt: skip
        if D_TAIL > 0:
            cos_b, sin_b = _angles(
                positions_ptr, inv_freq_ptr, tokens, row_mask, cols_b, stride_pa, stride_pt,
                HEAD_DIM, AXES, BOUND_1, BOUND_2, BOUND_3,
            )  # fmt: skip
    out_rows = tokens.to(tl.int64)[:, None] * (heads * HEAD_DIM)
    for h in range(HEADS_PER_PROGRAM):
        head = tl.program_id(1) * HEADS_PER_PROGRAM + h
        q_head = q_ptr + head * stride_qh
        k_head = k_ptr + head * stride_kh
        v_head = v_ptr + head * stride_vh
        q_a, q_b = _load_head(
            q_head, tokens, row_mask, stride_qt, cols_a, cols_b, cos_a, sin_a, cos_b, sin_b,
            HEAD_DIM, D_TAIL, MASK_COLS, ROTARY, UPCAST,
        )  # fmt: skip
        acc_a = tl.zeros((BLOCK_M, D_MAIN), tl.float32)
        acc_b = acc_a
        if D_TAIL > 0:
            acc_b = tl.zeros((BLOCK_M, D_TAIL), tl.float32)
        if ONE_PASS:
            # The whole segment is one K/V tile of the same rows as Q: one softmax pass.
            k_a, k_b = _load_head(
                k_head, tokens, row_mask, stride_kt, cols_a, cols_b, cos_a, sin_a, cos_b, sin_b,
                HEAD_DIM, D_TAIL, MASK_COLS, ROTARY, UPCAST,
            )  # fmt: skip
            s = _scores(q_a, q_b, k_a, k_b, row_mask, qk_scale, D_TAIL, IEEE)
            m_i = tl.max(s, 1)
            p = tl.exp2(s - m_i[:, None])
            l_i = tl.sum(p, 1)
            p_in = round_to(p, dtype)
            if UPCAST:
                p_in = p_in.to(tl.float32)
            v_a, v_b = _load_head(
                v_head, tokens, row_mask, stride_vt, cols_a, cols_b, 0.0, 0.0, 0.0, 0.0,
                HEAD_DIM, D_TAIL, MASK_COLS, False, UPCAST,
            )  # fmt: skip
            acc_a = _dot(p_in, v_a, acc_a, IEEE)
            if D_TAIL > 0:
                acc_b = _dot(p_in, v_b, acc_b, IEEE)
        else:
            m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
            l_i = tl.zeros((BLOCK_M,), tl.float32)
            if KV_BLOCKS > 0:
                # Interpreters without runtime loop bounds: every block up to max_seqlen, the
                # ones past this segment fully masked (they change nothing).
                for block in range(KV_BLOCKS):
                    acc_a, acc_b, m_i, l_i = _kv_step(
                        acc_a, acc_b, m_i, l_i, q_a, q_b, k_head, v_head, start, seqlen,
                        block * BLOCK_N, stride_kt, stride_vt, qk_scale, cols_a, cols_b,
                        HEAD_DIM, D_TAIL, MASK_COLS, BLOCK_N, UPCAST, IEEE, True,
                    )  # fmt: skip
            else:
                # Blocks the segment fills, unmasked; then the one its end cuts, if any.
                full_end = seqlen // BLOCK_N * BLOCK_N
                for n0 in range(0, full_end, BLOCK_N):
                    acc_a, acc_b, m_i, l_i = _kv_step(
                        acc_a, acc_b, m_i, l_i, q_a, q_b, k_head, v_head, start, seqlen, n0,
                        stride_kt, stride_vt, qk_scale, cols_a, cols_b, HEAD_DIM, D_TAIL,
                        MASK_COLS, BLOCK_N, UPCAST, IEEE, False,
                    )  # fmt: skip
                if full_end < seqlen:
                    acc_a, acc_b, m_i, l_i = _kv_step(
                        acc_a, acc_b, m_i, l_i, q_a, q_b, k_head, v_head, start, seqlen,
                        full_end, stride_kt, stride_vt, qk_scale, cols_a, cols_b, HEAD_DIM,
                        D_TAIL, MASK_COLS, BLOCK_N, UPCAST, IEEE, True,
                    )  # fmt: skip
        if STORE_LSE:  # natural log-sum-exp of the scaled scores, [T, H] fp32, for the backward
            lse = (m_i + tl.log2(l_i)) / LOG2E
            tl.store(lse_ptr + tokens.to(tl.int64) * heads + head, lse, mask=row_mask)
        inv_l = 1.0 / l_i[:, None]
        out_head = out_ptr + out_rows + head * HEAD_DIM
        mask_a = _tile_mask(row_mask, cols_a, HEAD_DIM, MASK_COLS)
        tl.store(out_head + cols_a[None, :], round_to(acc_a * inv_l, dtype), mask=mask_a)
        if D_TAIL > 0:
            mask_b = _tile_mask(row_mask, cols_b, HEAD_DIM, MASK_COLS)
            tl.store(out_head + cols_b[None, :], round_to(acc_b * inv_l, dtype), mask=mask_b)


@triton.jit
def _rotate_columns(
    q_head,
    k_head,
    out_rows,
    positions_ptr,
    inv_freq_ptr,
    tokens,
    token_mask,
    cols,
    q_stride,
    k_stride,
    stride_pa,
    stride_pt,
    k_offset,
    HEAD_DIM: tl.constexpr,
    MASK_COLS: tl.constexpr,
    AXES: tl.constexpr,
    BOUND_1: tl.constexpr,
    BOUND_2: tl.constexpr,
    BOUND_3: tl.constexpr,
):
    cos, sin = _angles(
        positions_ptr, inv_freq_ptr, tokens, token_mask, cols, stride_pa, stride_pt, HEAD_DIM,
        AXES, BOUND_1, BOUND_2, BOUND_3,
    )  # fmt: skip
    mask = _tile_mask(token_mask, cols, HEAD_DIM, MASK_COLS)
    q = _load_tile(
        q_head, tokens, token_mask, q_stride, cols, cos, sin, HEAD_DIM, MASK_COLS, True, False
    )
    tl.store(out_rows + cols[None, :], q, mask=mask)
    k = _load_tile(
        k_head, tokens, token_mask, k_stride, cols, cos, sin, HEAD_DIM, MASK_COLS, True, False
    )
    tl.store(out_rows + k_offset + cols[None, :], k, mask=mask)


@triton.jit
def _rotate_qk_kernel(
    q_ptr,
    k_ptr,
    out_ptr,
    positions_ptr,
    inv_freq_ptr,
    tokens_total,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_pa,
    stride_pt,
    heads,
    HEAD_DIM: tl.constexpr,
    D_MAIN: tl.constexpr,
    D_TAIL: tl.constexpr,
    BLOCK_T: tl.constexpr,
    AXES: tl.constexpr,
    BOUND_1: tl.constexpr,
    BOUND_2: tl.constexpr,
    BOUND_3: tl.constexpr,
):
    """q and k of one head for BLOCK_T tokens, rotated and rounded as on the window path, into
    ``out [T, 2, H, D]`` (contiguous)."""
    MASK_COLS: tl.constexpr = D_MAIN + D_TAIL != HEAD_DIM
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < tokens_total
    head = tl.program_id(1)
    q_head = q_ptr + head * stride_qh
    k_head = k_ptr + head * stride_kh
    out_rows = out_ptr + tokens.to(tl.int64)[:, None] * (2 * heads * HEAD_DIM) + head * HEAD_DIM
    _rotate_columns(
        q_head, k_head, out_rows, positions_ptr, inv_freq_ptr, tokens, token_mask,
        tl.arange(0, D_MAIN), stride_qt, stride_kt, stride_pa, stride_pt, heads * HEAD_DIM,
        HEAD_DIM, MASK_COLS, AXES, BOUND_1, BOUND_2, BOUND_3,
    )  # fmt: skip
    if D_TAIL > 0:
        _rotate_columns(
            q_head, k_head, out_rows, positions_ptr, inv_freq_ptr, tokens, token_mask,
            D_MAIN + tl.arange(0, D_TAIL), stride_qt, stride_kt, stride_pa, stride_pt,
            heads * HEAD_DIM, HEAD_DIM, MASK_COLS, AXES, BOUND_1, BOUND_2, BOUND_3,
        )  # fmt: skip


def _unit_columns(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its columns are contiguous (views of a packed qkv are), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _rotary_args(
    rotary: tuple[torch.Tensor, torch.Tensor, list[int]], head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, int, int, dict[str, int]]:
    """positions, fp32 inv_freq, the positions' strides and the band constexprs of a rotary."""
    positions, inv_freq, section = rotary
    bounds = band_bounds("window_attn_rope", section, head_dim // 2)
    bands = dict(zip(("BOUND_1", "BOUND_2", "BOUND_3"), bounds, strict=True), AXES=len(section))
    inv_freq = inv_freq.to(torch.float32).contiguous()
    return positions, inv_freq, positions.stride(0), positions.stride(1), bands


@dataclasses.dataclass(frozen=True)
class RotateConfig:
    """Launch shape of the long path's rotary pre-pass: tokens per program, warps."""

    block_tokens: int
    num_warps: int


def rotate_config(head_dim: int, arch: Arch) -> RotateConfig:
    """64 tokens a program up to head_dim 80, 32 for wider heads (64 spills at 128 on sm_80 and
    sm_90); 4 warps; the same on every arch."""
    del arch
    return RotateConfig(64 if head_dim <= 80 else 32, 4)


def _rotate_qk(
    q: torch.Tensor, k: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor, list[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k rotated (as the window path rotates them while loading) into one new buffer."""
    tokens, heads, head_dim = q.shape
    out = torch.empty((tokens, 2, heads, head_dim), dtype=q.dtype, device=q.device)
    positions, inv_freq, stride_pa, stride_pt, bands = _rotary_args(rotary, head_dim)
    d_main, d_tail = head_dim_blocks(head_dim)
    config = rotate_config(head_dim, launch_arch(q.device))
    launch(
        _rotate_qk_kernel,
        (triton.cdiv(tokens, config.block_tokens), heads),
        q,
        k,
        out,
        positions,
        inv_freq,
        tokens,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        stride_pa,
        stride_pt,
        heads,
        HEAD_DIM=head_dim,
        D_MAIN=d_main,
        D_TAIL=d_tail,
        BLOCK_T=config.block_tokens,
        **bands,
        num_warps=config.num_warps,
        # The rotated q and k are mrope_pos's, bit for bit: products rounded one by one.
        enable_fp_fusion=False,
    )
    return out[:, 0], out[:, 1]


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float,
    rotary: tuple[torch.Tensor, torch.Tensor, list[int]] | None = None,
    with_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output and, ``with_lse``, the log-sum-exp of each row ``[T, H]`` fp32."""
    tokens, heads, head_dim = q.shape
    out = torch.empty((tokens, heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((tokens, heads), dtype=torch.float32, device=q.device) if with_lse else None
    if out.numel() == 0:
        return out, lse
    q, k, v = (_unit_columns(t) for t in (q, k, v))
    arch = launch_arch(q.device)
    config = attn_config(max_seqlen, head_dim, q.dtype, arch, heads, rotary is not None)
    if rotary is not None and not config.one_pass:
        # The long path is bound by its matrix products, and rotating each key block in the
        # program of every query block would form its angles seqlen / block_m times: rotate q
        # and k once into a scratch buffer instead (the window path rotates while loading).
        q, k = _rotate_qk(q, k, rotary)
        rotary = None
    d_main, d_tail = head_dim_blocks(head_dim)
    m_blocks = 1 if config.one_pass else triton.cdiv(max_seqlen, config.block_m)
    kv_blocks = 0
    if not config.one_pass and needs_constexpr_trip_counts(arch):
        kv_blocks = triton.cdiv(max_seqlen, config.block_n)
    positions, inv_freq, stride_pa, stride_pt = q, q, 0, 0
    bands = {"AXES": 1, "BOUND_1": 0, "BOUND_2": 0, "BOUND_3": 0}
    if rotary is not None:
        positions, inv_freq, stride_pa, stride_pt, bands = _rotary_args(rotary, head_dim)
    grid = ((cu_seqlens.shape[0] - 1) * m_blocks, heads // config.heads_per_program)
    launch(
        _window_attn_kernel,
        grid,
        q,
        k,
        v,
        out,
        lse if with_lse else out,
        cu_seqlens,
        positions,
        inv_freq,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        stride_pa,
        stride_pt,
        heads,
        m_blocks,
        tokens,
        max_seqlen,
        softmax_scale * LOG2_E,
        HEAD_DIM=head_dim,
        D_MAIN=d_main,
        D_TAIL=d_tail,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        ONE_PASS=config.one_pass,
        KV_BLOCKS=kv_blocks,
        HEADS_PER_PROGRAM=config.heads_per_program,
        ROTARY=rotary is not None,
        **bands,
        UPCAST=arch is None,
        IEEE=q.dtype == torch.float32,
        STORE_LSE=with_lse,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        # With the rotary in the loads, q and k must come out as mrope_pos rounds them: no
        # multiply-add contraction (the interpreter never contracts, so only a GPU would see it).
        enable_fp_fusion=rotary is None,
    )
    return out, lse


def window_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float,
) -> torch.Tensor:
    """Attention inside each segment (inputs validated by the op) into a new ``[T, H, D]``."""
    return _launch(q, k, v, cu_seqlens, max_seqlen, softmax_scale)[0]


def window_attn_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``window_attn`` and the log-sum-exp of each row (what the backward recomputes P from)."""
    return _launch(q, k, v, cu_seqlens, max_seqlen, softmax_scale, with_lse=True)


def window_attn_rope(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    mrope_section: list[int],
    softmax_scale: float,
) -> torch.Tensor:
    """``window_attn`` of ``qkv``'s q, k (rotated as ``mrope_pos`` would) and v (inputs validated
    by the op): rotated while loading on the window path, by a pre-pass on the long path."""
    q, k, v = qkv.unbind(1)
    return _launch(
        q, k, v, cu_seqlens, max_seqlen, softmax_scale, (positions, inv_freq, mrope_section)
    )[0]


def window_attn_rope_forward(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    mrope_section: list[int],
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``window_attn_rope`` and the log-sum-exp of each row."""
    q, k, v = qkv.unbind(1)
    rotary = (positions, inv_freq, mrope_section)
    return _launch(q, k, v, cu_seqlens, max_seqlen, softmax_scale, rotary, with_lse=True)
