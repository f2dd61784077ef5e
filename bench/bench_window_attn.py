"""Benchmarks of ``qwen.window_attn`` and of ``qwen.window_attn_rope`` (the rotary fused in): the
windows of the 28 window-attention layers and the whole frames of the 4 full-attention layers.

Cases: the real window mix of a 1288x952 image (64-token windows plus 16- and 32-token edge
windows) and of a 16-frame 448x448 video; windows over square images of 1k-64k tokens; whole
frames of 1k-16k tokens. Peers: SDPA over windows padded to the longest, ``varlen_attn`` (torch's
FlashAttention entry), flex_attention with a block mask, the varlen kernels of flash-attn 2, 3
(Hopper) and 4 (CuTe) where installed, SDPA on cuDNN for frames of one length, and the
per-window loop of transformers' Qwen2.5-VL vision attention. The fused op runs the real window
mix and frames of each visual, against the unfused chain (``mrope_pos_`` in place on the packed
qkv, then ``window_attn``, each on its "auto" backend) and torch.compile of its reference. The
training ops (``window_attn_forward`` and ``window_attn_rope_forward``, which also store each
row's log-sum-exp, and ``window_attn_backward``) run the real window mix and frames of each
visual, against torch.compile of their references.
"""

from __future__ import annotations

import dataclasses
import functools
import types

import torch
import torch.nn.functional as F

import qwen_kernels
from qwen_kernels.model.layout import axial_inv_freq
from qwen_kernels.ops.window_attn import (
    window_attn_backward_reference,
    window_attn_forward_reference,
)
from qwen_kernels.ops.window_attn_rope import (
    window_attn_rope_forward_reference,
    window_attn_rope_reference,
)

from .harness import (
    Case,
    Impl,
    Inputs,
    Maker,
    Suite,
    compile_peer,
    cpu_bf16_sdpa_problem,
    missing_module,
)
from .shapes import Scale, cu_seqlens, frame_lengths, short_count, square_grid, window_lengths

OP = "window_attn"
ARGS = ("q", "k", "v", "cu_seqlens", "max_seqlen")
ROPE_OP = "window_attn_rope"
ROPE_ARGS = ("qkv", "cu_seqlens", "max_seqlen", "positions", "inv_freq", "mrope_section")
FORWARD_OP, BACKWARD_OP = "window_attn_forward", "window_attn_backward"
ROPE_FORWARD_OP = "window_attn_rope_forward"
BACKWARD_ARGS = ("grad", "q", "k", "v", "out", "lse", "cu_seqlens", "max_seqlen", "softmax_scale")


def cases(scale: Scale) -> list[Case]:
    """Window and full-attention cases at ``scale``."""
    heads, head_dim = scale.dims.heads, scale.dims.head_dim
    found = []
    for visual in scale.visuals:
        for kind, lengths in (
            ("windows", window_lengths(visual.grid)),
            ("frames", frame_lengths(visual.grid)),
        ):
            name = f"{visual.name}/{kind}"
            found.append(_case(name, "real", sum(lengths), lengths, heads, head_dim))
            rope = _rope_case(name, lengths, heads, head_dim)
            lse_bytes = sum(lengths) * heads * 4
            found.append(rope)
            found.append(
                dataclasses.replace(rope, op=ROPE_FORWARD_OP, bytes=rope.bytes + lse_bytes)
            )
            found += _training_cases(name, lengths, heads, head_dim)
    for tokens in scale.tokens:
        lengths = window_lengths(square_grid(tokens))
        found.append(
            _case(f"windows T={short_count(tokens)}", "windows", tokens, lengths, heads, head_dim)
        )
    for frame in scale.frame_tokens:
        count = scale.frames_total // frame
        found.append(
            _case(
                f"frames {short_count(frame)}x{count}",
                "frames",
                frame,
                [frame] * count,
                heads,
                head_dim,
            )
        )
    return found


def _case(name: str, series: str, x: int, lengths: list[int], heads: int, head_dim: int) -> Case:
    tokens = sum(lengths)
    return Case(
        op=OP,
        name=name,
        series=series,
        x=x,
        tokens=tokens,
        shape=f"q,k,v [{tokens}, {heads}, {head_dim}] bf16; {_segments(lengths)}",
        # q, k, v read, out written (bf16), cu_seqlens read (int32).
        bytes=4 * tokens * heads * head_dim * 2 + 4 * (len(lengths) + 1),
        # QK^T and PV: 2 * L^2 * D multiply-adds per head and segment.
        flops=4 * sum(n * n for n in lengths) * heads * head_dim,
        args=ARGS,
        build=functools.partial(_build, tuple(lengths), heads, head_dim),
        lengths=tuple(lengths),
    )


def _rope_case(name: str, lengths: list[int], heads: int, head_dim: int) -> Case:
    tokens = sum(lengths)
    return Case(
        op=ROPE_OP,
        name=name,
        series="real",
        x=tokens,
        tokens=tokens,
        shape=f"qkv [{tokens}, 3, {heads}, {head_dim}] bf16; positions [2, {tokens}] int32; "
        f"{_segments(lengths)}",
        # qkv read, out written (bf16); cu_seqlens, positions, inv_freq read (int32, fp32).
        bytes=4 * tokens * heads * head_dim * 2
        + 4 * (len(lengths) + 1 + 2 * tokens)
        + head_dim // 2 * 4,
        flops=4 * sum(n * n for n in lengths) * heads * head_dim,
        args=ROPE_ARGS,
        build=functools.partial(_build_rope, tuple(lengths), heads, head_dim),
        lengths=tuple(lengths),
    )


def _training_cases(name: str, lengths: list[int], heads: int, head_dim: int) -> list[Case]:
    """The training forward (the output and each row's lse) and the backward, which reads the
    output gradient, q, k, v, the output and the lse and writes dq, dk and dv, over five matrix
    products (QK^T again, dV, dP, dQ, dK) where the forward has two."""
    forward = _case(name, "real", sum(lengths), lengths, heads, head_dim)
    tokens, squares = sum(lengths), sum(n * n for n in lengths)
    lse_bytes = tokens * heads * 4
    head_bytes = tokens * heads * head_dim * 2
    return [
        dataclasses.replace(forward, op=FORWARD_OP, bytes=forward.bytes + lse_bytes),
        dataclasses.replace(
            forward,
            op=BACKWARD_OP,
            shape=forward.shape.replace("q,k,v", "grad, q, k, v, out"),
            bytes=8 * head_bytes + lse_bytes + 4 * (len(lengths) + 1),
            flops=10 * squares * heads * head_dim,
            args=BACKWARD_ARGS,
            build=functools.partial(_build_backward, tuple(lengths), heads, head_dim),
        ),
    ]


def _build_backward(lengths: tuple[int, ...], heads: int, head_dim: int, make: Maker) -> Inputs:
    """The forward's inputs, its output and lse (from the training forward, so that the saved
    values agree with q, k and v), and an output gradient."""
    inputs = _build(lengths, heads, head_dim, make)
    out, lse = torch.ops.qwen.window_attn_forward(*(inputs[name] for name in ARGS))
    return {**inputs, "grad": make.randn(*out.shape), "out": out, "lse": lse}


def _build_rope(lengths: tuple[int, ...], heads: int, head_dim: int, make: Maker) -> Inputs:
    """The tower's inputs: one packed projection, (row, column) positions, axial frequencies."""
    tokens = sum(lengths)
    axial = head_dim // 4
    return {
        "qkv": make.randn(tokens, 3, heads, head_dim),
        "cu_seqlens": make.put(cu_seqlens(list(lengths)), torch.int32),
        "max_seqlen": max(lengths),
        "positions": make.randint(max(2, int(tokens**0.5)), 2, tokens),
        "inv_freq": make.put(axial_inv_freq(head_dim), torch.float32),
        "mrope_section": [axial, axial],
        "softmax_scale": head_dim**-0.5,
    }


def _segments(lengths: list[int]) -> str:
    sizes = sorted(set(lengths))
    span = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    return f"{len(lengths)} segment{'s' * (len(lengths) > 1)} of {span} tokens"


def _build(lengths: tuple[int, ...], heads: int, head_dim: int, make: Maker) -> Inputs:
    tokens = sum(lengths)
    q, k, v = (make.randn(tokens, heads, head_dim) for _ in range(3))
    return {
        "q": q,
        "k": k,
        "v": v,
        "cu_seqlens": make.put(cu_seqlens(list(lengths)), torch.int32),
        "max_seqlen": max(lengths),
        "lengths": lengths,
        "softmax_scale": head_dim**-0.5,
    }


def peers(op: str) -> list[Impl]:
    """Other implementations of windowed attention on packed tokens (with the rotary before it,
    for the fused op)."""
    if op == FORWARD_OP:
        return [compile_peer(window_attn_forward_reference, (*ARGS, "softmax_scale"))]
    if op == BACKWARD_OP:
        return [compile_peer(window_attn_backward_reference, BACKWARD_ARGS)]
    if op == ROPE_FORWARD_OP:
        return [compile_peer(window_attn_rope_forward_reference, (*ROPE_ARGS, "softmax_scale"))]
    if op == ROPE_OP:
        return [
            Impl("mrope_pos_+window_attn", _unfused_chain),
            compile_peer(window_attn_rope_reference, (*ROPE_ARGS, "softmax_scale")),
        ]
    return [
        Impl(
            "sdpa-padded",
            _sdpa_padded,
            prepare=_with_padding,
            cpu_missing=cpu_bf16_sdpa_problem(),
        ),
        Impl("varlen_attn", _varlen_attn, missing=_varlen_missing(), cpu=False),
        Impl("flex_attention", _flex_attention, prepare=_with_block_mask, cpu=False, compiles=True),
        Impl(
            "flash-attn", _flash_attn, missing=missing_module("flash_attn", "flash-attn"), cpu=False
        ),
        Impl(
            "flash-attn-3",
            _flash_attn_3,
            missing=missing_module("flash_attn_interface", "flash-attn 3 (hopper)"),
            cpu=False,
        ),
        Impl(
            "flash-attn-4",
            _flash_attn_4,
            missing=missing_module("flash_attn.cute", "flash-attn 4 (flash_attn.cute)"),
            cpu=False,
        ),
        # Whole frames of one length are a batch with no mask: the form cuDNN's kernels take.
        Impl("sdpa-cudnn", _sdpa_cudnn, cpu=False, series=frozenset({"frames"})),
        Impl(
            "transformers-loop",
            _transformers_loop,
            missing=missing_module("transformers", "transformers"),
            cpu_missing=cpu_bf16_sdpa_problem(),
        ),
    ]


@functools.lru_cache(maxsize=4)
def _padding(lengths: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Gather index [S, L] into the packed tokens, its key mask, and the padded rows that hold
    tokens (in token order, since segments are contiguous and in order)."""
    slot = torch.arange(max(lengths))
    sizes = torch.tensor(lengths)
    valid = slot < sizes[:, None]
    index = torch.where(valid, torch.tensor(cu_seqlens(list(lengths))[:-1])[:, None] + slot, 0)
    rows = valid.flatten().nonzero().squeeze(1)
    return index.to(device), valid.to(device), rows.to(device)


def _with_padding(inputs: Inputs) -> Inputs:
    index, valid, rows = _padding(inputs["lengths"], inputs["q"].device)
    return {**inputs, "pad_index": index, "pad_valid": valid, "pad_rows": rows}


def _sdpa_padded(inputs: Inputs) -> torch.Tensor:
    index, valid = inputs["pad_index"], inputs["pad_valid"]
    q, k, v = (inputs[name][index].transpose(1, 2) for name in "qkv")  # [S, H, L, D]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
    return out.transpose(1, 2).flatten(0, 1).index_select(0, inputs["pad_rows"])


def _varlen_missing() -> str | None:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn"
    return None


def _varlen_attn(inputs: Inputs) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    cu, longest = inputs["cu_seqlens"], inputs["max_seqlen"]
    return varlen_attn(inputs["q"], inputs["k"], inputs["v"], cu, cu, longest, longest)


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


@functools.lru_cache(maxsize=4)
def _block_mask(lengths: tuple[int, ...], device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    segment = torch.repeat_interleave(
        torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device)
    )

    def same_segment(batch, head, q_index, kv_index):
        return segment[q_index] == segment[kv_index]

    tokens = sum(lengths)
    # _compile avoids materialising the [T, T] mask (64k tokens would not fit).
    return create_block_mask(same_segment, None, None, tokens, tokens, device=device, _compile=True)


def _with_block_mask(inputs: Inputs) -> Inputs:
    return {**inputs, "block_mask": _block_mask(inputs["lengths"], inputs["q"].device)}


def _flex_attention(inputs: Inputs) -> torch.Tensor:
    q, k, v = (inputs[name].transpose(0, 1).unsqueeze(0) for name in "qkv")  # [1, H, T, D]
    out = _compiled_flex_attention()(q, k, v, block_mask=inputs["block_mask"])
    return out[0].transpose(0, 1)


def _flash_attn(inputs: Inputs) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    cu, longest = inputs["cu_seqlens"], inputs["max_seqlen"]
    return flash_attn_varlen_func(inputs["q"], inputs["k"], inputs["v"], cu, cu, longest, longest)


def _flash_attn_3(inputs: Inputs) -> torch.Tensor:
    from flash_attn_interface import flash_attn_varlen_func

    cu, longest = inputs["cu_seqlens"], inputs["max_seqlen"]
    out = flash_attn_varlen_func(inputs["q"], inputs["k"], inputs["v"], cu, cu, longest, longest)
    return out[0] if isinstance(out, tuple) else out  # some releases also return the lse


def _flash_attn_4(inputs: Inputs) -> torch.Tensor:
    from flash_attn.cute import flash_attn_varlen_func

    cu = inputs["cu_seqlens"]
    out = flash_attn_varlen_func(
        inputs["q"], inputs["k"], inputs["v"], cu_seqlens_q=cu, cu_seqlens_k=cu
    )
    return out[0] if isinstance(out, tuple) else out


def _sdpa_cudnn(inputs: Inputs) -> torch.Tensor:
    """SDPA on cuDNN's attention kernels over the frames as a batch ``[S, H, L, D]``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    lengths = inputs["lengths"]
    tokens, heads, head_dim = inputs["q"].shape
    q, k, v = (
        inputs[n].view(len(lengths), lengths[0], heads, head_dim).transpose(1, 2) for n in "qkv"
    )
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(tokens, heads, head_dim)


# transformers reads these attributes of the attention module it is called for.
_HF_MODULE = types.SimpleNamespace(num_key_value_groups=1, is_causal=False, training=False)


def _transformers_loop(inputs: Inputs) -> torch.Tensor:
    """Qwen2_5_VLVisionAttention's path for its default "sdpa" attention: one SDPA per window."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    tokens, heads, head_dim = inputs["q"].shape
    q, k, v = (inputs[name].transpose(0, 1).unsqueeze(0) for name in "qkv")  # [1, H, T, D]
    cu = inputs["cu_seqlens"]
    lengths = (cu[1:] - cu[:-1]).tolist()
    splits = [torch.split(t, lengths, dim=2) for t in (q, k, v)]
    outs = [
        sdpa_attention_forward(
            _HF_MODULE, qs, ks, vs, None, scaling=head_dim**-0.5, is_causal=False
        )[0]
        for qs, ks, vs in zip(*splits, strict=True)
    ]
    return torch.cat(outs, dim=1).reshape(tokens, heads, head_dim)


def _unfused_chain(inputs: Inputs) -> torch.Tensor:
    """What the encoder runs without the fused op: the rotary in place on views of the packed
    qkv, then attention reading the views."""
    q, k, v = inputs["qkv"].unbind(1)
    qwen_kernels.mrope_pos_(q, k, inputs["positions"], inputs["inv_freq"], inputs["mrope_section"])
    return qwen_kernels.window_attn(q, k, v, inputs["cu_seqlens"], inputs["max_seqlen"])


SUITE = Suite("window_attn", (OP, ROPE_OP, FORWARD_OP, BACKWARD_OP, ROPE_FORWARD_OP), cases, peers)
