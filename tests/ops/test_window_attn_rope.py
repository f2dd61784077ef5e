"""window_attn_rope: the reference is mrope_pos then window_attn; every backend against the fp64
chain (held as tightly as window_attn: within 1.5x the error of the same-dtype eager chain, no
rounding bias) on real vision layouts, text-style 3-axis positions, long segments, strided
packed qkv; opcheck, torch.compile and bad input."""

from types import SimpleNamespace

import pytest
import torch

import qwen_kernels
from qwen_kernels.model.config import VisionConfig
from qwen_kernels.model.layout import build_layout
from tests.helpers import DTYPES, attention_accumulation, randn, targets
from tests.ops.test_window_attn import (
    GRIDS,
    LONG_CASES,
    assert_attention_close,
    cu_seqlens_of,
    segment_loop,
)


def vision_rotary(grids, head_dim: int):
    """cu_seqlens of windows and frames, positions, inv_freq and section of a real layout."""
    config = VisionConfig(hidden_size=2 * head_dim, num_heads=2, depth=4, fullatt_block_indexes=())
    layout = build_layout(config, tuple(grids), torch.device("cpu"))
    rotary = (layout.positions, layout.inv_freq, layout.rotary_section)
    return layout, rotary


def text_rotary(gen, tokens: int, head_dim: int):
    """Three position axes with the text model's band split and angles of hundreds of radians."""
    half = head_dim // 2
    section = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    positions = torch.randint(0, 700, (3, tokens), generator=gen)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    return positions, inv_freq, section


def check_backend(backend, device, qkv, cu, max_seqlen, rotary, softmax_scale=None):
    """``backend`` on ``device`` against the fp64 chain, measured against the eager chain."""
    positions, inv_freq, section = rotary
    args = (cu, max_seqlen, positions, inv_freq, section, softmax_scale)
    ref64 = qwen_kernels.window_attn_rope(qkv.double(), *args, backend="torch")
    eager = qwen_kernels.window_attn_rope(qkv, *args, backend="torch")
    on_device = [t.to(device) for t in (qkv, cu, positions, inv_freq)]
    got = qwen_kernels.window_attn_rope(
        on_device[0], on_device[1], max_seqlen, *on_device[2:], section, softmax_scale, backend
    )
    assert got.device.type == device and got.is_contiguous()
    # The rotary's angle and its two products add a few roundings before the scores.
    accumulation = attention_accumulation(*qkv.unbind(1), cu, softmax_scale, extra_terms=8)
    assert_attention_close(got.cpu(), ref64, eager, qkv.dtype, accumulation)
    return got.cpu(), eager


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_is_mrope_pos_then_window_attn(gen, dtype):
    layout, rotary = vision_rotary(GRIDS, 80)
    cu = layout.cu_window_seqlens
    qkv = randn(gen, layout.num_tokens, 3, 2, 80, dtype=dtype)
    fused = qwen_kernels.window_attn_rope(qkv, cu, 64, *rotary, backend="torch")
    q, k, v = qkv.clone().unbind(1)
    qwen_kernels.mrope_pos_(q, k, *rotary, backend="torch")
    chained = qwen_kernels.window_attn(q, k, v, cu, 64, backend="torch")
    assert fused.dtype == dtype and fused.shape == (layout.num_tokens, 2, 80)
    assert torch.equal(fused, chained)
    # The rotation in fp64 by direct math, then fp64 attention.
    if dtype == torch.float32:
        positions, inv_freq, _ = rotary
        angles = torch.cat(
            [positions[0, :, None] * inv_freq[:20], positions[1, :, None] * inv_freq[20:]], -1
        ).double()[:, None, :]
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)

        def rotate(x):
            x = x.double()
            return x * cos + torch.cat([-x[..., 40:], x[..., :40]], -1) * sin

        direct = segment_loop(rotate(qkv[:, 0]), rotate(qkv[:, 1]), qkv[:, 2], cu)
        assert float((fused.double() - direct).norm() / direct.norm()) < 1e-5


@pytest.mark.parametrize(("backend", "device"), targets("window_attn_rope"))
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_vision_windows(gen, backend, device, head_dim, dtype):
    """Windows of a real image and video with the tower's 2D rotary."""
    layout, rotary = vision_rotary(GRIDS, head_dim)
    qkv = randn(gen, layout.num_tokens, 3, 2, head_dim, dtype=dtype, scale=2.0)
    check_backend(backend, device, qkv, layout.cu_window_seqlens, 64, rotary)


@pytest.mark.parametrize(("backend", "device"), targets("window_attn_rope"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_vision_frames(gen, backend, device, dtype):
    """The full-attention layers: whole frames (the long path, on q and k rotated once)."""
    layout, rotary = vision_rotary(GRIDS, 80)
    qkv = randn(gen, layout.num_tokens, 3, 2, 80, dtype=dtype, scale=2.0)
    check_backend(backend, device, qkv, layout.cu_frame_seqlens, 150, rotary)


@pytest.mark.parametrize(("backend", "device"), targets("window_attn_rope"))
@pytest.mark.parametrize(("head_dim", "dtype"), LONG_CASES)
def test_long_segments(gen, backend, device, head_dim, dtype):
    """The long path, q and k rotated once before it: 5 and 3 key tiles (the last partial, an odd
    length), a 1-token and an empty segment, max_seqlen above the longest, 3 position axes."""
    cu = cu_seqlens_of([0, 300, 1, 0, 131])
    rotary = text_rotary(gen, int(cu[-1]), head_dim)
    qkv = randn(gen, int(cu[-1]), 3, 2, head_dim, dtype=dtype, scale=2.0)
    check_backend(backend, device, qkv, cu, 333, rotary)


@pytest.mark.parametrize(("backend", "device"), targets("window_attn_rope"))
@pytest.mark.parametrize("max_seqlen", [40, 100])
def test_text_positions_three_axes(gen, backend, device, max_seqlen):
    """3 position axes (band split 8/12/12 of 32 frequencies), large angles, empty and 1-token
    segments; window path and long path."""
    cu = cu_seqlens_of([40, 0, 1, 33, 7])
    rotary = text_rotary(gen, int(cu[-1]), 64)
    qkv = randn(gen, int(cu[-1]), 3, 4, 64, dtype=torch.bfloat16, scale=2.0)
    check_backend(backend, device, qkv, cu, max_seqlen, rotary, softmax_scale=0.2)


@pytest.mark.parametrize(("backend", "device"), targets("window_attn_rope"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_qkv_and_positions(gen, backend, device, dtype):
    """qkv a view with padded rows and heads, positions a transposed int64 view; the input is
    not modified."""
    layout, (positions, inv_freq, section) = vision_rotary([(1, 6, 10)], 80)
    tokens = layout.num_tokens
    qkv = randn(gen, tokens, 3, 3, 96, dtype=dtype, scale=2.0)[:, :, 1:, :80]
    before = qkv.clone()
    positions = positions.long().t().contiguous().t()
    rotary = (positions, inv_freq.double(), section)
    check_backend(backend, device, qkv, layout.cu_window_seqlens, 64, rotary)
    assert torch.equal(qkv, before)


@pytest.mark.parametrize(("backend", "device"), targets("window_attn_rope"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("segments", ["windows", "frames"])
def test_fused_matches_the_unfused_kernels(gen, backend, device, dtype, segments):
    """The fused kernel sees the rotated q and k that mrope_pos_ stores (but where cos or sin
    round differently, e.g. numpy's and torch's: a q or k element 1 ulp apart shifts its rows
    by a few ulps): most outputs bit-equal to mrope_pos_ + window_attn, the rest within 4 ulps."""
    layout, rotary = vision_rotary(GRIDS, 80)
    cu, longest = layout.cu_window_seqlens, layout.max_window_seqlen
    if segments == "frames":
        cu, longest = layout.cu_frame_seqlens, layout.max_frame_seqlen
    cu = cu.to(device)
    qkv = randn(gen, layout.num_tokens, 3, 2, 80, dtype=dtype, scale=2.0).to(device)
    on_device = [t.to(device) for t in rotary[:2]]
    fused = qwen_kernels.window_attn_rope(qkv, cu, longest, *on_device, rotary[2], backend=backend)
    q, k, v = qkv.clone().unbind(1)
    qwen_kernels.mrope_pos_(q, k, *on_device, rotary[2])
    chained = qwen_kernels.window_attn(q, k, v, cu, longest, backend=backend)
    ulp = torch.finfo(dtype).eps * chained.float().abs().clamp_min(1.0)
    assert ((fused.float() - chained.float()).abs() <= 4 * ulp).all()
    assert (fused == chained).float().mean() > 0.95


def test_opcheck(gen):
    layout, rotary = vision_rotary([(1, 4, 6)], 16)
    qkv = randn(gen, layout.num_tokens, 3, 2, 16)
    cu = layout.cu_window_seqlens
    torch.library.opcheck(torch.ops.qwen.window_attn_rope, (qkv, cu, 24, *rotary, None, "torch"))
    torch.library.opcheck(torch.ops.qwen.window_attn_rope, (qkv, cu, 30, *rotary, 0.3, "torch"))


def test_compiles_fullgraph(gen):
    layout, rotary = vision_rotary([(1, 4, 6)], 16)
    qkv = randn(gen, layout.num_tokens, 3, 2, 16)
    cu = layout.cu_window_seqlens
    compiled = torch.compile(
        lambda x: qwen_kernels.window_attn_rope(x, cu, 24, *rotary), fullgraph=True
    )
    torch.testing.assert_close(compiled(qkv), qwen_kernels.window_attn_rope(qkv, cu, 24, *rotary))


def test_bad_input(gen):
    qkv = randn(gen, 8, 3, 2, 16)
    cu = cu_seqlens_of([3, 5])
    positions = torch.randint(0, 9, (2, 8), generator=gen, dtype=torch.int32)
    inv_freq = torch.rand(8, generator=gen)
    args = SimpleNamespace(
        qkv=qkv, cu=cu, max_seqlen=5, positions=positions, inv_freq=inv_freq, section=[4, 4]
    )

    def call(**changes):
        a = {**vars(args), **changes}
        return qwen_kernels.window_attn_rope(
            a["qkv"], a["cu"], a["max_seqlen"], a["positions"], a["inv_freq"], a["section"]
        )

    cases = [
        ({"qkv": qkv[:, 0]}, "`qkv` must be 4-D"),
        ({"qkv": qkv[:, :2]}, r"`qkv` must be \[T, 3, H, D\]"),
        ({"qkv": qkv.int()}, "`qkv` must be of dtype"),
        ({"qkv": randn(gen, 8, 3, 2, 15)}, "even head_dim"),
        ({"cu": cu.long()}, "`cu_seqlens` must be an int32 tensor"),
        ({"cu": torch.tensor([0, 5, 3, 8], dtype=torch.int32)}, "non-decreasing"),
        ({"cu": torch.tensor([0, 3, 7], dtype=torch.int32)}, "ending at T = 8"),
        ({"max_seqlen": 4}, "`max_seqlen` must be at least the longest segment"),
        ({"max_seqlen": 0}, "`max_seqlen` must be a positive int"),
        ({"positions": positions.float()}, "`positions` must be int32 or int64"),
        ({"positions": positions[:, :7]}, r"`positions` must be \[A, ..., S=8\]"),
        ({"positions": positions[:1]}, "`mrope_section` must be 1 parts"),
        ({"section": [4, 3]}, "`mrope_section` must be sizes summing to head_dim / 2 = 8"),
        ({"section": [8, 0]}, "`mrope_section` must be positive sizes"),
        ({"inv_freq": inv_freq[:7]}, r"`inv_freq` must be \[D/2 = 8\]"),
        ({"inv_freq": inv_freq.half()}, "`inv_freq` must be of dtype float32, float64"),
    ]
    for changes, match in cases:
        with pytest.raises(ValueError, match=match):
            call(**changes)
    with pytest.raises(ValueError, match="`softmax_scale` must be a positive float"):
        qwen_kernels.window_attn_rope(qkv, cu, 5, positions, inv_freq, [4, 4], softmax_scale=0.0)


@pytest.mark.parametrize(
    ("backend", "device"), [t for t in targets("window_attn_rope") if t.values[0] == "triton"]
)
def test_kernel_rejects_more_axes_than_it_takes(gen, backend, device):
    qkv = randn(gen, 4, 3, 1, 20).to(device)
    positions = torch.zeros(5, 4, dtype=torch.int32, device=device)
    inv_freq = torch.ones(10, device=device)
    cu = cu_seqlens_of([4]).to(device)
    with pytest.raises(ValueError, match="`mrope_section` must have at most 4 parts"):
        qwen_kernels.window_attn_rope(qkv, cu, 4, positions, inv_freq, [2] * 5, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_rotated_inputs_bit_equal_to_mrope_pos_on_the_gpu(gen, backend):
    """On a GPU, where multiply-adds may contract: the fused op equals mrope_pos_ then
    window_attn of the same backend bit for bit on the window path (the rotated q and k are the
    same numbers), and the launch compiled without fp fusion is what makes it so."""
    layout, rotary = vision_rotary(GRIDS, 80)
    qkv = randn(gen, layout.num_tokens, 3, 2, 80, dtype=torch.bfloat16).cuda()
    rotary = tuple(t.cuda() if isinstance(t, torch.Tensor) else t for t in rotary)
    cu = layout.cu_window_seqlens.cuda()
    fused = qwen_kernels.window_attn_rope(qkv, cu, 64, *rotary, backend=backend)
    q, k, v = qkv.clone().unbind(1)
    qwen_kernels.mrope_pos_(q, k, *rotary, backend=backend)
    chained = qwen_kernels.window_attn(q, k, v, cu, 64, backend=backend)
    assert torch.equal(fused, chained)


@pytest.mark.parametrize(
    ("backend", "device"), targets("window_attn_rope_forward", with_reference=True)
)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["windows", "frames"])
def test_gradients_match_fp64_autograd(gen, backend, device, dtype, kind):
    """dqkv through the fused op: the backward rotates q and k again, runs window_attn's
    backward on them and turns dq and dk back by the negative angles. Held to window_attn's
    gradient bounds, taken on the rotated q and k (the rotation keeps their norms)."""
    from qwen_kernels.ops.mrope import mrope_pos_reference
    from qwen_kernels.ops.window_attn_rope import window_attn_rope_reference
    from tests.helpers import autograd_grads
    from tests.ops.test_window_attn_backward import assert_gradients_close

    layout, rotary = vision_rotary([(1, 8, 12), (1, 20, 4)], 80)
    cu = layout.cu_window_seqlens if kind == "windows" else layout.cu_frame_seqlens
    max_seqlen = int((cu[1:] - cu[:-1]).max())
    qkv = randn(gen, layout.num_tokens, 3, 2, 80, dtype=dtype)
    grad = randn(gen, layout.num_tokens, 2, 80, dtype=dtype)

    def run(fn, qkv, grad, *rotary):
        return autograd_grads(lambda t: fn(t, *rotary), (qkv,), grad, (0,))[0]

    def ours(t, cu, positions, inv_freq):
        return qwen_kernels.window_attn_rope(
            t, cu, max_seqlen, positions, inv_freq, rotary[2], None, backend
        )

    on_device = [t.to(device) for t in (cu, rotary[0], rotary[1])]
    got = run(ours, qkv.to(device), grad.to(device), *on_device).cpu()

    def reference(t, *rotary_args):
        return window_attn_rope_reference(t, cu, max_seqlen, *rotary_args, 80**-0.5)

    wide = (rotary[0], rotary[1].double(), rotary[2])
    ref64 = run(reference, qkv.double(), grad.double(), *wide)
    eager = run(reference, qkv, grad, *rotary)
    q, k, v = qkv.double().unbind(1)
    rotated = torch.stack((*mrope_pos_reference(q, k, *wide), v), 1).to(dtype)
    assert got.dtype == dtype and got.shape == qkv.shape
    assert_gradients_close(got, ref64, eager, rotated, cu, grad)


def test_inv_freq_is_not_differentiable(gen):
    layout, rotary = vision_rotary([(1, 4, 4)], 16)
    qkv = randn(gen, layout.num_tokens, 3, 2, 16).requires_grad_()
    inv_freq = rotary[1].clone().requires_grad_()
    with pytest.raises(ValueError, match="`inv_freq` must not require grad"):
        qwen_kernels.window_attn_rope(
            qkv, layout.cu_frame_seqlens, 16, rotary[0], inv_freq, rotary[2], backend="torch"
        )
