"""Shared pieces of the encoder tests: configs, transformers' tower as the reference, random
inputs, and the kernel backends to run on this machine (the configs for them come from
``KernelConfig.best_effort``)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers.initialization import no_init_weights
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
)

from qwen_kernels.model import VisionConfig
from qwen_kernels.model.config import GROUP_OPS
from tests.helpers import backends_for

SMALL = VisionConfig.tiny()

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def hf_tower(
    config: VisionConfig,
    state_dict: Mapping[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> Qwen2_5_VisionTransformerPretrainedModel:
    """transformers' tower on the CPU holding ``state_dict`` (shared, not copied, where the dtype
    matches). References run on the CPU: on GPUs cuDNN may run its Conv3d in TF32."""
    hf_config = Qwen2_5_VLVisionConfig(**config.to_hf_dict())
    hf_config._attn_implementation = attn_implementation
    with no_init_weights():
        model = Qwen2_5_VisionTransformerPretrainedModel(hf_config)
    weights = {k: v.to(dtype) for k, v in state_dict.items()}
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval()


def random_pixels(gen: torch.Generator, grid: list[tuple[int, int, int]], patch_dim: int = 1176):
    """Normalised-pixel-like patches for ``grid`` (CLIP-normalised values span about +-2)."""
    tokens = sum(t * h * w for t, h, w in grid)
    return torch.randn(tokens, patch_dim, generator=gen)


def device_backends() -> list[tuple[str, str]]:
    """(device, backend) pairs to test: each kernel backend that runs some group on the device."""
    pairs = []
    for device in DEVICES:
        usable = {b for ops in GROUP_OPS.values() for op in ops for b in backends_for(op, device)}
        pairs += [(device, b) for b in sorted(usable - {"torch"})]
    return pairs
