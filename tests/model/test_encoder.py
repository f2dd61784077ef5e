"""VisionEncoder against transformers' Qwen2_5_VisionTransformerPretrainedModel on seeded random
weights: batches of images and videos with odd grids, fp32 and bf16, every kernel backend of this
machine, per-layer mixes, the real 7B tower, and torch.compile."""

import dataclasses

import pytest
import torch

import qwen_kernels
from bench.harness import cpu_bf16_sdpa_problem
from qwen_kernels.model import (
    KernelConfig,
    VisionConfig,
    VisionEncoder,
    preprocess_image,
    random_hf_state_dict,
)
from qwen_kernels.model.config import op_backends
from tests.helpers import backends_for, rel_err
from tests.model.reference import (
    DEVICES,
    SMALL,
    device_backends,
    hf_tower,
    random_pixels,
)

# Two images with edge windows on both sides and a 2-temporal-patch video with whole windows only.
BATCH = [(1, 6, 10), (1, 14, 22), (2, 16, 16)]
# Smaller batch for the kernel backends (the Triton interpreter runs programs one by one).
SMALL_BATCH = [(1, 6, 10), (2, 4, 8)]
FP32_TOL = 1e-5


def fp32_tol(device: str) -> float:
    """Relative error allowed in fp32: kernels may sum in another order; on GPUs Triton's dot and
    the kernels' GEMMs may round their inputs to TF32 (10-bit mantissa)."""
    return 5e-5 if device == "cpu" else 5e-3


def _reference(hf_model, pixels, grid):
    """transformers' merged tokens and last hidden state (window order), on the CPU."""
    with torch.no_grad():
        out = hf_model(pixels.cpu(), torch.tensor(grid))
    return out.pooler_output, out.last_hidden_state


@pytest.fixture(scope="module")
def small_weights():
    return random_hf_state_dict(SMALL, seed=1234)


@pytest.fixture(scope="module")
def hf_small(small_weights):
    return hf_tower(SMALL, small_weights)


def test_batch_of_images_and_video_matches_transformers(gen, small_weights, hf_small):
    encoder = VisionEncoder.from_hf_state_dict(small_weights, SMALL, kernels="torch")
    pixels = random_pixels(gen, BATCH)
    expected, expected_hidden = _reference(hf_small, pixels, BATCH)
    with torch.no_grad():
        out, hidden = encoder(pixels, torch.tensor(BATCH), return_hidden=True)
    assert out.shape == (sum(t * h * w for t, h, w in BATCH) // 4, SMALL.out_hidden_size)
    assert rel_err(out, expected) < FP32_TOL
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    # transformers returns the last hidden state in window order; ours is in input order.
    window_order = encoder.layout(BATCH).token_index
    assert rel_err(hidden[window_order], expected_hidden) < FP32_TOL


@pytest.mark.parametrize("grid", [[(1, 2, 2)], [(1, 8, 8)], [(3, 4, 18)]], ids=str)
def test_single_inputs_match_transformers(gen, small_weights, hf_small, grid):
    encoder = VisionEncoder.from_hf_state_dict(small_weights, SMALL, kernels="torch")
    pixels = random_pixels(gen, grid)
    expected, _ = _reference(hf_small, pixels, grid)
    with torch.no_grad():
        assert rel_err(encoder(pixels, grid), expected) < FP32_TOL


@pytest.mark.parametrize("device, backend", device_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_backends_match_transformers(gen, small_weights, device, backend, dtype):
    kernels = KernelConfig.best_effort(backend)
    pixels = random_pixels(gen, SMALL_BATCH).to(device)
    weights = {k: v.to(dtype).float() for k, v in small_weights.items()}
    expected, _ = _reference(hf_tower(SMALL, weights), pixels, SMALL_BATCH)
    encoder = VisionEncoder.from_hf_state_dict(weights, SMALL, kernels, dtype=dtype, device=device)
    with torch.no_grad():
        out = encoder(pixels, SMALL_BATCH)
        encoder.set_kernels("torch")
        eager = encoder(pixels, SMALL_BATCH)
    assert out.dtype == dtype
    out, eager = out.cpu(), eager.cpu()
    if dtype == torch.float32:
        assert rel_err(out, expected) < fp32_tol(device)
    else:
        # Within twice the error of the eager ops in the same dtype (plus bf16 rounding slack).
        assert rel_err(out, expected) <= 2 * rel_err(eager, expected) + 4e-3


def _mixes(device: str) -> list[KernelConfig]:
    """Per-layer mixes: each kernel backend on alternate layers, fused MLP front on some."""
    mixes = []
    for dev, backend in [(device, "torch"), *device_backends()]:
        if dev != device:
            continue
        base = KernelConfig.best_effort(backend)
        fused_mlp = {"fuse_mlp_norm": True, "mlp": KernelConfig.best_effort(backend, True).mlp}
        layers = {
            0: fused_mlp,
            1: dict.fromkeys(("attention", "rotary", "norm", "mlp"), "torch"),
            3: {**fused_mlp, "attention": base.attention},
        }
        mixes.append(dataclasses.replace(base, layers=layers))
    return mixes


@pytest.mark.parametrize("device", DEVICES)
def test_per_layer_mixes_match_transformers(gen, small_weights, device):
    pixels = random_pixels(gen, SMALL_BATCH).to(device)
    expected, _ = _reference(hf_tower(SMALL, small_weights), pixels, SMALL_BATCH)
    encoder = VisionEncoder.from_hf_state_dict(small_weights, SMALL, device=device)
    for kernels in _mixes(device):
        encoder.set_kernels(kernels)
        with torch.no_grad():
            out = encoder(pixels, SMALL_BATCH)
        assert rel_err(out.cpu(), expected) < fp32_tol(device), kernels


def test_fused_mlp_front_folds_its_weights_once_per_version(gen, small_weights):
    """The folded gate/up weight lives with the block's MLP: made on the first fused forward,
    reused after, and made again once a weight it derives from changes in place."""
    pixels = random_pixels(gen, SMALL_BATCH)
    encoder = VisionEncoder.from_hf_state_dict(
        small_weights, SMALL, KernelConfig(fuse_mlp_norm=True)
    )
    block = encoder.blocks[0]
    with torch.no_grad():
        before = encoder(pixels, SMALL_BATCH)
        folded = block.mlp.folded_gate_up(block.norm2.weight)
        encoder(pixels, SMALL_BATCH)
        assert block.mlp.folded_gate_up(block.norm2.weight) is folded
        block.norm2.weight.mul_(2.0)
        refolded = block.mlp.folded_gate_up(block.norm2.weight)
        assert refolded is not folded
        torch.testing.assert_close(refolded, block.mlp.gate_up_proj.weight * block.norm2.weight)
        after = encoder(pixels, SMALL_BATCH)
        encoder.set_kernels("torch")
        unfused = encoder(pixels, SMALL_BATCH)
    assert not torch.equal(before, after)
    assert rel_err(after, unfused) < 1e-5


# A 120-token frame: the full-attention layers take the kernels' long path; windows of 64, 32,
# 16 and 8 tokens.
LONG_FRAME_BATCH = [(1, 10, 12), (2, 4, 8)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_attention_matches_torch(gen, small_weights, device, dtype):
    """Triton attention with the rotary fused in, apart from it, and mixed per layer, against
    the same tower on the reference ops."""
    if "triton" not in backends_for("window_attn", device):
        pytest.skip(f"no Triton on {device} here")
    pixels = random_pixels(gen, LONG_FRAME_BATCH).to(device)
    weights = {k: v.to(dtype).float() for k, v in small_weights.items()}
    expected, _ = _reference(hf_tower(SMALL, weights), pixels, LONG_FRAME_BATCH)
    encoder = VisionEncoder.from_hf_state_dict(weights, SMALL, "torch", dtype=dtype, device=device)
    with torch.no_grad():
        eager = encoder(pixels, LONG_FRAME_BATCH).cpu()
    apart = {"fuse_rotary": False, "rotary": "torch"}
    configs = [
        KernelConfig(attention="triton", rotary="triton"),
        KernelConfig(attention="triton", rotary="torch"),
        KernelConfig(attention="triton", rotary="triton", layers={1: apart}),
    ]
    assert configs[0].for_layer(0).rotary_fused and not configs[1].for_layer(0).rotary_fused
    for kernels in configs:
        encoder.set_kernels(kernels)
        with torch.no_grad():
            out = encoder(pixels, LONG_FRAME_BATCH).cpu()
        assert out.dtype == dtype
        if dtype == torch.float32:
            assert rel_err(out, eager) < fp32_tol(device), kernels
        else:
            assert rel_err(out, expected) <= 1.5 * rel_err(eager, expected) + 1e-3, kernels


def test_bf16_error_is_that_of_transformers_bf16(gen, small_weights):
    if cpu_bf16_sdpa_problem():  # transformers' bf16 tower runs torch's CPU SDPA
        pytest.skip(cpu_bf16_sdpa_problem())
    weights = {k: v.to(torch.bfloat16) for k, v in small_weights.items()}
    pixels = random_pixels(gen, BATCH)
    # Same (bf16-representable) weights in fp32: the error measured is that of the activations.
    expected, _ = _reference(hf_tower(SMALL, weights, dtype=torch.float32), pixels, BATCH)
    hf_bf16, _ = _reference(hf_tower(SMALL, weights, dtype=torch.bfloat16), pixels, BATCH)
    encoder = VisionEncoder.from_hf_state_dict(weights, SMALL, kernels="torch")
    with torch.no_grad():
        out = encoder(pixels, BATCH)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, expected) <= 1.5 * rel_err(hf_bf16, expected)
    assert rel_err(out, expected) < 2e-2


@pytest.fixture(scope="module")
def tower_7b():
    """The real tower's shapes with weights rounded to bf16 (so fp32 and bf16 runs share them),
    a preprocessed 56x84 image, and transformers' fp32 output for it."""
    config = VisionConfig.qwen2_5_vl("7b")
    weights = random_hf_state_dict(config, seed=7, dtype=torch.bfloat16)
    image = torch.randint(0, 256, (56, 84, 3), generator=torch.Generator().manual_seed(7))
    pixels, grid_thw = preprocess_image(image.to(torch.uint8).numpy())
    assert grid_thw.tolist() == [[1, 4, 6]]
    expected, _ = _reference(hf_tower(config, weights), pixels, grid_thw.tolist())
    return config, weights, pixels, grid_thw, expected


# bf16 GEMMs are slow on CPUs without bf16 units: the 7B tower runs bf16 on the GPU only.
@pytest.mark.parametrize(
    "device, dtype",
    [
        ("cpu", torch.float32),
        pytest.param("cuda", torch.float32, marks=pytest.mark.gpu),
        pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu),
    ],
)
def test_7b_tower_on_a_small_image(tower_7b, device, dtype):
    config, weights, pixels, grid_thw, expected = tower_7b
    encoder = VisionEncoder.from_hf_state_dict(weights, config, dtype=dtype, device=device)
    with torch.no_grad():
        out = encoder(pixels.to(device), grid_thw)
    assert out.shape == (6, 3584) and out.dtype == dtype
    tolerance = fp32_tol(device) if dtype == torch.float32 else 2e-2
    assert rel_err(out.cpu(), expected) < tolerance


def test_frozen_encoder_in_grad_mode_is_the_inference_forward(gen, small_weights):
    """Parameters start frozen: in grad mode, with nothing requiring grad, the forward records
    nothing and gives the no_grad result bit for bit."""
    encoder = VisionEncoder.from_hf_state_dict(small_weights, SMALL, kernels="torch")
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not any(p.requires_grad for p in VisionEncoder(SMALL).parameters())
    pixels = random_pixels(gen, SMALL_BATCH)
    assert torch.is_grad_enabled()
    out, hidden = encoder(pixels, SMALL_BATCH, return_hidden=True)
    assert not out.requires_grad and not hidden.requires_grad
    with torch.no_grad():
        expected, expected_hidden = encoder(pixels, SMALL_BATCH, return_hidden=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(hidden, expected_hidden, rtol=0, atol=0)


def test_layout_is_cached_per_grid(small_weights):
    encoder = VisionEncoder.from_hf_state_dict(small_weights, SMALL)
    first = encoder.layout(torch.tensor(BATCH))
    assert encoder.layout(BATCH) is first
    assert encoder.layout(SMALL_BATCH) is not first


def test_wrong_pixel_values_shape(gen, small_weights):
    encoder = VisionEncoder.from_hf_state_dict(small_weights, SMALL)
    pixels = random_pixels(gen, SMALL_BATCH)
    with pytest.raises(ValueError, match=r"pixel_values must be \[T, patch_dim\] = \[124, 1176\]"):
        encoder(pixels[:-4], SMALL_BATCH)


# Triton is left out on the CPU: the interpreter makes a compiled tower cost a minute.
@pytest.mark.parametrize("backend", ["torch", "cuda_emu"])
def test_compiles_to_one_graph(gen, small_weights, backend):
    missing = qwen_kernels._backends.runtime_missing(backend, "cpu")
    if missing:
        pytest.skip(f"{backend} cannot run here: {missing}")
    kernels = KernelConfig.best_effort(backend)
    encoder = VisionEncoder.from_hf_state_dict(small_weights, SMALL, kernels=kernels)
    pixels = random_pixels(gen, SMALL_BATCH)
    layout = encoder.layout(SMALL_BATCH)
    compiled = torch.compile(encoder.encode, fullgraph=True, backend="aot_eager")
    with torch.no_grad(), qwen_kernels.skip_value_checks():
        torch.testing.assert_close(compiled(pixels, layout), encoder.encode(pixels, layout))


@pytest.mark.gpu
def test_forward_does_not_sync_with_the_host(gen, small_weights):
    encoder = VisionEncoder.from_hf_state_dict(small_weights, SMALL, device="cuda")
    pixels = random_pixels(gen, BATCH).cuda()
    with torch.no_grad():
        encoder(pixels, BATCH)  # builds and caches the layout
        torch.cuda.set_sync_debug_mode("error")
        try:
            encoder(pixels, BATCH)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize(
    "device, backend",
    [pair for pair in device_backends() if pair[1] in op_backends("patch_merge")],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_backends_match_the_reference_merge(gen, small_weights, device, backend, dtype):
    """The merger on each kernel backend of patch_merge (everything else on the reference) gives
    the tokens of the reference merger: the merge rows differ at most by the fp32 statistic's
    summation order, which the MLP carries through at the size of one rounding."""
    pixels = random_pixels(gen, SMALL_BATCH).to(device)
    reference = KernelConfig.uniform("torch")
    kernels = dataclasses.replace(reference, merge=backend)
    encoder = VisionEncoder.from_hf_state_dict(
        small_weights, SMALL, kernels, dtype=dtype, device=device
    )
    assert encoder.kernels.merge == backend
    with torch.no_grad():
        out = encoder(pixels, SMALL_BATCH)
        encoder.set_kernels(reference)
        expected = encoder(pixels, SMALL_BATCH)
    assert out.dtype == dtype and out.shape == expected.shape
    assert rel_err(out.cpu(), expected.cpu()) < (1e-6 if dtype == torch.float32 else 1e-3)
