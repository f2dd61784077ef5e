"""Tiny Qwen2.5-VL vision towers for the plug-in's tests: transformers' (the reference, random
weights) and vLLM's (the same weights, loaded through vLLM's own loader), inside a vLLM process
group of one or more gloo ranks on the CPU."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
)

from qwen_kernels.model import VisionConfig

# Real head_dim (80), windows and merge; blocks 1 and 3 attend over whole frames.
VISION = VisionConfig.tiny()
# Two images (one with edge windows on both axes) and a 2-frame video.
IMAGES = ((1, 10, 12), (1, 16, 20))
VIDEO = ((2, 8, 12),)
SEED = 1234


def hf_config() -> Qwen2_5_VLVisionConfig:
    return Qwen2_5_VLVisionConfig(**VISION.to_hf_dict())


def hf_tower() -> nn.Module:
    """transformers' tower with seeded random weights (fp32, eval)."""
    torch.manual_seed(SEED)
    return Qwen2_5_VisionTransformerPretrainedModel._from_config(hf_config()).eval()


def vllm_tower(reference: nn.Module) -> nn.Module:
    """vLLM's tower, built now (so a registered plug-in patches it), with ``reference``'s
    weights loaded by vLLM's loader and post-processed as vLLM's model loader does."""
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VisionTransformer

    tower = Qwen2_5_VisionTransformer(vision_config=hf_config(), norm_eps=VISION.rms_norm_eps)
    tower.load_weights(reference.state_dict().items())
    for module in tower.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)
    return tower.eval()


def pixels(grids: Sequence[tuple[int, int, int]], seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    tokens = sum(t * h * w for t, h, w in grids)
    return torch.randn(tokens, VISION.patch_dim, generator=gen)


def hf_forward(tower: nn.Module, px: Tensor, grids: Sequence[tuple[int, int, int]]) -> Tensor:
    with torch.no_grad():
        return tower(px, grid_thw=torch.tensor(grids)).pooler_output


def vllm_forward(tower: nn.Module, px: Tensor, grids: Sequence[tuple[int, int, int]]) -> Tensor:
    with torch.no_grad():
        return tower(px, grid_thw=[list(g) for g in grids])


def tensor_parallel_rank(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One rank of a tensor-parallel tower with the plug-in on ("torch"): saves its heads per
    rank, the qwen ops it ran and its output for the parent test."""
    import os
    from pathlib import Path

    from bench.bench_host import CountQwenOps
    from qwen_kernels import vllm as plugin

    os.environ[plugin.ENV] = "torch"
    plugin.register()
    with plugin.standalone_world(world_size, rank, port):
        tower = vllm_tower(hf_tower())
        grids = IMAGES + VIDEO
        with CountQwenOps() as counter:
            out = vllm_forward(tower, pixels(grids, 11), grids)
        result = {
            "heads": tower.blocks[0].attn.num_attention_heads_per_partition,
            "counts": dict(counter.counts),
            "out": out,
        }
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
