"""The demo command: bundled sample, image + video inputs, checkpoint and random weights."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from qwen_kernels import _backends
from qwen_kernels.model import KernelConfig, demo, preprocess_image, random_hf_state_dict
from qwen_kernels.model.config import OP_GROUPS
from tests.model.reference import SMALL


def test_bundled_sample_image():
    image = demo._sample_image()
    assert image.size == (224, 168)
    _, grid = preprocess_image(image)
    assert grid.tolist() == [[1, 12, 16]]  # 4 windows, 2 of them edge windows


def test_image_and_video_with_a_checkpoint(tmp_path, gen, capsys):
    weights = random_hf_state_dict(SMALL, seed=5)
    save_file({"visual." + k: v for k, v in weights.items()}, str(tmp_path / "model.safetensors"))
    config = {"model_type": "qwen2_5_vl", "vision_config": SMALL.to_hf_dict()}
    (tmp_path / "config.json").write_text(json.dumps(config))
    image = torch.randint(0, 256, (70, 90, 3), generator=gen, dtype=torch.uint8).numpy()
    Image.fromarray(image).save(tmp_path / "image.png")
    frames = torch.randint(0, 256, (9, 60, 80, 3), generator=gen, dtype=torch.uint8).numpy()
    np.save(tmp_path / "video.npy", frames)

    argv = [
        "--weights",
        str(tmp_path),
        "--image",
        str(tmp_path / "image.png"),
        "--video",
        str(tmp_path / "video.npy"),
        "--fps",
        "4",
        "--device",
        "cpu",
        "--backends",
        "auto,cuda,cuda_emu",
    ]
    assert demo.main(argv) == 0
    out = capsys.readouterr().out
    # CPU tensors cannot run the cuda backend: reported, and the other backends still run.
    assert re.search(r"^cuda\s+unavailable: qwen\.\w+: backend 'cuda' is unavailable", out, re.M)
    # Groups without a cuda_emu kernel run on "auto", and the line names them.
    kernels = KernelConfig.best_effort("cuda_emu")
    fallback = [g for g in OP_GROUPS if getattr(kernels, g) == "auto"]
    note = f"  \\({', '.join(fallback)} on auto\\)" if fallback else ""
    if _backends.runtime_missing("cuda_emu", "cpu") is None:
        assert re.search(rf"^cuda_emu\s+\d+\.\d+\s+\d+  attention \S+,.*{note}$", out, re.M), out
    # On CPU tensors "auto" runs the reference in every group, and the line says so.
    ran = ", ".join(f"{group} torch" for group in OP_GROUPS)
    assert re.search(rf"^auto\s+\d+\.\d+\s+\d+  {ran}$", out, re.M), out
    assert "one untimed warm-up forward, then the mean of 3 timed forwards" in out
    assert f"checkpoint {tmp_path}" in out
    assert "image.png: 90x70 px -> 84x56 px" in out
    assert "9 frames at 4 fps -> 4 sampled" in out
    assert re.search(r"grid_thw \[\[1, 4, 6\], \[2, \d+, \d+\]\]", out)
    assert re.search(r"auto vs torch: max \|diff\| \S+, relative \S+", out)


def test_unknown_backend_is_refused(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--backends", "auto,tensorrt"])
    assert "unknown backends ['tensorrt']" in capsys.readouterr().err


def test_random_7b_tower_on_a_tiny_image(tmp_path, gen, capsys):
    image = torch.randint(0, 256, (56, 56, 3), generator=gen, dtype=torch.uint8).numpy()
    Image.fromarray(image).save(tmp_path / "tiny.png")
    assert demo.main(["--image", str(tmp_path / "tiny.png"), "--backends", "torch"]) == 0
    out = capsys.readouterr().out
    assert "depth 32, hidden 1280, heads 16, out 3584; seeded random weights (seed 0" in out
    assert "grid_thw [[1, 4, 4]]: 16 patches -> 4 tokens of 3584" in out
    assert re.search(r"^torch\s+\d+\.\d+\s+\d+  attention torch, ", out, re.MULTILINE)
