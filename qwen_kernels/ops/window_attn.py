"""Variable-length attention within segments: ``qwen::window_attn``, its training forward
``qwen::window_attn_forward`` and its backward ``qwen::window_attn_backward``.

Tokens are packed ``[T, H, D]``; ``cu_seqlens`` (int32, ``[S+1]``, 0 to T, non-decreasing) cuts
them into segments that attend only within themselves, without a causal mask. The vision tower
uses it for windows of at most 64 tokens and for whole frames in its full-attention layers.

Training follows FlashAttention-2: where a gradient is needed, ``window_attn`` runs
``window_attn_forward``, which also returns each row's log-sum-exp; the backward saves q, k, v,
the output and that lse (no probabilities) and recomputes P from them.
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
from ._define import Autograd, OpSpec, backward_backend, define

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
    out, _ = _segment_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale, with_lse=False)
    return out.to(q.dtype)


def window_attn_forward_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    softmax_scale: float,
) -> tuple[Tensor, Tensor]:
    """``window_attn_reference`` and the natural log-sum-exp of each row's scaled scores,
    ``[T, H]`` in fp32 (fp64 for fp64 inputs)."""
    out, lse = _segment_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale, with_lse=True)
    return out.to(q.dtype), lse


def window_attn_backward_reference(
    grad: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    softmax_scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Eager gradients in fp32 (fp64 for fp64 inputs), each rounded once to q's dtype: per
    padded segment ``P = softmax(c Q K^T)``, ``dV = P^T dO``, ``dS = P (dO V^T - D)`` with
    ``D = rowsum(dO O)``, ``dQ = c dS K``, ``dK = c dS^T Q``. It recomputes the forward in fp32;
    ``out`` and ``lse`` are what the kernels read instead."""
    del out, lse
    tokens = q.shape[0]
    acc = compute_dtype(q.dtype)
    grads: list[Tensor | None] = [None, None, None]
    for valid, index, local, inside in _chunks(q, cu_seqlens, max_seqlen):
        qp, kp, vp, gp = (t.to(acc)[index].transpose(1, 2) for t in (q, k, v, grad))
        rows = valid[:, None, :, None]  # padded query rows carry no gradient
        gp = gp * rows
        scores = qp @ kp.transpose(-1, -2) * softmax_scale
        p = torch.softmax(scores.masked_fill(~valid[:, None, None, :], float("-inf")), -1)
        p = p * rows
        delta = (gp * (p @ vp)).sum(-1, keepdim=True)
        ds = p * (gp @ vp.transpose(-1, -2) - delta)
        padded = (ds @ kp * softmax_scale, ds.transpose(-1, -2) @ qp * softmax_scale,
                  p.transpose(-1, -2) @ gp)  # fmt: skip
        for i, g in enumerate(padded):
            grads[i] = _merge_rows(grads[i], g.transpose(1, 2)[local], inside)
    if tokens == 0:
        return tuple(torch.empty_like(q, memory_format=torch.contiguous_format) for _ in range(3))
    return tuple(g.to(q.dtype) for g in grads)


def _chunks(q: Tensor, cu_seqlens: Tensor, max_seqlen: int):
    """The reference's padded layout, a chunk of segments at a time: per chunk ``valid``
    ``[s, L]``, ``index`` (each slot's token, 0 where padded) and, to scatter back, each token's
    ``(chunk-local segment, slot)`` and whether its segment is in the chunk. Bounds clamped to
    [0, T] and segments cut at ``max_seqlen``, as in the kernels; no host sync."""
    tokens, heads, head_dim = q.shape
    if tokens == 0:
        return
    segments = cu_seqlens.numel() - 1
    bounds = cu_seqlens.long().clamp(0, tokens)
    starts = bounds[:-1]
    lengths = (bounds[1:] - starts).clamp_(min=0)
    slot = torch.arange(max_seqlen, device=q.device)
    # Where each token sits in the padded layout: its segment and its slot within it.
    token = torch.arange(tokens, device=q.device, dtype=cu_seqlens.dtype)
    token_segment = torch.searchsorted(cu_seqlens[1:], token, right=True).clamp_(max=segments - 1)
    token_slot = (token.long() - starts[token_segment]).clamp_(0, max_seqlen - 1)
    per_chunk = max(1, _REFERENCE_CHUNK_ELEMENTS // (max_seqlen * heads * head_dim))
    for first in range(0, segments, per_chunk):
        chunk = slice(first, first + per_chunk)
        valid = slot < lengths[chunk, None]  # [s, L]
        index = torch.where(valid, starts[chunk, None] + slot, 0)
        count = valid.shape[0]
        local = (token_segment - first).clamp(0, count - 1)
        inside = (token_segment >= first) & (token_segment < first + count)
        yield valid, index, (local, token_slot), inside


def _segment_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    softmax_scale: float,
    with_lse: bool,
) -> tuple[Tensor, Tensor | None]:
    """The reference's attention in fp32 (fp64), not rounded, and optionally each row's lse."""
    _, heads, head_dim = q.shape
    acc = compute_dtype(q.dtype)
    out = lse = None
    for valid, index, local, inside in _chunks(q, cu_seqlens, max_seqlen):
        padded = [t.to(acc)[index].transpose(1, 2) for t in (q, k, v)]  # [s, H, L, D]
        key_mask = valid[:, None, None, :]
        attended = F.scaled_dot_product_attention(
            *padded, attn_mask=key_mask, scale=softmax_scale
        ).transpose(1, 2)  # [s, L, H, D]
        out = _merge_rows(out, attended[local], inside)  # [T, H, D]
        if with_lse:
            scores = padded[0] @ padded[1].transpose(-1, -2) * softmax_scale
            row_lse = torch.logsumexp(scores.masked_fill(~key_mask, float("-inf")), -1)
            lse = _merge_rows(lse, row_lse.transpose(1, 2)[local], inside)  # [T, H]
    if out is None:
        out = q.new_empty((0, heads, head_dim), dtype=acc)
        lse = q.new_empty((0, heads), dtype=acc) if with_lse else None
    return out, lse


def _merge_rows(merged: Tensor | None, rows: Tensor, inside: Tensor) -> Tensor:
    """``rows`` where ``inside`` (the tokens of this chunk of segments), ``merged`` elsewhere."""
    if merged is None:
        return rows
    return torch.where(inside.view(-1, *([1] * (rows.dim() - 1))), rows, merged)


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


# The longest segment of the window path (one key tile in every kernel family).
WINDOW_MAX_SEQLEN = 64

# "auto" on CUDA tensors where the device's order (cuda, triton, torch) is not the choice, by GPU
# generation (compute capability major) and path ("window": max_seqlen <= 64, else "long"), each
# entry with its source: the static figure until a GPU benchmark (bench/RESULTS.md) replaces it.
AUTO_CHOICES: dict[tuple[int, str], tuple[tuple[str, ...], str]] = {
    (9, "long"): (
        ("triton", "cuda", "torch"),
        "static, bench/STATIC.md main loops: Triton's wgmma loop (128x128, 8 warps) 0.84 "
        "instructions per kFLOP against 1.11 for the CUDA long path, whose mma.sync issues at "
        "most half of Hopper's wgmma rate",
    ),
}

AUTO_NOTE = (
    "CUDA tensors: the CUDA kernels where the build holds the head dim, else Triton where its "
    "kernel does, else the reference, but where AUTO_CHOICES names another order (sm_90 long "
    "segments: Triton first); no peer (varlen_attn, flash-attn) until a benchmark shows a case "
    "it wins"
)


def attention_auto_order(like: Tensor, max_seqlen: int) -> tuple[str, ...] | None:
    """ "auto"'s order of backends for attention on CUDA tensors like ``like`` over segments of at
    most ``max_seqlen`` tokens: ``AUTO_CHOICES``'s entry for the GPU and path, or None (the
    device's order)."""
    major = torch.cuda.get_device_capability(like.device)[0]
    path = "window" if max_seqlen <= WINDOW_MAX_SEQLEN else "long"
    entry = AUTO_CHOICES.get((major, path))
    return entry[0] if entry else None


def _check_backward_args(
    grad: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    softmax_scale: float,
) -> None:
    op = "window_attn_backward"
    check_attention_args(op, q, k, v, cu_seqlens, max_seqlen, softmax_scale)
    for name, t in (("grad", grad), ("out", out)):
        check_float(op, name, t)
        check_device(op, "q", q, name, t)
        if t.shape != q.shape:
            fail(op, name, f"of q's shape {tuple(q.shape)}", tuple(t.shape))
    if lse.dtype != compute_dtype(q.dtype) or tuple(lse.shape) != tuple(q.shape[:2]):
        fail(op, "lse", f"{compute_dtype(q.dtype)} [T, H] = {tuple(q.shape[:2])}", lse)
    check_device(op, "q", q, "lse", lse)


def save_segments(ctx, q: Tensor, max_seqlen: int, scale: float | None) -> None:
    """Keep what the backward of an attention op needs besides tensors: the longest segment and
    the resolved softmax scale (``q``: q, or the packed qkv)."""
    ctx.max_seqlen = max_seqlen
    ctx.softmax_scale = default_softmax_scale(q) if scale is None else scale


def attention_grads(
    ctx, grad: Tensor, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, out: Tensor, lse: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``window_attn_backward`` on the backend the forward's maps to."""
    backend = backward_backend("window_attn_backward", ctx.backend)
    return torch.ops.qwen.window_attn_backward(
        grad, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.softmax_scale, backend
    )


def _save(ctx, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    q, k, v, cu_seqlens, max_seqlen, scale, _ = inputs
    save_segments(ctx, q, max_seqlen, scale)
    ctx.save_for_backward(q, k, v, cu_seqlens, *output)


def _backward(ctx, grad: Tensor, _grad_lse: Tensor | None) -> tuple:
    q, k, v, cu_seqlens, out, lse = ctx.saved_tensors
    return (*attention_grads(ctx, grad, q, k, v, cu_seqlens, out, lse), None, None, None)


_SHARED_ARGS = """
    Args:
        q, k, v, cu_seqlens, max_seqlen, softmax_scale: as in ``window_attn``.
        backend: "auto", "torch", "triton", "cuda" or "cuda_emu".
"""

window_attn_backward = define(
    OpSpec(
        name="window_attn_backward",
        schema="(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor cu_seqlens, SymInt max_seqlen, float softmax_scale) -> (Tensor, Tensor, Tensor)",
        doc="""The gradients of ``window_attn`` (what its autograd formula runs).

    Args:
        grad: ``[T, H, D]``, the gradient of the output; any float dtype, unit last stride or
            not.
        q, k, v, cu_seqlens, max_seqlen, softmax_scale: the forward's (the scale resolved).
        out, lse: what ``window_attn_forward`` returned.
        backend: "auto", "torch", "triton", "cuda" or "cuda_emu".

    Returns:
        ``(dq, dk, dv)``, each ``[T, H, D]`` contiguous in q's dtype: P recomputed from q, k and
        lse in fp32, every sum fp32, each gradient rounded once. The fp16/bf16 kernels round P
        and dS to q's dtype before their products, and the CUDA kernels round a ``grad`` of
        another dtype to q's (it is a tensor-core operand).
    """,
        reference=window_attn_backward_reference,
        check=_check_backward_args,
        outputs=lambda grad, q, *_: tuple(
            torch.empty_like(q, memory_format=torch.contiguous_format) for _ in range(3)
        ),
        kernels={"triton": "qwen_kernels.triton_kernels.window_attn_backward:window_attn_backward"},
        native=True,
        misfit=kernel_misfit,
    )
)

window_attn_forward = define(
    OpSpec(
        name="window_attn_forward",
        schema="(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, SymInt max_seqlen, "
        "float? softmax_scale=None) -> (Tensor, Tensor)",
        doc="""``window_attn`` and each row's log-sum-exp: what ``window_attn`` runs where a
    gradient is needed (it carries the autograd formula).
"""
        + _SHARED_ARGS
        + """
    Returns:
        ``(out, lse)``: out as ``window_attn``'s, lse ``[T, H]`` fp32 (fp64 for fp64 inputs),
        the natural log of each row's sum of ``exp(scale * q . k)`` over its segment.
    """,
        reference=window_attn_forward_reference,
        check=lambda *args: check_attention_args("window_attn_forward", *args),
        outputs=lambda q, *_: (
            torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(q.shape[:2], dtype=compute_dtype(q.dtype)),
        ),
        kernels={"triton": "qwen_kernels.triton_kernels.window_attn:window_attn_forward"},
        native=True,
        check_values=lambda q, k, v, cu_seqlens, max_seqlen, _scale: check_segment_values(
            "window_attn_forward", q.shape[0], cu_seqlens, max_seqlen
        ),
        defaults={"softmax_scale": default_softmax_scale},
        misfit=kernel_misfit,
        autograd=Autograd(_save, _backward),
    )
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
        auto_order=lambda args: attention_auto_order(args[0], args[4]),
        train_with="window_attn_forward",
    )
)
