"""SwiGLU on a packed gate/up tensor: ``qwen::swiglu``.

Gate and up come out of one GEMM as ``[..., 2I]`` (first half gate), which saves a launch and a read
of the activations; the op computes ``silu(gate) * up`` in fp32 and rounds once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._backends import op_backends, register_native, tensor_key
from .._checks import check_float, check_ndim, fail
from .rms_norm import compute_dtype


def swiglu_reference(gate_up: Tensor) -> Tensor:
    """Eager ``silu(gate) * up`` with ``[gate | up] = gate_up`` along the last dim."""
    acc = compute_dtype(gate_up.dtype)
    gate, up = gate_up.to(acc).chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)


def check_swiglu_args(gate_up: Tensor) -> None:
    """``gate_up`` is a float tensor whose last dim is even."""
    check_float("swiglu", "gate_up", gate_up)
    check_ndim("swiglu", "gate_up", gate_up, (1,))
    if gate_up.shape[-1] % 2:
        fail(
            "swiglu", "gate_up", "of even size in the last dim ([gate | up])", tuple(gate_up.shape)
        )


def swiglu_out_shape(gate_up: Tensor) -> tuple[int, ...]:
    """``gate_up.shape`` with the last dim halved."""
    return (*gate_up.shape[:-1], gate_up.shape[-1] // 2)


SWIGLU = op_backends("swiglu", swiglu_reference)
SWIGLU.register("triton", "qwen_kernels.triton_kernels.swiglu:swiglu")
register_native(SWIGLU)


@torch.library.custom_op("qwen::swiglu", mutates_args=())
def _swiglu_op(gate_up: Tensor, backend: str = "auto") -> Tensor:
    signature = (backend, tensor_key(gate_up))
    impl = SWIGLU.resolved.get(signature) or SWIGLU.resolve(
        signature, backend, gate_up, check_swiglu_args, gate_up
    )
    return impl(gate_up).contiguous()


@_swiglu_op.register_fake
def _(gate_up: Tensor, backend: str = "auto") -> Tensor:
    check_swiglu_args(gate_up)
    return gate_up.new_empty(swiglu_out_shape(gate_up))


def swiglu(gate_up: Tensor, backend: str = "auto") -> Tensor:
    """``silu(gate) * up`` where ``gate_up = [gate | up]`` along the last dimension.

    Args:
        gate_up: ``[..., 2I]`` fp16, bf16 or fp32 (fp64 on "torch"), any strides.
        backend: "auto", "torch", "triton", "cuda" or "cuda_emu".

    Returns:
        ``[..., I]`` contiguous, in gate_up's dtype, computed in fp32.
    """
    return torch.ops.qwen.swiglu(gate_up, backend)
