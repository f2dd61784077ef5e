"""RMSNorm, with and without a fused residual add: ``qwen::rms_norm`` and ``qwen::add_rms_norm``,
and their backward ``qwen::rms_norm_backward``.

Numerics follow Qwen2.5-VL's RMSNorm: statistics in fp32, normalise in fp32, cast to the input
dtype, then multiply by the weight (rounded once to the input dtype). The backward recomputes the
statistics from x (nothing but x and the weight is saved), accumulates in fp32 and rounds each
gradient once; the weight's gradient is a two-stage reduction (per-block fp32 partial sums, then
their sum), with no atomics.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_device, check_float, check_same, compute_dtype, fail
from ._define import Autograd, OpSpec, backward_backend, define


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


def rms_norm_backward_reference(
    grad: Tensor, x: Tensor, weight: Tensor, eps: float, grad_residual: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Eager gradients of ``rms_norm(x, weight, eps)`` for the output gradient ``grad``, in fp32
    (fp64 for fp64 x): ``(grad_x, grad_weight)`` in x's and weight's dtypes. ``grad_residual``,
    where given, is added to grad_x (add_rms_norm's gradient of its sum output)."""
    acc = compute_dtype(x.dtype)
    xf, g = x.to(acc), grad.to(acc)
    rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    normed = xf * rstd
    grad_normed = g * weight.to(acc)
    grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
    if grad_residual is not None:
        grad_x = grad_x + grad_residual.to(acc)
    # The forward multiplies the weight by the normalised value rounded to x's dtype.
    grad_weight = (g * normed.to(x.dtype).to(acc)).reshape(-1, x.shape[-1]).sum(0)
    return grad_x.to(x.dtype), grad_weight.to(weight.dtype)


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


def _check_backward_args(
    grad: Tensor, x: Tensor, weight: Tensor, eps: float, grad_residual: Tensor | None
) -> None:
    check_rms_norm_args("rms_norm_backward", x, weight, eps)
    for name, t in (("grad", grad), ("grad_residual", grad_residual)):
        if t is None:
            continue
        check_float("rms_norm_backward", name, t)
        check_device("rms_norm_backward", "x", x, name, t)
        if t.shape != x.shape:
            fail("rms_norm_backward", name, f"of x's shape {tuple(x.shape)}", tuple(t.shape))


def _like(x: Tensor, *_) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _save_rms_norm(ctx, inputs: tuple, output: Tensor) -> None:
    x, weight, ctx.eps, _ = inputs
    ctx.save_for_backward(x, weight)


def _rms_norm_backward(ctx, grad: Tensor) -> tuple:
    x, weight = ctx.saved_tensors
    grad_x, grad_weight = _norm_gradients(ctx, grad, x, weight, None)
    return grad_x, grad_weight, None


def _save_add_rms_norm(ctx, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    ctx.eps = inputs[3]
    ctx.save_for_backward(output[1], inputs[2])  # the norm's input is the sum output


def _add_rms_norm_backward(ctx, grad: Tensor, grad_sum: Tensor) -> tuple:
    summed, weight = ctx.saved_tensors
    grad_summed, grad_weight = _norm_gradients(ctx, grad, summed, weight, grad_sum)
    return grad_summed, grad_summed, grad_weight, None


def _norm_gradients(
    ctx, grad: Tensor, x: Tensor, weight: Tensor, grad_residual: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    backend = backward_backend("rms_norm_backward", ctx.backend)
    grad_x, grad_weight = torch.ops.qwen.rms_norm_backward(
        grad, x, weight, ctx.eps, grad_residual, backend
    )
    weight_index = len(ctx.needs_input_grad) - 3  # the weight comes before eps and backend
    return grad_x, grad_weight if ctx.needs_input_grad[weight_index] else None


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
        autograd=Autograd(_save_rms_norm, _rms_norm_backward),
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
        autograd=Autograd(_save_add_rms_norm, _add_rms_norm_backward),
    )
)

rms_norm_backward = define(
    OpSpec(
        name="rms_norm_backward",
        schema="(Tensor grad, Tensor x, Tensor weight, float eps, Tensor? grad_residual=None) "
        "-> (Tensor, Tensor)",
        doc="""The gradients of ``rms_norm(x, weight, eps)`` (what its autograd formula runs).

    Args:
        grad: ``[..., C]``, the gradient of the output; x's shape, any float dtype and strides.
        x, weight, eps: the forward's arguments (add_rms_norm: its sum output as x).
        grad_residual: None, or the gradient of add_rms_norm's sum output, added to grad_x.
        backend: "auto", "torch", "triton", "cuda" or "cuda_emu".

    Returns:
        ``(grad_x, grad_weight)``: grad_x contiguous in x's dtype, grad_weight ``[C]`` in
        weight's dtype. Statistics are recomputed in fp32 and every sum is fp32.
    """,
        reference=rms_norm_backward_reference,
        check=_check_backward_args,
        outputs=lambda grad, x, weight, *_: (_like(x), torch.empty_like(weight)),
        kernels={"triton": "qwen_kernels.triton_kernels.rms_norm:rms_norm_backward"},
        native=True,
    )
)
