"""Rotary embedding fused into segment attention: ``qwen::window_attn_rope``.

Takes the packed projection ``qkv [T, 3, H, D]`` and the rotary arguments of ``mrope_pos``:
``mrope_pos`` on q and k, then ``window_attn``, as one op. Kernels rotate q and k while loading
them, so qkv is read once and only the attention output is written (the unfused chain writes q
and k back and reads them again).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._backends import op_backends, register_native, tensor_key
from .._checks import check_float, check_ndim, fail
from .mrope import _check_positions, mrope_pos_reference
from .window_attn import (
    AUTO_NOTE,
    check_segment_args,
    check_segment_values,
    kernel_fits,
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
    softmax_scale: float | None,
) -> Tensor:
    """Eager reference: ``mrope_pos`` of q and k (rounded to qkv's dtype, as the unfused chain
    stores them), then ``window_attn``."""
    q, k, v = qkv.unbind(1)
    q, k = mrope_pos_reference(q, k, positions, inv_freq, mrope_section)
    return window_attn_reference(q, k, v, cu_seqlens, max_seqlen, softmax_scale)


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


WINDOW_ATTN_ROPE = op_backends(
    OP, window_attn_rope_reference, fits=kernel_fits, auto_note=AUTO_NOTE
)
WINDOW_ATTN_ROPE.register("triton", "qwen_kernels.triton_kernels.window_attn:window_attn_rope")
register_native(WINDOW_ATTN_ROPE)


@torch.library.custom_op(
    "qwen::window_attn_rope",
    mutates_args=(),
    schema="(Tensor qkv, Tensor cu_seqlens, SymInt max_seqlen, Tensor positions, Tensor inv_freq, "
    'int[] mrope_section, float? softmax_scale=None, str backend="auto") -> Tensor',
)
def _window_attn_rope_op(
    qkv: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    positions: Tensor,
    inv_freq: Tensor,
    mrope_section: list[int],
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    args = (qkv, cu_seqlens, max_seqlen, positions, inv_freq, mrope_section, softmax_scale)
    signature = (
        backend,
        max_seqlen,
        softmax_scale,
        tuple(mrope_section),
        tensor_key(qkv),
        tensor_key(cu_seqlens),
        tensor_key(positions),
        tensor_key(inv_freq),
    )
    impl = WINDOW_ATTN_ROPE.resolved.get(signature) or WINDOW_ATTN_ROPE.resolve(
        signature, backend, qkv, _check_args, *args
    )
    check_segment_values(OP, qkv.shape[0], cu_seqlens, max_seqlen)
    return impl(*args).contiguous()


@_window_attn_rope_op.register_fake
def _(
    qkv,
    cu_seqlens,
    max_seqlen,
    positions,
    inv_freq,
    mrope_section,
    softmax_scale=None,
    backend="auto",
):
    _check_args(qkv, cu_seqlens, max_seqlen, positions, inv_freq, mrope_section, softmax_scale)
    return qkv.new_empty((qkv.shape[0], qkv.shape[2], qkv.shape[3]))


def window_attn_rope(
    qkv: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    positions: Tensor,
    inv_freq: Tensor,
    mrope_section: list[int],
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Rotary embedding of q and k fused into non-causal attention inside each segment.

    Same result as ``mrope_pos`` on q and k (rounded to qkv's dtype) followed by
    ``window_attn``, without writing the rotated q and k; qkv itself is not modified.

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
    """
    return torch.ops.qwen.window_attn_rope(
        qkv, cu_seqlens, max_seqlen, positions, inv_freq, mrope_section, softmax_scale, backend
    )
