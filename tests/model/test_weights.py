"""Weights: transformers layout to the encoder's, safetensors checkpoints (single file and sharded)
written here, key prefixes, and the errors for bad checkpoints."""

import json

import pytest
import torch
from safetensors.torch import save_file

from qwen_kernels.model import VisionEncoder, convert_hf_state_dict, random_hf_state_dict
from tests.model.reference import SMALL, random_pixels

GRID = [(1, 6, 10), (2, 4, 8)]


@pytest.fixture(scope="module")
def weights():
    return random_hf_state_dict(SMALL, seed=99)


def language_model_tensors(gen):
    """Stand-ins for the rest of a Qwen2.5-VL checkpoint, which loading must skip."""
    return {
        "model.language_model.embed_tokens.weight": torch.randn(32, 8, generator=gen),
        "lm_head.weight": torch.randn(32, 8, generator=gen),
    }


def write_config(folder):
    config = {"model_type": "qwen2_5_vl", "vision_config": SMALL.to_hf_dict()}
    (folder / "config.json").write_text(json.dumps(config))


def write_sharded(folder, tensors, shards):
    """``shards``: file name -> keys; returns the index's weight map."""
    weight_map = {}
    for name, keys in shards.items():
        save_file({k: tensors[k].contiguous() for k in keys}, str(folder / name))
        weight_map.update(dict.fromkeys(keys, name))
    return weight_map


def write_index(folder, weight_map):
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def outputs(model, pixels):
    with torch.no_grad():
        return model(pixels, GRID)


def test_conversion_packs_gate_up_and_flattens_the_patch_conv(weights):
    ours = convert_hf_state_dict(weights, SMALL)
    assert ours.keys() == VisionEncoder(SMALL).state_dict().keys()
    gate, up = weights["blocks.2.mlp.gate_proj.weight"], weights["blocks.2.mlp.up_proj.weight"]
    gate_up = ours["blocks.2.mlp.gate_up_proj.weight"]
    torch.testing.assert_close(gate_up, torch.cat([gate, up]), rtol=0, atol=0)
    conv = weights["patch_embed.proj.weight"]
    torch.testing.assert_close(ours["patch_embed.weight"], conv.flatten(1), rtol=0, atol=0)


@pytest.mark.parametrize("prefix", ["", "visual.", "model.visual."])
def test_prefixes(gen, weights, prefix):
    reference = VisionEncoder.from_hf_state_dict(weights, SMALL, kernels="torch")
    prefixed = {prefix + k: v for k, v in weights.items()}
    if prefix:
        prefixed.update(language_model_tensors(gen))
    model = VisionEncoder.from_hf_state_dict(prefixed, SMALL, kernels="torch")
    pixels = random_pixels(gen, GRID)
    torch.testing.assert_close(outputs(model, pixels), outputs(reference, pixels), rtol=0, atol=0)


def test_single_file_round_trip(tmp_path, gen, weights):
    tensors = {"model.visual." + k: v for k, v in weights.items()}
    save_file({**tensors, **language_model_tensors(gen)}, str(tmp_path / "model.safetensors"))
    write_config(tmp_path)
    model = VisionEncoder.from_pretrained(tmp_path, kernels="torch")
    assert model.config == SMALL
    reference = VisionEncoder.from_hf_state_dict(weights, SMALL, kernels="torch")
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0)
    pixels = random_pixels(gen, GRID)
    torch.testing.assert_close(outputs(model, pixels), outputs(reference, pixels), rtol=0, atol=0)


def test_sharded_round_trip_reads_only_vision_shards(tmp_path, gen, weights):
    tensors = {"visual." + k: v for k, v in weights.items()}
    keys = sorted(tensors)
    shard = "model-0000{}-of-00003.safetensors".format
    weight_map = write_sharded(tmp_path, tensors, {shard(1): keys[:40], shard(2): keys[40:]})
    # The language model's shard is listed but never written: loading must not open it.
    weight_map.update(dict.fromkeys(language_model_tensors(gen), shard(3)))
    write_index(tmp_path, weight_map)
    write_config(tmp_path)
    model = VisionEncoder.from_pretrained(tmp_path, kernels="torch", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    reference = VisionEncoder.from_hf_state_dict(weights, SMALL, kernels="torch")
    pixels = random_pixels(gen, GRID)
    torch.testing.assert_close(
        outputs(model, pixels), outputs(reference.to(torch.bfloat16), pixels), rtol=0, atol=0
    )


def _break(weights, change):
    tensors = {"visual." + k: v for k, v in weights.items()}
    if change == "missing":
        del tensors["visual.blocks.2.mlp.up_proj.bias"]
    elif change == "shape":
        tensors["visual.blocks.1.attn.qkv.weight"] = torch.randn(480, 161)
    else:
        tensors["visual.blocks.9.norm1.weight"] = torch.randn(160)
    return tensors


@pytest.mark.parametrize(
    "change, match",
    [
        ("missing", r"missing 1 tensors: visual\.blocks\.2\.mlp\.up_proj\.bias"),
        (
            "shape",
            r"visual\.blocks\.1\.attn\.qkv\.weight has shape \[480, 161\], expected "
            r"\[480, 160\]",
        ),
        ("unexpected", r"unexpected tensors: visual\.blocks\.9\.norm1\.weight"),
    ],
)
def test_bad_checkpoints(tmp_path, weights, change, match):
    tensors = _break(weights, change)
    with pytest.raises(ValueError, match=match):
        VisionEncoder.from_hf_state_dict(tensors, SMALL)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    write_config(tmp_path)
    with pytest.raises(ValueError, match=r"checkpoint .* does not match the vision tower"):
        VisionEncoder.from_pretrained(tmp_path)


def test_missing_files(tmp_path, weights):
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        VisionEncoder.from_pretrained(tmp_path)
    write_config(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"neither model\.safetensors nor"):
        VisionEncoder.from_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickle checkpoint"):
        VisionEncoder.from_pretrained(tmp_path)
    tensors = {"visual." + k: v for k, v in weights.items()}
    write_index(tmp_path, dict.fromkeys(tensors, "model-00001-of-00001.safetensors"))
    with pytest.raises(FileNotFoundError, match="shards not found"):
        VisionEncoder.from_pretrained(tmp_path)
