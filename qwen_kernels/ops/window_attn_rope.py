"""Rotary embedding fused into segment attention: ``qwen::window_attn_rope``.

Takes the packed projection ``qkv [T, 3, H, D]`` and the rotary arguments of ``mrope_pos``:
``mrope_pos`` on q and k, then ``window_attn``, as one op. On windows (max_seqlen up to one key
tile of 64) the kernels rotate q and k while loading them, so qkv is read once and only the
attention output is written (the unfused chain writes q and k back and reads them again). Longer
segments span several key tiles, which every block of queries reads: there the Triton and CUDA
kernels rotate q and k once into a scratch copy and run the plain long path, so no angle is
formed inside the key loop.

Training: where a gradient is needed the op runs ``window_attn_rope_forward`` (its kernels also
storing each row's log-sum-exp). The backward saves qkv, the output and the lse: it rotates q and
k again (``mrope_pos``), runs ``window_attn_backward`` on the rotated values and turns dq and dk
back by the negative angles (``mrope_pos`` with ``-inv_freq``); the rotated q and k are never
kept.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_float, check_ndim, fail
from ._define import Autograd, OpSpec, backward_backend, define, not_differentiable
from .mrope import _check_positions, mrope_pos_reference
from .window_attn import (
    AUTO_NOTE,
    attention_auto_order,
    attention_grads,
    check_segment_args,
    check_segment_values,
    default_softmax_scale,
    kernel_misfit,
    save_segments,
    window_attn_forward_reference,
    window_attn_reference,
)

OP = "window_attn_rope"


def window_attn_rope_reference(
    qkv: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    positions: Tensor,
    inv_freq: Tensor,
    mrope_section: list[int],
    softmax_scale: float,
) -> Tensor:
    """Eager reference: ``mrope_pos`` of q and k (rounded to qkv's dtype, as the unfused chain
    stores them), then ``window_attn``."""
    q, k, v = _rotated(qkv, positions, inv_freq, mrope_section)
    return window_attn_reference(q, k, v, cu_seqlens, max_seqlen, softmax_scale)


def _rotated(
    qkv: Tensor, positions: Tensor, inv_freq: Tensor, mrope_section: list[int]
) -> tuple[Tensor, Tensor, Tensor]:
    """q and k of qkv rotated by the eager ``mrope_pos``, and v."""
    q, k, v = qkv.unbind(1)
    return (*mrope_pos_reference(q, k, positions, inv_freq, mrope_section), v)


def window_attn_rope_forward_reference(
    qkv: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    positions: Tensor,
    inv_freq: Tensor,
    mrope_section: list[int],
    softmax_scale: float,
) -> tuple[Tensor, Tensor]:
    """``window_attn_rope_reference`` and each row's log-sum-exp (``window_attn_forward``)."""
    q, k, v = _rotated(qkv, positions, inv_freq, mrope_section)
    return window_attn_forward_reference(q, k, v, cu_seqlens, max_seqlen, softmax_scale)


def _check_args(
    qkv: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    positions: Tensor,
    inv_freq: Tensor,
    mrope_section: list[int],
    softmax_scale: float | None,
) -> None:
    check_float(OP, "qkv", qkv)
    check_ndim(OP, "qkv", qkv, 4)
    shape = qkv.shape
    if shape[1] != 3:
        fail(OP, "qkv", "[T, 3, H, D] (q, k, v packed along dim 1)", tuple(shape))
    if shape[3] % 2:
        fail(OP, "qkv", "[T, 3, H, D] with an even head_dim D", tuple(shape))
    # q, k and v are views of the checked qkv: one dtype and device, and q's shape is [T, H, D].
    check_segment_args(OP, "qkv", qkv, cu_seqlens, max_seqlen, softmax_scale)
    q_shape = (shape[0], shape[2], shape[3])
    _check_positions(OP, "qkv", qkv, q_shape, positions, inv_freq, mrope_section)


def _save(ctx, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    not_differentiable("window_attn_rope_forward", inputs, "inv_freq")
    qkv, cu_seqlens, max_seqlen, positions, inv_freq, ctx.mrope_section, scale, _ = inputs
    save_segments(ctx, qkv, max_seqlen, scale)
    ctx.save_for_backward(qkv, cu_seqlens, positions, inv_freq, *output)


def _backward(ctx, grad: Tensor, _grad_lse: Tensor | None) -> tuple:
    qkv, cu_seqlens, positions, inv_freq, out, lse = ctx.saved_tensors
    q, k, v = qkv.unbind(1)
    rotary = (positions, inv_freq, ctx.mrope_section)
    rotate = backward_backend("mrope_pos", ctx.backend)
    q, k = torch.ops.qwen.mrope_pos(q, k, *rotary, rotate)
    dq, dk, dv = attention_grads(ctx, grad, q, k, v, cu_seqlens, out, lse)
    dq, dk = torch.ops.qwen.mrope_pos(dq, dk, positions, -inv_freq, ctx.mrope_section, rotate)
    return torch.stack((dq, dk, dv), dim=1), None, None, None, None, None, None


window_attn_rope_forward = define(
    OpSpec(
        name="window_attn_rope_forward",
        schema="(Tensor qkv, Tensor cu_seqlens, SymInt max_seqlen, Tensor positions, "
        "Tensor inv_freq, int[] mrope_section, float? softmax_scale=None) -> (Tensor, Tensor)",
        doc="""``window_attn_rope`` and each row's log-sum-exp: what ``window_attn_rope`` runs
    where a gradient is needed (it carries the autograd formula).

    Args:
        qkv, cu_seqlens, max_seqlen, positions, inv_freq, mrope_section, softmax_scale: as in
            ``window_attn_rope``.
        backend: "auto", "torch", "triton", "cuda" or "cuda_emu".

    Returns:
        ``(out, lse)``: out as ``window_attn_rope``'s, lse ``[T, H]`` fp32 (fp64 for fp64
        inputs), the natural log of each row's sum of ``exp(scale * q . k)`` of the rotated q, k.
    """,
        reference=window_attn_rope_forward_reference,
        check=_check_args,
        outputs=lambda qkv, *_: (
            qkv.new_empty((qkv.shape[0], qkv.shape[2], qkv.shape[3])),
            qkv.new_empty(
                qkv.shape[:1] + qkv.shape[2:3],
                dtype=torch.float64 if qkv.dtype == torch.float64 else torch.float32,
            ),
        ),
        kernels={"triton": "qwen_kernels.triton_kernels.window_attn:window_attn_rope_forward"},
        native=True,
        check_values=lambda qkv, cu_seqlens, max_seqlen, *_: check_segment_values(
            "window_attn_rope_forward", qkv.shape[0], cu_seqlens, max_seqlen
        ),
        defaults={"softmax_scale": default_softmax_scale},
        misfit=kernel_misfit,
        autograd=Autograd(_save, _backward),
    )
)

window_attn_rope = define(
    OpSpec(
        name=OP,
        schema="(Tensor qkv, Tensor cu_seqlens, SymInt max_seqlen, Tensor positions, "
        "Tensor inv_freq, int[] mrope_section, float? softmax_scale=None) -> Tensor",
        doc="""Rotary embedding of q and k fused into non-causal attention inside each segment.

    Same result as ``mrope_pos`` on q and k (rounded to qkv's dtype) followed by
    ``window_attn``, without writing the rotated q and k; qkv itself is not modified. The op of
    its own (not a flag of ``window_attn``) at every layer: ``csrc/window_attn/`` (the rotary
    flag of the same kernel family), ``triton_kernels/window_attn.py`` (the ``ROTARY`` constexpr
    of the same kernel), this module, ``tests/ops/test_window_attn_rope.py``.

    Args:
        qkv: ``[T, 3, H, D]`` (q, k, v along dim 1, e.g. the qkv projection viewed per head) of
            fp16, bf16 or fp32 (fp64 on "torch"), any strides; D even.
        cu_seqlens: int32 ``[S+1]``: segment s is tokens ``cu_seqlens[s]:cu_seqlens[s+1]``;
            starts at 0, ends at T, non-decreasing (empty segments are allowed).
        max_seqlen: the longest segment (an upper bound is fine; kernels size tiles by it).
        positions: int32/int64 ``[A, T]``, one row per position axis (the vision tower: row and
            column of each token in its frame).
        inv_freq: fp32 ``[D/2]``: frequency i turns by ``positions[axis(i)] * inv_freq[i]``.
        mrope_section: A band sizes summing to D/2; axis(i) is the band holding i (the tower
            uses ``[D/4, D/4]``).
        softmax_scale: defaults to ``1/sqrt(D)``.
        backend: "auto", "torch", "triton", "cuda" or "cuda_emu".

    Returns:
        ``[T, H, D]`` contiguous in qkv's dtype; angles and softmax in fp32.
    """,
        reference=window_attn_rope_reference,
        check=_check_args,
        outputs=lambda qkv, *_: qkv.new_empty((qkv.shape[0], qkv.shape[2], qkv.shape[3])),
        kernels={"triton": "qwen_kernels.triton_kernels.window_attn:window_attn_rope"},
        native=True,
        check_values=lambda qkv, cu_seqlens, max_seqlen, *_: check_segment_values(
            OP, qkv.shape[0], cu_seqlens, max_seqlen
        ),
        defaults={"softmax_scale": default_softmax_scale},
        misfit=kernel_misfit,
        auto_note=AUTO_NOTE,
        auto_order=lambda args: attention_auto_order(args[0], args[2]),
        train_with="window_attn_rope_forward",
    )
)
