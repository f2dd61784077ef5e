"""VisionConfig presets and conversion from transformers configs; KernelConfig resolution, its
validation against the kernels that exist, and best_effort."""

import dataclasses

import pytest
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLVisionConfig,
)

from qwen_kernels import _backends
from qwen_kernels.model import KernelConfig, LayerKernels, VisionConfig, VisionEncoder
from qwen_kernels.model.config import GROUP_OPS, OP_GROUPS, op_backends
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
        True,
        False,
    }
    assert uniform.merge == "triton"
    assert KernelConfig.coerce({"merge": "torch"}) == KernelConfig(merge="torch")
    assert KernelConfig.coerce(kernels) is kernels


def test_rotary_runs_inside_the_attention_where_it_can():
    """Fused (window_attn_rope) where attention and rotary share a backend that has it, unless
    the layer says fuse_rotary=False; apart otherwise."""
    fused_backends = op_backends("window_attn_rope")
    kernels = KernelConfig(
        attention="triton",
        rotary="triton",
        layers={1: {"fuse_rotary": False}, 2: {"rotary": "torch"}, 3: {"attention": "torch"}},
    )
    assert kernels.for_layer(0).rotary_fused == ("triton" in fused_backends)
    assert not kernels.for_layer(1).rotary_fused
    assert not kernels.for_layer(2).rotary_fused
    assert KernelConfig.uniform("torch").for_layer(3).rotary_fused
    assert KernelConfig().for_layer(0).rotary_fused  # "auto" for both
    with pytest.raises(ValueError, match="fuse_rotary must be a bool"):
        KernelConfig(layers={0: {"fuse_rotary": 1}})


@pytest.mark.usefixtures("pinned_registry")
def test_fused_rotary_needs_the_fused_op(monkeypatch):
    """With a backend that has window_attn_rope, attention and rotary validate against it alone
    (mrope_pos_ may lack that backend); best_effort then gives both groups that backend."""
    kernels = KernelConfig(attention="triton", rotary="triton")
    with pytest.raises(ValueError, match=r"'rotary' runs qwen\.mrope_pos_, which has no 'triton'"):
        VisionEncoder(SMALL, kernels=kernels)
    table = _backends.REGISTRY["window_attn_rope"]
    fused = dataclasses.replace(table, impls=dict.fromkeys(["torch", "triton"], _not_run))
    monkeypatch.setitem(_backends.REGISTRY, "window_attn_rope", fused)
    VisionEncoder(SMALL, kernels=kernels)
    best = KernelConfig.best_effort("triton")
    assert (best.attention, best.rotary, best.norm) == ("triton", "triton", "triton")


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
    model.set_kernels({"norm": "cuda_emu", "layers": {1: {"norm": "torch"}}})
    assert [b.kernels.norm for b in model.blocks] == ["cuda_emu", "torch", "cuda_emu", "cuda_emu"]
    assert model.kernels.merge == "auto"
    with pytest.raises(ValueError, match=r"layers \[4\] outside \[0, 4\)"):
        model.set_kernels({"layers": {4: {"norm": "torch"}}})


def _not_run(*args: object) -> None:
    raise AssertionError("the kernel config tests never run an op")


# The kernels of the ops when these tests were written (the norms and swiglu in every backend,
# the fused MLP front in Triton, attention, rotary and merge in the reference only).
PINNED_BACKENDS = {
    "window_attn": ["torch"],
    "window_attn_rope": ["torch"],
    "mrope_pos_": ["torch"],
    "rms_norm": ["torch", "triton", "cuda", "cuda_emu"],
    "add_rms_norm": ["torch", "triton", "cuda", "cuda_emu"],
    "swiglu": ["torch", "triton", "cuda", "cuda_emu"],
    "rms_norm_swiglu": ["torch", "triton"],
    "patch_merge": ["torch"],
}


@pytest.fixture
def pinned_registry(monkeypatch):
    """The op registry as in PINNED_BACKENDS, whatever kernels have landed since (only the
    backend names are read: the implementations are never called)."""
    for op, backends in PINNED_BACKENDS.items():
        table = dataclasses.replace(_backends.REGISTRY[op], impls=dict.fromkeys(backends, _not_run))
        monkeypatch.setitem(_backends.REGISTRY, op, table)


@pytest.mark.usefixtures("pinned_registry")
@pytest.mark.parametrize(
    "spec, problems",
    [
        (
            {"attention": "cuda"},
            [
                r"layers 0-3: 'attention' runs qwen\.window_attn, which has no 'cuda' kernel "
                r"\(it has: torch\)"
            ],
        ),
        (
            {"attention": "cuda", "layers": {1: {"attention": "torch"}}},
            [r"layers 0, 2-3: 'attention' runs qwen\.window_attn, which has no 'cuda' kernel"],
        ),
        (
            {"layers": {2: {"mlp": "cuda", "fuse_mlp_norm": True}}},
            [
                r"layer 2: 'mlp' runs qwen\.rms_norm_swiglu, which has no 'cuda' kernel "
                r"\(it has: torch, triton\)"
            ],
        ),
        ({"merge": "triton"}, [r"merger: 'merge' runs qwen\.patch_merge, which has no 'triton'"]),
    ],
)
def test_kernels_without_code_are_refused_up_front(spec, problems):
    model = VisionEncoder(SMALL, kernels="torch")
    for match in problems:
        with pytest.raises(ValueError, match=match):
            model.set_kernels(spec)
        with pytest.raises(ValueError, match=match):
            VisionEncoder(SMALL, kernels=spec)
    assert model.kernels == KernelConfig.uniform("torch")  # unchanged by the refused configs


@pytest.mark.usefixtures("pinned_registry")
def test_best_effort():
    assert KernelConfig.best_effort("cuda") == KernelConfig(norm="cuda", mlp="cuda")
    assert KernelConfig.best_effort("triton") == KernelConfig(norm="triton", mlp="triton")
    assert KernelConfig.best_effort("cuda", fuse_mlp_norm=True).mlp == "auto"
    assert KernelConfig.best_effort("triton", fuse_mlp_norm=True) == KernelConfig(
        norm="triton", mlp="triton", fuse_mlp_norm=True
    )
    assert KernelConfig.best_effort("torch") == KernelConfig.uniform("torch")
    assert KernelConfig.best_effort("auto") == KernelConfig()
    with pytest.raises(ValueError, match="must be one of"):
        KernelConfig.best_effort("tensorrt")


@pytest.mark.parametrize("backend", _backends.BACKENDS)
def test_plain_backend_names_are_all_or_nothing(backend):
    """A plain name means that backend everywhere: it is accepted exactly when every op has it,
    and its best_effort config always is."""
    complete = all(backend in op_backends(op) for ops in GROUP_OPS.values() for op in ops)
    model = VisionEncoder(SMALL, kernels="torch")
    if complete:
        model.set_kernels(backend)
    else:
        with pytest.raises(ValueError, match=f"no {backend!r} kernel"):
            model.set_kernels(backend)
    model.set_kernels(KernelConfig.best_effort(backend))
    assert {getattr(model.kernels, g) for g in OP_GROUPS} <= {backend, "auto"}


def test_tiny_preset_keeps_the_real_attention_shape():
    tiny, real = VisionConfig.tiny(), VisionConfig.qwen2_5_vl("7b")
    assert tiny.hidden_size // tiny.num_heads == real.hidden_size // real.num_heads == 80
    assert tiny.window_size == real.window_size and tiny.spatial_merge_size == 2
    assert tiny.depth == 4 and tuple(tiny.fullatt_block_indexes) == (1, 3)
