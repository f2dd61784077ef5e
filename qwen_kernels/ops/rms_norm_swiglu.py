"""The MLP front fused: RMSNorm, the gate/up projection and SwiGLU, ``qwen::rms_norm_swiglu``.

``silu(g) * u`` where ``[g | u] = rms_norm(x) @ gate_up_weight.T + gate_up_bias`` (gate rows first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._backends import op_backends, tensor_key
from .._checks import check_float, check_same, fail
from .rms_norm import check_rms_norm_args, rms_norm_reference
from .swiglu import swiglu_reference

OP = "rms_norm_swiglu"


def rms_norm_swiglu_reference(
    x: Tensor, norm_weight: Tensor, gate_up_weight: Tensor, gate_up_bias: Tensor | None, eps: float
) -> Tensor:
    """Eager chain: RMSNorm in x's dtype, one GEMM in x's dtype, SwiGLU in fp32."""
    normed = rms_norm_reference(x, norm_weight, eps)
    return swiglu_reference(F.linear(normed, gate_up_weight, gate_up_bias))


def _check_args(
    x: Tensor, norm_weight: Tensor, gate_up_weight: Tensor, gate_up_bias: Tensor | None, eps: float
) -> None:
    check_rms_norm_args(OP, x, norm_weight, eps)
    check_float(OP, "gate_up_weight", gate_up_weight)
    check_same(OP, "x", x, "gate_up_weight", gate_up_weight)
    check_same(OP, "x", x, "gate_up_bias", gate_up_bias)
    channels = x.shape[-1]
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
    x: Tensor, norm_weight: Tensor, gate_up_weight: Tensor, gate_up_bias: Tensor | None, eps: float
) -> Tensor:
    """The chain "auto" runs: the best rms_norm, one cuBLAS GEMM, the best swiglu.

    The fused kernel has not been measured against this chain on a GPU yet, and "auto" only
    picks it where it wins.
    """
    normed = torch.ops.qwen.rms_norm(x, norm_weight, eps, "auto")
    return torch.ops.qwen.swiglu(F.linear(normed, gate_up_weight, gate_up_bias), "auto")


RMS_NORM_SWIGLU = op_backends(OP, rms_norm_swiglu_reference, auto_impl=unfused_best)
RMS_NORM_SWIGLU.register("triton", "qwen_kernels.triton_kernels.rms_norm_swiglu:rms_norm_swiglu")


@torch.library.custom_op("qwen::rms_norm_swiglu", mutates_args=())
def _rms_norm_swiglu_op(
    x: Tensor,
    norm_weight: Tensor,
    gate_up_weight: Tensor,
    gate_up_bias: Tensor | None,
    eps: float,
    backend: str = "auto",
) -> Tensor:
    signature = (
        backend,
        eps,
        tensor_key(x),
        tensor_key(norm_weight),
        tensor_key(gate_up_weight),
        tensor_key(gate_up_bias),
    )
    impl = RMS_NORM_SWIGLU.resolved.get(signature) or RMS_NORM_SWIGLU.resolve(
        signature, backend, x, _check_args, x, norm_weight, gate_up_weight, gate_up_bias, eps
    )
    return impl(x, norm_weight, gate_up_weight, gate_up_bias, eps).contiguous()


@_rms_norm_swiglu_op.register_fake
def _(
    x: Tensor,
    norm_weight: Tensor,
    gate_up_weight: Tensor,
    gate_up_bias: Tensor | None,
    eps: float,
    backend: str = "auto",
) -> Tensor:
    _check_args(x, norm_weight, gate_up_weight, gate_up_bias, eps)
    return x.new_empty((*x.shape[:-1], gate_up_weight.shape[0] // 2))


def rms_norm_swiglu(
    x: Tensor,
    norm_weight: Tensor,
    gate_up_weight: Tensor,
    gate_up_bias: Tensor | None,
    eps: float,
    backend: str = "auto",
) -> Tensor:
    """RMSNorm, gate/up projection and SwiGLU in one op.

    Args:
        x: ``[..., C]`` activations (fp16, bf16, fp32; fp64 on "torch").
        norm_weight: ``[C]`` RMSNorm weight.
        gate_up_weight: ``[2I, C]``, the gate projection's rows first, then the up projection's;
            same dtype and device as x.
        gate_up_bias: ``[2I]`` or None.
        eps: RMSNorm epsilon.
        backend: "auto", "torch", "triton", "cuda" or "cuda_emu".

    Returns:
        ``[..., I]`` in x's dtype: ``silu(g) * u`` with ``[g | u] = rms_norm(x) @ W.T + b``.
    """
    return torch.ops.qwen.rms_norm_swiglu(
        x, norm_weight, gate_up_weight, gate_up_bias, eps, backend
    )
