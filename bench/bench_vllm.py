"""vLLM's own Qwen2.5-VL vision tower with and without the plug-in (``qwen-kernels bench --op
vllm_tower``): the 7B tower in bf16 on a 1344x1344 image and a 16-frame 448x448 video, stock
("vllm") against the plug-in on "auto" ("vllm+qwen/auto", ``qwen_kernels.vllm``), both checked
against our encoder on the eager references. Where vllm is not installed both rows are skipped
with that reason. The dry run builds the tiny tower in fp32 and runs each once on the CPU.

The towers are built once per process inside a one-rank vLLM world (``standalone_world``),
with the same random weights loaded through vLLM's loader.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor, nn

from qwen_kernels.model import VisionConfig

from .bench_encoder import DRY_RUN_REL_ERR, tower_case, tower_weights
from .harness import REL_ERR_LIMIT, Case, Impl, Inputs, Suite, missing_module
from .shapes import TINY, Grid, Scale

OP = "vllm_tower"
NO_VLLM = missing_module("vllm", "vllm")
# A 1344x1344 image (96x96 patches) and 16 frames of 448x448 (8 temporal patches of 32x32).
GRIDS: dict[str, Grid] = {"image-1344x1344": (1, 96, 96), "video-16x448x448": (8, 32, 32)}
TINY_GRIDS: dict[str, Grid] = {"image-140x168": (1, 10, 12), "video-2x112x168": (2, 8, 12)}


def cases(scale: Scale) -> list[Case]:
    """The 7B tower in bf16 on the image and the video; the tiny tower in fp32 for the dry run."""
    tiny = scale is TINY
    config = VisionConfig.tiny() if tiny else VisionConfig.qwen2_5_vl("7b")
    dtype = torch.float32 if tiny else torch.bfloat16
    limit = DRY_RUN_REL_ERR if tiny else REL_ERR_LIMIT
    grids = TINY_GRIDS if tiny else GRIDS
    return [
        tower_case(name, "vllm", grid, config, dtype, limit, op=OP) for name, grid in grids.items()
    ]


# The vLLM world of this process, entered on first use and kept open (the towers live in it).
_WORLD = contextlib.ExitStack()


@functools.cache
def _world() -> None:
    from qwen_kernels.vllm import standalone_world

    _WORLD.enter_context(standalone_world())


@functools.cache
def _tower(
    plugged: bool, config: VisionConfig, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """vLLM's tower with the shared random weights, stock or patched on "auto"."""
    _world()  # first: it picks vLLM's device before vllm is imported
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VisionTransformer

    from qwen_kernels.vllm import patch_vision_tower

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # vLLM's linears take the default dtype
    try:
        with torch.device(device):
            tower = Qwen2_5_VisionTransformer(
                vision_config=Qwen2_5_VLVisionConfig(**config.to_hf_dict()),
                norm_eps=config.rms_norm_eps,
            )
    finally:
        torch.set_default_dtype(previous)
    tower.load_weights(tower_weights(config, dtype, device).items())
    for module in tower.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)
    if plugged:
        patch_vision_tower(tower, config, "auto")
    return tower.eval()


def _prepare(plugged: bool, inputs: Inputs) -> Inputs:
    tower = _tower(plugged, *inputs["model"])
    grid_thw = [list(grid) for grid in inputs["grids"]]

    def forward() -> Tensor:
        return tower(inputs["pixels"], grid_thw=grid_thw)

    return {**inputs, "forward": forward}


def _run(inputs: Inputs) -> Tensor:
    with torch.no_grad():
        return inputs["forward"]()


def ours(case: Case, device_type: str) -> list[Impl]:
    """vLLM's tower with the plug-in on "auto"."""
    prepare = functools.partial(_prepare, True)
    return [Impl("vllm+qwen/auto", _run, kind="qwen", missing=NO_VLLM, prepare=prepare)]


def peers(op: str) -> list[Impl]:
    """vLLM's stock tower."""
    return [Impl("vllm", _run, missing=NO_VLLM, prepare=functools.partial(_prepare, False))]


SUITE = Suite("vllm", (OP,), cases, peers, ours=ours, profile=True, warmup_ms=200, rep_ms=1000)
