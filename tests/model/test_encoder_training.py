"""VisionEncoder trains: gradients of the pixels and of every parameter against transformers' tower
on the same weights (fp32), on every CPU backend with backward kernels, with activation
checkpointing, under torch.compile, and nothing recorded under no_grad or inference_mode."""

import dataclasses

import pytest
import torch

import qwen_kernels
from qwen_kernels.model import KernelConfig, VisionEncoder, random_hf_state_dict
from qwen_kernels.model.weights import convert_hf_state_dict
from tests.helpers import rel_err
from tests.model.reference import SMALL, hf_tower, random_pixels

GRID = [(1, 6, 10), (2, 4, 8)]
# fp32 gradients summed in other orders, through 4 blocks and the merger.
GRAD_TOL = 1e-4


@pytest.fixture(scope="module")
def weights():
    return random_hf_state_dict(SMALL, seed=99)


def trainable_encoder(weights, kernels) -> VisionEncoder:
    copies = {k: v.clone() for k, v in weights.items()}  # the fixture's tensors stay frozen
    return VisionEncoder.from_hf_state_dict(copies, SMALL, kernels=kernels).train().requires_grad_()


def hf_gradients(weights, pixels, grid, weight_of_output):
    """transformers' pixel gradient and parameter gradients in the encoder's layout."""
    model = hf_tower(SMALL, {k: v.clone() for k, v in weights.items()}).requires_grad_()
    pixels = pixels.clone().requires_grad_()
    out = model(pixels, torch.tensor(grid)).pooler_output
    (out * weight_of_output).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return pixels.grad, convert_hf_state_dict(grads, SMALL)


def encoder_gradients(encoder, pixels, grid, weight_of_output, step=None):
    pixels = pixels.clone().requires_grad_()
    run = step or encoder
    (run(pixels, grid) * weight_of_output).sum().backward()
    return pixels.grad, {name: p.grad for name, p in encoder.named_parameters()}


def assert_gradients_match(ours, expected) -> None:
    pixel_grad, grads = ours
    expected_pixel_grad, expected_grads = expected
    assert rel_err(pixel_grad, expected_pixel_grad) < GRAD_TOL
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert grad is not None, f"{name} got no gradient"
        assert rel_err(grad, expected_grads[name]) < GRAD_TOL, name


def _backends() -> list:
    params = []
    for backend in ("torch", "triton", "cuda_emu"):
        missing = qwen_kernels._backends.runtime_missing(backend, "cpu")
        marks = [pytest.mark.skip(reason=f"{backend} cannot run here: {missing}")] * bool(missing)
        params.append(pytest.param(backend, marks=marks))
    return params


@pytest.mark.parametrize("backend", _backends())
def test_gradients_match_transformers(gen, weights, backend):
    """Every parameter and the pixels, with the MLP front fused (it takes the norm weight
    unfolded where a gradient is needed)."""
    pixels = random_pixels(gen, GRID)
    weight_of_output = torch.randn(sum(t * h * w for t, h, w in GRID) // 4, 96, generator=gen)
    expected = hf_gradients(weights, pixels, GRID, weight_of_output)
    fused_mlp = (
        backend if backend in qwen_kernels._backends.REGISTRY["rms_norm_swiglu"].impls else "auto"
    )
    kernels = dataclasses.replace(
        KernelConfig.best_effort(backend), fuse_mlp_norm=True, mlp=fused_mlp
    )
    encoder = trainable_encoder(weights, kernels)
    assert all(block.kernels.fuse_mlp_norm for block in encoder.blocks)
    assert_gradients_match(encoder_gradients(encoder, pixels, GRID, weight_of_output), expected)


def test_unfused_layers_and_checkpointing_give_the_same_gradients(gen, weights):
    """Blocks that run the rotary apart from the attention (out of place where a gradient is
    needed), each recomputed in the backward (activation checkpointing)."""
    pixels = random_pixels(gen, GRID)
    weight_of_output = torch.randn(sum(t * h * w for t, h, w in GRID) // 4, 96, generator=gen)
    expected = hf_gradients(weights, pixels, GRID, weight_of_output)
    unfused = dataclasses.replace(KernelConfig.uniform("torch"), fuse_rotary=False)
    encoder = trainable_encoder(weights, unfused)
    assert not any(block.kernels.rotary_fused for block in encoder.blocks)
    encoder.gradient_checkpointing = True
    assert_gradients_match(encoder_gradients(encoder, pixels, GRID, weight_of_output), expected)


def test_compiled_training_step_matches_eager(gen, weights):
    pixels = random_pixels(gen, GRID)
    weight_of_output = torch.randn(sum(t * h * w for t, h, w in GRID) // 4, 96, generator=gen)
    encoder = trainable_encoder(weights, "torch")
    eager = encoder_gradients(encoder, pixels, GRID, weight_of_output)
    encoder.zero_grad()
    layout = encoder.layout(GRID)
    compiled = torch.compile(encoder.encode, fullgraph=True, backend="aot_eager")

    def step(pixels, grid):
        with qwen_kernels.skip_value_checks():
            return compiled(pixels, layout)

    assert_gradients_match(
        encoder_gradients(encoder, pixels, GRID, weight_of_output, step=step), eager
    )


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_no_grad_and_inference_mode_record_nothing(gen, weights, mode):
    """A trainable encoder run under no_grad or inference_mode is the inference forward."""
    encoder = trainable_encoder(weights, "torch")
    pixels = random_pixels(gen, GRID)
    with mode():
        out = encoder(pixels, GRID)
    assert out.grad_fn is None and not out.requires_grad
    frozen = VisionEncoder.from_hf_state_dict(weights, SMALL, kernels="torch")
    with torch.no_grad():
        torch.testing.assert_close(out, frozen(pixels, GRID), rtol=0, atol=0)
