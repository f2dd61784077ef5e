"""Multimodal rotary embedding (M-RoPE): ``qwen::mrope``, ``qwen::mrope_pos`` and their in-place
forms ``qwen::mrope_`` and ``qwen::mrope_pos_``.

Rotate-half convention: ``x * cos + rotate_half(x) * sin`` with ``rotate_half([a, b]) = [-b, a]``,
computed in fp32 and rounded once. ``mrope`` takes cos/sin tables, either composed ``[..., S, D]``
or one per position axis ``[A, ..., S, D]`` with ``mrope_section`` saying which axis drives each
band of frequencies (Qwen2.5-VL's text model). ``mrope_pos`` takes the integer positions
``[A, ..., S]`` and the frequencies, and forms the angles itself (in fp32), so no table is written.

The gradient of a rotation is the rotation by the negative angle: the backward of ``mrope_pos``
runs ``mrope_pos`` with ``-inv_freq``, that of ``mrope`` runs ``mrope`` with ``-sin`` with its two
halves swapped (the transpose for any tables; for rotary tables, whose halves are equal, the
negative angle). Same kernels; nothing saved but the angle source. Tables, positions and
frequencies are not differentiable. The in-place forms refuse inputs that require grad (see
``OpSpec.autograd``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .._checks import (
    INDEX_DTYPES,
    check_device,
    check_float,
    check_ndim,
    check_same,
    check_section,
    compute_dtype,
    fail,
)
from ._define import Autograd, OpSpec, backward_backend, define, not_differentiable

_FREQ_DTYPES = frozenset((torch.float32, torch.float64))


def compose_tables(table: Tensor, mrope_section: Sequence[int]) -> Tensor:
    """Per-axis tables ``[A, ..., S, D]`` to one ``[..., S, D]``: band j of each half from axis j"""
    axes = table.shape[0]
    bands = table.split(list(mrope_section) * 2, dim=-1)
    return torch.cat([band[i % axes] for i, band in enumerate(bands)], dim=-1)


def rope_tables(
    positions: Tensor, inv_freq: Tensor, mrope_section: Sequence[int], dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos/sin ``[..., S, D]``; angle i is ``positions[axis(i)] * inv_freq[i]``."""
    # Built on the device from Python ints: no host-to-device copy, so no sync.
    frequency = torch.arange(sum(mrope_section), device=positions.device)
    axis_of_freq = torch.zeros_like(frequency)
    for boundary in itertools.accumulate(mrope_section[:-1]):
        axis_of_freq += frequency >= boundary
    angles = positions.to(dtype)[axis_of_freq].movedim(0, -1) * inv_freq.to(dtype)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    acc = compute_dtype(x.dtype)
    xf = x.to(acc)
    first, second = xf.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return (xf * cos.to(acc).unsqueeze(-2) + rotated * sin.to(acc).unsqueeze(-2)).to(x.dtype)


def mrope_reference(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, mrope_section: Sequence[int] | None
) -> tuple[Tensor, Tensor]:
    """Eager rotation of q and k with composed or per-axis tables."""
    if mrope_section is not None:
        cos, sin = compose_tables(cos, mrope_section), compose_tables(sin, mrope_section)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def mrope_pos_reference(
    q: Tensor, k: Tensor, positions: Tensor, inv_freq: Tensor, mrope_section: Sequence[int]
) -> tuple[Tensor, Tensor]:
    """Eager rotation of q and k with angles formed from integer positions."""
    acc = compute_dtype(q.dtype)
    cos, sin = rope_tables(positions, inv_freq, mrope_section, acc)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _in_place(reference):
    """The in-place form of a reference: rotate, then write back where q and k lie."""

    def rotate_in_place(q: Tensor, k: Tensor, *args) -> None:
        q_out, k_out = reference(q, k, *args)
        q.copy_(q_out)
        k.copy_(k_out)

    return rotate_in_place


def _check_qk(op: str, q: Tensor, k: Tensor) -> None:
    check_float(op, "q", q)
    check_float(op, "k", k)
    check_ndim(op, "q", q, (3,))
    check_ndim(op, "k", k, (3,))
    check_same(op, "q", q, "k", k)
    q_shape, k_shape = q.shape, k.shape
    head_dim = q_shape[-1]
    if head_dim % 2:
        fail(op, "q", "[..., S, H, D] with an even head_dim D", tuple(q_shape))
    if k_shape[-1] != head_dim or k_shape[:-2] != q_shape[:-2]:
        fail(
            op,
            "k",
            f"[..., S, H_k, D] with q's leading dims, S and D = {tuple(q_shape[:-2])}, {head_dim}",
            tuple(k_shape),
        )


def _check_broadcast(
    op: str, name: str, batch: Sequence[int], leading: Sequence[int], got: object
) -> None:
    """``leading`` (a table's batch dims) broadcasts to q's ``batch`` dims without growing them."""
    if tuple(leading) == tuple(batch):
        return  # the common case, without the cost of broadcast_shapes
    try:
        fits = tuple(torch.broadcast_shapes(tuple(batch), tuple(leading))) == tuple(batch)
    except RuntimeError:
        fits = False
    if not fits:
        fail(op, name, f"leading dims that broadcast to q's {tuple(batch)}", got)


def _check_tables(
    op: str, q: Tensor, cos: Tensor, sin: Tensor, mrope_section: Sequence[int] | None
) -> None:
    q_shape = q.shape
    seq, head_dim = q_shape[-3], q_shape[-1]
    for name, t in (("cos", cos), ("sin", sin)):
        check_float(op, name, t)
    check_device(op, "q", q, "cos", cos)
    check_device(op, "q", q, "sin", sin)
    if sin.shape != cos.shape:
        fail(op, "sin", f"of cos's shape {tuple(cos.shape)}", tuple(sin.shape))
    per_axis = mrope_section is not None
    check_ndim(op, "cos", cos, (3,) if per_axis else (2,))
    if cos.shape[-2:] != (seq, head_dim):
        fail(op, "cos", f"[..., S={seq}, D={head_dim}]", tuple(cos.shape))
    if per_axis:
        check_section(op, mrope_section, cos.shape[0], head_dim // 2)
    _check_broadcast(
        op, "cos", q_shape[:-3], cos.shape[1 if per_axis else 0 : -2], tuple(cos.shape)
    )


def _check_positions(
    op: str,
    q_name: str,
    q: Tensor,
    q_shape: Sequence[int],
    positions: Tensor,
    inv_freq: Tensor,
    mrope_section: Sequence[int],
) -> None:
    """The position arguments of a rotation of ``q_shape`` = ``[..., S, H, D]`` (the shape of
    ``q``, or of the q part of a packed ``q_name``) on ``q``'s device."""
    seq, head_dim = q_shape[-3], q_shape[-1]
    if positions.dtype not in INDEX_DTYPES:
        fail(op, "positions", "int32 or int64", positions.dtype)
    check_ndim(op, "positions", positions, (2,))
    check_device(op, q_name, q, "positions", positions)
    check_device(op, q_name, q, "inv_freq", inv_freq)
    positions_shape = positions.shape
    if positions_shape[-1] != seq:
        fail(op, "positions", f"[A, ..., S={seq}]", tuple(positions_shape))
    _check_broadcast(op, "positions", q_shape[:-3], positions_shape[1:-1], tuple(positions_shape))
    check_section(op, mrope_section, positions_shape[0], head_dim // 2)
    check_float(op, "inv_freq", inv_freq, _FREQ_DTYPES)
    if tuple(inv_freq.shape) != (head_dim // 2,):
        fail(op, "inv_freq", f"[D/2 = {head_dim // 2}]", tuple(inv_freq.shape))


def _check_table_args(
    op: str, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, mrope_section: Sequence[int] | None
) -> None:
    _check_qk(op, q, k)
    _check_tables(op, q, cos, sin, mrope_section)


def _check_position_args(
    op: str,
    q: Tensor,
    k: Tensor,
    positions: Tensor,
    inv_freq: Tensor,
    mrope_section: Sequence[int],
) -> None:
    _check_qk(op, q, k)
    _check_positions(op, "q", q, q.shape, positions, inv_freq, mrope_section)


def _new_like(t: Tensor) -> Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


_TABLE_ARGS = """
    Args:
        q: ``[..., S, H, D]``, any strides. k: ``[..., S, H_k, D]`` (H_k may differ from H),
            same dtype and device as q.
        cos, sin: composed ``[..., S, D]`` or, with ``mrope_section``, per axis ``[A, ..., S, D]``;
            their leading dims broadcast to q's.
        mrope_section: A band sizes summing to D/2: band j of each half of the tables is taken
            from axis j (Qwen2.5-VL's text model uses [16, 24, 24] over axes t, h, w).
        backend: "auto", "torch", "triton", "cuda" or "cuda_emu".
"""
_POSITION_ARGS = """
    Args:
        q, k: as in ``mrope``.
        positions: int32/int64 ``[A, ..., S]``, one row per position axis; leading dims broadcast
            to q's.
        inv_freq: fp32 ``[D/2]``: frequency i has angle ``positions[axis(i)] * inv_freq[i]``.
        mrope_section: A band sizes summing to D/2; axis(i) is the band holding i. The vision
            tower uses A = 2 with [20, 20] (inv_freq the 20 axial frequencies twice); the text
            model A = 3 with [16, 24, 24].
        backend: "auto", "torch", "triton", "cuda" or "cuda_emu".
"""
_OUT_OF_PLACE = """
    Returns:
        ``(q_out, k_out)``, contiguous, in q's dtype.
    """
_IN_PLACE = """
    Returns:
        None: q and k are rotated where they lie (e.g. views of one packed qkv).
    """
_TABLES = "Tensor cos, Tensor sin, int[]? mrope_section=None"
_POSITIONS = "Tensor positions, Tensor inv_freq, int[] mrope_section"


def _rotary_autograd(name: str, from_positions: bool) -> Autograd:
    """Backward of an out-of-place form: the same op rotating the output gradients by the
    negative angles (``-sin``, or ``-inv_freq`` for positions)."""
    angle_args = ("inv_freq",) if from_positions else ("cos", "sin")

    def save(ctx, inputs: tuple, output) -> None:
        not_differentiable(name, inputs, *angle_args)
        _, _, first, second, ctx.mrope_section, _ = inputs
        ctx.save_for_backward(first, second)

    def backward(ctx, grad_q: Tensor, grad_k: Tensor) -> tuple:
        angles, turn = ctx.saved_tensors  # (cos, sin) or (positions, inv_freq)
        # x' = x cos + rotate_half(x) sin has the transpose g cos + rotate_half(g) sin', with
        # sin' = -sin, halves swapped (with positions: the negative angles).
        turn = -turn if from_positions else -turn.roll(turn.shape[-1] // 2, dims=-1)
        backend = backward_backend(name, ctx.backend)
        grads = getattr(torch.ops.qwen, name)(
            grad_q, grad_k, angles, turn, ctx.mrope_section, backend
        )
        return (*grads, None, None, None)

    return Autograd(save, backward)


def _rotary(name: str, in_place: bool, from_positions: bool) -> Callable:
    """One of the four forms: tables or positions as the angle source, out of place or in place.
    Each kernel serves the in-place and the out-of-place form (an output pointer), so all four
    name the same kernels."""
    source = _POSITIONS if from_positions else _TABLES
    reference = mrope_pos_reference if from_positions else mrope_reference
    check = _check_position_args if from_positions else _check_table_args
    summary = (
        "Rotary embedding of q and k from integer positions; angles are formed in fp32."
        if from_positions
        else "Rotary embedding of q and k from cos/sin tables (rotate-half convention, fp32 math)."
    )
    if in_place:
        summary = f"In-place ``{name.rstrip('_')}``: " + summary[0].lower() + summary[1:]
    return define(
        OpSpec(
            name=name,
            schema=f"(Tensor(a!) q, Tensor(b!) k, {source}) -> ()"
            if in_place
            else f"(Tensor q, Tensor k, {source}) -> (Tensor, Tensor)",
            doc=summary
            + "\n"
            + (_POSITION_ARGS if from_positions else _TABLE_ARGS)
            + (_IN_PLACE if in_place else _OUT_OF_PLACE),
            reference=_in_place(reference) if in_place else reference,
            check=lambda *args: check(name, *args),
            outputs=(lambda *_: None)
            if in_place
            else (lambda q, k, *_: (_new_like(q), _new_like(k))),
            kernels={"triton": f"qwen_kernels.triton_kernels.mrope:{name}"},
            native=True,
            autograd=None if in_place else _rotary_autograd(name, from_positions),
        )
    )


mrope = _rotary("mrope", in_place=False, from_positions=False)
mrope_ = _rotary("mrope_", in_place=True, from_positions=False)
mrope_pos = _rotary("mrope_pos", in_place=False, from_positions=True)
mrope_pos_ = _rotary("mrope_pos_", in_place=True, from_positions=True)
