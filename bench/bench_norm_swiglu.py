"""Benchmarks of the MLP-side ops: ``rms_norm``, ``add_rms_norm``, ``swiglu`` and the fused
``rms_norm_swiglu``, and the backward ops ``rms_norm_backward`` and ``swiglu_backward``, over
tokens [T, 1280] with intermediate 3420.

Peers: torch.compile of each reference, Liger-Kernel's rms_norm and swiglu where installed. The
fused op is measured against what it replaces: RMSNorm, the cuBLAS gate/up GEMM and SwiGLU
(our eager reference, and the same chain through our fastest norm and swiglu backends), and
reported in TFLOP/s.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import qwen_kernels
from qwen_kernels.ops.rms_norm import (
    add_rms_norm_reference,
    rms_norm_backward_reference,
    rms_norm_reference,
)
from qwen_kernels.ops.rms_norm_swiglu import rms_norm_swiglu_reference
from qwen_kernels.ops.swiglu import swiglu_backward_reference, swiglu_reference

from .harness import Case, Impl, Inputs, Maker, Suite, compile_peer, missing_module
from .shapes import Scale, short_count

EPS = 1e-6
ARGS = {
    "rms_norm": ("x", "weight", "eps"),
    "add_rms_norm": ("x", "residual", "weight", "eps"),
    "swiglu": ("gate_up",),
    "rms_norm_swiglu": ("x", "norm_weight", "gate_up_weight", "gate_up_bias", "eps"),
    "rms_norm_backward": ("grad", "x", "weight", "eps", "grad_residual"),
    "swiglu_backward": ("grad", "gate_up"),
}
REFERENCES = {
    "rms_norm": rms_norm_reference,
    "add_rms_norm": add_rms_norm_reference,
    "swiglu": swiglu_reference,
    "rms_norm_swiglu": rms_norm_swiglu_reference,
    "rms_norm_backward": rms_norm_backward_reference,
    "swiglu_backward": swiglu_backward_reference,
}
BF16 = 2  # bytes per element


def cases(scale: Scale) -> list[Case]:
    """Each op over the token sweep of ``scale``."""
    hidden, inter = scale.dims.hidden, scale.dims.intermediate
    found = []
    for tokens in scale.tokens:
        name = f"T={short_count(tokens)}"
        act = tokens * hidden * BF16
        found += [
            _case(
                "rms_norm",
                name,
                tokens,
                f"x [{tokens}, {hidden}] bf16",
                2 * act + hidden * BF16,
                0,
                hidden,
                inter,
            ),
            _case(
                "add_rms_norm",
                name,
                tokens,
                f"x, residual [{tokens}, {hidden}] bf16",
                4 * act + hidden * BF16,
                0,
                hidden,
                inter,
            ),
            _case(
                "swiglu",
                name,
                tokens,
                f"gate_up [{tokens}, {2 * inter}] bf16",
                3 * tokens * inter * BF16,
                0,
                hidden,
                inter,
            ),
            _case(
                "rms_norm_swiglu",
                name,
                tokens,
                f"x [{tokens}, {hidden}], W [{2 * inter}, {hidden}], b [{2 * inter}] bf16",
                act + (hidden + 2 * inter * hidden + 2 * inter + tokens * inter) * BF16,
                2 * tokens * hidden * 2 * inter,
                hidden,
                inter,
            ),
            # The backward reads the output gradient and the forward's input, writes one
            # gradient per input.
            _case(
                "rms_norm_backward",
                name,
                tokens,
                f"grad, x [{tokens}, {hidden}] bf16",
                3 * act + 2 * hidden * BF16,
                0,
                hidden,
                inter,
            ),
            _case(
                "swiglu_backward",
                name,
                tokens,
                f"grad [{tokens}, {inter}], gate_up [{tokens}, {2 * inter}] bf16",
                5 * tokens * inter * BF16,
                0,
                hidden,
                inter,
            ),
        ]
    return found


def _case(
    op: str, name: str, tokens: int, shape: str, nbytes: int, flops: int, hidden: int, inter: int
) -> Case:
    return Case(
        op=op,
        name=name,
        series="tokens",
        x=tokens,
        tokens=tokens,
        shape=shape,
        bytes=nbytes,
        flops=flops,
        args=ARGS[op],
        build=functools.partial(_build, op, tokens, hidden, inter),
    )


def _build(op: str, tokens: int, hidden: int, inter: int, make: Maker) -> Inputs:
    if op == "swiglu":
        return {"gate_up": make.randn(tokens, 2 * inter)}
    if op == "swiglu_backward":
        return {"grad": make.randn(tokens, inter), "gate_up": make.randn(tokens, 2 * inter)}
    inputs = {"x": make.randn(tokens, hidden), "weight": make.randn(hidden), "eps": EPS}
    if op == "rms_norm_backward":
        inputs |= {"grad": make.randn(tokens, hidden), "grad_residual": None}
    if op == "add_rms_norm":
        inputs["residual"] = make.randn(tokens, hidden)
    if op == "rms_norm_swiglu":
        inputs["norm_weight"] = inputs.pop("weight")
        # Scaled like a trained projection so that SwiGLU sees activations of order one.
        inputs["gate_up_weight"] = make.randn(2 * inter, hidden) * hidden**-0.5
        inputs["gate_up_bias"] = make.randn(2 * inter)
    return inputs


def peers(op: str) -> list[Impl]:
    """torch.compile for every op, Liger where it has the op, the unfused chain for the fusion."""
    found = [compile_peer(REFERENCES[op], ARGS[op])]
    liger = missing_module("liger_kernel", "liger-kernel")
    if op == "rms_norm":
        found.append(Impl("liger", _liger_rms_norm, missing=liger, cpu=False))
    if op == "swiglu":
        found.append(Impl("liger", _liger_swiglu, missing=liger, cpu=False, prepare=_split))
    if op == "rms_norm_swiglu":
        found.append(Impl("unfused-auto", _unfused_auto))
    return found


def _liger_rms_norm(inputs: Inputs) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_rms_norm

    return liger_rms_norm(inputs["x"], inputs["weight"], inputs["eps"])


def _split(inputs: Inputs) -> Inputs:
    """Liger takes gate and up as two tensors (two GEMM outputs), each contiguous."""
    gate, up = (half.contiguous() for half in inputs["gate_up"].chunk(2, dim=-1))
    return {"gate": gate, "up": up}


def _liger_swiglu(inputs: Inputs) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_swiglu

    return liger_swiglu(inputs["gate"], inputs["up"])


def _unfused_auto(inputs: Inputs) -> torch.Tensor:
    """The chain the fusion replaces, at its best: our fastest norm, cuBLAS, our fastest swiglu."""
    normed = qwen_kernels.rms_norm(inputs["x"], inputs["norm_weight"], inputs["eps"])
    gate_up = F.linear(normed, inputs["gate_up_weight"], inputs["gate_up_bias"])
    return qwen_kernels.swiglu(gate_up)


SUITE = Suite("norm_swiglu", tuple(ARGS), cases, peers)
