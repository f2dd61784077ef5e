"""Window order, attention segments and rotary positions against transformers' vision utils."""

import pytest
import torch
from transformers.vision_utils import (
    get_vision_cu_seqlens,
    get_vision_position_ids,
    get_vision_window_index,
)

from qwen_kernels.model import VisionConfig
from qwen_kernels.model.layout import LayoutCache, build_layout, normalize_grid

CONFIG = VisionConfig()
GRIDS = [
    [(1, 2, 2)],  # one merge unit
    [(1, 8, 8)],  # exactly one window
    [(1, 16, 16)],  # whole windows only (transformers pads an empty window row and column)
    [(1, 6, 10)],
    [(1, 14, 22)],  # edge windows on both sides
    [(3, 12, 20)],  # video: 3 temporal patches
    [(1, 6, 10), (2, 14, 22), (1, 4, 4), (1, 30, 2)],  # a batch of images and a video
]
# Sides (in patches) around the window side of 8: below it, equal, just past it, 1x and 2x plus
# an edge of each width; frames 1 (image), 2 and 5 (videos).
SIDES = (2, 4, 6, 8, 10, 14, 16, 18, 22, 34)
SWEEP = [(t, h, w) for t in (1, 2, 5) for h in SIDES for w in SIDES]


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_layout_matches_transformers(grid):
    grid_thw = torch.tensor(grid)
    layout = build_layout(CONFIG, normalize_grid(grid_thw), torch.device("cpu"))
    window_index, cu_window = get_vision_window_index(grid_thw, 2, 112, 14)
    tokens = int(grid_thw.prod(1).sum())
    assert layout.num_tokens == tokens

    expected_tokens = (window_index[:, None] * 4 + torch.arange(4)).reshape(-1)
    torch.testing.assert_close(layout.token_index, expected_tokens, rtol=0, atol=0)
    torch.testing.assert_close(layout.unit_index, torch.argsort(window_index), rtol=0, atol=0)
    assert layout.cu_window_seqlens.dtype == torch.int32
    torch.testing.assert_close(layout.cu_window_seqlens, cu_window, rtol=0, atol=0)
    assert layout.max_window_seqlen == int(cu_window.diff().max())

    cu_frames = get_vision_cu_seqlens(grid_thw)
    torch.testing.assert_close(layout.cu_frame_seqlens, cu_frames, rtol=0, atol=0)
    assert layout.max_frame_seqlen == int(cu_frames.diff().max())

    # transformers permutes its (unit-order) positions with the same window index.
    positions = get_vision_position_ids(grid_thw, 2)[expected_tokens].T
    torch.testing.assert_close(layout.positions, positions.to(torch.int32), rtol=0, atol=0)


def test_layout_matches_transformers_on_a_sweep_of_grids():
    """Every grid of SWEEP alone (videos, edge windows of every width, the smallest 2x2 grid),
    then all of them as one batch (offsets of units and windows across inputs)."""
    for grid in [[g] for g in SWEEP] + [SWEEP]:
        grid_thw = torch.tensor(grid)
        layout = build_layout(CONFIG, normalize_grid(grid_thw), torch.device("cpu"))
        window_index, cu_window = get_vision_window_index(grid_thw, 2, 112, 14)
        expected_tokens = (window_index[:, None] * 4 + torch.arange(4)).reshape(-1)
        assert torch.equal(layout.token_index, expected_tokens), grid
        assert torch.equal(layout.unit_index[window_index], torch.arange(window_index.numel()))
        assert torch.equal(layout.cu_window_seqlens, cu_window), grid
        assert layout.max_window_seqlen == int(cu_window.diff().max()), grid
        assert torch.equal(layout.cu_frame_seqlens, get_vision_cu_seqlens(grid_thw)), grid


def test_unit_index_returns_window_order_to_raster_order(gen):
    """Rows permuted into window order (as the encoder does with token_index) come back in input
    order through unit_index, for every merge unit."""
    grid = ((2, 10, 14), (1, 6, 18))
    layout = build_layout(CONFIG, grid, torch.device("cpu"))
    units = torch.randn(layout.num_tokens // 4, 3, generator=gen)
    window_ordered = units[layout.token_index[::4] // 4]
    assert torch.equal(window_ordered[layout.unit_index], units)


def test_rotary_frequencies_match_transformers():
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VLVisionRotaryEmbedding,
    )

    hf = Qwen2_5_VLVisionRotaryEmbedding(Qwen2_5_VLVisionConfig(**CONFIG.to_hf_dict()))
    layout = build_layout(CONFIG, ((1, 4, 4),), torch.device("cpu"))
    assert layout.rotary_section == [20, 20]
    torch.testing.assert_close(layout.inv_freq, torch.cat([hf.inv_freq, hf.inv_freq]))


@pytest.mark.parametrize(
    "grid, match",
    [
        ([(1, 5, 4)], "multiples of spatial_merge_size"),
        ([(0, 4, 4)], "t must be positive"),
        ([(1, 0, 4)], "positive multiples"),
        ([], "non-empty"),
        ([(1, 4)], r"\[N, 3\]"),
    ],
)
def test_bad_grids(grid, match):
    with pytest.raises(ValueError, match=match):
        build_layout(CONFIG, normalize_grid(grid), torch.device("cpu"))


def test_layout_cache_keeps_the_most_recent_grids():
    cache = LayoutCache(VisionConfig.tiny(), size=2)
    cpu = torch.device("cpu")
    first = cache.get([(1, 4, 4)], cpu)
    assert cache.get(torch.tensor([[1, 4, 4]]), cpu) is first  # a tensor grid is the same key
    second = cache.get([(1, 4, 8)], cpu)
    cache.get([(1, 4, 4)], cpu)  # most recent again: the next new grid evicts the second
    cache.get([(2, 4, 4)], cpu)
    assert cache.get([(1, 4, 4)], cpu) is first
    assert cache.get([(1, 4, 8)], cpu) is not second
    assert torch.equal(cache.get([(1, 4, 8)], cpu).token_index, second.token_index)
