"""The shapes the benchmarks run at: Qwen2.5-VL's vision tower, and a tiny copy for dry runs.

Attention windows are computed from a patch grid the way Qwen2.5-VL's window index does it:
14-px patches, 2x2 merge units, 112-px windows (4x4 merge units = 64 tokens), windows tiled from
the top-left corner of each frame so that the last row and column of windows may be smaller.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

PATCH_PX = 14
TEMPORAL_PATCH = 2  # frames per patch; an image is repeated to 2 frames
MERGE = 2  # merge units are MERGE x MERGE patches
WINDOW_PX = 112
WINDOW_UNITS = WINDOW_PX // PATCH_PX // MERGE  # 4 merge units a side: 64 tokens

Grid = tuple[int, int, int]  # (t, h, w) in patches


@dataclass(frozen=True)
class Visual:
    """An image or video at the model's input resolution (sides multiples of 28 px)."""

    name: str
    frames: int
    height: int
    width: int

    @property
    def grid(self) -> Grid:
        """The ``(t, h, w)`` patch grid."""
        return (
            math.ceil(self.frames / TEMPORAL_PATCH),
            self.height // PATCH_PX,
            self.width // PATCH_PX,
        )


@dataclass(frozen=True)
class Dims:
    """Model widths: the vision tower's, and the text model's for the M-RoPE LLM form."""

    hidden: int
    heads: int
    head_dim: int
    intermediate: int
    llm_heads: int
    llm_kv_heads: int
    llm_head_dim: int
    llm_section: tuple[int, ...]


@dataclass(frozen=True)
class Scale:
    """The sizes one run of the suite uses.

    Attributes:
        name: "full", "quick" or "tiny".
        tokens: token counts T of the sweeps (windows over square images, elementwise ops).
        frame_tokens: frame lengths of the full-attention sweep.
        frames_total: tokens of each full-attention case (frames of each length fill it).
        visuals: images and videos whose real window mix is measured.
        dims: model widths.
    """

    name: str
    tokens: tuple[int, ...]
    frame_tokens: tuple[int, ...]
    frames_total: int
    visuals: tuple[Visual, ...]
    dims: Dims


QWEN25_VL = Dims(
    hidden=1280,
    heads=16,
    head_dim=80,
    intermediate=3420,
    llm_heads=28,
    llm_kv_heads=4,
    llm_head_dim=128,
    llm_section=(16, 24, 24),
)
TINY_DIMS = Dims(
    hidden=160,
    heads=2,
    head_dim=80,
    intermediate=96,
    llm_heads=4,
    llm_kv_heads=2,
    llm_head_dim=32,
    llm_section=(4, 6, 6),
)

IMAGE = Visual("image-1288x952", frames=1, height=952, width=1288)
VIDEO = Visual("video-16x448x448", frames=16, height=448, width=448)

FULL = Scale(
    "full", (1024, 4096, 16384, 65536), (1024, 4096, 16384), 16384, (IMAGE, VIDEO), QWEN25_VL
)
QUICK = Scale("quick", (4096, 16384), (1024, 16384), 16384, (IMAGE, VIDEO), QWEN25_VL)
# Same builders at a size the CPU runs in milliseconds; the image keeps edge windows of 3 sizes.
TINY = Scale(
    "tiny",
    (64, 256),
    (64, 256),
    256,
    (Visual("image-252x168", 1, 168, 252), Visual("video-4x112x112", 4, 112, 112)),
    TINY_DIMS,
)
SCALES = {scale.name: scale for scale in (FULL, QUICK, TINY)}


def square_grid(tokens: int) -> Grid:
    """One frame of ``tokens`` patches, as square as whole merge units allow."""
    side = math.isqrt(tokens)
    if side * side != tokens or side % MERGE:
        raise ValueError(f"{tokens} tokens is not a square of an even side")
    return (1, side, side)


def window_unit_order(grid: Grid) -> torch.Tensor:
    """Window order of the merge units (int64): entry i is the unit-order index of the i-th unit.

    Units are numbered in raster order per frame; windows run in raster order per frame, units in
    raster order inside a window.
    """
    t, h, w = grid
    units_h, units_w = h // MERGE, w // MERGE
    order = []
    for frame in range(t):
        base = frame * units_h * units_w
        for top, left in itertools.product(
            range(0, units_h, WINDOW_UNITS), range(0, units_w, WINDOW_UNITS)
        ):
            for row in range(top, min(top + WINDOW_UNITS, units_h)):
                start = base + row * units_w + left
                order.extend(range(start, start + min(WINDOW_UNITS, units_w - left)))
    return torch.tensor(order, dtype=torch.int64)


def window_lengths(grid: Grid) -> list[int]:
    """Tokens of each attention window of ``grid``, in window order (edge windows smaller)."""
    t, h, w = grid
    rows = _tiles(h // MERGE)
    cols = _tiles(w // MERGE)
    return [r * c * MERGE * MERGE for _ in range(t) for r in rows for c in cols]


def frame_lengths(grid: Grid) -> list[int]:
    """Tokens of each frame of ``grid``: the segments of the full-attention layers."""
    t, h, w = grid
    return [h * w] * t


def cu_seqlens(lengths: list[int]) -> list[int]:
    """``[0, l0, l0 + l1, ...]``."""
    return [0, *itertools.accumulate(lengths)]


def short_count(n: int) -> str:
    """``1024 -> "1k"``, ``65536 -> "64k"``, ``6256 -> "6256"``."""
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _tiles(units: int) -> list[int]:
    return [min(WINDOW_UNITS, units - start) for start in range(0, units, WINDOW_UNITS)]
