"""Triton backward of the attention inside segments (``window_attn_backward``), FlashAttention-2
style: nothing of the forward is kept but its output O and the log-sum-exp of each row; the
probabilities are recomputed from q and k.

Per segment and head, with scale c, ``S = c Q K^T``, ``P = exp(S - lse)``, ``D = rowsum(dO * O)``:

    dV = P^T dO,  dP = dO V^T,  dS = P * (dP - D),  dQ = c dS K,  dK = c dS^T Q.

* window path (segments of at most 64 tokens): one program holds a whole segment of one head,
  computes D from its dO and O tiles and writes dQ, dK and dV: no second pass, no atomics;
* long path: a pre-pass writes D ``[T, H]``; one program per block of keys walks the segment's
  query blocks and writes that block's dK and dV; a second kernel, one program per block of
  queries, walks the key blocks for dQ. Recomputing S and dP there costs two matrix products
  per tile more than accumulating dQ with fp32 atomics, and buys a dQ that is the same on every
  run, with no fp32 scratch.

Numerics as the forward: fp16/bf16 tiles go into ``tl.dot`` as they are with fp32 accumulation, P
and dS are rounded to the input dtype before their products (FlashAttention does the same), D and
the softmax are fp32, each gradient is rounded once. fp32 inputs use fp32 products.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._common import Arch, launch, launch_arch, needs_constexpr_trip_counts, round_to
from .window_attn import (
    LOG2_E,
    LOG2E,
    WINDOW_MAX_SEQLEN,
    _dot,
    _load_head,
    _scores,
    _tile_mask,
    head_dim_blocks,
)


@dataclasses.dataclass(frozen=True)
class AttnBackwardConfig:
    """Launch shape of the backward: rows per query block and per key block, whether one block
    holds a whole segment (the window path), warps and pipeline stages."""

    block_m: int
    block_n: int
    one_pass: bool
    num_warps: int
    num_stages: int


def attn_backward_config(max_seqlen: int, dtype: torch.dtype, arch: Arch) -> AttnBackwardConfig:
    """Window path for fp16/bf16 segments of at most 64 tokens (any dtype under the interpreter):
    the forward's tile of 16, 32 or 64 rows, one warp per 16. Long path, 8 warps and 2 stages:
    64 queries x 32 keys on sm_80, 64 x 64 from sm_90 (the backward keeps K, V, their two
    gradients, Q, dO and four score tiles live; compiled offline at head_dim 80 these are the
    tiles that spill no registers, 64 x 64 spilling on sm_80 and 64 x 32 on sm_90a); fp32 32 x 32
    with 4 warps (its products run on FMA units). Not yet timed on a GPU."""
    interpreted = arch is None
    if max_seqlen <= WINDOW_MAX_SEQLEN and (interpreted or dtype != torch.float32):
        block = max(16, triton.next_power_of_2(max_seqlen))
        return AttnBackwardConfig(block, block, True, max(1, block // 16), 1)
    if interpreted:
        return AttnBackwardConfig(64, 64, False, 4, 1)
    if dtype == torch.float32:
        return AttnBackwardConfig(32, 32, False, 4, 2)
    return AttnBackwardConfig(64, 64 if arch[0] >= 9 else 32, False, 8, 2)


@triton.jit
def _segment(cu_seqlens_ptr, segment, n_tokens, max_seqlen):
    """The segment's first token and length, clamped as the forward clamps them."""
    start = tl.minimum(tl.maximum(tl.load(cu_seqlens_ptr + segment), 0), n_tokens)
    end = tl.minimum(tl.maximum(tl.load(cu_seqlens_ptr + segment + 1), start), n_tokens)
    return start, tl.minimum(end - start, max_seqlen)


@triton.jit
def _probabilities(q_a, q_b, k_a, k_b, lse_ptr, tokens, row_mask, key_mask, head, heads,
                   qk_scale, D_TAIL: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """P of a (query block, key block) tile from the saved log-sum-exp (zero outside both)."""
    s = _scores(q_a, q_b, k_a, k_b, key_mask, qk_scale, D_TAIL, IEEE)
    lse = tl.load(lse_ptr + tokens.to(tl.int64) * heads + head, mask=row_mask, other=0.0)
    p = tl.exp2(s - (lse * LOG2E)[:, None])
    return tl.where(row_mask[:, None], p, 0.0)


@triton.jit
def _score_grads(p, do_a, do_b, v_a, v_b, delta, dtype: tl.constexpr, D_TAIL: tl.constexpr,
                 UPCAST: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """dS = P * (dO V^T - D), rounded to the input dtype for its products."""
    dp = _dot(do_a, tl.trans(v_a), tl.zeros((p.shape[0], p.shape[1]), tl.float32), IEEE)
    if D_TAIL > 0:
        dp = _dot(do_b, tl.trans(v_b), dp, IEEE)
    ds = round_to(p * (dp - delta[:, None]), dtype)
    if UPCAST:
        ds = ds.to(tl.float32)
    return ds


@triton.jit
def _key_grads(p, q_a, q_b, do_a, do_b, v_a, v_b, delta, dk_a, dk_b, dv_a, dv_b,
               dtype: tl.constexpr, D_TAIL: tl.constexpr, UPCAST: tl.constexpr,
               IEEE: tl.constexpr):  # fmt: skip
    """One (query block, key block) tile's share of dV = P^T dO and dK = dS^T Q (unscaled),
    added to the running sums; returns them and dS (for dQ)."""
    p_in = round_to(p, dtype)
    if UPCAST:
        p_in = p_in.to(tl.float32)
    dv_a = _dot(tl.trans(p_in), do_a, dv_a, IEEE)
    ds = _score_grads(p, do_a, do_b, v_a, v_b, delta, dtype, D_TAIL, UPCAST, IEEE)
    dk_a = _dot(tl.trans(ds), q_a, dk_a, IEEE)
    if D_TAIL > 0:
        dv_b = _dot(tl.trans(p_in), do_b, dv_b, IEEE)
        dk_b = _dot(tl.trans(ds), q_b, dk_b, IEEE)
    return dk_a, dk_b, dv_a, dv_b, ds


@triton.jit
def _store_head(ptr, tokens, mask_rows, cols_a, cols_b, x_a, x_b, heads, HEAD_DIM: tl.constexpr,
                D_TAIL: tl.constexpr, MASK_COLS: tl.constexpr):  # fmt: skip
    """Rows ``tokens`` of one head of a contiguous ``[T, H, D]`` output, rounded to its dtype."""
    rows = ptr + tokens.to(tl.int64)[:, None] * (heads * HEAD_DIM)
    dtype: tl.constexpr = ptr.dtype.element_ty
    mask_a = _tile_mask(mask_rows, cols_a, HEAD_DIM, MASK_COLS)
    tl.store(rows + cols_a[None, :], round_to(x_a, dtype), mask=mask_a)
    if D_TAIL > 0:
        mask_b = _tile_mask(mask_rows, cols_b, HEAD_DIM, MASK_COLS)
        tl.store(rows + cols_b[None, :], round_to(x_b, dtype), mask=mask_b)


@triton.jit
def _columns(D_MAIN: tl.constexpr, D_TAIL: tl.constexpr):
    """The column indices of a head's two blocks (the second is the first without a tail)."""
    cols_a = tl.arange(0, D_MAIN)
    cols_b = cols_a
    if D_TAIL > 0:
        cols_b = D_MAIN + tl.arange(0, D_TAIL)
    return cols_a, cols_b


@triton.jit
def _load_rows(ptr, tokens, mask, stride_t, cols_a, cols_b, HEAD_DIM: tl.constexpr,
               D_TAIL: tl.constexpr, MASK_COLS: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    """``_load_head`` without a rotary: rows ``tokens`` of one head, both column blocks."""
    return _load_head(
        ptr, tokens, mask, stride_t, cols_a, cols_b, 0.0, 0.0, 0.0, 0.0, HEAD_DIM, D_TAIL,
        MASK_COLS, False, UPCAST,
    )  # fmt: skip


@triton.jit
def _row_dot(a_a, a_b, b_a, b_b, D_TAIL: tl.constexpr):
    """Per row, the dot product of two heads (both column blocks) in fp32."""
    d = tl.sum(a_a.to(tl.float32) * b_a.to(tl.float32), 1)
    if D_TAIL > 0:
        d += tl.sum(a_b.to(tl.float32) * b_b.to(tl.float32), 1)
    return d


@triton.jit
def _delta_kernel(out_ptr, grad_ptr, delta_ptr, n_tokens, stride_ot, stride_oh, stride_gt,
                  stride_gh, heads, HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr,
                  D_TAIL: tl.constexpr, BLOCK_T: tl.constexpr):  # fmt: skip
    """D = rowsum(dO * O) ``[T, H]`` fp32: the long path's pre-pass."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = tokens < n_tokens
    head = tl.program_id(1)
    MASK_COLS: tl.constexpr = D_MAIN + D_TAIL != HEAD_DIM
    cols_a, cols_b = _columns(D_MAIN, D_TAIL)
    o_a, o_b = _load_rows(
        out_ptr + head * stride_oh, tokens, mask, stride_ot, cols_a, cols_b, HEAD_DIM, D_TAIL,
        MASK_COLS, True,
    )  # fmt: skip
    g_a, g_b = _load_rows(
        grad_ptr + head * stride_gh, tokens, mask, stride_gt, cols_a, cols_b, HEAD_DIM, D_TAIL,
        MASK_COLS, True,
    )  # fmt: skip
    delta = _row_dot(o_a, o_b, g_a, g_b, D_TAIL)
    tl.store(delta_ptr + tokens.to(tl.int64) * heads + head, delta, mask=mask)


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, grad_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr,
    cu_seqlens_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot,
    stride_oh, stride_gt, stride_gh, heads, n_blocks, n_tokens, max_seqlen, qk_scale,
    softmax_scale, HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ONE_PASS: tl.constexpr,
    Q_BLOCKS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """dK and dV of one block of keys (and, on the window path, dQ of the whole segment)."""
    segment = tl.program_id(0) // n_blocks
    n_block = tl.program_id(0) % n_blocks
    head = tl.program_id(1)
    start, seqlen = _segment(cu_seqlens_ptr, segment, n_tokens, max_seqlen)
    if n_block * BLOCK_N >= seqlen:  # an empty segment, or keys past the end of this one
        return
    MASK_COLS: tl.constexpr = D_MAIN + D_TAIL != HEAD_DIM
    dtype: tl.constexpr = dk_ptr.dtype.element_ty
    cols_a, cols_b = _columns(D_MAIN, D_TAIL)
    keys = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    key_mask = keys < seqlen
    key_tokens = start + keys
    q_head, o_head = q_ptr + head * stride_qh, out_ptr + head * stride_oh
    g_head = grad_ptr + head * stride_gh
    k_a, k_b = _load_rows(
        k_ptr + head * stride_kh, key_tokens, key_mask, stride_kt, cols_a, cols_b, HEAD_DIM, D_TAIL,
        MASK_COLS, UPCAST,
    )  # fmt: skip
    v_a, v_b = _load_rows(
        v_ptr + head * stride_vh, key_tokens, key_mask, stride_vt, cols_a, cols_b, HEAD_DIM, D_TAIL,
        MASK_COLS, UPCAST,
    )  # fmt: skip
    dk_a = tl.zeros((BLOCK_N, D_MAIN), tl.float32)
    dv_a = dk_a
    dk_b, dv_b = dk_a, dk_a
    if D_TAIL > 0:
        dk_b = tl.zeros((BLOCK_N, D_TAIL), tl.float32)
        dv_b = dk_b
    if ONE_PASS:
        # The segment is one block: its queries are its keys, and dQ is complete here.
        q_a, q_b = _load_rows(
            q_head, key_tokens, key_mask, stride_qt, cols_a, cols_b, HEAD_DIM, D_TAIL, MASK_COLS,
            UPCAST,
        )  # fmt: skip
        do_a, do_b = _load_rows(
            g_head, key_tokens, key_mask, stride_gt, cols_a, cols_b, HEAD_DIM, D_TAIL, MASK_COLS,
            UPCAST,
        )  # fmt: skip
        o_a, o_b = _load_rows(
            o_head, key_tokens, key_mask, stride_ot, cols_a, cols_b, HEAD_DIM, D_TAIL, MASK_COLS,
            UPCAST,
        )  # fmt: skip
        delta = _row_dot(do_a, do_b, o_a, o_b, D_TAIL)
        p = _probabilities(
            q_a, q_b, k_a, k_b, lse_ptr, key_tokens, key_mask, key_mask, head, heads, qk_scale,
            D_TAIL, IEEE,
        )  # fmt: skip
        dk_a, dk_b, dv_a, dv_b, ds = _key_grads(
            p, q_a, q_b, do_a, do_b, v_a, v_b, delta, dk_a, dk_b, dv_a, dv_b, dtype, D_TAIL,
            UPCAST, IEEE,
        )  # fmt: skip
        dq_a = _dot(ds, k_a, tl.zeros((BLOCK_N, D_MAIN), tl.float32), IEEE)
        dq_b = dq_a
        if D_TAIL > 0:
            dq_b = _dot(ds, k_b, tl.zeros((BLOCK_N, D_TAIL), tl.float32), IEEE)
        _store_head(
            dq_ptr + head * HEAD_DIM, key_tokens, key_mask, cols_a, cols_b, dq_a * softmax_scale,
            dq_b * softmax_scale, heads, HEAD_DIM, D_TAIL, MASK_COLS,
        )  # fmt: skip
    else:
        trips = tl.cdiv(seqlen, BLOCK_M)
        if Q_BLOCKS > 0:  # interpreters without runtime loop bounds: masked blocks add nothing
            trips = Q_BLOCKS
        for m_block in range(0, trips):
            rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
            row_mask = rows < seqlen
            tokens = start + rows
            q_a, q_b = _load_rows(
                q_head, tokens, row_mask, stride_qt, cols_a, cols_b, HEAD_DIM, D_TAIL, MASK_COLS,
                UPCAST,
            )  # fmt: skip
            do_a, do_b = _load_rows(
                g_head, tokens, row_mask, stride_gt, cols_a, cols_b, HEAD_DIM, D_TAIL, MASK_COLS,
                UPCAST,
            )  # fmt: skip
            delta = tl.load(
                delta_ptr + tokens.to(tl.int64) * heads + head, mask=row_mask, other=0.0
            )
            p = _probabilities(
                q_a, q_b, k_a, k_b, lse_ptr, tokens, row_mask, key_mask, head, heads, qk_scale,
                D_TAIL, IEEE,
            )  # fmt: skip
            dk_a, dk_b, dv_a, dv_b, _ = _key_grads(
                p, q_a, q_b, do_a, do_b, v_a, v_b, delta, dk_a, dk_b, dv_a, dv_b, dtype, D_TAIL,
                UPCAST, IEEE,
            )  # fmt: skip
    _store_head(
        dk_ptr + head * HEAD_DIM, key_tokens, key_mask, cols_a, cols_b, dk_a * softmax_scale,
        dk_b * softmax_scale, heads, HEAD_DIM, D_TAIL, MASK_COLS,
    )  # fmt: skip
    _store_head(
        dv_ptr + head * HEAD_DIM, key_tokens, key_mask, cols_a, cols_b, dv_a, dv_b, heads,
        HEAD_DIM, D_TAIL, MASK_COLS,
    )  # fmt: skip


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, grad_ptr, lse_ptr, delta_ptr, dq_ptr, cu_seqlens_ptr, stride_qt,
    stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_gt, stride_gh, heads, m_blocks,
    n_tokens, max_seqlen, qk_scale, softmax_scale, HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr,
    D_TAIL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KV_BLOCKS: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """dQ of one block of queries (long path): walks the segment's key blocks."""
    segment = tl.program_id(0) // m_blocks
    m_block = tl.program_id(0) % m_blocks
    head = tl.program_id(1)
    start, seqlen = _segment(cu_seqlens_ptr, segment, n_tokens, max_seqlen)
    if m_block * BLOCK_M >= seqlen:
        return
    MASK_COLS: tl.constexpr = D_MAIN + D_TAIL != HEAD_DIM
    dtype: tl.constexpr = dq_ptr.dtype.element_ty
    cols_a, cols_b = _columns(D_MAIN, D_TAIL)
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < seqlen
    tokens = start + rows
    q_a, q_b = _load_rows(
        q_ptr + head * stride_qh, tokens, row_mask, stride_qt, cols_a, cols_b, HEAD_DIM, D_TAIL,
        MASK_COLS, UPCAST,
    )  # fmt: skip
    do_a, do_b = _load_rows(
        grad_ptr + head * stride_gh, tokens, row_mask, stride_gt, cols_a, cols_b, HEAD_DIM, D_TAIL,
        MASK_COLS, UPCAST,
    )  # fmt: skip
    delta = tl.load(delta_ptr + tokens.to(tl.int64) * heads + head, mask=row_mask, other=0.0)
    dq_a = tl.zeros((BLOCK_M, D_MAIN), tl.float32)
    dq_b = dq_a
    if D_TAIL > 0:
        dq_b = tl.zeros((BLOCK_M, D_TAIL), tl.float32)
    trips = tl.cdiv(seqlen, BLOCK_N)
    if KV_BLOCKS > 0:
        trips = KV_BLOCKS
    for n_block in range(0, trips):
        keys = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
        key_mask = keys < seqlen
        key_tokens = start + keys
        k_a, k_b = _load_rows(
            k_ptr + head * stride_kh, key_tokens, key_mask, stride_kt, cols_a, cols_b, HEAD_DIM,
            D_TAIL, MASK_COLS, UPCAST,
        )  # fmt: skip
        v_a, v_b = _load_rows(
            v_ptr + head * stride_vh, key_tokens, key_mask, stride_vt, cols_a, cols_b, HEAD_DIM,
            D_TAIL, MASK_COLS, UPCAST,
        )  # fmt: skip
        p = _probabilities(
            q_a, q_b, k_a, k_b, lse_ptr, tokens, row_mask, key_mask, head, heads, qk_scale,
            D_TAIL, IEEE,
        )  # fmt: skip
        ds = _score_grads(p, do_a, do_b, v_a, v_b, delta, dtype, D_TAIL, UPCAST, IEEE)
        dq_a = _dot(ds, k_a, dq_a, IEEE)
        if D_TAIL > 0:
            dq_b = _dot(ds, k_b, dq_b, IEEE)
    _store_head(
        dq_ptr + head * HEAD_DIM, tokens, row_mask, cols_a, cols_b, dq_a * softmax_scale,
        dq_b * softmax_scale, heads, HEAD_DIM, D_TAIL, MASK_COLS,
    )  # fmt: skip


def _unit_columns(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def window_attn_backward(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``, each a new contiguous ``[T, H, D]`` (inputs validated by the op)."""
    tokens, heads, head_dim = q.shape
    dq, dk, dv = (torch.empty((tokens, heads, head_dim), dtype=q.dtype, device=q.device)
                  for _ in range(3))  # fmt: skip
    if dq.numel() == 0:
        return dq, dk, dv
    grad, q, k, v, out = (_unit_columns(t) for t in (grad, q, k, v, out))
    lse = lse.contiguous()
    arch = launch_arch(q.device)
    config = attn_backward_config(max_seqlen, q.dtype, arch)
    d_main, d_tail = head_dim_blocks(head_dim)
    segments = cu_seqlens.shape[0] - 1
    constexpr_trips = needs_constexpr_trip_counts(arch)
    common = dict(HEAD_DIM=head_dim, D_MAIN=d_main, D_TAIL=d_tail, BLOCK_M=config.block_m,
                  BLOCK_N=config.block_n, UPCAST=arch is None, IEEE=q.dtype == torch.float32,
                  num_warps=config.num_warps, num_stages=config.num_stages)  # fmt: skip
    delta = lse  # unused on the window path, which computes D in its program
    if not config.one_pass:
        delta = torch.empty((tokens, heads), dtype=torch.float32, device=q.device)
        block_t = 64
        launch(
            _delta_kernel, (triton.cdiv(tokens, block_t), heads), out, grad, delta, tokens,
            out.stride(0), out.stride(1), grad.stride(0), grad.stride(1), heads, HEAD_DIM=head_dim,
            D_MAIN=d_main, D_TAIL=d_tail, BLOCK_T=block_t, num_warps=4,
        )  # fmt: skip
    n_blocks = 1 if config.one_pass else triton.cdiv(max_seqlen, config.block_n)
    q_blocks = triton.cdiv(max_seqlen, config.block_m) if constexpr_trips else 0
    strides = (*q.stride()[:2], *k.stride()[:2], *v.stride()[:2])
    launch(
        _attn_bwd_dkdv_kernel, (segments * n_blocks, heads), q, k, v, out, grad, lse, delta, dq,
        dk, dv, cu_seqlens, *strides, out.stride(0), out.stride(1), grad.stride(0),
        grad.stride(1), heads, n_blocks, tokens, max_seqlen, softmax_scale * LOG2_E,
        softmax_scale, ONE_PASS=config.one_pass, Q_BLOCKS=0 if config.one_pass else q_blocks,
        **common,
    )  # fmt: skip
    if not config.one_pass:
        m_blocks = triton.cdiv(max_seqlen, config.block_m)
        kv_blocks = triton.cdiv(max_seqlen, config.block_n) if constexpr_trips else 0
        launch(
            _attn_bwd_dq_kernel, (segments * m_blocks, heads), q, k, v, grad, lse, delta, dq,
            cu_seqlens, *strides, grad.stride(0), grad.stride(1), heads, m_blocks, tokens,
            max_seqlen, softmax_scale * LOG2_E, softmax_scale, KV_BLOCKS=kv_blocks, **common,
        )  # fmt: skip
    return dq, dk, dv
