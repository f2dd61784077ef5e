"""The benchmark shapes: attention windows as Qwen2.5-VL cuts them."""

import pytest
import torch

from bench import shapes


@pytest.mark.parametrize(
    "visual", [shapes.IMAGE, shapes.VIDEO, *shapes.TINY.visuals], ids=lambda v: v.name
)
def test_windows_match_transformers(visual):
    vision_utils = pytest.importorskip("transformers.vision_utils")
    if not hasattr(vision_utils, "get_vision_window_index"):
        pytest.skip("this transformers has no vision_utils.get_vision_window_index")
    index, cu = vision_utils.get_vision_window_index(
        torch.tensor([visual.grid]),
        spatial_merge_size=shapes.MERGE,
        window_size=shapes.WINDOW_PX,
        patch_size=shapes.PATCH_PX,
    )
    assert cu.tolist() == shapes.cu_seqlens(shapes.window_lengths(visual.grid))
    assert torch.equal(index, shapes.window_unit_order(visual.grid))


def test_real_grids():
    assert shapes.IMAGE.grid == (1, 68, 92)
    assert shapes.VIDEO.grid == (8, 32, 32)
    assert sorted(set(shapes.window_lengths(shapes.IMAGE.grid))) == [16, 32, 64]
    assert shapes.frame_lengths(shapes.VIDEO.grid) == [1024] * 8


def test_square_grids_and_names():
    assert shapes.square_grid(4096) == (1, 64, 64)
    with pytest.raises(ValueError, match="square"):
        shapes.square_grid(1000)
    assert [shapes.short_count(n) for n in (1024, 65536, 6256)] == ["1k", "64k", "6256"]


def test_window_order_is_a_permutation():
    order = shapes.window_unit_order(shapes.IMAGE.grid)
    t, h, w = shapes.IMAGE.grid
    assert torch.equal(order.sort().values, torch.arange(t * h * w // shapes.MERGE**2))
