"""patch_merge: reference vs fp64 math and transformers' Qwen2_5_VLPatchMerger with the reverse
window index, every backend vs the reference, opcheck, and bad input."""

import pytest
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPatchMerger

import qwen_kernels
from tests.helpers import DTYPES, assert_close_to_reference, randn, rel_err, targets, tolerance

EPS = 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels", [1280, 36])
def test_reference_matches_direct_math(gen, dtype, channels):
    tokens = 4 * 13
    x, weight = randn(gen, tokens, channels, dtype=dtype), randn(gen, channels, dtype=dtype)
    unit_index = torch.randperm(tokens // 4, generator=gen)
    out = qwen_kernels.patch_merge(x, weight, EPS, unit_index, "torch")
    x64 = x.double()
    normed = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + EPS) * weight.double()
    expected = normed.reshape(tokens // 4, 4 * channels)[unit_index]
    assert out.shape == (tokens // 4, 4 * channels) and out.dtype == dtype
    assert rel_err(out, expected) < 2 * tolerance(dtype)


def test_matches_transformers_merger_with_reverse_window_index(gen):
    channels, out_hidden, units = 32, 24, 10
    merger = Qwen2_5_VLPatchMerger(dim=out_hidden, context_dim=channels)
    with torch.no_grad():
        for param in merger.parameters():
            param.copy_(randn(gen, *param.shape, scale=0.2))
    x = randn(gen, 4 * units, channels)
    window_index = torch.randperm(units, generator=gen)
    reverse = torch.argsort(window_index)
    with torch.no_grad():
        expected = merger(x)[reverse]
        ours = merger.mlp(qwen_kernels.patch_merge(x, merger.ln_q.weight, EPS, reverse, "torch"))
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize(("backend", "device"), targets("patch_merge"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [None, torch.int32, torch.int64])
def test_backend_matches_reference(gen, backend, device, dtype, index_dtype):
    tokens, channels = 4 * 9, 1280
    x, weight = randn(gen, tokens, channels, dtype=dtype), randn(gen, channels, dtype=dtype)
    unit_index = None
    if index_dtype is not None:  # a gather that repeats and skips units, not just a permutation
        unit_index = torch.randint(0, tokens // 4, (11,), generator=gen).to(index_dtype)
    ref64 = qwen_kernels.patch_merge(x.double(), weight.double(), EPS, unit_index, "torch")
    eager = qwen_kernels.patch_merge(x, weight, EPS, unit_index, "torch")
    index = unit_index.to(device) if unit_index is not None else None
    assert_close_to_reference(
        qwen_kernels.patch_merge(x.to(device), weight.to(device), EPS, index, backend).cpu(),
        ref64,
        eager,
    )


def test_opcheck(gen):
    x, weight = randn(gen, 12, 8), randn(gen, 8)
    torch.library.opcheck(torch.ops.qwen.patch_merge, (x, weight, EPS, None, "torch"))
    index = torch.tensor([2, 0, 1])
    torch.library.opcheck(torch.ops.qwen.patch_merge, (x, weight, EPS, index, "torch"))


def test_bad_input(gen):
    x, weight = randn(gen, 12, 8), randn(gen, 8)
    cases = [
        (lambda: qwen_kernels.patch_merge(x[:10], weight, EPS), "T a multiple of 4"),
        (lambda: qwen_kernels.patch_merge(x[None], weight, EPS), "`x` must be 2-D"),
        (lambda: qwen_kernels.patch_merge(x, weight[:7], EPS), "`weight` must be 1-D of size"),
        (
            lambda: qwen_kernels.patch_merge(x, weight, EPS, torch.tensor([0.0, 1.0])),
            "`unit_index` must be int32 or int64",
        ),
        (
            lambda: qwen_kernels.patch_merge(x, weight, EPS, torch.tensor([[0, 1]])),
            "`unit_index` must be 1-D",
        ),
        (
            lambda: qwen_kernels.patch_merge(x, weight, EPS, torch.tensor([0, 3])),
            r"indices of merge units in \[0, 3\)",
        ),
        (
            lambda: qwen_kernels.patch_merge(x, weight, EPS, torch.tensor([-1, 0])),
            r"indices of merge units in \[0, 3\)",
        ),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
