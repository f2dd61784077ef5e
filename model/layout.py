"""Token order, attention segments and rotary positions of a batch of images and videos.

Everything here depends only on the grids ``(t, h, w)`` (in patches) of the inputs, so the encoder
computes it once per distinct batch of grids, on the host, and caches it on the device: the layers
then run without any device-to-host copy.

Token orders. The preprocessor emits patches grouped in 2x2 merge units: units in raster order
per frame, the 4 patches of a unit row-major ("unit order"). The encoder permutes whole merge
units into window order (frames in order, windows of ``window_units x window_units`` units in
raster order, units raster order inside a window) so that each attention window is a contiguous
segment, and undoes the permutation when it merges the units.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import VisionConfig
from .rope_index import vision_positions

Grid = tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class GridLayout:
    """Per-batch index tensors, all on the encoder's device.

    Attributes:
        grid: the ``(t, h, w)`` patch grid of each input.
        num_tokens: patches in the batch (rows of ``pixel_values``).
        token_index: int64 ``[T]``: row i of the window-ordered sequence is patch
            ``token_index[i]`` of the input.
        unit_index: int64 ``[T/4]``: merged token j (unit order) is window-ordered merge unit
            ``unit_index[j]`` (the inverse of the window permutation, for ``patch_merge``).
        positions: int32 ``[2, T]``: (row, column) of each window-ordered token in its frame.
        inv_freq: fp32 ``[head_dim/2]``: the axial rotary frequencies, once for the row half and
            once for the column half of the rotary dims.
        rotary_section: ``[head_dim/4, head_dim/4]``: frequencies driven by the row, the column.
        cu_window_seqlens: int32 ``[W+1]``: the attention windows (no empty ones).
        max_window_seqlen: the longest window in tokens.
        cu_frame_seqlens: int32 ``[F+1]``: whole frames, for the full-attention blocks.
        max_frame_seqlen: the longest frame in tokens.
    """

    grid: Grid
    num_tokens: int
    token_index: Tensor
    unit_index: Tensor
    positions: Tensor
    inv_freq: Tensor
    rotary_section: list[int]
    cu_window_seqlens: Tensor
    max_window_seqlen: int
    cu_frame_seqlens: Tensor
    max_frame_seqlen: int


def normalize_grid(grid_thw: Tensor | Iterable[Sequence[int]]) -> Grid:
    """``grid_thw`` ([N, 3] tensor or nested sequence) as a tuple of int triples."""
    rows = grid_thw.tolist() if isinstance(grid_thw, Tensor) else [list(g) for g in grid_thw]
    grid = tuple((int(r[0]), int(r[1]), int(r[2])) for r in rows if len(r) == 3)
    if len(grid) != len(rows) or not grid:
        raise ValueError(f"grid_thw must be a non-empty [N, 3] list of (t, h, w), got {rows}")
    return grid


def window_index(grid: Grid, merge_size: int, window_units: int) -> tuple[Tensor, Tensor]:
    """Window order of the merge units, and the window sizes in merge units.

    Tensor ops per input, none per window or per unit, so the cost grows with the grid only
    through the size of the tensors.

    Returns:
        ``(index, sizes)``: ``index[i]`` is the unit-order position of the i-th merge unit in
        window order (int64); ``sizes`` (int64) the number of merge units of each non-empty window.
    """
    indices, sizes, offset = [], [], 0
    for t, h, w in grid:
        uh, uw = h // merge_size, w // merge_size
        nh, nw = -(-uh // window_units), -(-uw // window_units)
        units = torch.arange(t * uh * uw).reshape(t, uh, uw)
        # Pad to whole windows with -1, cut into windows, keep the real units in window order.
        padded = torch.full((t, nh * window_units, nw * window_units), -1, dtype=torch.long)
        padded[:, :uh, :uw] = units
        windows = padded.reshape(t, nh, window_units, nw, window_units).permute(0, 1, 3, 2, 4)
        windows = windows.reshape(t * nh * nw, window_units * window_units)
        real = windows >= 0
        indices.append(windows[real] + offset)
        sizes.append(real.sum(1))
        offset += t * uh * uw
    return torch.cat(indices), torch.cat(sizes)


def rotary_inv_freq(config: VisionConfig) -> Tensor:
    """fp32 ``[head_dim/2]``: the head_dim/4 axial frequencies, for the row then the column."""
    return axial_inv_freq(config.head_dim, config.rope_theta)


def axial_inv_freq(head_dim: int, theta: float = 10000.0) -> Tensor:
    """fp32 ``[head_dim/2]``: the vision tower's 2D rotary frequencies for heads of ``head_dim``
    (``mrope_section`` ``[head_dim/4] * 2``), for the row then the column."""
    # Each axis rotates half the head: a rotary of width head_dim/2 with head_dim/4 frequencies.
    axis_dim = head_dim // 2
    freq = 1.0 / theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float) / axis_dim)
    return torch.cat([freq, freq])


def _inverse(permutation: Tensor) -> Tensor:
    """The inverse of an int64 permutation of ``0..n-1`` (one scatter, not a sort)."""
    inverse = torch.empty_like(permutation)
    inverse[permutation] = torch.arange(permutation.numel())
    return inverse


def _cu_seqlens(lengths: Tensor, total: int, what: str) -> Tensor:
    """int32 cumulative lengths, checked once here so the layers can skip their value checks."""
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    if bool((lengths <= 0).any()) or int(cu[-1]) != total:
        raise AssertionError(f"bad {what} segments {lengths.tolist()} for {total} tokens")
    return cu.to(torch.int32)


def build_layout(config: VisionConfig, grid: Grid, device: torch.device) -> GridLayout:
    """All index tensors for ``grid`` on ``device`` (computed on the host, copied once)."""
    merge, unit = config.spatial_merge_size, config.merge_unit
    for t, h, w in grid:
        if t < 1 or h < merge or w < merge or h % merge or w % merge:
            raise ValueError(
                f"grid (t={t}, h={h}, w={w}): t must be positive, and h and w positive multiples "
                f"of spatial_merge_size={merge}"
            )
    num_tokens = sum(t * h * w for t, h, w in grid)
    units, window_sizes = window_index(grid, merge, config.window_units)
    token_index = (units[:, None] * unit + torch.arange(unit)).reshape(-1)
    positions = vision_positions(grid, merge)[:, token_index]  # (row, column), unit order
    frames = torch.tensor([h * w for _, h, w in grid]).repeat_interleave(
        torch.tensor([t for t, _, _ in grid])
    )
    freqs_per_axis = config.head_dim // 4
    return GridLayout(
        grid=grid,
        num_tokens=num_tokens,
        token_index=token_index.to(device),
        unit_index=_inverse(units).to(device),
        positions=positions.to(device=device, dtype=torch.int32),
        inv_freq=rotary_inv_freq(config).to(device),
        rotary_section=[freqs_per_axis, freqs_per_axis],
        cu_window_seqlens=_cu_seqlens(window_sizes * unit, num_tokens, "window").to(device),
        max_window_seqlen=int(window_sizes.max()) * unit,
        cu_frame_seqlens=_cu_seqlens(frames, num_tokens, "frame").to(device),
        max_frame_seqlen=int(frames.max()),
    )


class LayoutCache:
    """``build_layout`` per distinct batch of grids and device, the most recent ``size`` kept
    (a server sees the same few image and video sizes again and again)."""

    def __init__(self, config: VisionConfig, size: int = 32) -> None:
        self.config = config
        self.size = size
        self._layouts: OrderedDict[tuple[Grid, torch.device], GridLayout] = OrderedDict()

    def get(self, grid_thw: Tensor | Iterable[Sequence[int]], device: torch.device) -> GridLayout:
        """The layout of ``grid_thw`` (as ``normalize_grid`` takes it) on ``device``."""
        key = (normalize_grid(grid_thw), torch.device(device))
        layout = self._layouts.get(key)
        if layout is None:
            layout = build_layout(self.config, key[0], key[1])
            self._layouts[key] = layout
            if len(self._layouts) > self.size:
                self._layouts.popitem(last=False)
        else:
            self._layouts.move_to_end(key)
        return layout
