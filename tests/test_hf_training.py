"""A patched transformers Qwen2.5-VL trains like the unpatched one: ``loss.backward()`` gives the
unpatched model's gradient for every parameter (fp32, an image and a video), with the vision
tower trained or frozen, only some parameters requiring grad (as LoRA does), gradient
checkpointing, and 20 optimizer steps of fine-tuning with the unpatched losses."""

import copy

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

import qwen_kernels
from qwen_kernels.hf import patch_qwen2_5_vl
from tests.helpers import rel_err
from tests.test_hf import image_inputs, tiny_config, video_inputs

# fp32 gradients through a few layers, summed in other orders by the kernels.
GRAD_TOL = 1e-4
LOSS_TOL = 1e-5


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(4321)
    return Qwen2_5_VLForConditionalGeneration(tiny_config())


def lora_like(model) -> None:
    """Only the attention projections of q and v (text) and the vision qkv learn."""
    for name, param in model.named_parameters():
        param.requires_grad_(any(key in name for key in ("q_proj", "v_proj", "attn.qkv")))


def freeze_vision(model) -> None:
    for param in model.model.visual.parameters():
        param.requires_grad_(False)


SETTINGS = {
    "all": lambda model: None,
    "vision frozen": freeze_vision,
    "some parameters": lora_like,
    "checkpointing": lambda model: model.gradient_checkpointing_enable(),
}


def gradients(model, inputs) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    return float(loss), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def pair(base_model, setting: str):
    """(unpatched, patched-to-be) copies of the model in train mode with ``setting`` applied."""
    models = [copy.deepcopy(base_model).train() for _ in range(2)]
    for model in models:
        SETTINGS[setting](model)
    return models


def _backends() -> list:
    params = []
    for backend in ("torch", "triton", "cuda_emu"):
        missing = qwen_kernels._backends.runtime_missing(backend, "cpu")
        marks = [pytest.mark.skip(reason=f"{backend} cannot run here: {missing}")] * bool(missing)
        params.append(pytest.param(backend, marks=marks))
    return params


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("inputs", [image_inputs, video_inputs], ids=["image", "video"])
def test_gradients_match_the_unpatched_model(gen, base_model, setting, inputs):
    inputs = inputs(gen)
    unpatched, patched = pair(base_model, setting)
    expected_loss, expected = gradients(unpatched, inputs)
    handle = patch_qwen2_5_vl(patched, "torch")
    try:
        loss, got = gradients(patched, inputs)
    finally:
        handle.unpatch()
    assert abs(loss - expected_loss) <= LOSS_TOL * abs(expected_loss)
    assert got.keys() == expected.keys() and got
    for name, grad in got.items():
        assert (grad is None) == (expected[name] is None), name
        if grad is not None:
            assert rel_err(grad, expected[name]) < GRAD_TOL, name


@pytest.mark.parametrize("backend", _backends())
def test_kernel_backends_train(gen, base_model, backend):
    """The patched model on each backend's kernels and backward kernels (Triton's through the
    interpreter, CUDA's through the emulation), the others from "auto"."""
    inputs = image_inputs(gen)
    unpatched, patched = pair(base_model, "all")
    _, expected = gradients(unpatched, inputs)
    handle = patch_qwen2_5_vl(patched, qwen_kernels.model.KernelConfig.best_effort(backend))
    try:
        _, got = gradients(patched, inputs)
    finally:
        handle.unpatch()
    for name, grad in got.items():
        assert rel_err(grad, expected[name]) < GRAD_TOL, name


def test_twenty_steps_of_fine_tuning_give_the_unpatched_losses(gen, base_model):
    inputs = {**image_inputs(gen)}
    unpatched, patched = pair(base_model, "all")
    handle = patch_qwen2_5_vl(patched, "torch")
    losses = {}
    try:
        for name, model in (("unpatched", unpatched), ("patched", patched)):
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            losses[name] = []
            for _ in range(20):
                optimizer.zero_grad()
                loss = model(**inputs, labels=inputs["input_ids"]).loss
                loss.backward()
                optimizer.step()
                losses[name].append(float(loss))
    finally:
        handle.unpatch()
    assert losses["patched"][-1] < losses["patched"][0]  # it learns
    for step, (got, expected) in enumerate(
        zip(losses["patched"], losses["unpatched"], strict=True)
    ):
        assert abs(got - expected) <= 1e-4 * abs(expected), (step, got, expected)
