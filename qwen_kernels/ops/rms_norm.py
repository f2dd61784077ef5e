"""RMSNorm, with and without a fused residual add: ``qwen::rms_norm`` and ``qwen::add_rms_norm``.

Numerics follow Qwen2.5-VL's RMSNorm: statistics in fp32, normalise in fp32, cast to the input
dtype, then multiply by the weight (rounded once to the input dtype).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._backends import op_backends, register_native, tensor_key
from .._checks import check_device, check_float, check_same, fail


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the references compute in: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Eager RMSNorm over the last dim, in the cast order of the model."""
    acc = compute_dtype(x.dtype)
    xf = x.to(acc)
    normed = (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (normed.to(acc) * weight.to(acc)).to(x.dtype)


def add_rms_norm_reference(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """Eager residual add (rounded to the input dtype, as the model stores it) then RMSNorm."""
    acc = compute_dtype(x.dtype)
    residual_out = (x.to(acc) + residual.to(acc)).to(x.dtype)
    return rms_norm_reference(residual_out, weight, eps), residual_out


def check_rms_norm_args(op: str, x: Tensor, weight: Tensor, eps: float) -> None:
    """Shape/dtype/device checks shared by the RMSNorm family (also used by fused ops)."""
    check_float(op, "x", x)
    shape = x.shape
    if not shape or shape[-1] == 0:
        expected = "at least 1-D with a non-empty last dim (the normalised features)"
        fail(op, "x", expected, f"shape {tuple(shape)}")
    # The model's weight has the activations' dtype; fp32 master weights are common too.
    if weight.dtype != x.dtype:
        check_float(op, "weight", weight, frozenset((x.dtype, torch.float32)))
    check_device(op, "x", x, "weight", weight)
    if weight.dim() != 1 or weight.shape[0] != shape[-1]:
        fail(op, "weight", f"1-D of size x.shape[-1] = {shape[-1]}", f"shape {tuple(weight.shape)}")
    if not eps >= 0.0:
        fail(op, "eps", "a non-negative float", eps)


RMS_NORM = op_backends("rms_norm", rms_norm_reference)
RMS_NORM.register("triton", "qwen_kernels.triton_kernels.rms_norm:rms_norm")
register_native(RMS_NORM)
ADD_RMS_NORM = op_backends("add_rms_norm", add_rms_norm_reference)
ADD_RMS_NORM.register("triton", "qwen_kernels.triton_kernels.rms_norm:add_rms_norm")
register_native(ADD_RMS_NORM)


@torch.library.custom_op("qwen::rms_norm", mutates_args=())
def _rms_norm_op(x: Tensor, weight: Tensor, eps: float, backend: str = "auto") -> Tensor:
    signature = (backend, eps, tensor_key(x), tensor_key(weight))
    impl = RMS_NORM.resolved.get(signature) or RMS_NORM.resolve(
        signature, backend, x, check_rms_norm_args, "rms_norm", x, weight, eps
    )
    return impl(x, weight, eps).contiguous()


@_rms_norm_op.register_fake
def _(x: Tensor, weight: Tensor, eps: float, backend: str = "auto") -> Tensor:
    check_rms_norm_args("rms_norm", x, weight, eps)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("qwen::add_rms_norm", mutates_args=())
def _add_rms_norm_op(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    signature = (backend, eps, tensor_key(x), tensor_key(residual), tensor_key(weight))
    impl = ADD_RMS_NORM.resolved.get(signature) or ADD_RMS_NORM.resolve(
        signature, backend, x, _check_add_args, x, residual, weight, eps
    )
    out, residual_out = impl(x, residual, weight, eps)
    return out.contiguous(), residual_out.contiguous()


@_add_rms_norm_op.register_fake
def _(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    _check_add_args(x, residual, weight, eps)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    return out, torch.empty_like(out)


def _check_add_args(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> None:
    check_rms_norm_args("add_rms_norm", x, weight, eps)
    check_float("add_rms_norm", "residual", residual)
    check_same("add_rms_norm", "x", x, "residual", residual)
    if residual.shape != x.shape:
        fail("add_rms_norm", "residual", f"of x's shape {tuple(x.shape)}", tuple(residual.shape))


def rms_norm(x: Tensor, weight: Tensor, eps: float, backend: str = "auto") -> Tensor:
    """RMSNorm over the last dimension: ``x / sqrt(mean(x^2) + eps) * weight``.

    Args:
        x: ``[..., C]`` fp16, bf16 or fp32 (fp64 on the "torch" backend), any strides.
        weight: ``[C]`` floating point, on x's device.
        eps: added to the mean square before the reciprocal square root.
        backend: "auto", "torch", "triton", "cuda" or "cuda_emu".

    Returns:
        ``[..., C]`` contiguous, in x's dtype. Statistics are fp32.
    """
    return torch.ops.qwen.rms_norm(x, weight, eps, backend)


def add_rms_norm(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Residual add fused with RMSNorm: ``r = x + residual``; returns ``(rms_norm(r), r)``.

    ``residual`` has x's shape, dtype and device; ``r`` is rounded to that dtype before the norm,
    as the model stores its residual stream. See ``rms_norm`` for the other arguments.
    """
    return torch.ops.qwen.add_rms_norm(x, residual, weight, eps, backend)
