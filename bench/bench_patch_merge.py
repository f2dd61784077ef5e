"""Benchmarks of ``qwen.patch_merge``: the merger's RMSNorm, the 2x2 concatenation and the gather
that returns merge units from window order to raster order.

Tokens ``[T, 1280]`` in window order over a square image of T patches; ``unit_index`` is the
inverse of that image's window permutation, as the encoder passes it. Peer: torch.compile of the
reference.
"""

from __future__ import annotations

import functools

import torch

from qwen_kernels.ops.patch_merge import patch_merge_reference

from .harness import Case, Impl, Inputs, Maker, Suite, compile_peer
from .shapes import MERGE, Scale, short_count, square_grid, window_unit_order

OP = "patch_merge"
ARGS = ("x", "weight", "eps", "unit_index")
EPS = 1e-6
UNIT = MERGE * MERGE


def cases(scale: Scale) -> list[Case]:
    """The merge over the token sweep of ``scale``."""
    hidden = scale.dims.hidden
    return [
        Case(
            op=OP,
            name=f"T={short_count(tokens)}",
            series="tokens",
            x=tokens,
            tokens=tokens,
            shape=f"x [{tokens}, {hidden}] bf16 -> [{tokens // UNIT}, {UNIT * hidden}]; "
            f"unit_index [{tokens // UNIT}] int64",
            # x read and the merged rows written (bf16), the weight and the int64 index read.
            bytes=2 * tokens * hidden * 2 + hidden * 2 + tokens // UNIT * 8,
            flops=0,
            args=ARGS,
            build=functools.partial(_build, tokens, hidden),
        )
        for tokens in scale.tokens
    ]


def _build(tokens: int, hidden: int, make: Maker) -> Inputs:
    raster_of_window = window_unit_order(square_grid(tokens))
    return {
        "x": make.randn(tokens, hidden),
        "weight": make.randn(hidden),
        "eps": EPS,
        "unit_index": make.put(torch.argsort(raster_of_window), torch.int64),
    }


def peers(op: str) -> list[Impl]:
    """torch.compile of the reference."""
    return [compile_peer(patch_merge_reference, ARGS)]


SUITE = Suite("patch_merge", (OP,), cases, peers)
