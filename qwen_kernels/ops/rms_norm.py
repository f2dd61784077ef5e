"""RMSNorm, with and without a fused residual add: ``qwen::rms_norm`` and ``qwen::add_rms_norm``.

Numerics follow Qwen2.5-VL's RMSNorm: statistics in fp32, normalise in fp32, cast to the input
dtype, then multiply by the weight (rounded once to the input dtype).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_device, check_float, check_same, compute_dtype, fail
from ._define import OpSpec, define


def rms_normalize(x: Tensor, eps: float) -> Tensor:
    """``x / sqrt(mean(x^2) + eps)`` over the last dim in fp32, cast to x's dtype (RMSNorm
    before its weight)."""
    xf = x.to(compute_dtype(x.dtype))
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Eager RMSNorm over the last dim, in the cast order of the model."""
    acc = compute_dtype(x.dtype)
    return (rms_normalize(x, eps).to(acc) * weight.to(acc)).to(x.dtype)


def add_rms_norm_reference(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """Eager residual add (rounded to the input dtype, as the model stores it) then RMSNorm."""
    acc = compute_dtype(x.dtype)
    residual_out = (x.to(acc) + residual.to(acc)).to(x.dtype)
    return rms_norm_reference(residual_out, weight, eps), residual_out


def check_rms_norm_args(
    op: str, x: Tensor, weight: Tensor | None, eps: float, weight_name: str = "weight"
) -> None:
    """Shape/dtype/device checks shared by the RMSNorm family (also used by fused ops, which
    may name the weight otherwise or have none)."""
    check_float(op, "x", x)
    shape = x.shape
    if not shape or shape[-1] == 0:
        expected = "at least 1-D with a non-empty last dim (the normalised features)"
        fail(op, "x", expected, f"shape {tuple(shape)}")
    if not eps >= 0.0:
        fail(op, "eps", "a non-negative float", eps)
    if weight is None:
        return
    # The model's weight has the activations' dtype; fp32 master weights are common too.
    if weight.dtype != x.dtype:
        check_float(op, weight_name, weight, frozenset((x.dtype, torch.float32)))
    check_device(op, "x", x, weight_name, weight)
    if weight.dim() != 1 or weight.shape[0] != shape[-1]:
        fail(
            op,
            weight_name,
            f"1-D of size x.shape[-1] = {shape[-1]}",
            f"shape {tuple(weight.shape)}",
        )


def _check_add_args(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> None:
    check_rms_norm_args("add_rms_norm", x, weight, eps)
    check_float("add_rms_norm", "residual", residual)
    check_same("add_rms_norm", "x", x, "residual", residual)
    if residual.shape != x.shape:
        fail("add_rms_norm", "residual", f"of x's shape {tuple(x.shape)}", tuple(residual.shape))


def _like(x: Tensor, *_) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


rms_norm = define(
    OpSpec(
        name="rms_norm",
        schema="(Tensor x, Tensor weight, float eps) -> Tensor",
        doc="""RMSNorm over the last dimension: ``x / sqrt(mean(x^2) + eps) * weight``.

    Args:
        x: ``[..., C]`` fp16, bf16 or fp32 (fp64 on the "torch" backend), any strides.
        weight: ``[C]`` floating point, on x's device.
        eps: added to the mean square before the reciprocal square root.
        backend: "auto", "torch", "triton", "cuda" or "cuda_emu".

    Returns:
        ``[..., C]`` contiguous, in x's dtype. Statistics are fp32.
    """,
        reference=rms_norm_reference,
        check=lambda x, weight, eps: check_rms_norm_args("rms_norm", x, weight, eps),
        outputs=_like,
        kernels={"triton": "qwen_kernels.triton_kernels.rms_norm:rms_norm"},
        native=True,
    )
)

add_rms_norm = define(
    OpSpec(
        name="add_rms_norm",
        schema="(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)",
        doc="""Residual add fused with RMSNorm: ``r = x + residual``; returns ``(rms_norm(r), r)``.

    ``residual`` has x's shape, dtype and device; ``r`` is rounded to that dtype before the norm,
    as the model stores its residual stream. See ``rms_norm`` for the other arguments.
    """,
        reference=add_rms_norm_reference,
        check=_check_add_args,
        outputs=lambda x, *_: (_like(x), _like(x)),
        kernels={"triton": "qwen_kernels.triton_kernels.rms_norm:add_rms_norm"},
        native=True,
    )
)
