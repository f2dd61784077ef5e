"""VisionConfig presets and conversion from transformers configs; KernelConfig resolution."""

import dataclasses

import pytest
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLVisionConfig,
)

from qwen_kernels.model import KernelConfig, LayerKernels, VisionConfig, VisionEncoder
from tests.model.reference import SMALL

# The vision_config block of a released checkpoint's config.json (older key names included).
CHECKPOINT_VISION_CONFIG = {
    "depth": 32,
    "hidden_act": "silu",
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "in_chans": 3,
    "out_hidden_size": 2048,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "spatial_patch_size": 14,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
    "temporal_patch_size": 2,
}


@pytest.mark.parametrize("size, out", [("3b", 2048), ("7b", 3584), ("32b", 5120), ("72B", 8192)])
def test_presets(size, out):
    config = VisionConfig.qwen2_5_vl(size)
    assert config.out_hidden_size == out
    assert (config.depth, config.hidden_size, config.num_heads) == (32, 1280, 16)
    assert config.head_dim == 80
    assert (config.intermediate_size, config.patch_dim, config.window_units) == (3420, 1176, 4)
    assert config.fullatt_block_indexes == (7, 15, 23, 31)
    assert config.rms_norm_eps == 1e-6


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"unknown Qwen2\.5-VL size"):
        VisionConfig.qwen2_5_vl("13b")


def test_from_checkpoint_dicts():
    config = VisionConfig.from_hf(CHECKPOINT_VISION_CONFIG)
    assert config == VisionConfig.qwen2_5_vl("3b")
    full = {"model_type": "qwen2_5_vl", "vision_config": CHECKPOINT_VISION_CONFIG}
    assert VisionConfig.from_hf(full) == config


def test_from_transformers_configs():
    hf = Qwen2_5_VLVisionConfig(**SMALL.to_hf_dict())
    assert VisionConfig.from_hf(hf) == SMALL
    assert VisionConfig.from_hf(hf.to_dict()) == SMALL
    full = Qwen2_5_VLConfig(vision_config=SMALL.to_hf_dict())
    assert VisionConfig.from_hf(full) == SMALL


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"num_heads": 3}, "divisible by num_heads"),
        ({"hidden_size": 120, "num_heads": 4}, "multiple of 4"),
        ({"hidden_act": "gelu"}, "silu"),
        ({"window_size": 100}, "multiple of patch_size"),
        ({"fullatt_block_indexes": (3, 32)}, r"\[32\] are outside"),
    ],
)
def test_bad_vision_config(changes, match):
    with pytest.raises(ValueError, match=match):
        VisionConfig(**changes)


def test_non_square_patch_is_rejected():
    with pytest.raises(ValueError, match="not square"):
        VisionConfig.from_hf({**CHECKPOINT_VISION_CONFIG, "patch_size": [14, 16]})


def test_kernel_config_resolution():
    kernels = KernelConfig(
        attention="cuda",
        norm="triton",
        layers={7: {"attention": "torch"}, "2": {"mlp": "cuda_emu", "fuse_mlp_norm": True}},
    )
    assert kernels.for_layer(0) == LayerKernels(attention="cuda", norm="triton")
    assert kernels.for_layer(7) == LayerKernels(attention="torch", norm="triton")
    assert kernels.for_layer(2) == LayerKernels(
        attention="cuda", norm="triton", mlp="cuda_emu", fuse_mlp_norm=True
    )
    uniform = KernelConfig.coerce("triton")
    assert {getattr(uniform, f.name) for f in dataclasses.fields(LayerKernels)} == {
        "triton",
        False,
    }
    assert uniform.merge == "triton"
    assert KernelConfig.coerce({"merge": "torch"}) == KernelConfig(merge="torch")
    assert KernelConfig.coerce(kernels) is kernels


@pytest.mark.parametrize(
    "spec, error, match",
    [
        ("tensorrt", ValueError, "backend for 'attention' must be one of"),
        ({"rotary": "cudnn"}, ValueError, "backend for 'rotary'"),
        ({"layers": {3: {"merge": "torch"}}}, ValueError, r"layers\[3\] has unknown keys"),
        ({"layers": {3: {"norm": "fast"}}}, ValueError, "backend for 'norm'"),
        ({"fuse_mlp_norm": "yes"}, ValueError, "must be a bool"),
        (3, TypeError, "kernels must be"),
    ],
)
def test_bad_kernel_config(spec, error, match):
    with pytest.raises(error, match=match):
        KernelConfig.coerce(spec)


def test_set_kernels_on_live_model():
    model = VisionEncoder(SMALL, kernels="torch")
    model.set_kernels({"attention": "triton", "layers": {1: {"attention": "torch"}}})
    assert [b.kernels.attention for b in model.blocks] == ["triton", "torch", "triton", "triton"]
    assert model.kernels.merge == "auto"
    with pytest.raises(ValueError, match=r"layers \[4\] outside \[0, 4\)"):
        model.set_kernels({"layers": {4: {"norm": "torch"}}})
