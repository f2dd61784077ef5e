"""Triton M-RoPE: rotate-half rotary of q and k from cos/sin tables (``mrope``) or from integer
positions with the angles formed in registers (``mrope_pos``), in place or into new tensors.

One kernel per kind of angle source; each serves both forms through its output pointers (equal to
the input pointers in place) and rotates q and k in one launch. A program takes ``block_tokens``
tokens, forms their cos/sin once and walks all heads of q, then all heads of k (k may have fewer
heads: GQA), ``block_heads`` at a time, so cos/sin are formed once per token and shared by every
head. Every tensor is addressed through its own strides: q and k may be views into a packed qkv
buffer, in the vision layout ``[T, H, D]`` or the text layouts ``[B, S, H, D]`` and (transposed
views of) ``[B, H, S, D]``.

head_dim 80: each half (40 values) sits in a masked block of 64 lanes rather than a 32 + 8 split.
The half is a compile-time constant, so the mask is constant over runs of 8 lanes and the loads
and stores of each half stay 16-byte vectors (40 = 5 x 8 bf16); the idle lanes cost registers,
not memory traffic, and one code path serves every head_dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import (
    Arch,
    band_bounds,
    launch,
    launch_arch,
    needs_constexpr_trip_counts,
    num_warps_for,
    round_to,
)

# Values per half-tile one program aims to hold (x1 and x2 each): 4-16 per thread.
_ELEMENTS_PER_TILE = 2048


@dataclass(frozen=True)
class MropeConfig:
    """Launch configuration: tokens per program, heads per tile, lanes per half, warps, and
    whether the head-tile loop needs a constexpr trip count (older interpreters)."""

    block_tokens: int
    block_heads: int
    block_half: int
    num_warps: int
    constexpr_trips: bool = False


def mrope_config(head_dim: int, q_heads: int, k_heads: int, arch: Arch) -> MropeConfig:
    """Heuristic: a head tile that divides the smaller head count where it is a power of two
    (16 for the vision tower, 4 for GQA's k), and enough tokens to fill about 2048 lanes; the
    same on every GPU."""
    block_half = triton.next_power_of_2(head_dim // 2)
    block_heads = min(triton.next_power_of_2(max(1, min(q_heads, k_heads))), 16)
    block_tokens = max(1, min(32, _ELEMENTS_PER_TILE // (block_heads * block_half)))
    elements = 2 * block_tokens * block_heads * block_half
    trips = needs_constexpr_trip_counts(arch)
    return MropeConfig(block_tokens, block_heads, block_half, num_warps_for(elements), trips)


@triton.jit
def _rotate_heads(
    x_ptr,
    out_ptr,
    n_heads,
    rows_x,
    rows_out,
    token_mask,
    stride_h,
    stride_d,
    out_stride_h,
    out_stride_d,
    cos1,
    sin1,
    cos2,
    sin2,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    HEAD_TILES: tl.constexpr,
):
    """Rotate every head of the given tokens: ``rows_*`` are the token offsets [T], cos/sin
    [T, BLOCK_HALF] for the first (1) and second (2) half of the head. ``HEAD_TILES`` > 0 loops
    over that constexpr count of head tiles (for interpreters that cannot loop over a runtime
    bound; tiles past the heads are masked), 0 over the heads there are."""
    if HEAD_TILES > 0:
        for tile in range(HEAD_TILES):
            _rotate_head_tile(
                x_ptr, out_ptr, n_heads, tile * BLOCK_HEADS, rows_x, rows_out, token_mask,
                stride_h, stride_d, out_stride_h, out_stride_d, cos1, sin1, cos2, sin2,
                HALF, BLOCK_HALF, BLOCK_HEADS,
            )  # fmt: skip
    else:
        for first in range(0, n_heads, BLOCK_HEADS):
            _rotate_head_tile(
                x_ptr, out_ptr, n_heads, first, rows_x, rows_out, token_mask,
                stride_h, stride_d, out_stride_h, out_stride_d, cos1, sin1, cos2, sin2,
                HALF, BLOCK_HALF, BLOCK_HEADS,
            )  # fmt: skip


@triton.jit
def _rotate_head_tile(
    x_ptr,
    out_ptr,
    n_heads,
    first_head,
    rows_x,
    rows_out,
    token_mask,
    stride_h,
    stride_d,
    out_stride_h,
    out_stride_d,
    cos1,
    sin1,
    cos2,
    sin2,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
):
    """Heads ``first_head`` .. ``first_head + BLOCK_HEADS`` (those that exist) of the tokens."""
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < HALF
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    heads = first_head + tl.arange(0, BLOCK_HEADS)
    mask = token_mask[:, None, None] & (heads < n_heads)[None, :, None] & col_mask[None, None, :]
    x_offsets = (
        rows_x[:, None, None]
        + heads.to(tl.int64)[None, :, None] * stride_h
        + cols[None, None, :] * stride_d
    )
    out_offsets = (
        rows_out[:, None, None]
        + heads.to(tl.int64)[None, :, None] * out_stride_h
        + cols[None, None, :] * out_stride_d
    )
    x1 = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_offsets + HALF * stride_d, mask=mask, other=0.0).to(tl.float32)
    # x * cos + rotate_half(x) * sin with rotate_half([a, b]) = [-b, a]; products rounded
    # separately, as the reference does (the launch turns off FMA contraction).
    out1 = x1 * cos1[:, None, :] - x2 * sin1[:, None, :]
    out2 = x2 * cos2[:, None, :] + x1 * sin2[:, None, :]
    tl.store(out_ptr + out_offsets, round_to(out1, dtype), mask=mask)
    tl.store(out_ptr + out_offsets + HALF * out_stride_d, round_to(out2, dtype), mask=mask)


@triton.jit
def _axis_of(cols, bound1, bound2, bound3):
    """The position axis driving each frequency: the band of mrope_section holding it."""
    return (cols >= bound1).to(tl.int64) + (cols >= bound2) + (cols >= bound3)


@triton.jit
def _mrope_kernel(
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    angle_a_ptr,
    angle_b_ptr,
    n_tokens,
    seq,
    q_heads,
    k_heads,
    sq_b,
    sq_s,
    sq_h,
    sq_d,
    sk_b,
    sk_s,
    sk_h,
    sk_d,
    sqo_b,
    sqo_s,
    sqo_h,
    sqo_d,
    sko_b,
    sko_s,
    sko_h,
    sko_d,
    sa_a,
    sa_b,
    sa_s,
    sa_d,
    sb_a,
    sb_b,
    sb_s,
    sb_d,
    bound1,
    bound2,
    bound3,
    FROM_POSITIONS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    HEAD_TILES: tl.constexpr,
):
    """The angle sources ``a``/``b`` are the cos/sin tables ``[A, B, S, D]``, or with
    ``FROM_POSITIONS`` the positions ``[A, B, S]`` (``sa_d`` unused) and the contiguous fp32
    frequencies (``sb_*`` unused)."""
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
    token_mask = tokens < n_tokens
    b, s = tokens // seq, tokens % seq
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < HALF
    mask = token_mask[:, None] & col_mask[None, :]
    axis = _axis_of(cols, bound1, bound2, bound3)[None, :]
    if FROM_POSITIONS:
        position = tl.load(angle_a_ptr + (b * sa_b + s * sa_s)[:, None] + axis * sa_a, mask=mask)
        inv_freq = tl.load(angle_b_ptr + cols, mask=col_mask, other=0.0)
        # As the reference: the position rounded to fp32, times the fp32 frequency, then
        # cos/sin (precise, with full range reduction: positions reach 10^6).
        angle = position.to(tl.float32) * inv_freq[None, :]
        cos1, sin1 = tl.cos(angle), tl.sin(angle)
        cos2, sin2 = cos1, sin1
    else:
        c_rows = (b * sa_b + s * sa_s)[:, None] + axis * sa_a + cols[None, :] * sa_d
        s_rows = (b * sb_b + s * sb_s)[:, None] + axis * sb_a + cols[None, :] * sb_d
        cos1 = tl.load(angle_a_ptr + c_rows, mask=mask, other=0.0).to(tl.float32)
        cos2 = tl.load(angle_a_ptr + c_rows + HALF * sa_d, mask=mask, other=0.0).to(tl.float32)
        sin1 = tl.load(angle_b_ptr + s_rows, mask=mask, other=0.0).to(tl.float32)
        sin2 = tl.load(angle_b_ptr + s_rows + HALF * sb_d, mask=mask, other=0.0).to(tl.float32)
    # fmt: off
    _rotate_heads(q_ptr, q_out_ptr, q_heads, b * sq_b + s * sq_s, b * sqo_b + s * sqo_s,
                  token_mask, sq_h, sq_d, sqo_h, sqo_d, cos1, sin1, cos2, sin2,
                  HALF, BLOCK_HALF, BLOCK_HEADS, HEAD_TILES)
    _rotate_heads(k_ptr, k_out_ptr, k_heads, b * sk_b + s * sk_s, b * sko_b + s * sko_s,
                  token_mask, sk_h, sk_d, sko_h, sko_d, cos1, sin1, cos2, sin2,
                  HALF, BLOCK_HALF, BLOCK_HEADS, HEAD_TILES)
    # fmt: on


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
    angle_args: list,
    angle_strides: list[int],
    bounds: list[int],
    from_positions: bool,
) -> None:
    """One launch over ``[B, S, H, D]`` q/k (any strides) and their outputs; ``angle_strides``
    are the 8 strides of ``_mrope_kernel``'s angle sources."""
    batch, seq, q_heads, head_dim = q.shape
    n_tokens = batch * seq
    if n_tokens == 0:
        return
    config = mrope_config(head_dim, q_heads, k.shape[2], launch_arch(q.device))
    grid = (triton.cdiv(n_tokens, config.block_tokens),)
    head_tiles = 0
    if config.constexpr_trips:
        head_tiles = triton.cdiv(max(q_heads, k.shape[2]), config.block_heads)
    launch(
        _mrope_kernel,
        grid,
        q,
        k,
        q_out,
        k_out,
        *angle_args,
        n_tokens,
        seq,
        q_heads,
        k.shape[2],
        *q.stride(),
        *k.stride(),
        *q_out.stride(),
        *k_out.stride(),
        *angle_strides,
        *bounds,
        FROM_POSITIONS=from_positions,
        HALF=head_dim // 2,
        BLOCK_HALF=config.block_half,
        BLOCK_TOKENS=config.block_tokens,
        BLOCK_HEADS=config.block_heads,
        HEAD_TILES=head_tiles,
        num_warps=config.num_warps,
        # Products and sums rounded one by one, as the eager reference computes them.
        enable_fp_fusion=False,
    )


def _per_batch(run, q, k, q_out, k_out, angles: list[torch.Tensor]) -> None:
    """Run ``run`` on 4-D ``[B, S, H, D]`` views: a 3-D input gains B = 1, more leading dims are
    walked one index at a time (``angles`` carry an axis dim first, then q's batch dims)."""
    if q.dim() == 3:
        run(*(t.unsqueeze(0) for t in (q, k, q_out, k_out)), [a.unsqueeze(1) for a in angles])
    elif q.dim() == 4:
        run(q, k, q_out, k_out, angles)
    else:
        for i in range(q.shape[0]):
            _per_batch(run, q[i], k[i], q_out[i], k_out[i], [a[:, i] for a in angles])


def _expand(table: torch.Tensor, batch: tuple[int, ...], trailing: int) -> torch.Tensor:
    """``[A, ..., *trailing dims]`` broadcast (stride 0) to ``[A, *batch, *trailing dims]``."""
    tail = tuple(table.shape[table.dim() - trailing :])
    lead = table.shape[1 : table.dim() - trailing]
    shaped = table.reshape(table.shape[0], *([1] * (len(batch) - len(lead))), *lead, *tail)
    return shaped.expand(table.shape[0], *batch, *tail)


def _outputs(q: torch.Tensor, k: torch.Tensor, in_place: bool):
    if in_place:
        return q, k
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(
        k.shape, dtype=k.dtype, device=k.device
    )


def _rotate_tables(q, k, cos, sin, mrope_section, in_place):
    half = q.shape[-1] // 2
    bounds = band_bounds("mrope_" if in_place else "mrope", mrope_section, half)
    if mrope_section is None:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    batch = tuple(q.shape[:-3])
    cos, sin = _expand(cos, batch, 2), _expand(sin, batch, 2)
    q_out, k_out = _outputs(q, k, in_place)

    def run(q4, k4, q4_out, k4_out, angles):
        c, s = angles
        _launch(q4, k4, q4_out, k4_out, [c, s], [*c.stride(), *s.stride()], bounds, False)

    _per_batch(run, q, k, q_out, k_out, [cos, sin])
    return q_out, k_out


def _rotate_positions(q, k, positions, inv_freq, mrope_section, in_place):
    half = q.shape[-1] // 2
    bounds = band_bounds("mrope_pos_" if in_place else "mrope_pos", mrope_section, half)
    positions = _expand(positions, tuple(q.shape[:-3]), 1)
    inv_freq = inv_freq.to(torch.float32).contiguous()
    q_out, k_out = _outputs(q, k, in_place)

    def run(q4, k4, q4_out, k4_out, angles):
        (p,) = angles
        # The positions have no column stride, the frequencies are contiguous: zeros, unused.
        strides = [*p.stride(), 0, 0, 0, 0, 0]
        _launch(q4, k4, q4_out, k4_out, [p, inv_freq], strides, bounds, True)

    _per_batch(run, q, k, q_out, k_out, [positions])
    return q_out, k_out


def mrope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mrope_section: Sequence[int] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k (validated by the op) by cos/sin tables into new tensors."""
    return _rotate_tables(q, k, cos, sin, mrope_section, in_place=False)


def mrope_(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mrope_section: Sequence[int] | None,
) -> None:
    """Rotate q and k by cos/sin tables where they lie."""
    _rotate_tables(q, k, cos, sin, mrope_section, in_place=True)


def mrope_pos(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    mrope_section: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by angles formed from integer positions, into new tensors."""
    return _rotate_positions(q, k, positions, inv_freq, mrope_section, in_place=False)


def mrope_pos_(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    mrope_section: Sequence[int],
) -> None:
    """Rotate q and k by angles formed from integer positions, where they lie."""
    _rotate_positions(q, k, positions, inv_freq, mrope_section, in_place=True)
