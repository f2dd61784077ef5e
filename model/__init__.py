"""Reference Qwen2.5-VL vision encoder on the qwen kernels, with its preprocessing and loaders.

    from qwen_kernels.model import VisionEncoder, preprocess_image

    encoder = VisionEncoder.from_pretrained("Qwen2.5-VL-7B-Instruct", dtype=torch.bfloat16,
                                            device="cuda")
    pixel_values, grid_thw = preprocess_image(image)
    tokens = encoder(pixel_values.cuda(), grid_thw)  # [h*w/4, 3584], raster order

Every block picks its kernels (``KernelConfig``; ``encoder.set_kernels(...)`` switches them live).
"""

from .config import KernelConfig, LayerKernels, VisionConfig
from .encoder import VisionEncoder
from .layout import GridLayout
from .preprocess import (
    VideoInputs,
    preprocess_image,
    preprocess_video,
    sample_frame_indices,
    smart_resize,
)
from .rope_index import get_rope_index, vision_positions
from .weights import convert_hf_state_dict, load_checkpoint, random_hf_state_dict

__all__ = [
    "GridLayout",
    "KernelConfig",
    "LayerKernels",
    "VideoInputs",
    "VisionConfig",
    "VisionEncoder",
    "convert_hf_state_dict",
    "get_rope_index",
    "load_checkpoint",
    "preprocess_image",
    "preprocess_video",
    "random_hf_state_dict",
    "sample_frame_indices",
    "smart_resize",
    "vision_positions",
]
