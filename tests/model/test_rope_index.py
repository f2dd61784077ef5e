"""The rotary position indices: ``vision_positions`` against the tower's own layout and
transformers' vision rotary, ``get_rope_index`` against transformers' ``Qwen2_5_VLModel`` on
random mixes of text, images and videos with padding, a video at fps 3 by hand, and bad input."""

import types

import pytest
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

from qwen_kernels.model.rope_index import (
    IMAGE_TOKEN_ID,
    VIDEO_TOKEN_ID,
    get_rope_index,
    vision_positions,
)

MERGE = 2
TOKENS_PER_SECOND = 2


def hf_vision_positions(grid: list[tuple[int, int, int]]) -> torch.Tensor:
    """transformers' ``rot_pos_emb`` position ids (Qwen2.5-VL vision tower), [2, T]."""
    out = []
    for t, h, w in grid:
        hpos = torch.arange(h).unsqueeze(1).expand(-1, w)
        hpos = hpos.reshape(h // MERGE, MERGE, w // MERGE, MERGE).permute(0, 2, 1, 3).flatten()
        wpos = torch.arange(w).unsqueeze(0).expand(h, -1)
        wpos = wpos.reshape(h // MERGE, MERGE, w // MERGE, MERGE).permute(0, 2, 1, 3).flatten()
        out.append(torch.stack([hpos, wpos]).repeat(1, t))
    return torch.cat(out, dim=1)


def test_vision_positions(gen):
    grid = [(1, 4, 6), (3, 8, 2), (2, 2, 2)]
    got = vision_positions(torch.tensor(grid), MERGE)
    assert got.dtype == torch.long and got.shape == (2, sum(t * h * w for t, h, w in grid))
    assert torch.equal(got, hf_vision_positions(grid))


def hf_get_rope_index(input_ids, kinds, image_grid, video_grid, seconds, mask):
    """transformers' method, on a stand-in for the model carrying only what it reads."""
    vision_config = types.SimpleNamespace(
        spatial_merge_size=MERGE, tokens_per_second=TOKENS_PER_SECOND
    )
    model = types.SimpleNamespace(
        config=types.SimpleNamespace(vision_config=vision_config),
        get_vision_position_ids=lambda *a, **k: Qwen2_5_VLModel.get_vision_position_ids(
            None, *a, **k
        ),
    )
    return Qwen2_5_VLModel.get_rope_index(
        model, input_ids, kinds, image_grid, video_grid, seconds, mask
    )


def random_batch(gen: torch.Generator, batch: int = 3, pad: bool = True):
    """Samples of text runs, images and videos (each vision run between text), left-padded."""
    rows, images, videos, seconds = [], [], [], []
    for _ in range(batch):
        row = list(
            torch.randint(0, 1000, (int(torch.randint(1, 5, (1,), generator=gen)),), generator=gen)
        )
        for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
            kind = int(torch.randint(0, 2, (1,), generator=gen))
            t = 1 if kind == 0 else int(torch.randint(1, 4, (1,), generator=gen))
            h, w = (2 * int(torch.randint(1, 4, (1,), generator=gen)) for _ in range(2))
            (images if kind == 0 else videos).append((t, h, w))
            if kind == 1:
                fps = float(torch.tensor([0.5, 1.0, 2.0, 3.0, 24 / 7])[torch.randint(0, 5, (1,))])
                seconds.append(2 / fps)
            row += [IMAGE_TOKEN_ID if kind == 0 else VIDEO_TOKEN_ID] * (t * h * w // MERGE**2)
            row += list(
                torch.randint(
                    0, 1000, (int(torch.randint(1, 4, (1,), generator=gen)),), generator=gen
                )
            )
        rows.append(row)
    length = max(map(len, rows)) + (2 if pad else 0)
    input_ids = torch.zeros(batch, length, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row) :] = torch.tensor(row)
        mask[i, length - len(row) :] = 1
    image_grid = torch.tensor(images).reshape(-1, 3) if images else None
    video_grid = torch.tensor(videos).reshape(-1, 3) if videos else None
    return input_ids, mask, image_grid, video_grid, torch.tensor(seconds) if videos else None


@pytest.mark.parametrize("trial", range(6))
def test_get_rope_index_matches_transformers(gen, trial):
    input_ids, mask, image_grid, video_grid, seconds = random_batch(gen, pad=trial % 3 != 0)
    kinds = (input_ids == IMAGE_TOKEN_ID) * 1 + (input_ids == VIDEO_TOKEN_ID) * 2
    expected, expected_deltas = hf_get_rope_index(
        input_ids, kinds, image_grid, video_grid, seconds, mask
    )
    positions, deltas = get_rope_index(input_ids, image_grid, video_grid, seconds, mask)
    assert positions.shape == (3, *input_ids.shape) and positions.dtype == input_ids.dtype
    assert torch.equal(positions, expected)
    assert torch.equal(deltas, expected_deltas)
    again, _ = get_rope_index(
        input_ids, image_grid, video_grid, seconds, mask, mm_token_type_ids=kinds
    )
    assert torch.equal(again, expected)


def test_video_at_fps_3_by_hand():
    """One video of 4 temporal patches, 2x2 merged tokens each, at fps 3: 2/3 s per temporal
    patch, interval 4/3 position per patch: times floor(0, 4/3, 8/3, 4) = 0, 1, 2, 4 (truncating
    the seconds to an integer first would give 0 for every patch)."""
    text = [11, 12]
    video = [VIDEO_TOKEN_ID] * 16  # t=4, h=w=4 patches -> 2x2 merged tokens per patch
    input_ids = torch.tensor([text + video + [13]])
    positions, deltas = get_rope_index(
        input_ids,
        video_grid_thw=torch.tensor([[4, 4, 4]]),
        second_per_grid_ts=torch.tensor([2 / 3]),
    )
    times = torch.tensor([0, 1, 2, 4]).repeat_interleave(4) + 2
    rows = torch.tensor([0, 0, 1, 1]).repeat(4) + 2
    cols = torch.tensor([0, 1, 0, 1]).repeat(4) + 2
    expected = torch.stack(
        [
            torch.cat([torch.tensor([0, 1]), times, torch.tensor([4])]),
            torch.cat([torch.tensor([0, 1]), rows, torch.tensor([4])]),
            torch.cat([torch.tensor([0, 1]), cols, torch.tensor([4])]),
        ]
    )[:, None]
    assert torch.equal(positions, expected)
    # The largest position is the last video time (6); 19 tokens.
    assert torch.equal(deltas, torch.tensor([[6 + 1 - 19]]))


def test_bad_input():
    ids = torch.tensor([[1, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 2]])
    with pytest.raises(ValueError, match="1 image token runs in input_ids but 0 rows"):
        get_rope_index(ids)
    with pytest.raises(ValueError, match="does not match its grid"):
        get_rope_index(ids, image_grid_thw=torch.tensor([[1, 4, 4]]))
    with pytest.raises(ValueError, match=r"`input_ids` must be \[B, S\]"):
        get_rope_index(ids[0])
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        vision_positions(torch.tensor([[1, 3, 4]]), 2)
    video = torch.tensor([[VIDEO_TOKEN_ID]])
    with pytest.raises(ValueError, match="`second_per_grid_ts` must have one entry per video"):
        get_rope_index(video, video_grid_thw=[[1, 2, 2]], second_per_grid_ts=[1.0, 2.0])
