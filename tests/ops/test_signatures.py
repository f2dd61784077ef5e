"""Ops check their arguments and select a backend once per call signature
(``OpBackends.resolve``): a call that differs from a valid one in any checked property is still
checked, failures are never remembered, value checks run on every call, and registering an
implementation forgets what was resolved."""

import importlib

import pytest
import torch

import qwen_kernels
from qwen_kernels.ops.rms_norm import rms_norm_reference
from tests.helpers import assert_close_to_reference, randn, targets

EPS = 1e-6


def test_every_checked_property_is_part_of_the_signature(gen):
    """After a valid call, changing one tensor's dtype, shape or device, or one scalar, so that
    the call is invalid still raises (a signature missing that property would let it through)."""
    x, weight = randn(gen, 4, 16, dtype=torch.float16), randn(gen, 16, dtype=torch.float16)
    qwen_kernels.rms_norm(x, weight, EPS, backend="torch")
    bad_calls = [
        ((x, weight.bfloat16(), EPS), "`weight` must be of dtype float16, float32"),
        ((x, weight[:8], EPS), "`weight` must be 1-D of size"),
        ((x, torch.empty(16, dtype=torch.float16, device="meta"), EPS), "`weight` must be on"),
        ((x, weight, -1.0), "`eps` must be a non-negative"),
    ]
    for args, match in bad_calls:
        with pytest.raises(ValueError, match=match):
            qwen_kernels.rms_norm(*args, backend="torch")

    qkv = randn(gen, 8, 3, 2, 16)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    positions = torch.randint(0, 4, (2, 8), generator=gen, dtype=torch.int32)
    inv_freq = randn(gen, 8).abs()
    good = {"qkv": qkv, "cu": cu, "max": 5, "positions": positions, "section": [4, 4]}
    qwen_kernels.window_attn_rope(qkv, cu, 5, positions, inv_freq, [4, 4], backend="torch")
    changes = [
        ({"qkv": qkv[:, :2]}, r"`qkv` must be \[T, 3, H, D\]"),
        ({"cu": cu.long()}, "`cu_seqlens` must be an int32 tensor"),
        ({"positions": positions.to("meta")}, "`positions` must be on cpu"),
        ({"max": 0}, "`max_seqlen` must be a positive int"),
        ({"section": [4, 3]}, "`mrope_section` must be sizes summing to head_dim / 2 = 8"),
    ]
    for change, match in changes:
        a = {**good, **change}
        with pytest.raises(ValueError, match=match):
            qwen_kernels.window_attn_rope(
                a["qkv"], a["cu"], a["max"], a["positions"], inv_freq, a["section"], backend="torch"
            )


def test_failures_are_not_remembered_and_values_are_checked_every_call(gen):
    q = k = v = randn(gen, 8, 2, 16)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    for _ in range(2):
        with pytest.raises(ValueError, match="`max_seqlen` must be a positive int"):
            qwen_kernels.window_attn(q, k, v, cu, 0)
    qwen_kernels.window_attn(q, k, v, cu, 5)
    # The same signature with cu_seqlens values that do not end at T.
    with pytest.raises(ValueError, match="ending at T = 8"):
        qwen_kernels.window_attn(q, k, v, torch.tensor([0, 3, 7], dtype=torch.int32), 5)


def test_register_forgets_resolved_signatures(gen):
    table = importlib.import_module("qwen_kernels._backends").REGISTRY["swiglu"]
    gate_up = randn(gen, 4, 32)
    first = qwen_kernels.swiglu(gate_up, backend="torch")
    reference = table.impls["torch"]
    marked = torch.full_like(first, 7.0)
    try:
        table.register("torch", lambda t: marked)
        assert torch.equal(qwen_kernels.swiglu(gate_up, backend="torch"), marked)
    finally:
        table.register("torch", reference)
    torch.testing.assert_close(qwen_kernels.swiglu(gate_up, backend="torch"), first)


@pytest.mark.parametrize(("backend", "device"), targets("rms_norm"))
def test_strided_views_share_a_signature_with_contiguous_inputs(gen, backend, device):
    """Strides are not in the signature: a kernel backend resolved for contiguous rows must give
    right results for a strided view of the same shape, and the reverse."""
    dtype = torch.bfloat16
    wide = randn(gen, 6, 2 * 40, dtype=dtype).to(device)
    x_strided, x_contiguous = wide[:, ::2], wide[:, ::2].contiguous()
    weight = randn(gen, 40, dtype=dtype).to(device)
    for x in (x_contiguous, x_strided, x_contiguous):
        out = qwen_kernels.rms_norm(x, weight, EPS, backend=backend)
        ref64 = rms_norm_reference(x.cpu().double(), weight.cpu().double(), EPS)
        eager = rms_norm_reference(x.cpu(), weight.cpu(), EPS)
        assert_close_to_reference(out.cpu(), ref64, eager)
