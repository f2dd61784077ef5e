"""Image and video preprocessing for the Qwen2.5-VL vision tower.

Matches transformers' ``Qwen2VLImageProcessorPil``: RGB (transparency composited on white),
bicubic resize (Pillow) to sides that are multiples of 28 with the pixel count kept within
[min_pixels, max_pixels], rescale to [0, 1], CLIP mean/std, each image repeated to the 2 frames of a
temporal patch, and patches flattened in merge-unit order. Videos are sampled at a dynamic frame
rate as qwen-vl-utils does (frames chosen by time, an even count) and resized as transformers'
``Qwen2VLVideoProcessor`` does (antialiased bicubic on uint8 tensors).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE

IMAGE_MIN_PIXELS = 56 * 56
IMAGE_MAX_PIXELS = 28 * 28 * 1280
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_FPS = 2.0
VIDEO_MIN_FRAMES = 4
VIDEO_MAX_FRAMES = 768
FRAME_SPACINGS = ("qwen-vl-utils", "transformers")

ImageLike = Image.Image | np.ndarray


def smart_resize(
    height: int,
    width: int,
    factor: int = FACTOR,
    min_pixels: int = IMAGE_MIN_PIXELS,
    max_pixels: int = IMAGE_MAX_PIXELS,
) -> tuple[int, int]:
    """The size an image is resized to: sides multiples of ``factor``, aspect ratio kept as
    closely as possible, ``min_pixels <= height * width <= max_pixels``.

    Raises:
        ValueError: the aspect ratio is beyond 200, or a side is not positive.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image sides must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"aspect ratio must be at most 200, got {max(height, width) / min(height, width):.1f}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(image: ImageLike) -> Image.Image:
    """A Pillow RGB image from a Pillow image or a uint8 ``[H, W]``, ``[H, W, 1|3|4]`` array.

    Transparency is composited onto white, as transformers does.
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8 [H, W, C], got dtype {image.dtype}")
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
            raise ValueError(
                f"image arrays must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got "
                f"{list(image.shape)}"
            )
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or a numpy array, got {type(image).__name__}")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _normalize(image: Image.Image, height: int, width: int) -> np.ndarray:
    """Bicubic resize (Pillow), rescale to [0, 1], CLIP-normalise: fp32 ``[3, height, width]``."""
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.BICUBIC)
    return _rescale_and_normalize(np.asarray(image)).transpose(2, 0, 1)


def _rescale_and_normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 ``[..., 3]`` to fp32 CLIP-normalised values, channels last."""
    # Same rounding steps as transformers: rescale in fp64, store fp32, normalise in fp32.
    scaled = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)
    std = np.asarray(CLIP_STD, dtype=np.float32)
    return (scaled - mean) / std


def _resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 ``[F, H, W, 3]`` frames to ``[F, height, width, 3]`` with torch's antialiased bicubic
    on uint8: what torchvision's resize runs for qwen-vl-utils and transformers' video processor
    (it differs from Pillow's bicubic by up to a few uint8 levels where one side shrinks and the
    other grows)."""
    if frames.shape[1:3] == (height, width):
        return frames
    channels_first = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()
    resized = F.interpolate(
        channels_first, size=(height, width), mode="bicubic", align_corners=False, antialias=True
    )
    return resized.permute(0, 2, 3, 1).numpy()


def patchify(frames: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """``[F, C, H, W]`` frames (F a multiple of the temporal patch) to ``[t*h*w, C*2*14*14]``
    patches in merge-unit order, and the grid ``(t, h, w)`` in patches.

    Patch row order: frame group, merge-unit row, merge-unit column, row and column inside the
    unit. Values of a patch: channel, frame, pixel row, pixel column.
    """
    f, c, height, width = frames.shape
    t, h, w = f // TEMPORAL_PATCH_SIZE, height // PATCH_SIZE, width // PATCH_SIZE
    m, p = MERGE_SIZE, PATCH_SIZE
    patches = frames.reshape(t, TEMPORAL_PATCH_SIZE, c, h // m, m, p, w // m, m, p)
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return patches.reshape(t * h * w, c * TEMPORAL_PATCH_SIZE * p * p), (t, h, w)


def preprocess_image(
    image: ImageLike | Sequence[ImageLike],
    min_pixels: int = IMAGE_MIN_PIXELS,
    max_pixels: int = IMAGE_MAX_PIXELS,
) -> tuple[Tensor, Tensor]:
    """Patches of one image, or of several images concatenated.

    Args:
        image: a PIL image, a uint8 ``[H, W(, C)]`` array, or a sequence of them.
        min_pixels, max_pixels: bounds of the resized pixel count (see ``smart_resize``).

    Returns:
        ``(pixel_values, grid_thw)``: fp32 ``[sum t*h*w, 1176]`` and int64 ``[N, 3]`` (t = 1).
    """
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    patches, grids = [], []
    for item in images:
        rgb = to_rgb(item)
        height, width = smart_resize(rgb.height, rgb.width, FACTOR, min_pixels, max_pixels)
        frame = _normalize(rgb, height, width)
        frames = np.broadcast_to(frame, (TEMPORAL_PATCH_SIZE, *frame.shape))
        flat, grid = patchify(frames)
        patches.append(flat)
        grids.append(grid)
    return torch.from_numpy(np.concatenate(patches)), torch.tensor(grids, dtype=torch.int64)


@dataclass(frozen=True)
class VideoInputs:
    """A preprocessed video.

    Attributes:
        pixel_values: fp32 ``[t*h*w, 1176]`` patches.
        grid_thw: int64 ``[1, 3]``.
        second_per_grid_t: seconds of video per temporal patch (for the LLM's M-RoPE time axis).
        frame_indices: the source frames that were sampled.
    """

    pixel_values: Tensor
    grid_thw: Tensor
    second_per_grid_t: float
    frame_indices: list[int]


def sample_frame_indices(
    num_frames: int,
    fps: float,
    sample_fps: float = VIDEO_FPS,
    min_frames: int = VIDEO_MIN_FRAMES,
    max_frames: int = VIDEO_MAX_FRAMES,
    spacing: str = "qwen-vl-utils",
) -> list[int]:
    """Frames to keep from a video of ``num_frames`` at ``fps``: about ``sample_fps`` per second,
    an even number of them (whole temporal patches) between ``min_frames`` and ``max_frames``,
    spread evenly over the video's duration.

    ``spacing`` says how they are spread: "qwen-vl-utils" (the reference pipeline: ``linspace(0,
    N-1, n)`` rounded, first and last frame kept) or "transformers" (``Qwen2VLVideoProcessor``
    with ``do_sample_frames=True``: ``arange(0, N, N/n)`` truncated). Both keep the same count.
    """
    if spacing not in FRAME_SPACINGS:
        raise ValueError(f"spacing must be one of {FRAME_SPACINGS}, got {spacing!r}")
    if num_frames < TEMPORAL_PATCH_SIZE:
        raise ValueError(f"a video needs at least {TEMPORAL_PATCH_SIZE} frames, got {num_frames}")
    if fps <= 0 or sample_fps <= 0:
        raise ValueError(f"fps and sample_fps must be positive, got {fps} and {sample_fps}")
    step = TEMPORAL_PATCH_SIZE
    wanted = num_frames / fps * sample_fps
    count = min(max(wanted, min_frames), max_frames, num_frames)
    count = max(step, int(count // step) * step)
    if spacing == "transformers":
        return torch.arange(0, num_frames, num_frames / count).int().tolist()[:count]
    return torch.linspace(0, num_frames - 1, count).round().long().tolist()


def preprocess_video(
    frames: Sequence[ImageLike] | np.ndarray,
    fps: float,
    sample_fps: float = VIDEO_FPS,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
    min_frames: int = VIDEO_MIN_FRAMES,
    max_frames: int = VIDEO_MAX_FRAMES,
    spacing: str = "qwen-vl-utils",
) -> VideoInputs:
    """Sample a video at a dynamic frame rate and cut it into patches.

    Args:
        frames: the decoded video: a sequence of PIL images / uint8 arrays of one size, or a
            uint8 ``[N, H, W, C]`` array.
        fps: the source frame rate.
        sample_fps: frames kept per second of video (before the min/max frame bounds).
        min_pixels, max_pixels: bounds of each resized frame's pixel count.
        min_frames, max_frames: bounds of the number of sampled frames.
        spacing: which frames: "qwen-vl-utils" or "transformers" (see ``sample_frame_indices``).

    Returns:
        A ``VideoInputs``; consecutive sampled frames pair into temporal patches.

    Frames are resized as qwen-vl-utils and transformers' video processor resize them
    (torchvision's antialiased bicubic on uint8; images use Pillow's bicubic, as their
    processors do). The total pixel budget for long videos (transformers'
    ``cap_pixels_per_frame``) is left to the caller: lower ``max_pixels`` for many frames.
    """
    indices = sample_frame_indices(len(frames), fps, sample_fps, min_frames, max_frames, spacing)
    picked = [to_rgb(frames[i]) for i in indices]
    sizes = {im.size for im in picked}
    if len(sizes) != 1:
        raise ValueError(f"video frames must share one size, got {sorted(sizes)}")
    width, height = picked[0].size
    height, width = smart_resize(height, width, FACTOR, min_pixels, max_pixels)
    resized = _resize_frames(np.stack([np.asarray(im) for im in picked]), height, width)
    flat, grid = patchify(_rescale_and_normalize(resized).transpose(0, 3, 1, 2))
    # The sampled rate may differ from sample_fps (bounds, rounding to whole patches).
    effective_fps = len(indices) / len(frames) * fps
    return VideoInputs(
        pixel_values=torch.from_numpy(flat),
        grid_thw=torch.tensor([grid], dtype=torch.int64),
        second_per_grid_t=TEMPORAL_PATCH_SIZE / effective_fps,
        frame_indices=indices,
    )
