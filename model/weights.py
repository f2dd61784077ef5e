"""Vision-tower weights: transformers layout to the encoder's, safetensors checkpoints, and seeded
random weights for tests and the demo.

The transformers layout (``Qwen2_5_VisionTransformerPretrainedModel``, stored under ``visual.`` or
``model.visual.`` in Qwen2.5-VL checkpoints) differs from the encoder's in two places: the patch
embedding is a Conv3d weight ``[C, 3, 2, 14, 14]`` (the encoder's Linear is its ``[C, 1176]``
view), and the MLP has separate gate and up projections (the encoder packs them, gate first).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from .config import VisionConfig

# Checked in this order: a full checkpoint may hold the tower under either.
HF_PREFIXES: tuple[str, ...] = ("model.visual.", "visual.")

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
_PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def hf_shapes(config: VisionConfig) -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor of the tower in the transformers layout (no prefix)."""
    c, i, p = config.hidden_size, config.intermediate_size, config.patch_size
    merged = c * config.merge_unit
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embed.proj.weight": (c, config.in_channels, config.temporal_patch_size, p, p)
    }
    for b in range(config.depth):
        shapes.update(
            {
                f"blocks.{b}.norm1.weight": (c,),
                f"blocks.{b}.norm2.weight": (c,),
                f"blocks.{b}.attn.qkv.weight": (3 * c, c),
                f"blocks.{b}.attn.qkv.bias": (3 * c,),
                f"blocks.{b}.attn.proj.weight": (c, c),
                f"blocks.{b}.attn.proj.bias": (c,),
                f"blocks.{b}.mlp.gate_proj.weight": (i, c),
                f"blocks.{b}.mlp.gate_proj.bias": (i,),
                f"blocks.{b}.mlp.up_proj.weight": (i, c),
                f"blocks.{b}.mlp.up_proj.bias": (i,),
                f"blocks.{b}.mlp.down_proj.weight": (c, i),
                f"blocks.{b}.mlp.down_proj.bias": (c,),
            }
        )
    shapes.update(
        {
            "merger.ln_q.weight": (c,),
            "merger.mlp.0.weight": (merged, merged),
            "merger.mlp.0.bias": (merged,),
            "merger.mlp.2.weight": (config.out_hidden_size, merged),
            "merger.mlp.2.bias": (config.out_hidden_size,),
        }
    )
    return shapes


def vision_prefix(keys: list[str]) -> str:
    """The prefix the tower's tensors carry among ``keys``: a ``HF_PREFIXES`` entry or ""."""
    for prefix in HF_PREFIXES:
        if any(
            k.startswith(prefix + "patch_embed.") or k.startswith(prefix + "blocks.") for k in keys
        ):
            return prefix
    return ""


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_hf_state_dict(
    state_dict: Mapping[str, Tensor], config: VisionConfig, source: str = "state_dict"
) -> str:
    """Raise a ValueError naming every missing, unexpected or mis-shaped tensor; return the prefix.

    Keys outside the tower's prefix (the language model of a full checkpoint) are ignored; with no
    prefix every key must belong to the tower.
    """
    prefix = vision_prefix(list(state_dict))
    shapes = hf_shapes(config)
    present = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    problems = []
    missing = [prefix + k for k in shapes if k not in present]
    if missing:
        problems.append(f"missing {len(missing)} tensors: {_listing(missing)}")
    unexpected = [prefix + k for k in present if k not in shapes]
    if unexpected:
        problems.append(f"unexpected tensors: {_listing(unexpected)}")
    for name, tensor in present.items():
        if name in shapes and tuple(tensor.shape) != shapes[name]:
            problems.append(
                f"{prefix + name} has shape {list(tensor.shape)}, expected {list(shapes[name])}"
            )
    if problems:
        raise ValueError(
            f"{source} does not match the vision tower {config}: " + "; ".join(problems)
        )
    return prefix


def convert_hf_state_dict(
    state_dict: Mapping[str, Tensor], config: VisionConfig, source: str = "state_dict"
) -> dict[str, Tensor]:
    """Transformers-layout tower weights (checked) to the encoder's ``state_dict`` keys."""
    prefix = check_hf_state_dict(state_dict, config, source)
    hf = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    out = {}
    for name, tensor in hf.items():
        if name == "patch_embed.proj.weight":
            out["patch_embed.weight"] = tensor.reshape(config.hidden_size, config.patch_dim)
        elif ".mlp.gate_proj." in name:
            up = hf[name.replace(".gate_proj.", ".up_proj.")]
            out[name.replace(".gate_proj.", ".gate_up_proj.")] = torch.cat([tensor, up])
        elif ".mlp.up_proj." not in name:
            out[name] = tensor
    return out


def random_hf_state_dict(
    config: VisionConfig, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """Seeded random weights in the transformers layout, scaled like a trained tower.

    Matrices are N(0, 1/fan_in) so activations stay O(1) through the depth; biases N(0, 0.02^2);
    norm weights 1 + N(0, 0.1^2). Same seed and config, same weights.
    """
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in hf_shapes(config).items():
        tensor = torch.empty(shape).normal_(generator=generator)
        if name.endswith("norm1.weight") or name.endswith("norm2.weight") or "ln_q" in name:
            tensor = 1.0 + 0.1 * tensor
        elif name.endswith(".bias"):
            tensor *= 0.02
        else:
            fan_in = tensor[0].numel()
            tensor *= fan_in**-0.5
        out[name] = tensor.to(dtype)
    return out


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Key -> safetensors file holding it, for a single-file or a sharded checkpoint."""
    from safetensors import safe_open

    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: folder / file for key, file in weight_map.items()}
    single = folder / SAFETENSORS_SINGLE
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    if any((folder / name).exists() for name in _PICKLE_NAMES):
        raise ValueError(
            f"{folder} holds a pickle checkpoint; only safetensors are loaded (convert it first)"
        )
    raise FileNotFoundError(f"{folder} has neither {SAFETENSORS_SINGLE} nor {SAFETENSORS_INDEX}")


def load_checkpoint(
    path: str | Path, device: torch.device | str | None = None
) -> tuple[VisionConfig, dict[str, Tensor]]:
    """Read the tower's config and transformers-layout tensors from a checkpoint folder.

    Only the vision tensors are read, straight to ``device`` (CPU by default); the language
    model's shards are not opened. The tensors are checked against the config.
    """
    from safetensors import safe_open

    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json")
    config = VisionConfig.from_hf(json.loads(config_file.read_text()))
    key_files = _tensor_files(folder)
    prefix = vision_prefix(list(key_files))
    by_file: dict[Path, list[str]] = {}
    for key, file in key_files.items():
        if key.startswith(prefix):
            by_file.setdefault(file, []).append(key)
    missing_files = [str(f) for f in by_file if not f.is_file()]
    if missing_files:
        raise FileNotFoundError(f"checkpoint shards not found: {_listing(missing_files)}")

    tensors: dict[str, Tensor] = {}
    target = str(torch.device(device)) if device is not None else "cpu"
    for file, keys in by_file.items():
        with safe_open(file, framework="pt", device=target) as f:
            for key in keys:
                tensors[key] = f.get_tensor(key)
    check_hf_state_dict(tensors, config, source=f"checkpoint {folder}")
    return config, tensors
