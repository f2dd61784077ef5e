"""SwiGLU on a packed gate/up tensor: ``qwen::swiglu``.

Gate and up come out of one GEMM as ``[..., 2I]`` (first half gate), which saves a launch and a read
of the activations; the op computes ``silu(gate) * up`` in fp32 and rounds once.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .._checks import check_float, check_ndim, compute_dtype, fail
from ._define import OpSpec, define


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


swiglu = define(
    OpSpec(
        name="swiglu",
        schema="(Tensor gate_up) -> Tensor",
        doc="""``silu(gate) * up`` where ``gate_up = [gate | up]`` along the last dimension.

    Args:
        gate_up: ``[..., 2I]`` fp16, bf16 or fp32 (fp64 on "torch"), any strides.
        backend: "auto", "torch", "triton", "cuda" or "cuda_emu".

    Returns:
        ``[..., I]`` contiguous, in gate_up's dtype, computed in fp32.
    """,
        reference=swiglu_reference,
        check=check_swiglu_args,
        outputs=lambda gate_up: gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2)),
        kernels={"triton": "qwen_kernels.triton_kernels.swiglu:swiglu"},
        native=True,
    )
)
