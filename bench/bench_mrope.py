"""Benchmarks of ``qwen.mrope`` and ``qwen.mrope_pos``: the rotary embedding of every layer.

Vision form (every vision layer): q and k are strided views of the packed qkv projection
``[T, 3, 16, 80]``, rotated by fp32 cos/sin tables ``[T, 80]`` (``mrope``) or by angles formed from
the (row, column) of each token (``mrope_pos``, no table read). Text form (Qwen2.5-VL-7B's LLM,
which Liger-Kernel's kernel targets): q ``[1, S, 28, 128]``, k ``[1, S, 4, 128]``, per-axis bf16
tables ``[3, 1, S, 128]`` with mrope_section [16, 24, 24] (``mrope``), or int64 positions
``[3, 1, S]`` (``mrope_pos``). Peers: torch.compile of the reference, transformers'
``apply_rotary_pos_emb_vision`` / ``apply_rotary_pos_emb`` (from tables, or building them from the
positions as its rotary modules do), Liger's ``qwen2vl_mrope`` (text form; from positions it
builds the tables first).
"""

from __future__ import annotations

import functools

import torch

from qwen_kernels.model.layout import axial_inv_freq
from qwen_kernels.ops.mrope import mrope_pos_reference, mrope_reference

from .harness import Case, Impl, Inputs, Maker, Suite, compile_peer, missing_module
from .shapes import Dims, Scale, short_count

MROPE_ARGS = ("q", "k", "cos", "sin", "mrope_section")
MROPE_POS_ARGS = ("q", "k", "positions", "inv_freq", "mrope_section")
TEXT_ROPE_THETA = 1_000_000.0


def cases(scale: Scale) -> list[Case]:
    """Vision and text-model rotations over the token sweep of ``scale``."""
    dims = scale.dims
    found = []
    for tokens in scale.tokens:
        name = f"T={short_count(tokens)}"
        found.append(_vision_case(f"vision {name}", tokens, dims))
        found.append(_text_case(f"text {name}", tokens, dims))
        found.append(_positions_case(f"vision {name}", tokens, dims))
        found.append(_text_positions_case(f"text {name}", tokens, dims))
    return found


def _qk_bytes(tokens: int, q_heads: int, k_heads: int, head_dim: int) -> int:
    """q and k read and written back (bf16)."""
    return 2 * tokens * (q_heads + k_heads) * head_dim * 2


def _vision_case(name: str, tokens: int, dims: Dims) -> Case:
    heads, head_dim = dims.heads, dims.head_dim
    return Case(
        op="mrope",
        name=name,
        series="vision",
        x=tokens,
        tokens=tokens,
        shape=f"q,k [{tokens}, {heads}, {head_dim}] bf16 views of qkv; cos,sin [{tokens}, "
        f"{head_dim}] fp32",
        bytes=_qk_bytes(tokens, heads, heads, head_dim) + 2 * tokens * head_dim * 4,
        flops=0,
        args=MROPE_ARGS,
        build=functools.partial(_build_vision, tokens, heads, head_dim),
    )


def _packed_qk(make: Maker, tokens: int, heads: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """q and k as the vision attention gets them: views into one ``[T, 3, H, D]`` projection."""
    q, k, _ = make.randn(tokens, 3, heads, head_dim).unbind(1)
    return q, k


def _build_vision(tokens: int, heads: int, head_dim: int, make: Maker) -> Inputs:
    q, k = _packed_qk(make, tokens, heads, head_dim)
    cos, sin = (make.randn(tokens, head_dim, dtype=torch.float32) for _ in range(2))
    return {"q": q, "k": k, "cos": cos, "sin": sin, "mrope_section": None}


def _text_case(name: str, tokens: int, dims: Dims) -> Case:
    heads, kv_heads, head_dim = dims.llm_heads, dims.llm_kv_heads, dims.llm_head_dim
    return Case(
        op="mrope",
        name=name,
        series="text",
        x=tokens,
        tokens=tokens,
        shape=f"q [1, {tokens}, {heads}, {head_dim}], k [1, {tokens}, {kv_heads}, {head_dim}], "
        f"cos,sin [3, 1, {tokens}, {head_dim}] bf16, section {list(dims.llm_section)}",
        bytes=_qk_bytes(tokens, heads, kv_heads, head_dim) + 2 * 3 * tokens * head_dim * 2,
        flops=0,
        args=MROPE_ARGS,
        build=functools.partial(_build_text, tokens, heads, kv_heads, head_dim, dims.llm_section),
    )


def _build_text(
    tokens: int, heads: int, kv_heads: int, head_dim: int, section: tuple[int, ...], make: Maker
) -> Inputs:
    q = make.randn(1, tokens, heads, head_dim)
    k = make.randn(1, tokens, kv_heads, head_dim)
    cos, sin = (make.randn(3, 1, tokens, head_dim) for _ in range(2))
    return {"q": q, "k": k, "cos": cos, "sin": sin, "mrope_section": list(section)}


def _positions_case(name: str, tokens: int, dims: Dims) -> Case:
    heads, head_dim = dims.heads, dims.head_dim
    return Case(
        op="mrope_pos",
        name=name,
        series="vision",
        x=tokens,
        tokens=tokens,
        shape=f"q,k [{tokens}, {heads}, {head_dim}] bf16 views of qkv; positions [2, {tokens}] "
        f"int32; inv_freq [{head_dim // 2}] fp32",
        bytes=_qk_bytes(tokens, heads, heads, head_dim) + 2 * tokens * 4 + head_dim // 2 * 4,
        flops=0,
        args=MROPE_POS_ARGS,
        build=functools.partial(_build_positions, tokens, heads, head_dim),
    )


def _build_positions(tokens: int, heads: int, head_dim: int, make: Maker) -> Inputs:
    q, k = _packed_qk(make, tokens, heads, head_dim)
    # The vision tower's rotary: head_dim/4 frequencies per axis, rows first, then columns.
    axial = head_dim // 4
    side = max(1, int(tokens**0.5))
    return {
        "q": q,
        "k": k,
        "positions": make.randint(side, 2, tokens),
        "inv_freq": make.put(axial_inv_freq(head_dim), torch.float32),
        "mrope_section": [axial, axial],
    }


def _text_positions_case(name: str, tokens: int, dims: Dims) -> Case:
    heads, kv_heads, head_dim = dims.llm_heads, dims.llm_kv_heads, dims.llm_head_dim
    return Case(
        op="mrope_pos",
        name=name,
        series="text",
        x=tokens,
        tokens=tokens,
        shape=f"q [1, {tokens}, {heads}, {head_dim}], k [1, {tokens}, {kv_heads}, {head_dim}] "
        f"bf16; positions [3, 1, {tokens}] int64; section {list(dims.llm_section)}",
        bytes=_qk_bytes(tokens, heads, kv_heads, head_dim) + 3 * tokens * 8 + head_dim // 2 * 4,
        flops=0,
        args=MROPE_POS_ARGS,
        build=functools.partial(
            _build_text_positions, tokens, heads, kv_heads, head_dim, dims.llm_section
        ),
    )


def _build_text_positions(
    tokens: int, heads: int, kv_heads: int, head_dim: int, section: tuple[int, ...], make: Maker
) -> Inputs:
    freqs = 1.0 / TEXT_ROPE_THETA ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return {
        "q": make.randn(1, tokens, heads, head_dim),
        "k": make.randn(1, tokens, kv_heads, head_dim),
        "positions": make.randint(tokens, 3, 1, tokens, dtype=torch.int64),
        "inv_freq": make.put(freqs, torch.float32),
        "mrope_section": list(section),
    }


def peers(op: str) -> list[Impl]:
    """torch.compile of the reference for both ops; transformers for both (from positions: its
    rotary modules build the tables, then apply them); Liger on the text form (from positions,
    its time includes building the tables with torch, as a caller without them would)."""
    if op == "mrope_pos":
        return [
            compile_peer(mrope_pos_reference, MROPE_POS_ARGS),
            Impl(
                "transformers",
                _transformers_from_positions,
                missing=missing_module("transformers", "transformers"),
            ),
            Impl(
                "liger",
                _liger_from_positions,
                missing=missing_module("liger_kernel", "liger-kernel"),
                cpu=False,
                series=frozenset({"text"}),
            ),
        ]
    return [
        compile_peer(mrope_reference, MROPE_ARGS),
        Impl(
            "transformers",
            _transformers_vision,
            missing=missing_module("transformers", "transformers"),
            series=frozenset({"vision"}),
        ),
        Impl(
            "liger",
            _liger,
            missing=missing_module("liger_kernel", "liger-kernel"),
            cpu=False,
            series=frozenset({"text"}),
        ),
    ]


def _transformers_vision(inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    return apply_rotary_pos_emb_vision(inputs["q"], inputs["k"], inputs["cos"], inputs["sin"])


def _liger(inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    from liger_kernel.transformers.functional import liger_qwen2vl_mrope

    # The text attention hands q and k over as [B, H, S, D] views of its projections.
    q, k = (inputs[name].transpose(1, 2) for name in ("q", "k"))
    q_out, k_out = liger_qwen2vl_mrope(q, k, inputs["cos"], inputs["sin"], inputs["mrope_section"])
    return q_out.transpose(1, 2), k_out.transpose(1, 2)


def _tables_from_positions(inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Composed fp32 cos/sin ``[..., S, D]`` as transformers' rotary modules build them."""
    positions, inv_freq, section = (inputs[n] for n in ("positions", "inv_freq", "mrope_section"))
    freqs = positions[..., None].float() * inv_freq  # [A, ..., S, D/2]
    bands = freqs.split(list(section), dim=-1)
    composed = torch.cat([band[i] for i, band in enumerate(bands)], dim=-1)
    emb = torch.cat([composed, composed], dim=-1)
    return emb.cos(), emb.sin()


def _transformers_from_positions(inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        apply_rotary_pos_emb,
        apply_rotary_pos_emb_vision,
    )

    cos, sin = _tables_from_positions(inputs)
    q, k = inputs["q"], inputs["k"]
    if q.dim() == 3:  # the vision tower: fp32 math on [T, H, D]
        return apply_rotary_pos_emb_vision(q, k, cos, sin)
    # The text model: tables in the activations' dtype, q and k as [B, H, S, D].
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    q_out, k_out = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return q_out.transpose(1, 2), k_out.transpose(1, 2)


def _liger_from_positions(inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    from liger_kernel.transformers.functional import liger_qwen2vl_mrope

    positions, inv_freq = inputs["positions"], inputs["inv_freq"]
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)  # per axis [3, B, S, D]: Liger picks the bands
    q, k = (inputs[name].transpose(1, 2) for name in ("q", "k"))
    cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
    q_out, k_out = liger_qwen2vl_mrope(q, k, cos, sin, inputs["mrope_section"])
    return q_out.transpose(1, 2), k_out.transpose(1, 2)


SUITE = Suite("mrope", ("mrope", "mrope_pos"), cases, peers)
