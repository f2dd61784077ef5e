""" "auto" never fails where "torch" works, and agrees with it: awkward but valid inputs on every
device here (on a GPU "auto" picks the kernels, so this is where their coverage gaps show)."""

import pytest
import torch

import qwen_kernels
from tests.helpers import randn, rel_err

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
EPS = 1e-6


def cases(gen):
    bf16 = torch.bfloat16
    x = randn(gen, 6, 1 + 1280, dtype=bf16)[:, 1:]  # rows off a 16-byte boundary
    weight = randn(gen, 2 * 1280, dtype=bf16)[::2]  # strided
    x8 = randn(gen, 8, 1 + 1280, dtype=bf16)[:, 1:]  # two merge units of such rows
    gate_up_weight = randn(gen, 2 * 100, 1280, dtype=bf16, scale=0.03)
    return {
        "rms_norm fp32 weight": (qwen_kernels.rms_norm, (x, randn(gen, 1280), EPS)),
        "rms_norm strided": (qwen_kernels.rms_norm, (x, weight, EPS)),
        "rms_norm empty": (qwen_kernels.rms_norm, (x[:0], weight, EPS)),
        "add_rms_norm strided": (qwen_kernels.add_rms_norm, (x, x, weight, EPS)),
        "swiglu odd": (qwen_kernels.swiglu, (randn(gen, 3, 2 * 1281, dtype=bf16),)),
        "swiglu empty": (qwen_kernels.swiglu, (randn(gen, 3, 0, dtype=bf16),)),
        "patch_merge strided int32 index": (
            qwen_kernels.patch_merge,
            (x8, weight, EPS, torch.tensor([1, 0, 1], dtype=torch.int32)),
        ),
        "patch_merge fp32 weight": (qwen_kernels.patch_merge, (x8, randn(gen, 1280), EPS)),
        "patch_merge empty index": (
            qwen_kernels.patch_merge,
            (x8, weight, EPS, torch.empty(0, dtype=torch.int64)),
        ),
        "rms_norm_swiglu": (
            qwen_kernels.rms_norm_swiglu,
            (x, weight, gate_up_weight, randn(gen, 200, dtype=bf16), EPS),
        ),
    }


@pytest.mark.parametrize("device", DEVICES)
def test_auto_agrees_with_torch(gen, device):
    for name, (op, args) in cases(gen).items():
        moved = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
        expected = op(*moved, backend="torch")
        got = op(*moved, backend="auto")
        pairs = zip(got, expected, strict=True) if isinstance(got, tuple) else [(got, expected)]
        for out, ref in pairs:
            assert out.shape == ref.shape and out.dtype == ref.dtype, name
            if ref.numel():
                assert rel_err(out.cpu(), ref.cpu()) < 1e-2, name
