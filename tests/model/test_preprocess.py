"""Preprocessing against transformers' Qwen2VLImageProcessorPil (images of odd sizes and modes),
transparency against Pillow, smart_resize over many sizes, and the video path: frame sampling and
patch order.

Transparent images reach transformers already composited onto white by Pillow: transformers
versions differ there (some composite onto white, older ones drop the alpha channel), so its part
of the comparison is the resize and normalisation, and our compositing is checked against Pillow.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    smart_resize as hf_smart_resize,
)

from qwen_kernels.model import (
    preprocess_image,
    preprocess_video,
    sample_frame_indices,
    smart_resize,
)
from qwen_kernels.model.preprocess import to_rgb


def random_image(gen: torch.Generator, height: int, width: int, channels: int = 3) -> np.ndarray:
    shape = (height, width, channels) if channels else (height, width)
    return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).numpy()


def on_white(image: Image.Image | np.ndarray) -> Image.Image:
    """``image`` composited onto white by Pillow (a masked paste); opaque images just in RGB."""
    rgba = (image if isinstance(image, Image.Image) else Image.fromarray(image)).convert("RGBA")
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def hf_preprocess(images, min_pixels, max_pixels):
    processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    out = processor(images=images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


@given(
    height=st.integers(1, 4000),
    width=st.integers(1, 4000),
    min_pixels=st.sampled_from([56 * 56, 128 * 28 * 28]),
    max_pixels=st.sampled_from([28 * 28 * 16, 28 * 28 * 1280, 16384 * 28 * 28]),
)
@settings(max_examples=300, deadline=None)
def test_smart_resize_matches_transformers(height, width, min_pixels, max_pixels):
    if max(height, width) / min(height, width) > 200:
        with pytest.raises(ValueError, match="aspect ratio"):
            smart_resize(height, width, 28, min_pixels, max_pixels)
        return
    ours = smart_resize(height, width, 28, min_pixels, max_pixels)
    assert ours == hf_smart_resize(height, width, 28, min_pixels, max_pixels)
    assert ours[0] % 28 == 0 and ours[1] % 28 == 0


@pytest.mark.parametrize(
    "height, width, channels, max_pixels",
    [
        (37, 53, 3, 28 * 28 * 1280),  # upscaled to min_pixels
        (301, 177, 3, 28 * 28 * 1280),  # odd sides, rounded to multiples of 28
        (20, 1000, 3, 28 * 28 * 1280),  # aspect ratio 50
        (517, 389, 3, 28 * 28 * 64),  # downscaled to max_pixels
        (90, 61, 4, 28 * 28 * 1280),  # RGBA: transformers gets it composited on white
        (45, 99, 0, 28 * 28 * 1280),  # grayscale [H, W]
    ],
)
def test_image_matches_transformers(gen, height, width, channels, max_pixels):
    image = random_image(gen, height, width, channels)
    pixels, grid = preprocess_image(image, max_pixels=max_pixels)
    if channels == 4:
        hf_image = np.asarray(on_white(image))
    elif channels == 0:
        hf_image = Image.fromarray(image)  # transformers reads a 2-D array as a batch of rows
    else:
        hf_image = image
    hf_pixels, hf_grid = hf_preprocess(hf_image, 56 * 56, max_pixels)
    assert grid.tolist() == hf_grid.tolist()
    assert pixels.dtype == torch.float32 and pixels.shape == hf_pixels.shape
    torch.testing.assert_close(pixels, hf_pixels, rtol=0, atol=1e-6)


def test_pil_images_batch_matches_transformers(gen):
    images = [
        Image.fromarray(random_image(gen, 61, 143)),
        Image.fromarray(random_image(gen, 200, 90, 4), mode="RGBA"),
        Image.fromarray(random_image(gen, 77, 77)).convert("P"),
    ]
    pixels, grid = preprocess_image(images)
    hf_pixels, hf_grid = hf_preprocess([on_white(im) for im in images], 56 * 56, 28 * 28 * 1280)
    assert grid.tolist() == hf_grid.tolist()
    torch.testing.assert_close(pixels, hf_pixels, rtol=0, atol=1e-6)


def transparent_images(gen: torch.Generator) -> dict[str, Image.Image | np.ndarray]:
    """Images with transparency in each form to_rgb takes; alpha 0 and 255 both occur."""
    rgba = random_image(gen, 37, 45, 4)
    rgba[:3, :, 3] = 0
    rgba[3:6, :, 3] = 255
    la = np.ascontiguousarray(rgba[..., [0, 3]])
    palette = Image.fromarray(rgba[..., :3]).convert("P")
    palette.info["transparency"] = int(np.asarray(palette)[0, 0])  # a palette index, see-through
    return {
        "rgba array": rgba,
        "RGBA": Image.fromarray(rgba),
        "LA": Image.fromarray(la),
        "P with transparency": palette,
    }


@pytest.mark.parametrize("kind", ["rgba array", "RGBA", "LA", "P with transparency"])
def test_transparency_is_composited_on_white(gen, kind):
    image = transparent_images(gen)[kind]
    ours = np.asarray(to_rgb(image))
    np.testing.assert_array_equal(ours, np.asarray(on_white(image)))
    # Independently of Pillow: colour * alpha + white * (1 - alpha), rounded.
    rgba = np.asarray((Image.fromarray(image) if kind == "rgba array" else image).convert("RGBA"))
    alpha = rgba[..., 3:] / 255
    expected = rgba[..., :3] * alpha + 255 * (1 - alpha)
    assert np.abs(ours - expected).max() <= 0.5 + 1e-9
    assert (ours[rgba[..., 3] == 0] == 255).all()
    assert (rgba[..., 3] == 0).any()


@pytest.mark.parametrize(
    "image, error, match",
    [
        (np.zeros((30, 40, 3), dtype=np.float32), ValueError, "uint8"),
        (np.zeros((30, 40, 2), dtype=np.uint8), ValueError, r"\[H, W, 3\]"),
        (np.zeros((3, 5000, 3), dtype=np.uint8), ValueError, "aspect ratio"),
        ("photo.jpg", TypeError, "PIL image or a numpy array"),
    ],
)
def test_bad_images(image, error, match):
    with pytest.raises(error, match=match):
        preprocess_image(image)


@pytest.mark.parametrize(
    "num_frames, fps, expected_count",
    [
        (300, 30.0, 20),  # 10 s at 2 fps
        (31, 30.0, 4),  # about 1 s: at least 4 frames
        (5, 30.0, 4),
        (3, 1.0, 2),  # fewer frames than min_frames: all of them, rounded down to even
        (100_000, 25.0, 768),  # capped at max_frames
    ],
)
def test_frame_sampling(num_frames, fps, expected_count):
    indices = sample_frame_indices(num_frames, fps)
    assert len(indices) == expected_count and len(indices) % 2 == 0
    assert indices[0] == 0 and indices[-1] == num_frames - 1
    assert indices == sorted(indices)
    # Evenly spread over time: each the nearest frame to its ideal position (fp32 linspace).
    step = (num_frames - 1) / (expected_count - 1)
    assert all(abs(i - k * step) <= 0.51 for k, i in enumerate(indices))


def test_video_patch_order_and_timing(gen):
    frames = np.stack([random_image(gen, 56, 84) for _ in range(13)])  # 13 frames of 56x84
    video = preprocess_video(frames, fps=4.0, min_pixels=56 * 56)
    # 3.25 s at 2 fps: 6.5 frames, rounded down to whole temporal patches.
    assert video.frame_indices == [0, 2, 5, 7, 10, 12]
    t, h, w = video.grid_thw[0].tolist()
    assert (t, h, w) == (3, 4, 6)
    assert math.isclose(video.second_per_grid_t, 2 / (6 / 13 * 4.0))
    # Each temporal patch holds two consecutive sampled frames, normalised like an image.
    per_frame = [preprocess_image(frames[i], min_pixels=56 * 56)[0] for i in video.frame_indices]
    patches = video.pixel_values.view(t, h * w, 3, 2, 14 * 14)
    for k in range(t):
        for j in range(2):
            image_patches = per_frame[2 * k + j].view(h * w, 3, 2, 14 * 14)[:, :, 0]
            torch.testing.assert_close(patches[k, :, :, j], image_patches, rtol=0, atol=0)


def test_video_of_one_repeated_frame_equals_the_image(gen):
    """Without a resize (images resize with Pillow, videos as torchvision does) a video of one
    repeated frame is that image."""
    frame = random_image(gen, 84, 112)
    video = preprocess_video([frame, frame], fps=2.0, min_pixels=56 * 56)
    pixels, grid = preprocess_image(frame, min_pixels=56 * 56)
    assert video.grid_thw.tolist() == grid.tolist()
    torch.testing.assert_close(video.pixel_values, pixels, rtol=0, atol=0)


def test_bad_videos(gen):
    with pytest.raises(ValueError, match="at least 2 frames"):
        preprocess_video([random_image(gen, 56, 56)], fps=2.0)
    with pytest.raises(ValueError, match="share one size"):
        preprocess_video([random_image(gen, 56, 56), random_image(gen, 56, 84)], fps=2.0)
    with pytest.raises(ValueError, match="must be positive"):
        sample_frame_indices(10, fps=0.0)


def _hf_video_processor(**kwargs):
    """transformers' Qwen2VLVideoProcessor (it resizes with torchvision: skipped without it)."""
    pytest.importorskip("torchvision")
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    return Qwen2VLVideoProcessor(cap_pixels_per_frame=False, **kwargs)


@pytest.mark.parametrize(
    "height, width", [(112, 168), (56, 84), (100, 150), (57, 250), (300, 200), (500, 333)]
)
def test_video_matches_transformers_video_processor(gen, height, width):
    """Same grid and patches as transformers' video processor given the same frames (by default
    it takes every frame it is given): frames that need no resize, that shrink, grow, or shrink
    on one side and grow on the other (where Pillow's bicubic would differ by many levels)."""
    frames = np.stack([random_image(gen, height, width) for _ in range(6)])
    bounds = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 64}
    hf = _hf_video_processor()(videos=[frames], size=bounds, return_tensors="pt")
    # Sampling at the source rate keeps every frame, as transformers does here.
    ours = preprocess_video(
        frames, fps=2.0, sample_fps=2.0, min_pixels=56 * 56, max_pixels=28 * 28 * 64
    )
    assert ours.frame_indices == list(range(6))
    assert ours.grid_thw.tolist() == hf["video_grid_thw"].tolist()
    # Equal up to the rounding of the fp32 normalisation (a uint8 level is 0.0145 here).
    torch.testing.assert_close(ours.pixel_values, hf["pixel_values_videos"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("source_fps", [1.0, 2.0, 3.0, 24.0, 29.97])
def test_frame_sampling_matches_transformers(source_fps):
    """``spacing="transformers"`` picks the frames transformers' video processor samples with
    ``do_sample_frames=True``; the default (qwen-vl-utils) picks as many, spread to the last
    frame."""
    from transformers.video_utils import VideoMetadata

    processor = _hf_video_processor()
    for num_frames in (2, 3, 5, 8, 13, 48, 61, 100, 257, 1000, 2001):
        metadata = VideoMetadata(total_num_frames=num_frames, fps=source_fps)
        expected = processor.sample_frames(metadata, fps=2.0).tolist()
        ours = sample_frame_indices(num_frames, source_fps, 2.0, spacing="transformers")
        assert ours == expected, (num_frames, source_fps)
        default = sample_frame_indices(num_frames, source_fps, 2.0)
        assert len(default) == len(expected) and default[-1] == num_frames - 1
