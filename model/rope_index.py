"""Rotary position indices of Qwen2.5-VL, vectorised (no Python loop per token, window or item).

``vision_positions``: the (row, column) of every patch the vision tower sees, in merge-unit order,
for its 2D rotary. ``get_rope_index``: the language model's 3D (t, h, w) M-RoPE positions of a
batch of token sequences mixing text, images and videos, and the per-sample deltas that continue
the positions during generation; it returns what transformers' ``Qwen2_5_VLModel.get_rope_index``
returns (video time = floor(temporal patch index x seconds per temporal patch x
tokens_per_second), seconds kept fractional so that fps above 2 stay right).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# Qwen2.5-VL's token ids for image and video placeholders.
IMAGE_TOKEN_ID = 151655
VIDEO_TOKEN_ID = 151656
TEXT, IMAGE, VIDEO = 0, 1, 2


def _grid_tensor(grid_thw: Tensor | Sequence[Sequence[int]] | None, name: str) -> Tensor:
    """``grid_thw`` as an int64 ``[N, 3]`` CPU tensor (N = 0 when None)."""
    if grid_thw is None:
        return torch.zeros(0, 3, dtype=torch.long)
    grid = torch.as_tensor(grid_thw).to("cpu", torch.long)
    if grid.dim() != 2 or grid.shape[1] != 3 or bool((grid <= 0).any()):
        raise ValueError(f"`{name}` must be [N, 3] positive (t, h, w), got {grid.tolist()}")
    return grid


def vision_positions(grid_thw: Tensor | Sequence[Sequence[int]], spatial_merge_size: int) -> Tensor:
    """int64 ``[2, T]``: (row, column) in its frame of every patch, in merge-unit order (the
    units of each frame in raster order, the ``m x m`` patches of a unit row-major), frames and
    inputs in order: the positions of the vision tower's 2D rotary.

    Args:
        grid_thw: ``[N, 3]`` (t, h, w) patch grids; h and w multiples of spatial_merge_size.
        spatial_merge_size: the merge unit's side m (2 in Qwen2.5-VL).
    """
    grid = _grid_tensor(grid_thw, "grid_thw")
    m = spatial_merge_size
    if m < 1 or bool((grid[:, 1:] % m != 0).any()):
        raise ValueError(
            f"`grid_thw` h and w must be multiples of spatial_merge_size={m}, got {grid.tolist()}"
        )
    t, h, w = grid.unbind(1)
    counts = t * h * w
    image = torch.repeat_interleave(torch.arange(len(grid)), counts)
    offset = torch.arange(int(counts.sum())) - (counts.cumsum(0) - counts)[image]
    h, w = h[image], w[image]
    in_frame = offset % (h * w)
    unit, in_unit = in_frame // (m * m), in_frame % (m * m)
    units_per_row = w // m
    rows = unit // units_per_row * m + in_unit // m
    cols = unit % units_per_row * m + in_unit % m
    return torch.stack([rows, cols])


def get_rope_index(
    input_ids: Tensor,
    image_grid_thw: Tensor | None = None,
    video_grid_thw: Tensor | None = None,
    second_per_grid_ts: Tensor | Sequence[float] | None = None,
    attention_mask: Tensor | None = None,
    *,
    mm_token_type_ids: Tensor | None = None,
    spatial_merge_size: int = 2,
    tokens_per_second: int = 2,
    image_token_id: int = IMAGE_TOKEN_ID,
    video_token_id: int = VIDEO_TOKEN_ID,
) -> tuple[Tensor, Tensor]:
    """3D M-RoPE positions of a batch, as transformers' ``Qwen2_5_VLModel.get_rope_index``.

    Each run of consecutive tokens of one kind (text, image or video; padding left out) is a
    group. A text group of n tokens continues the position p of its sample: p, ..., p + n - 1 on
    all three axes, and p grows by n. The k-th image (video) group of the batch, in order, is
    image (video) k with grid (t, h, w) in patches: its tokens, in (t, h/m, w/m) raster order,
    get (p + floor(ti x interval), p + hi, p + wi) with interval = 1 for images and
    tokens_per_second x second_per_grid_ts[k] for videos, and p grows by max(h, w) / m.

    Args:
        input_ids: int ``[B, S]``; the placeholders ``image_token_id`` / ``video_token_id`` mark
            vision tokens unless ``mm_token_type_ids`` (0 text, 1 image, 2 video) is given.
        image_grid_thw, video_grid_thw: ``[N, 3]`` (t, h, w) in patches, one row per image/video.
        second_per_grid_ts: ``[N_videos]`` seconds per temporal patch (temporal_patch_size / fps);
            1 when None.
        attention_mask: ``[B, S]``, 0 on padding (any side): padding gets position 0 and is left
            out of the groups.
        spatial_merge_size, tokens_per_second: from the vision config (2 and 2 in Qwen2.5-VL).

    Returns:
        ``(position_ids [3, B, S] in input_ids' dtype, deltas [B, 1])``: deltas = the largest
        position of the sample + 1 - its number of tokens.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"`input_ids` must be [B, S], got shape {tuple(input_ids.shape)}")
    device = input_ids.device
    batch, seq = input_ids.shape
    kinds = mm_token_type_ids
    if kinds is None:
        kinds = (input_ids == image_token_id) * IMAGE + (input_ids == video_token_id) * VIDEO
    kinds = kinds.to("cpu", torch.long)
    valid = (
        torch.ones(batch, seq, dtype=torch.bool)
        if attention_mask is None
        else attention_mask.to("cpu").bool()
    )
    if kinds.shape != (batch, seq) or valid.shape != (batch, seq):
        raise ValueError("`mm_token_type_ids` and `attention_mask` must have input_ids' shape")

    # Compact each row: its real tokens first, in order (a stable sort moves padding behind).
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
    kind = kinds.gather(1, order)
    real = valid.gather(1, order)
    starts = real.clone()
    starts[:, 1:] &= kind[:, 1:] != kind[:, :-1]
    group = starts.reshape(-1).cumsum(0).reshape(batch, seq) - 1  # group id, batch-wide
    groups = int(starts.sum())
    group_kind = kind[starts]
    group_len = torch.zeros(groups, dtype=torch.long).index_add_(
        0, group[real], torch.ones(int(real.sum()), dtype=torch.long)
    )
    group_row = torch.arange(batch)[:, None].expand(batch, seq)[starts]

    # Vision groups take the grids of their modality in batch order.
    grid_t = torch.zeros(groups, dtype=torch.long)
    grid_h, grid_w = torch.ones_like(grid_t), torch.ones_like(grid_t)
    interval = torch.ones(groups, dtype=torch.long)
    for code, grids, name in (
        (IMAGE, _grid_tensor(image_grid_thw, "image_grid_thw"), "image"),
        (VIDEO, _grid_tensor(video_grid_thw, "video_grid_thw"), "video"),
    ):
        mine = group_kind == code
        count = int(mine.sum())
        if count != len(grids):
            raise ValueError(
                f"{count} {name} token runs in input_ids but {len(grids)} rows in `{name}_grid_thw`"
            )
        if count == 0:
            continue
        grid_t[mine], grid_h[mine], grid_w[mine] = (
            grids[:, 0],
            grids[:, 1] // spatial_merge_size,
            grids[:, 2] // spatial_merge_size,
        )
        if code == VIDEO:
            seconds = (
                torch.ones(count, dtype=torch.long)
                if second_per_grid_ts is None
                else torch.as_tensor(second_per_grid_ts).to("cpu")
            )
            if seconds.shape != (count,):
                raise ValueError(
                    f"`second_per_grid_ts` must have one entry per video ({count}), got "
                    f"shape {tuple(seconds.shape)}"
                )
            # As transformers: tokens_per_second x seconds in the seconds' dtype, then floor of
            # index x interval (so fractional seconds per patch, e.g. fps 3, stay exact).
            interval = interval.to(torch.promote_types(interval.dtype, seconds.dtype))
            interval[mine] = tokens_per_second * seconds
    vision = group_kind != TEXT
    tokens_per_group = grid_t * grid_h * grid_w
    if bool((group_len[vision] != tokens_per_group[vision]).any()):
        raise ValueError(
            "a run of vision tokens does not match its grid: run lengths "
            f"{group_len[vision].tolist()}, grid tokens (t x h/m x w/m) "
            f"{tokens_per_group[vision].tolist()}"
        )

    # Each group's start position: the advances of the earlier groups of its row.
    advance = torch.where(vision, torch.maximum(grid_h, grid_w), group_len)
    ends = advance.cumsum(0)
    row_first = torch.searchsorted(group_row, torch.arange(batch))
    before_row = torch.cat([torch.zeros(1, dtype=torch.long), ends])[row_first][group_row]
    start = ends - advance - before_row

    # Positions of the compacted tokens.
    g = group.clamp_min(0)
    slot = torch.arange(seq).expand(batch, seq)
    group_first = torch.zeros(groups, dtype=torch.long)
    group_first[group[starts]] = slot[starts]
    offset = slot - group_first[g]
    hw = grid_h[g] * grid_w[g]
    t_index = offset // hw
    h_index = offset % hw // grid_w[g]
    w_index = offset % grid_w[g]
    temporal = (t_index * interval[g]).long()
    is_vision = vision[g]
    base = start[g]
    compact = torch.stack(
        [
            base + torch.where(is_vision, temporal, offset),
            base + torch.where(is_vision, h_index, offset),
            base + torch.where(is_vision, w_index, offset),
        ]
    )
    compact = torch.where(real, compact, torch.zeros((), dtype=torch.long))

    positions = torch.zeros(3, batch, seq, dtype=torch.long)
    positions.scatter_(2, order.expand(3, batch, seq), compact)
    largest = compact.amax(dim=(0, 2))
    deltas = (largest + 1 - real.sum(1))[:, None]
    return positions.to(device=device, dtype=input_ids.dtype), deltas.to(device)
