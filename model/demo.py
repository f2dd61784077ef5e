"""Encode an image (and/or a video) with the best available kernels and with the eager reference,
and compare them.

    qwen-kernels demo                       # bundled sample image, seeded random 7B-tower weights
    qwen-kernels demo --image photo.jpg --weights Qwen2.5-VL-7B-Instruct --device cuda
    qwen-kernels demo --video frames_dir --fps 30 --backends auto,triton,torch
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

import qwen_kernels

from .config import BACKEND_NAMES, OP_GROUPS, KernelConfig, VisionConfig, group_ops
from .encoder import VisionEncoder
from .preprocess import (
    IMAGE_MAX_PIXELS,
    IMAGE_MIN_PIXELS,
    PATCH_SIZE,
    preprocess_image,
    preprocess_video,
)
from .weights import random_hf_state_dict

REFERENCE = "torch"
_FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen-kernels demo",
        description="Run the Qwen2.5-VL vision encoder with several kernel backends and compare.",
    )
    parser.add_argument("--image", type=Path, help="image file (default: the bundled sample)")
    parser.add_argument(
        "--video",
        type=Path,
        help="folder of frame images, or a uint8 .npy "
        "[N, H, W, 3]; encoded in the same batch as --image",
    )
    parser.add_argument(
        "--fps",
        type=float,
        default=2.0,
        help="frame rate of --video (default 2: frames already sampled)",
    )
    parser.add_argument(
        "--weights", type=Path, help="Qwen2.5-VL checkpoint folder (default: seeded random weights)"
    )
    parser.add_argument(
        "--size",
        default="7b",
        choices=["3b", "7b", "32b", "72b"],
        help="tower preset for random weights (default 7b)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *_DTYPES],
        help="default: bfloat16 on a GPU, float32 on the CPU",
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--backends",
        default="auto,torch",
        help="comma-separated backends to run, each compared with 'torch'; a backend runs every "
        "op group whose ops it has kernels for, the others run on 'auto'",
    )
    parser.add_argument(
        "--max-pixels", type=int, default=IMAGE_MAX_PIXELS, help="pixel budget of the resized image"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="timed forwards per backend after an untimed warm-up (default: 10 on a GPU, 3 on "
        "the CPU)",
    )
    return parser


def _sample_image() -> Image.Image:
    with resources.as_file(resources.files(__package__) / "assets" / "sample.png") as path:
        return Image.open(path).convert("RGB")


def _read_frames(path: Path) -> np.ndarray | list[Image.Image]:
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in _FRAME_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no frame images ({', '.join(_FRAME_SUFFIXES)}) in {path}")
    return [Image.open(p) for p in files]


def _inputs(args: argparse.Namespace) -> tuple[Tensor, Tensor, list[str]]:
    """pixel_values, grid_thw and one description line per input."""
    pixels, grids, lines = [], [], []
    if args.image is not None or args.video is None:
        image = Image.open(args.image) if args.image is not None else _sample_image()
        name = str(args.image) if args.image is not None else "bundled sample"
        values, grid = preprocess_image(image, IMAGE_MIN_PIXELS, args.max_pixels)
        _, h, w = (n * PATCH_SIZE for n in grid[0].tolist())
        lines.append(f"image  {name}: {image.width}x{image.height} px -> {w}x{h} px")
        pixels.append(values)
        grids.append(grid)
    if args.video is not None:
        frames = _read_frames(args.video)
        video = preprocess_video(frames, fps=args.fps)
        _, h, w = (n * PATCH_SIZE for n in video.grid_thw[0].tolist())
        lines.append(
            f"video  {args.video}: {len(frames)} frames at {args.fps:g} fps -> "
            f"{len(video.frame_indices)} sampled, {w}x{h} px, "
            f"{video.second_per_grid_t:.2f} s per temporal patch"
        )
        pixels.append(video.pixel_values)
        grids.append(video.grid_thw)
    return torch.cat(pixels), torch.cat(grids), lines


def _timed(fn: Callable[[], Tensor], device: torch.device, repeat: int) -> tuple[float, Tensor]:
    """Seconds per call over ``repeat`` calls, and the last output. One untimed call first, on
    every device, so that each backend is timed without its one-time costs (Triton compiles and
    caches, the emulation builds, first-touch allocations)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeat, out


def what_runs(encoder: VisionEncoder, dtype: torch.dtype) -> str:
    """Per op group, the backend that the encoder's first block (and its merger) resolves to on
    its device and ``dtype``, e.g. "attention torch, rotary torch, ..." for "auto" on CPU
    tensors: "auto" runs the eager reference there, so it times the same code as "torch"."""
    device = encoder.patch_embed.weight.device
    config, layer = encoder.config, encoder.blocks[0].kernels
    head_dim = config.hidden_size // config.num_heads
    parts = []
    for group in OP_GROUPS:
        backend = encoder.kernels.merge if group == "merge" else getattr(layer, group)
        ops = group_ops(group, layer.fuse_mlp_norm, layer.rotary_fused)
        last_dim = head_dim if group in ("attention", "rotary") else config.hidden_size
        like = torch.empty((1, last_dim), device=device, dtype=dtype)
        names = {qwen_kernels._backends.REGISTRY[op].select_name(backend, like) for op in ops}
        parts.append(f"{group} {'/'.join(sorted(names))}")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be at least 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = _DTYPES[args.dtype]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKEND_NAMES]
    if unknown:
        parser.error(f"unknown backends {unknown}; expected some of {list(BACKEND_NAMES)}")
    if REFERENCE not in backends:
        backends.append(REFERENCE)
    repeat = args.repeat if args.repeat is not None else (10 if device.type == "cuda" else 3)

    start = time.perf_counter()
    if args.weights is not None:
        encoder = VisionEncoder.from_pretrained(args.weights, dtype=dtype, device=device)
        source = f"checkpoint {args.weights}"
    else:
        config = VisionConfig.qwen2_5_vl(args.size)
        state_dict = random_hf_state_dict(config, seed=args.seed)
        encoder = VisionEncoder.from_hf_state_dict(state_dict, config, dtype=dtype, device=device)
        source = (
            f"seeded random weights (seed {args.seed}, no --weights given): the outputs "
            f"are not meaningful features"
        )
    encoder.eval()
    config = encoder.config
    print(
        f"tower: depth {config.depth}, hidden {config.hidden_size}, heads {config.num_heads}, "
        f"out {config.out_hidden_size}; {source}"
    )
    print(
        f"device {device}, dtype {str(dtype).removeprefix('torch.')}, "
        f"weights ready in {time.perf_counter() - start:.1f} s"
    )

    pixel_values, grid_thw, lines = _inputs(args)
    for line in lines:
        print(line)
    layout = encoder.layout(grid_thw)
    windows = layout.cu_window_seqlens.numel() - 1
    print(
        f"grid_thw {grid_thw.tolist()}: {layout.num_tokens} patches -> "
        f"{layout.num_tokens // config.merge_unit} tokens of {config.out_hidden_size}; "
        f"{windows} attention windows (longest {layout.max_window_seqlen} patches), "
        f"full attention over frames of up to {layout.max_frame_seqlen} patches"
    )
    usable = qwen_kernels.available_backends()
    print("backends usable here: " + "; ".join(f"{op} {'/'.join(b)}" for op, b in usable.items()))

    pixel_values = pixel_values.to(device)
    outputs = {}
    print(f"each backend: one untimed warm-up forward, then the mean of {repeat} timed forwards")
    print(f"{'backend':<10} {'s/forward':>10} {'patches/s':>10}  what ran, per op group")
    with torch.inference_mode():
        for backend in backends:
            # Ops without a kernel of this backend yet run on "auto", and the line says which.
            kernels = KernelConfig.best_effort(backend)
            encoder.set_kernels(kernels)
            fallback = [g for g in OP_GROUPS if getattr(kernels, g) != backend]
            note = f"  ({', '.join(fallback)} on auto)" if fallback else ""
            try:
                seconds, outputs[backend] = _timed(
                    lambda: encoder(pixel_values, grid_thw), device, repeat
                )
            except RuntimeError as error:  # the backend cannot run here (device, build)
                print(f"{backend:<10} unavailable: {error}")
                continue
            ran = what_runs(encoder, dtype)
            print(
                f"{backend:<10} {seconds:>10.3f} {layout.num_tokens / seconds:>10.0f}  {ran}{note}"
            )
    reference = outputs[REFERENCE].float()
    for backend in outputs:
        if backend == REFERENCE:
            continue
        diff = outputs[backend].float() - reference
        print(
            f"{backend} vs {REFERENCE}: max |diff| {diff.abs().max().item():.3e}, "
            f"relative {(diff.norm() / reference.norm()).item():.3e} "
            f"(output max |x| {reference.abs().max().item():.3e})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
