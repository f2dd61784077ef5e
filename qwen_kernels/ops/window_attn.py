"""Variable-length attention within segments: ``qwen::window_attn``.

Tokens are packed ``[T, H, D]``; ``cu_seqlens`` (int32, ``[S+1]``, 0 to T, non-decreasing) cuts
them into segments that attend only within themselves, without a causal mask. The vision tower
uses it for windows of at most 64 tokens and for whole frames in its full-attention layers.
"""

from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F
from torch import Tensor

from .._backends import native_library
from .._checks import (
    check_device,
    check_float,
    check_ndim,
    check_same,
    compute_dtype,
    fail,
)
from ._define import OpSpec, define

OP = "window_attn"
# Padded elements per chunk of segments in the reference: bounds its memory on long inputs.
_REFERENCE_CHUNK_ELEMENTS = 1 << 26


def window_attn_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    softmax_scale: float,
) -> Tensor:
    """Eager reference: segments padded to ``max_seqlen`` and run through SDPA with a key mask.

    Computes in fp32 (fp64 for fp64 inputs). Only gathers and selects, no boolean indexing, so
    it never synchronises with the host (the encoder runs whole forwards without a sync). Bounds
    are clamped to [0, T] and segments cut at ``max_seqlen``, as in the kernels (the contract for
    layouts the value checks would refuse, see ``window_attn``).
    """
    tokens, heads, head_dim = q.shape
    segments = cu_seqlens.numel() - 1
    if tokens == 0:
        return torch.empty_like(q, memory_format=torch.contiguous_format)
    acc = compute_dtype(q.dtype)
    bounds = cu_seqlens.long().clamp(0, tokens)
    starts = bounds[:-1]
    lengths = (bounds[1:] - starts).clamp_(min=0)
    slot = torch.arange(max_seqlen, device=q.device)
    # Where each token sits in the padded layout: its segment and its slot within it.
    token = torch.arange(tokens, device=q.device, dtype=cu_seqlens.dtype)
    token_segment = torch.searchsorted(cu_seqlens[1:], token, right=True).clamp_(max=segments - 1)
    token_slot = (token.long() - starts[token_segment]).clamp_(0, max_seqlen - 1)
    out = None
    per_chunk = max(1, _REFERENCE_CHUNK_ELEMENTS // (max_seqlen * heads * head_dim))
    for first in range(0, segments, per_chunk):
        chunk = slice(first, first + per_chunk)
        valid = slot < lengths[chunk, None]  # [s, L]
        index = torch.where(valid, starts[chunk, None] + slot, 0)
        padded = [t.to(acc)[index].transpose(1, 2) for t in (q, k, v)]  # [s, H, L, D]
        attended = F.scaled_dot_product_attention(
            *padded, attn_mask=valid[:, None, None, :], scale=softmax_scale
        ).transpose(1, 2)  # [s, L, H, D]
        local = (token_segment - first).clamp(0, attended.shape[0] - 1)
        rows = attended[local, token_slot].to(q.dtype)  # [T, H, D]
        if out is None:
            out = rows
        else:
            inside = (token_segment >= first) & (token_segment < first + attended.shape[0])
            out = torch.where(inside[:, None, None], rows, out)
    return out


def check_attention_args(
    op: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    softmax_scale: float | None,
) -> None:
    """Shape/dtype/device checks of q, k, v and the segments."""
    check_float(op, "q", q)
    check_ndim(op, "q", q, 3)
    check_same(op, "q", q, "k", k)
    check_same(op, "q", q, "v", v)
    shape = q.shape
    for name, t in (("k", k), ("v", v)):
        if t.shape != shape:
            fail(op, name, f"of q's shape [T, H, D] = {tuple(shape)}", tuple(t.shape))
    check_segment_args(op, "q", q, cu_seqlens, max_seqlen, softmax_scale)


def check_segment_args(
    op: str,
    q_name: str,
    q: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    softmax_scale: float | None,
) -> None:
    """Shape/dtype/device checks of the segments and the scale (``q_name`` already checked)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32:
        fail(op, "cu_seqlens", "an int32 tensor", getattr(cu_seqlens, "dtype", type(cu_seqlens)))
    check_ndim(op, "cu_seqlens", cu_seqlens, 1)
    if cu_seqlens.shape[0] < 2:
        fail(op, "cu_seqlens", "[S+1] with at least one segment", tuple(cu_seqlens.shape))
    check_device(op, q_name, q, "cu_seqlens", cu_seqlens)
    if max_seqlen < 1:
        fail(op, "max_seqlen", "a positive int (the longest segment)", max_seqlen)
    if softmax_scale is not None and not softmax_scale > 0:
        fail(op, "softmax_scale", "a positive float or None (1/sqrt(D))", softmax_scale)


def check_segment_values(op: str, tokens: int, cu_seqlens: Tensor, max_seqlen: int) -> None:
    """``cu_seqlens`` runs from 0 to ``tokens`` without decreasing and no segment exceeds
    ``max_seqlen``: one device-to-host copy of four numbers (the op runs it outside
    ``skip_value_checks()``)."""
    lengths = cu_seqlens.diff()
    bounds = [cu_seqlens[0], cu_seqlens[-1], *(torch.aminmax(lengths) if lengths.numel() else ())]
    first, last, shortest, longest = [*torch.stack(bounds).tolist(), 0, 0][:4]
    if first != 0 or last != tokens:
        fail(op, "cu_seqlens", f"starting at 0 and ending at T = {tokens}", f"{first} ... {last}")
    if shortest < 0:
        at = int(torch.nonzero(lengths < 0)[0, 0])
        fail(op, "cu_seqlens", "non-decreasing", f"a decrease after index {at}")
    if longest > max_seqlen:
        fail(op, "max_seqlen", "at least the longest segment", f"{max_seqlen} < {longest}")


@functools.cache
def native_head_dims(backend: str) -> tuple[int, ...]:
    """The head dims the "cuda" or "cuda_emu" build instantiates its kernels for, as the build
    reports them (csrc/window_attn/variants.h)."""
    return tuple(native_library(backend).window_attn_head_dims())


def kernel_misfit(backend: str, head_dim: int) -> str | None:
    """Why ``backend`` cannot hold ``head_dim`` (the last dim of q, or of the packed qkv), or
    None: what "auto" checks before it picks the CUDA kernels (then Triton, then the reference)
    for CUDA tensors, and what an explicit backend is refused with. No peer kernel is routed to
    until a benchmark shows a case it wins."""
    if backend in ("cuda", "cuda_emu"):
        held = native_head_dims(backend)
        if head_dim not in held:
            dims = ", ".join(map(str, held))
            return f"its kernels hold head dims {dims}, not {head_dim}"
    elif backend == "triton":
        most = importlib.import_module("qwen_kernels.triton_kernels.window_attn").MAX_HEAD_DIM
        if head_dim > most:
            return f"its kernel holds head dims up to {most}, not {head_dim}"
    return None


def default_softmax_scale(q: Tensor) -> float:
    """``1/sqrt(D)``, D the last dim of q (or of the packed qkv): the one place the default
    softmax scale is computed."""
    return q.shape[-1] ** -0.5


AUTO_NOTE = (
    "CUDA tensors: the CUDA kernels where the build holds the head dim, else Triton where its "
    "kernel does, else the reference; no peer (varlen_attn, flash-attn) until a benchmark "
    "shows a case it wins"
)

window_attn = define(
    OpSpec(
        name=OP,
        schema="(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, SymInt max_seqlen, "
        "float? softmax_scale=None) -> Tensor",
        doc="""Non-causal attention inside each segment of a packed sequence.

    Args:
        q, k, v: ``[T, H, D]`` of one dtype (fp16, bf16, fp32; fp64 on "torch") and device, any
            strides (views into a packed qkv buffer are fine).
        cu_seqlens: int32 ``[S+1]``, segment s is tokens ``cu_seqlens[s]:cu_seqlens[s+1]``;
            starts at 0, ends at T, non-decreasing (empty segments are allowed).
        max_seqlen: the longest segment (an upper bound is fine; kernels size tiles by it).
        softmax_scale: defaults to ``1/sqrt(D)``.
        backend: "auto", "torch", "triton", "cuda" or "cuda_emu".

    Returns:
        ``[T, H, D]`` contiguous in q's dtype; the softmax runs in fp32.

    A layout the value checks refuse, passed with the checks skipped (``skip_value_checks()``),
    never makes a backend read or write out of bounds: every backend clamps each segment to
    ``[clamp(cu[s], 0, T), clamp(cu[s+1], start, T))`` and cuts it after ``max_seqlen`` tokens,
    and the rows of such a segment's first ``max_seqlen`` tokens are attention over those tokens.
    Other rows (past the cut, or of tokens that overlapping segments share) are undefined.
    """,
        reference=window_attn_reference,
        check=lambda *args: check_attention_args(OP, *args),
        outputs=lambda q, *_: torch.empty_like(q, memory_format=torch.contiguous_format),
        kernels={"triton": "qwen_kernels.triton_kernels.window_attn:window_attn"},
        native=True,
        check_values=lambda q, k, v, cu_seqlens, max_seqlen, _scale: check_segment_values(
            OP, q.shape[0], cu_seqlens, max_seqlen
        ),
        defaults={"softmax_scale": default_softmax_scale},
        misfit=kernel_misfit,
        auto_note=AUTO_NOTE,
    )
)
