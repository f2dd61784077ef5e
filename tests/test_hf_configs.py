"""qwen_kernels.hf.patch_qwen2_5_vl on the tiny configurations transformers' own Qwen2.5-VL model
tests build (vision hidden 32 with 4 heads: head_dim 8; spatial_merge_size 1; one-patch images;
text head_dim 8 with mrope_section [2, 1, 1]), and on the same with a 2x2 merge: every backend
that can take the shapes gives the unpatched outputs (images, a video, a batch with left padding,
greedy and beam generate, hidden states, save/load, resized embeddings), and one that cannot is
refused at patch time, before anything is replaced."""

import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

import qwen_kernels
from bench.bench_host import CountQwenOps
from qwen_kernels.hf import patch_qwen2_5_vl
from qwen_kernels.model import KernelConfig
from tests.helpers import rel_err

PAD, BOS, EOS, VISION_START, IMAGE, VIDEO = 2, 0, 1, 3, 4, 5
BATCH = 3
# fp32 runs of the same math in another summation order differ by about 1e-7.
FP32_TOL = 2e-6


def tiny_config(merge_size: int) -> Qwen2_5_VLConfig:
    """transformers' test config (tests/models/qwen2_5_vl/test_modeling_qwen2_5_vl.py), with the
    given spatial merge size."""
    vision = {
        "depth": 2,
        "in_chans": 3,
        "hidden_act": "silu",
        "intermediate_size": 32,
        "out_hidden_size": 32,
        "hidden_size": 32,
        "num_heads": 4,
        "patch_size": 14,
        "spatial_patch_size": 14,
        "spatial_merge_size": merge_size,
        "temporal_patch_size": 2,
    }
    text = {
        "vocab_size": 99,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1e4},
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        "tie_word_embeddings": True,
    }
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VISION_START,
    )


@pytest.fixture(scope="module", params=[1, 2], ids=["merge1", "merge2"])
def model(request):
    torch.manual_seed(4321 + request.param)
    return Qwen2_5_VLForConditionalGeneration(tiny_config(request.param)).eval()


def _grid(model, frames: int = 1) -> tuple[int, int, int]:
    """The smallest grid the merge allows: one patch (merge 1), one 2x2 unit (merge 2)."""
    side = model.config.vision_config.spatial_merge_size
    return (frames, side, side)


def _prompt(gen, tokens: int, token: int, length: int = 7) -> torch.Tensor:
    """Random text with a vision block (start token, then ``tokens`` placeholders) inside."""
    ids = torch.randint(6, 99, (length + tokens,), generator=gen)
    ids[2] = VISION_START
    ids[3 : 3 + tokens] = token
    return ids


def image_batch(gen, model, left_padding: int = 0) -> dict:
    """BATCH prompts with one smallest image each; the first ``left_padding`` positions of the
    first prompt are padding (masked out), as a batch of unequal prompts is."""
    grid = _grid(model)
    patches = grid[0] * grid[1] * grid[2]
    merged = patches // model.config.vision_config.spatial_merge_size**2
    ids = torch.stack([_prompt(gen, merged, IMAGE) for _ in range(BATCH)])
    mask = torch.ones_like(ids)
    if left_padding:
        ids = torch.cat([torch.full((BATCH, left_padding), PAD), ids], dim=1)
        mask = torch.cat([torch.zeros(BATCH, left_padding, dtype=mask.dtype), mask], dim=1)
        mask[1:, :left_padding] = 1  # only the first prompt is padded; the others hold text
        ids[1:, :left_padding] = 7
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.randn(BATCH * patches, 3 * 2 * 14 * 14, generator=gen),
        "image_grid_thw": torch.tensor([grid] * BATCH),
    }


def video_batch(gen, model) -> dict:
    grid = _grid(model, frames=2)
    patches = grid[0] * grid[1] * grid[2]
    merged = patches // model.config.vision_config.spatial_merge_size**2
    ids = torch.stack([_prompt(gen, merged, VIDEO) for _ in range(BATCH)])
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values_videos": torch.randn(BATCH * patches, 3 * 2 * 14 * 14, generator=gen),
        "video_grid_thw": torch.tensor([grid] * BATCH),
        "second_per_grid_ts": torch.tensor([1.0] * BATCH),
    }


def _outputs(model, inputs) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    return out.logits, out.hidden_states


def _patched(model, kernels, run):
    handle = patch_qwen2_5_vl(model, kernels)
    try:
        return run()
    finally:
        handle.unpatch()


def _backends() -> list:
    """ "auto", "torch" and the kernel backends of this machine that hold head_dim 8 (Triton)."""
    params = [pytest.param("auto", id="auto"), pytest.param("torch", id="torch")]
    missing = qwen_kernels._backends.runtime_missing("triton", "cpu")
    marks = [pytest.mark.skip(reason=f"triton cannot run here: {missing}")] if missing else []
    params.append(pytest.param("triton", marks=marks, id="triton"))
    return params


def _kernels(backend: str) -> KernelConfig:
    return KernelConfig.best_effort(backend)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("inputs", [image_batch, video_batch], ids=["image", "video"])
def test_patched_outputs_match(gen, model, backend, inputs):
    batch = inputs(gen, model)
    logits, hidden = _outputs(model, batch)
    with CountQwenOps() as counter:
        patched_logits, patched_hidden = _patched(
            model, _kernels(backend), lambda: _outputs(model, batch)
        )
    # The tower and the text rotary really ran the qwen ops.
    assert counter.counts["patch_merge"] == 1 and counter.counts["mrope"] == 2
    assert counter.counts["window_attn_rope"] + counter.counts["window_attn"] == 2
    assert patched_logits.shape == logits.shape
    assert rel_err(patched_logits, logits) < FP32_TOL
    assert len(patched_hidden) == len(hidden)
    for ours, theirs in zip(patched_hidden, hidden, strict=True):
        assert rel_err(ours, theirs) < FP32_TOL


@pytest.mark.parametrize("op", ["patch_merge", "window_attn_rope", "mrope"])
def test_a_slightly_wrong_op_is_caught(gen, model, monkeypatch, op):
    """The comparisons above fail when one op's output is off by 1e-3: the tolerance sees it on
    these tiny widths too."""
    right = getattr(qwen_kernels, op)

    def wrong(*args, **kwargs):
        out = right(*args, **kwargs)
        return tuple(t * 1.001 for t in out) if isinstance(out, tuple) else out * 1.001

    monkeypatch.setattr(qwen_kernels, op, wrong)
    batch = image_batch(gen, model)
    logits, _ = _outputs(model, batch)
    patched, _ = _patched(model, "torch", lambda: _outputs(model, batch))
    assert rel_err(patched, logits) > FP32_TOL


@pytest.mark.parametrize("backend", _backends())
def test_left_padded_batch(gen, model, backend):
    batch = image_batch(gen, model, left_padding=3)
    logits, _ = _outputs(model, batch)
    patched, _ = _patched(model, _kernels(backend), lambda: _outputs(model, batch))
    keep = batch["attention_mask"].bool()  # padded positions are not compared
    assert rel_err(patched[keep], logits[keep]) < FP32_TOL


@pytest.mark.parametrize("beams", [1, 2], ids=["greedy", "beam"])
def test_generate_gives_the_same_tokens(gen, model, beams):
    batch = image_batch(gen, model, left_padding=2)
    settings = {"max_new_tokens": 4, "do_sample": False, "num_beams": beams, "pad_token_id": PAD}
    expected = model.generate(**batch, **settings)
    out = _patched(model, "auto", lambda: model.generate(**batch, **settings))
    assert torch.equal(out, expected)


def test_save_load_and_resized_embeddings(gen, model, tmp_path):
    """A model saved and loaded again, and one with its embeddings resized, patch like the
    original: the patch reads the modules' own weights."""
    model.save_pretrained(tmp_path)
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = image_batch(gen, model)
    expected, _ = _outputs(model, batch)
    patched, _ = _patched(loaded, "torch", lambda: _outputs(loaded, batch))
    assert rel_err(patched, expected) < FP32_TOL
    loaded.resize_token_embeddings(120)
    resized, _ = _outputs(loaded, batch)
    assert resized.shape[-1] == 120
    patched, _ = _patched(loaded, "auto", lambda: _outputs(loaded, batch))
    assert rel_err(patched, resized) < FP32_TOL


def test_a_backend_that_cannot_take_the_head_dim_is_refused_at_patch_time(model):
    """The emulated CUDA kernels hold the build's head dims, not 8: refused when patching, with
    the op, the head dim and what the kernels hold, and nothing is replaced."""
    missing = qwen_kernels._backends.runtime_missing("cuda_emu", "cpu")
    if missing:
        pytest.skip(f"cuda_emu cannot run here: {missing}")
    forwards = {name: m.__dict__.get("forward") for name, m in model.named_modules()}
    match = (
        r"'attention' runs qwen\.window_attn(_rope)? on 'cuda_emu' over heads of head_dim 8, which "
        r"it cannot take: its kernels hold head dims 64, 80, 128, not 8"
    )
    for kernels in ("cuda_emu", KernelConfig(layers={1: {"attention": "cuda_emu"}})):
        with pytest.raises(ValueError, match=match):
            patch_qwen2_5_vl(model, kernels)
        assert {name: m.__dict__.get("forward") for name, m in model.named_modules()} == forwards
    # The groups whose kernels take the shape can still run them.
    handle = patch_qwen2_5_vl(
        model, KernelConfig(norm="cuda_emu", mlp="cuda_emu", merge="cuda_emu")
    )
    handle.unpatch()


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("inputs", [image_batch, video_batch], ids=["image", "video"])
def test_gradients_match(gen, model, backend, inputs):
    """The training path holds on these configs too: every parameter's gradient of the LM loss
    is the unpatched model's (head_dim 8 in the tower and the text model, merge 1 and 2)."""
    batch = inputs(gen, model)

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model.train()
        try:
            model(**batch, labels=batch["input_ids"]).loss.backward()
        finally:
            model.eval()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    expected = gradients()
    got = _patched(model, _kernels(backend), gradients)
    model.zero_grad(set_to_none=True)
    assert got.keys() == expected.keys() and got
    for name, grad in got.items():
        assert rel_err(grad, expected[name]) < 1e-4, name
