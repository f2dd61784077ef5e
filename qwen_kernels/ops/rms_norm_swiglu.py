"""The MLP front fused: RMSNorm, the gate/up projection and SwiGLU, ``qwen::rms_norm_swiglu``.

``silu(g) * u`` where ``[g | u] = rms_norm(x) @ gate_up_weight.T + gate_up_bias`` (gate rows first).
The kernels fold the norm weight into the gate/up weight (``fold_norm_weight``), so the GEMM reads
the raw activations and applies the norm's per-row scale in its epilogue. A caller that runs the
op many times with the same weights (the encoder) folds once, keeps the folded weight with the
module that owns the weights, and passes it with ``norm_weight=None``.

The backward saves only the inputs: it recomputes the normalised activations and the gate/up
projection (one GEMM), then runs ``swiglu_backward``, two GEMMs for the gradients of the
activations and of the weight, and ``rms_norm_backward``, each op on the forward's backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_float, check_same, fail
from ._define import Autograd, OpSpec, backward_backend, define
from .rms_norm import check_rms_norm_args, rms_norm_reference, rms_normalize
from .swiglu import swiglu_reference

OP = "rms_norm_swiglu"


def fold_norm_weight(norm_weight: Tensor, gate_up_weight: Tensor) -> Tensor:
    """``gate_up_weight * norm_weight`` per input channel (fp32 product, rounded once to the
    weight's dtype), contiguous: the weight to pass with ``norm_weight=None``."""
    return (gate_up_weight.float() * norm_weight.float()).to(gate_up_weight.dtype).contiguous()


def rms_norm_swiglu_reference(
    x: Tensor,
    norm_weight: Tensor | None,
    gate_up_weight: Tensor,
    gate_up_bias: Tensor | None,
    eps: float,
) -> Tensor:
    """Eager chain: RMSNorm in x's dtype, one GEMM in x's dtype, SwiGLU in fp32."""
    if norm_weight is None:
        normed = rms_normalize(x, eps)
    else:
        normed = rms_norm_reference(x, norm_weight, eps)
    return swiglu_reference(F.linear(normed, gate_up_weight, gate_up_bias))


def _check_args(
    x: Tensor,
    norm_weight: Tensor | None,
    gate_up_weight: Tensor,
    gate_up_bias: Tensor | None,
    eps: float,
) -> None:
    check_rms_norm_args(OP, x, norm_weight, eps, "norm_weight")
    channels = x.shape[-1]
    check_float(OP, "gate_up_weight", gate_up_weight)
    check_same(OP, "x", x, "gate_up_weight", gate_up_weight)
    check_same(OP, "x", x, "gate_up_bias", gate_up_bias)
    if gate_up_weight.dim() != 2 or gate_up_weight.shape[1] != channels:
        fail(OP, "gate_up_weight", f"[2I, {channels}]", f"shape {tuple(gate_up_weight.shape)}")
    if gate_up_weight.shape[0] % 2:
        fail(
            OP,
            "gate_up_weight",
            "an even number of rows (gate rows, then up rows)",
            f"shape {tuple(gate_up_weight.shape)}",
        )
    if gate_up_bias is not None and tuple(gate_up_bias.shape) != (gate_up_weight.shape[0],):
        fail(
            OP, "gate_up_bias", f"[{gate_up_weight.shape[0]}]", f"shape {tuple(gate_up_bias.shape)}"
        )


def unfused_best(
    x: Tensor,
    norm_weight: Tensor | None,
    gate_up_weight: Tensor,
    gate_up_bias: Tensor | None,
    eps: float,
) -> Tensor:
    """The chain "auto" runs: the best rms_norm, one cuBLAS GEMM, the best swiglu.

    The fused kernel has not been measured against this chain on a GPU yet, and "auto" only
    picks it where it wins.
    """
    weight = norm_weight if norm_weight is not None else x.new_ones(x.shape[-1])
    normed = torch.ops.qwen.rms_norm(x, weight, eps, "auto")
    return torch.ops.qwen.swiglu(F.linear(normed, gate_up_weight, gate_up_bias), "auto")


def _save(ctx, inputs: tuple, output: Tensor) -> None:
    x, norm_weight, gate_up_weight, gate_up_bias, ctx.eps, _ = inputs
    ctx.save_for_backward(x, norm_weight, gate_up_weight, gate_up_bias)


def _backward(ctx, grad: Tensor) -> tuple:
    x, norm_weight, weight, bias = ctx.saved_tensors
    needs_x, needs_norm_weight, needs_weight, needs_bias = ctx.needs_input_grad[:4]
    unit = norm_weight if norm_weight is not None else x.new_ones(x.shape[-1])
    norm_backend = backward_backend("rms_norm", ctx.backend)
    normed = torch.ops.qwen.rms_norm(x, unit, ctx.eps, norm_backend)
    gate_up = F.linear(normed, weight, bias)
    grad_gate_up = torch.ops.qwen.swiglu_backward(
        grad.reshape((*gate_up.shape[:-1], weight.shape[0] // 2)),
        gate_up,
        backward_backend("swiglu_backward", ctx.backend),
    ).reshape(-1, weight.shape[0])
    grad_weight = grad_gate_up.t() @ normed.reshape(-1, x.shape[-1]) if needs_weight else None
    grad_bias = grad_gate_up.float().sum(0).to(bias.dtype) if needs_bias else None
    grad_x = grad_norm_weight = None
    if needs_x or needs_norm_weight:
        grad_normed = (grad_gate_up @ weight).reshape(x.shape)
        grad_x, grad_norm_weight = torch.ops.qwen.rms_norm_backward(
            grad_normed, x, unit, ctx.eps, None, backward_backend("rms_norm_backward", ctx.backend)
        )
    if not needs_norm_weight:
        grad_norm_weight = None
    return grad_x, grad_norm_weight, grad_weight, grad_bias, None


rms_norm_swiglu = define(
    OpSpec(
        name=OP,
        schema="(Tensor x, Tensor? norm_weight, Tensor gate_up_weight, Tensor? gate_up_bias, "
        "float eps) -> Tensor",
        doc="""RMSNorm, gate/up projection and SwiGLU in one op.

    Args:
        x: ``[..., C]`` activations (fp16, bf16, fp32; fp64 on "torch").
        norm_weight: ``[C]`` RMSNorm weight, or None where ``gate_up_weight`` has it folded in
            already (``fold_norm_weight``; the norm then runs with a unit weight).
        gate_up_weight: ``[2I, C]``, the gate projection's rows first, then the up projection's;
            same dtype and device as x.
        gate_up_bias: ``[2I]`` or None.
        eps: RMSNorm epsilon.
        backend: "auto", "torch", "triton", "cuda" or "cuda_emu".

    Returns:
        ``[..., I]`` in x's dtype: ``silu(g) * u`` with ``[g | u] = rms_norm(x) @ W.T + b``.
    """,
        reference=rms_norm_swiglu_reference,
        check=_check_args,
        outputs=lambda x, norm_weight, gate_up_weight, *_: x.new_empty(
            (*x.shape[:-1], gate_up_weight.shape[0] // 2)
        ),
        kernels={"triton": "qwen_kernels.triton_kernels.rms_norm_swiglu:rms_norm_swiglu"},
        auto_impl=unfused_best,
        autograd=Autograd(_save, _backward),
    )
)
