"""SwiGLU on a packed gate/up tensor: ``qwen::swiglu``, and its backward ``qwen::swiglu_backward``.

Gate and up come out of one GEMM as ``[..., 2I]`` (first half gate), which saves a launch and a read
of the activations; the op computes ``silu(gate) * up`` in fp32 and rounds once. The backward
saves only gate_up and recomputes the sigmoid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_device, check_float, check_ndim, compute_dtype, fail
from ._define import Autograd, OpSpec, backward_backend, define


def swiglu_reference(gate_up: Tensor) -> Tensor:
    """Eager ``silu(gate) * up`` with ``[gate | up] = gate_up`` along the last dim."""
    acc = compute_dtype(gate_up.dtype)
    gate, up = gate_up.to(acc).chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)


def swiglu_backward_reference(grad: Tensor, gate_up: Tensor) -> Tensor:
    """Eager gradient of ``swiglu(gate_up)`` for the output gradient ``grad``, in fp32:
    ``[grad * up * silu'(gate) | grad * silu(gate)]`` in gate_up's dtype, with
    ``silu'(g) = s (1 + g (1 - s))``, ``s = sigmoid(g)``."""
    acc = compute_dtype(gate_up.dtype)
    gate, up = gate_up.to(acc).chunk(2, dim=-1)
    g = grad.to(acc)
    sig = torch.sigmoid(gate)
    grad_gate = g * up * sig * (1 + gate * (1 - sig))
    return torch.cat((grad_gate, g * gate * sig), dim=-1).to(gate_up.dtype)


def check_swiglu_args(gate_up: Tensor) -> None:
    """``gate_up`` is a float tensor whose last dim is even."""
    check_float("swiglu", "gate_up", gate_up)
    check_ndim("swiglu", "gate_up", gate_up, (1,))
    if gate_up.shape[-1] % 2:
        fail(
            "swiglu", "gate_up", "of even size in the last dim ([gate | up])", tuple(gate_up.shape)
        )


def _check_backward_args(grad: Tensor, gate_up: Tensor) -> None:
    check_swiglu_args(gate_up)
    check_float("swiglu_backward", "grad", grad)
    check_device("swiglu_backward", "gate_up", gate_up, "grad", grad)
    expected = (*gate_up.shape[:-1], gate_up.shape[-1] // 2)
    if tuple(grad.shape) != expected:
        fail("swiglu_backward", "grad", f"of the output's shape {expected}", tuple(grad.shape))


def _save(ctx, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad: Tensor) -> tuple:
    (gate_up,) = ctx.saved_tensors
    backend = backward_backend("swiglu_backward", ctx.backend)
    return (torch.ops.qwen.swiglu_backward(grad, gate_up, backend),)


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
        autograd=Autograd(_save, _backward),
    )
)

swiglu_backward = define(
    OpSpec(
        name="swiglu_backward",
        schema="(Tensor grad, Tensor gate_up) -> Tensor",
        doc="""The gradient of ``swiglu(gate_up)`` (what its autograd formula runs).

    Args:
        grad: ``[..., I]``, the gradient of the output; any float dtype and strides.
        gate_up: ``[..., 2I]``, the forward's input.
        backend: "auto", "torch", "triton", "cuda" or "cuda_emu".

    Returns:
        ``[..., 2I]`` contiguous in gate_up's dtype, ``[grad_gate | grad_up]``, computed in fp32.
    """,
        reference=swiglu_backward_reference,
        check=_check_backward_args,
        outputs=lambda grad, gate_up: torch.empty_like(
            gate_up, memory_format=torch.contiguous_format
        ),
        kernels={"triton": "qwen_kernels.triton_kernels.swiglu:swiglu_backward"},
        native=True,
    )
)
