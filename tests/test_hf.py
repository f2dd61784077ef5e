"""qwen_kernels.hf.patch_qwen2_5_vl on a tiny random transformers Qwen2.5-VL (text + vision):
same logits and generated tokens patched and unpatched on an image and a video, the patched tower
against VisionEncoder, exact restoration by unpatch, the qwen ops really running (counted), the
kernel backends of this machine, and clear errors for models it does not know."""

import dataclasses

import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLAttention

import qwen_kernels
from bench.bench_host import CountQwenOps
from qwen_kernels.hf import patch_qwen2_5_vl
from qwen_kernels.model import KernelConfig, LayerKernels, VisionConfig, VisionEncoder
from tests.helpers import rel_err

# Real head_dim (80), windows and merge; block 1 attends over whole frames.
VISION = VisionConfig(
    depth=3,
    hidden_size=160,
    num_heads=2,
    intermediate_size=224,
    out_hidden_size=64,
    fullatt_block_indexes=(1,),
)
TEXT_LAYERS = 2
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 10, 11, 8, 9
# An image wider than one 8x8-patch window (edge windows on both axes) and a 2-frame video.
IMAGE_GRID = (1, 10, 12)
VIDEO_GRID = (2, 4, 8)
# Clean runs differ by about 3e-7 (summation order); scaling one attention output by 1.001
# already gives 3e-5.
FP32_TOL = 2e-6


def tiny_config() -> Qwen2_5_VLConfig:
    text = {
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": TEXT_LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        # head_dim 16: the M-RoPE bands (t, h, w) cover its 8 frequencies.
        "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4},
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=VISION.to_hf_dict(),
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1234)
    return Qwen2_5_VLForConditionalGeneration(tiny_config()).eval()


def _tokens(grid: tuple[int, int, int]) -> int:
    t, h, w = grid
    return t * h * w // 4


def image_inputs(gen: torch.Generator) -> dict:
    ids = [1, 20, VISION_START, *[IMAGE_TOKEN] * _tokens(IMAGE_GRID), VISION_END, 30, 31, 32]
    return {
        "input_ids": torch.tensor([ids]),
        "pixel_values": torch.randn(4 * _tokens(IMAGE_GRID), 1176, generator=gen),
        "image_grid_thw": torch.tensor([IMAGE_GRID]),
    }


def video_inputs(gen: torch.Generator) -> dict:
    ids = [1, VISION_START, *[VIDEO_TOKEN] * _tokens(VIDEO_GRID), VISION_END, 40, 41]
    return {
        "input_ids": torch.tensor([ids]),
        "pixel_values_videos": torch.randn(4 * _tokens(VIDEO_GRID), 1176, generator=gen),
        "video_grid_thw": torch.tensor([VIDEO_GRID]),
    }


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _instance_forwards(model) -> dict[str, object]:
    return {name: m.__dict__.get("forward") for name, m in model.named_modules()}


@pytest.mark.parametrize("inputs", [image_inputs, video_inputs], ids=["image", "video"])
def test_patched_logits_match_and_unpatch_restores(gen, model, inputs):
    inputs = inputs(gen)
    expected = _logits(model, inputs)
    handle = patch_qwen2_5_vl(model, "torch")
    try:
        patched = _logits(model, inputs)
    finally:
        handle.unpatch()
    assert patched.shape == expected.shape
    assert rel_err(patched, expected) < FP32_TOL
    torch.testing.assert_close(_logits(model, inputs), expected, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["window_attn_rope", "swiglu", "mrope"])
def test_a_slightly_wrong_op_is_caught(gen, model, monkeypatch, op):
    """The comparison above fails when one op's output is off by 1e-3 (vision attention, MLP,
    text rotary): the tolerance is tight enough to see it."""
    right = getattr(qwen_kernels, op)

    def wrong(*args, **kwargs):
        out = right(*args, **kwargs)
        return tuple(t * 1.001 for t in out) if isinstance(out, tuple) else out * 1.001

    monkeypatch.setattr(qwen_kernels, op, wrong)
    inputs = image_inputs(gen)
    expected = _logits(model, inputs)
    handle = patch_qwen2_5_vl(model, "torch")
    try:
        assert rel_err(_logits(model, inputs), expected) > FP32_TOL
    finally:
        handle.unpatch()


def test_patched_forward_runs_the_qwen_ops(gen, model):
    inputs = image_inputs(gen)
    handle = patch_qwen2_5_vl(model, "torch")
    try:
        with CountQwenOps() as counter:
            _logits(model, inputs)
    finally:
        handle.unpatch()
    # The rotary and the attention run as one op (window_attn_rope) where the backend has it.
    per_block = ("rms_norm", "add_rms_norm", "window_attn_rope", "swiglu")
    expected = {op: VISION.depth for op in per_block}
    expected |= {"patch_merge": 1, "mrope": TEXT_LAYERS}
    assert dict(counter.counts) == expected
    with CountQwenOps() as counter:
        _logits(model, inputs)
    assert not counter.counts  # unpatched: transformers' own code only


def test_generate_gives_the_same_tokens(gen, model):
    inputs = image_inputs(gen)
    settings = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    expected = model.generate(**inputs, **settings)
    with CountQwenOps() as counter:
        handle = patch_qwen2_5_vl(model, "torch")
        try:
            out = model.generate(**inputs, **settings)
        finally:
            handle.unpatch()
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert torch.equal(out, expected)
    # The tower runs once; the text rotary runs in the prefill and every decoding step.
    assert counter.counts["patch_merge"] == 1
    assert counter.counts["mrope"] >= 2 * TEXT_LAYERS


def test_patched_tower_matches_vision_encoder(gen, model):
    tower = model.model.visual
    grid = [IMAGE_GRID, VIDEO_GRID]
    pixels = torch.randn(sum(4 * _tokens(g) for g in grid), 1176, generator=gen)
    encoder = VisionEncoder.from_hf_state_dict(
        tower.state_dict(), VisionConfig.from_hf(tower.config), kernels="torch"
    )
    handle = patch_qwen2_5_vl(tower, "torch")
    try:
        with torch.no_grad():
            out = tower(pixels, torch.tensor(grid)).pooler_output
            expected = encoder(pixels, grid)
    finally:
        handle.unpatch()
    assert out.shape == expected.shape == (sum(_tokens(g) for g in grid), 64)
    assert rel_err(out, expected) < FP32_TOL


def test_unpatch_restores_the_exact_forwards(gen, model):
    tower = model.model.visual
    # An instance forward set before the patch (e.g. by a hook library) comes back as it was.
    custom = tower.blocks[0].mlp.forward
    tower.blocks[0].mlp.forward = custom
    classes = {type(m): type(m).forward for m in model.modules()}
    before = _instance_forwards(model)
    try:
        handle = patch_qwen2_5_vl(model, "torch")
        assert handle.active and len(handle.modules) == 3 * VISION.depth + 2 + TEXT_LAYERS
        for module in handle.modules:
            assert module.__dict__["forward"] is not before[_name(model, module)]
        # Only instances change: transformers' classes keep their code.
        assert {type(m): type(m).forward for m in model.modules()} == classes
        for part in (model, model.model, tower):
            with pytest.raises(ValueError, match="already patched"):
                patch_qwen2_5_vl(part, "torch")
        handle.unpatch()
        assert not handle.active
        after = _instance_forwards(model)
        assert after == before
        assert all(after[n] is before[n] for n in before)
        assert tower.blocks[0].mlp.__dict__["forward"] is custom
        handle.unpatch()  # a second unpatch changes nothing
        assert _instance_forwards(model) == before
    finally:
        del tower.blocks[0].mlp.forward


def test_accelerate_hooks_keep_working(gen, model):
    """Under an accelerate hook (its ``forward`` calls ``_old_forward``) the patch replaces
    ``_old_forward``: the hook still runs, around the qwen ops, and comes back intact."""
    block = model.model.visual.blocks[0]
    original, calls = block.forward, []

    def hooked_forward(*args, **kwargs):
        calls.append(1)
        return block._old_forward(*args, **kwargs)

    block._hf_hook, block._old_forward, block.forward = object(), original, hooked_forward
    try:
        inputs = image_inputs(gen)
        expected = _logits(model, inputs)
        handle = patch_qwen2_5_vl(model, "torch")
        assert block.forward is hooked_forward and block._old_forward is not original
        with CountQwenOps() as counter:
            patched = _logits(model, inputs)
        handle.unpatch()
        assert block.forward is hooked_forward and block._old_forward is original
        assert len(calls) == 2 and counter.counts["rms_norm"] == VISION.depth
        assert rel_err(patched, expected) < FP32_TOL
    finally:
        del block._hf_hook, block._old_forward, block.forward


def _name(root, module) -> str:
    return next(n for n, m in root.named_modules() if m is module)


def _kernel_configs() -> list:
    configs = []
    for backend in ("cuda_emu", "triton"):
        missing = qwen_kernels._backends.runtime_missing(backend, "cpu")
        mark = pytest.mark.skip(reason=f"{backend} cannot run here: {missing}") if missing else ()
        configs.append(pytest.param(backend, marks=mark, id=backend))
    return configs


@pytest.mark.parametrize("backend", _kernel_configs())
def test_kernel_backends_on_the_patched_model(gen, model, backend):
    """Every group whose ops have ``backend`` kernels runs them; the rest stay on "auto"."""
    kernels = KernelConfig.best_effort(backend)
    assert backend in (kernels.norm, kernels.rotary, kernels.mlp)
    # Small inputs: the Triton interpreter runs one program at a time.
    inputs = video_inputs(gen)
    expected = _logits(model, inputs)
    handle = patch_qwen2_5_vl(model, kernels)
    try:
        patched = _logits(model, inputs)
    finally:
        handle.unpatch()
    assert rel_err(patched, expected) < FP32_TOL


def test_per_layer_kernels(gen, model):
    """Each block runs the backends its KernelConfig layer names (seen in the ops' arguments)."""
    kernels = KernelConfig(layers={1: {"attention": "torch", "norm": "torch"}})
    handle = patch_qwen2_5_vl(model, kernels)
    try:
        with CountQwenOps() as counter:
            assert _logits(model, image_inputs(gen)).isfinite().all()
    finally:
        handle.unpatch()
    assert counter.backends["rms_norm", "auto"] == VISION.depth - 1
    assert counter.backends["rms_norm", "torch"] == 1
    assert counter.backends["window_attn", "torch"] == 1
    assert counter.backends["swiglu", "auto"] == VISION.depth
    with pytest.raises(ValueError, match=r"layers\[5\]|outside \[0, 3\)"):
        patch_qwen2_5_vl(model, KernelConfig(layers={5: {"norm": "torch"}}))
    with pytest.raises(ValueError, match="fuse_mlp_norm is set for blocks \\[2\\]"):
        patch_qwen2_5_vl(model, KernelConfig(layers={2: {"fuse_mlp_norm": True}}))
    assert all(f is None for f in _instance_forwards(model).values())


def test_rotary_backends_the_table_forms_lack_are_refused(model, monkeypatch):
    """The patch runs the table rotaries (transformers passes cos/sin), which the encoder's
    config check does not cover: a rotary backend one of them lacks is refused before anything
    is replaced."""
    table = qwen_kernels._backends.REGISTRY["mrope_"]
    without_triton = {b: impl for b, impl in table.impls.items() if b != "triton"}
    monkeypatch.setitem(
        qwen_kernels._backends.REGISTRY, "mrope_", dataclasses.replace(table, impls=without_triton)
    )
    kernels = KernelConfig(layers={1: {"rotary": "triton", "fuse_rotary": False}})
    with pytest.raises(ValueError, match=r"'rotary' = 'triton' runs qwen\.mrope_ here"):
        patch_qwen2_5_vl(model, kernels)
    assert all(f is None for f in _instance_forwards(model).values())


def test_unknown_models_are_refused(model):
    with pytest.raises(ValueError, match=r"expected a Qwen2_5_VLForConditionalGeneration.*Linear"):
        patch_qwen2_5_vl(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="transformers 5"):
        patch_qwen2_5_vl(model.model.language_model)


def test_other_module_layouts_are_refused(model):
    """A module laid out unlike the known transformers versions is named, and nothing is patched."""
    qkv = model.model.visual.blocks[2].attn.qkv
    del model.model.visual.blocks[2].attn.qkv
    try:
        with pytest.raises(ValueError, match=r"visual\.blocks\[2\]\.attn .* lacks \['qkv'\]"):
            patch_qwen2_5_vl(model)
    finally:
        model.model.visual.blocks[2].attn.qkv = qkv

    class OtherAttention(Qwen2_5_VLAttention):
        def forward(self, hidden_states, **kwargs):
            return hidden_states, None

    attn = model.model.language_model.layers[1].self_attn
    attn.__class__ = OtherAttention
    try:
        with pytest.raises(ValueError, match=r"layers\[1\]\.self_attn\.forward must call"):
            patch_qwen2_5_vl(model)
    finally:
        attn.__class__ = Qwen2_5_VLAttention
    assert all(f is None for f in _instance_forwards(model).values())


def test_fused_rotary_attention_where_the_config_asks(gen, model, monkeypatch):
    """Where the package has ``window_attn_rope`` and a layer's config fuses the rotary
    (``LayerKernels.rotary_fused``, which come together from the fused-rotary change), the
    attention calls it with the window-ordered positions; here a stand-in composed of
    ``mrope_pos`` and ``window_attn`` (its definition) plays the op."""
    calls = []

    def window_attn_rope(qkv, cu, max_seqlen, positions, inv_freq, section, scale, backend):
        calls.append(positions.shape)
        q, k, v = qkv.unbind(1)
        q, k = qwen_kernels.mrope_pos(q, k, positions, inv_freq, section, backend)
        return qwen_kernels.window_attn(q, k, v, cu, max_seqlen, scale, backend)

    monkeypatch.setattr(qwen_kernels, "window_attn_rope", window_attn_rope, raising=False)
    monkeypatch.setattr(LayerKernels, "rotary_fused", property(lambda self: True), raising=False)
    inputs = image_inputs(gen)
    expected = _logits(model, inputs)
    handle = patch_qwen2_5_vl(model, "torch")
    try:
        with CountQwenOps() as counter:
            patched = _logits(model, inputs)
    finally:
        handle.unpatch()
    tokens = 4 * _tokens(IMAGE_GRID)
    assert calls == [(2, tokens)] * VISION.depth
    assert counter.counts["mrope_"] == 0 and counter.counts["mrope_pos"] == VISION.depth
    assert rel_err(patched, expected) < FP32_TOL


def test_patched_tower_refuses_a_patch_count_unlike_the_grid(gen, model):
    tower = model.model.visual
    handle = patch_qwen2_5_vl(tower, "torch")
    try:
        pixels = torch.randn(4 * _tokens(IMAGE_GRID) - 4, 1176, generator=gen)
        with pytest.raises(ValueError, match=r"one row per patch of grid_thw \(120\), got 116"):
            tower(pixels, torch.tensor([IMAGE_GRID]))
    finally:
        handle.unpatch()


@pytest.mark.gpu
def test_patched_model_does_not_sync_in_the_tower(gen, model):
    """On a GPU the patched tower makes no device-to-host copy (grid_thw on the CPU, as the
    processor returns it); with grid_thw on the GPU the stock tower reads the segment lengths
    back in every layer."""
    tower = model.model.visual.cuda()
    grid = torch.tensor([IMAGE_GRID, VIDEO_GRID])
    pixels = torch.randn(4 * (_tokens(IMAGE_GRID) + _tokens(VIDEO_GRID)), 1176).cuda()
    handle = patch_qwen2_5_vl(tower)
    try:
        with torch.no_grad():
            expected = tower(pixels, grid).pooler_output  # warm-up: kernels load and compile
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                out = tower(pixels, grid).pooler_output
            finally:
                torch.cuda.set_sync_debug_mode("default")
        torch.testing.assert_close(out, expected)
    finally:
        handle.unpatch()
        model.model.visual.cpu()


@pytest.mark.gpu
def test_encoder_cuda_graph_replays_like_eager(gen, model):
    """VisionEncoder.encode for a fixed grid is captured in a CUDA graph and replayed on new
    pixels; the replay matches eager (the layout is built and the kernels loaded beforehand)."""
    tower = model.model.visual
    encoder = VisionEncoder.from_hf_state_dict(tower.state_dict(), VISION, device="cuda")
    grid = [IMAGE_GRID, VIDEO_GRID]
    layout = encoder.layout(grid)
    static = torch.randn(layout.num_tokens, 1176, device="cuda")
    with torch.no_grad(), qwen_kernels.skip_value_checks():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                encoder.encode(static, layout)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = encoder.encode(static, layout)
        for _ in range(2):
            pixels = torch.randn(layout.num_tokens, 1176, device="cuda")
            static.copy_(pixels)
            graph.replay()
            torch.testing.assert_close(out, encoder.encode(pixels, layout))
