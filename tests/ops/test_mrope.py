"""mrope / mrope_pos and their in-place forms: reference vs fp64 math and transformers' vision
and text rotary embeddings, every backend vs the reference, opcheck, and bad input."""

import pytest
import torch
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLVisionConfig,
)
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLRotaryEmbedding,
    Qwen2_5_VLVisionRotaryEmbedding,
    apply_rotary_pos_emb,
    apply_rotary_pos_emb_vision,
)

import qwen_kernels
from tests.helpers import DTYPES, assert_close_to_reference, randn, rel_err, targets, tolerance

VISION_SECTION = [20, 20]
TEXT_SECTION = [16, 24, 24]


def direct_rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """fp64 rotate-half with angles [..., S, D/2]: pairs (i, i + D/2) turn by angles[i]."""
    x64, angles = x.double(), angles.double().unsqueeze(-2)
    first, second = x64.chunk(2, dim=-1)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


def vision_inputs(gen, tokens: int, heads: int = 3, head_dim: int = 80, dtype=torch.float32):
    positions = torch.randint(0, 40, (2, tokens), generator=gen)
    axial = 1.0 / (
        10000 ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float) / (head_dim // 2))
    )
    inv_freq = torch.cat([axial, axial])
    q = randn(gen, tokens, heads, head_dim, dtype=dtype)
    k = randn(gen, tokens, heads, head_dim, dtype=dtype)
    return q, k, positions, inv_freq


def vision_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    half = inv_freq.numel() // 2
    return torch.cat(
        [positions[0, :, None] * inv_freq[:half], positions[1, :, None] * inv_freq[half:]], -1
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_mrope_pos_matches_direct_math(gen, dtype):
    q, k, positions, inv_freq = vision_inputs(gen, 37, dtype=dtype)
    q_out, k_out = qwen_kernels.mrope_pos(q, k, positions, inv_freq, VISION_SECTION, "torch")
    angles = vision_angles(positions.double(), inv_freq.double())
    assert rel_err(q_out, direct_rotate(q, angles)) < tolerance(dtype)
    assert rel_err(k_out, direct_rotate(k, angles)) < tolerance(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_vision_rotary_matches_transformers(gen, dtype):
    config = Qwen2_5_VLVisionConfig(hidden_size=160, num_heads=2)
    rotary = Qwen2_5_VLVisionRotaryEmbedding(config)
    q, k, positions, _ = vision_inputs(gen, 29, heads=2, dtype=dtype)
    cos, sin = rotary(q, positions.t())
    expected = apply_rotary_pos_emb_vision(q, k, cos, sin)
    inv_freq = torch.cat([rotary.inv_freq, rotary.inv_freq])
    from_positions = qwen_kernels.mrope_pos(q, k, positions, inv_freq, VISION_SECTION, "torch")
    from_tables = qwen_kernels.mrope(q, k, cos, sin, backend="torch")
    for ours in (from_positions, from_tables):
        torch.testing.assert_close(ours[0], expected[0])
        torch.testing.assert_close(ours[1], expected[1])


def text_inputs(gen, batch=2, seq=11, heads=4, kv_heads=2, head_dim=128, dtype=torch.float32):
    config = Qwen2_5_VLTextConfig(hidden_size=heads * head_dim, num_attention_heads=heads)
    rotary = Qwen2_5_VLRotaryEmbedding(config)
    positions = torch.randint(0, 300, (3, batch, seq), generator=gen)
    q = randn(gen, batch, seq, heads, head_dim, dtype=dtype)
    k = randn(gen, batch, seq, kv_heads, head_dim, dtype=dtype)
    return rotary, positions, q, k


def test_text_rotary_matches_transformers(gen):
    rotary, positions, q, k = text_inputs(gen)
    cos, sin = rotary(q, positions)  # composed [B, S, D]
    expected_q, expected_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    freqs = positions[..., None].float() * rotary.inv_freq
    per_axis = torch.cat([freqs, freqs], dim=-1)  # [3, B, S, D]
    for q_out, k_out in (
        qwen_kernels.mrope(q, k, per_axis.cos(), per_axis.sin(), TEXT_SECTION, "torch"),
        qwen_kernels.mrope_pos(q, k, positions, rotary.inv_freq, TEXT_SECTION, "torch"),
    ):
        torch.testing.assert_close(q_out, expected_q.transpose(1, 2))
        torch.testing.assert_close(k_out, expected_k.transpose(1, 2))


@pytest.mark.parametrize(("backend", "device"), targets("mrope_pos"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_mrope_pos_backend_matches_reference(gen, backend, device, dtype, head_dim):
    _, positions, q, k = text_inputs(gen, seq=13, head_dim=head_dim, dtype=dtype)
    section = [
        head_dim // 8,
        3 * head_dim // 16,
        head_dim // 2 - head_dim // 8 - 3 * head_dim // 16,
    ]
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    ref64 = qwen_kernels.mrope_pos(q.double(), k.double(), positions, inv_freq, section, "torch")
    eager = qwen_kernels.mrope_pos(q, k, positions, inv_freq, section, "torch")
    args = [t.to(device) for t in (q, k, positions, inv_freq)]
    got = qwen_kernels.mrope_pos(*args, section, backend)
    for out, ref, same in zip(got, ref64, eager, strict=True):
        assert_close_to_reference(out.cpu(), ref, same)


@pytest.mark.parametrize(("backend", "device"), targets("mrope"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_mrope_backend_matches_reference(gen, backend, device, dtype):
    q, k, positions, inv_freq = vision_inputs(gen, 41, dtype=dtype)
    angles = torch.cat([vision_angles(positions.float(), inv_freq)] * 2, dim=-1)
    cos, sin = angles.cos(), angles.sin()
    ref64 = qwen_kernels.mrope(q.double(), k.double(), cos, sin, backend="torch")
    eager = qwen_kernels.mrope(q, k, cos, sin, backend="torch")
    got = qwen_kernels.mrope(*[t.to(device) for t in (q, k, cos, sin)], backend=backend)
    for out, ref, same in zip(got, ref64, eager, strict=True):
        assert_close_to_reference(out.cpu(), ref, same)


@pytest.mark.parametrize(("backend", "device"), targets("mrope_pos_"))
def test_in_place_on_packed_qkv_views(gen, backend, device):
    tokens, heads, head_dim = 23, 2, 80
    qkv = randn(gen, tokens, 3, heads, head_dim).to(device)
    original = qkv.clone()
    q, k, _ = qkv.unbind(1)  # strided views into the packed buffer
    _, _, positions, inv_freq = vision_inputs(gen, tokens)
    positions, inv_freq = positions.to(device), inv_freq.to(device)
    expected = qwen_kernels.mrope_pos(q, k, positions, inv_freq, VISION_SECTION, "torch")
    qwen_kernels.mrope_pos_(q, k, positions, inv_freq, VISION_SECTION, backend)
    torch.testing.assert_close(qkv[:, 0], expected[0])
    torch.testing.assert_close(qkv[:, 1], expected[1])
    assert torch.equal(qkv[:, 2], original[:, 2]), "v must not be touched"
    angles = torch.cat([vision_angles(positions.float(), inv_freq)] * 2, dim=-1)
    q2, k2, _ = original.clone().unbind(1)
    qwen_kernels.mrope_(q2, k2, angles.cos(), angles.sin(), backend="torch")
    torch.testing.assert_close(q2, expected[0])


def test_in_place_under_compile(gen):
    tokens = 9
    _, _, positions, inv_freq = vision_inputs(gen, tokens)

    def rotate(qkv):
        q, k, _ = qkv.unbind(1)
        qwen_kernels.mrope_pos_(q, k, positions, inv_freq, VISION_SECTION)
        return qkv

    qkv = randn(gen, tokens, 3, 2, 80)
    expected = rotate(qkv.clone())
    torch.testing.assert_close(torch.compile(rotate, fullgraph=True)(qkv.clone()), expected)


def test_opcheck(gen):
    q, k, positions, inv_freq = vision_inputs(gen, 7, heads=2, head_dim=16)
    angles = torch.cat([vision_angles(positions.float(), inv_freq)] * 2, dim=-1)
    cos, sin = angles.cos(), angles.sin()
    section = [4, 4]
    torch.library.opcheck(torch.ops.qwen.mrope, (q, k, cos, sin, None, "torch"))
    per_axis = torch.stack([cos, cos * 0.5])
    torch.library.opcheck(torch.ops.qwen.mrope, (q, k, per_axis, per_axis, section, "torch"))
    torch.library.opcheck(torch.ops.qwen.mrope_, (q.clone(), k.clone(), cos, sin, None, "torch"))
    args = (positions, inv_freq, section, "torch")
    torch.library.opcheck(torch.ops.qwen.mrope_pos, (q, k, *args))
    torch.library.opcheck(torch.ops.qwen.mrope_pos_, (q.clone(), k.clone(), *args))


def test_bad_input(gen):
    q, k, positions, inv_freq = vision_inputs(gen, 7, heads=2, head_dim=16)
    cos = torch.rand(7, 16)
    cases = [
        (
            lambda: qwen_kernels.mrope(q[..., :15], k[..., :15], cos[:, :15], cos[:, :15]),
            "even head_dim",
        ),
        (lambda: qwen_kernels.mrope(q, k[:5], cos, cos), "`k` must be"),
        (lambda: qwen_kernels.mrope(q, k, cos[:6], cos[:6]), r"`cos` must be \[\.\.\., S=7"),
        (lambda: qwen_kernels.mrope(q, k, cos, cos[:, :8]), "`sin` must be of cos's shape"),
        (
            lambda: qwen_kernels.mrope(q, k, cos.expand(3, 7, 16), cos.expand(3, 7, 16)),
            "`cos` must be leading dims that broadcast",
        ),
        (
            lambda: qwen_kernels.mrope(
                q, k, cos[None].expand(2, 7, 16), cos[None].expand(2, 7, 16), [4, 5]
            ),
            "summing to head_dim / 2 = 8",
        ),
        (
            lambda: qwen_kernels.mrope(
                q, k, cos[None].expand(2, 7, 16), cos[None].expand(2, 7, 16), [8]
            ),
            "2 parts",
        ),
        (
            lambda: qwen_kernels.mrope_pos(q, k, positions.float(), inv_freq, [4, 4]),
            "`positions` must be int32 or int64",
        ),
        (
            lambda: qwen_kernels.mrope_pos(q, k, positions, inv_freq[:7], [4, 4]),
            r"`inv_freq` must be \[D/2 = 8\]",
        ),
        (
            lambda: qwen_kernels.mrope_pos(q, k, positions, inv_freq.half(), [4, 4]),
            "`inv_freq` must be of dtype",
        ),
        (
            lambda: qwen_kernels.mrope_pos(q, k, positions[:, :6], inv_freq, [4, 4]),
            r"`positions` must be \[A, \.\.\., S=7\]",
        ),
        (
            lambda: qwen_kernels.mrope_pos(q, k.double(), positions, inv_freq, [4, 4]),
            "`k` must be of dtype torch.float32",
        ),
        (lambda: qwen_kernels.mrope_pos(q, k, positions, inv_freq, [4, 0, 4]), "positive sizes"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
