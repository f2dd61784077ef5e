"""window_attn: reference vs an fp64 loop over segments and transformers' vision attention, every
backend vs the reference (windows, edge windows, 1-token and empty segments, long segments,
strided views), opcheck, and bad input."""

import importlib
import itertools
from types import SimpleNamespace

import pytest
import torch
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionAttention

import qwen_kernels
from qwen_kernels.model import VisionConfig
from qwen_kernels.model.layout import build_layout, normalize_grid
from qwen_kernels.ops.mrope import mrope_pos_reference
from qwen_kernels.ops.window_attn import window_attn_reference
from tests.helpers import DTYPES, assert_close_to_reference, randn, rel_err, targets, tolerance

# Windows of 64 with the edge windows of a real grid, a 1-token and an empty segment.
WINDOW_LENGTHS = [64, 64, 32, 1, 0, 48, 16, 64, 4, 12]


def cu_seqlens_of(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def segment_loop(q, k, v, cu_seqlens, scale=None) -> torch.Tensor:
    """fp64 attention, one segment at a time."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    bounds = cu_seqlens.tolist()
    for start, end in itertools.pairwise(bounds):
        if end == start:
            continue
        qs, ks, vs = (t[start:end].double().transpose(0, 1) for t in (q, k, v))  # [H, L, D]
        weights = torch.softmax(qs @ ks.transpose(1, 2) * scale, dim=-1)
        out[start:end] = (weights @ vs).transpose(0, 1)
    return out


def random_qkv(gen, tokens, heads, head_dim, dtype=torch.float32, scale=1.0):
    return [randn(gen, tokens, heads, head_dim, dtype=dtype, scale=scale) for _ in range(3)]


@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_segment_loop(gen, head_dim, dtype):
    cu = cu_seqlens_of(WINDOW_LENGTHS)
    q, k, v = random_qkv(gen, int(cu[-1]), 3, head_dim, dtype, scale=2.0)
    out = qwen_kernels.window_attn(q, k, v, cu, 64, backend="torch")
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_err(out, segment_loop(q, k, v, cu)) < 2 * tolerance(dtype)


def test_long_segments_and_loose_max_seqlen(gen):
    cu = cu_seqlens_of([300, 1, 211])
    q, k, v = random_qkv(gen, 512, 2, 80)
    out = qwen_kernels.window_attn(q, k, v, cu, 400, softmax_scale=0.05, backend="torch")
    assert rel_err(out, segment_loop(q, k, v, cu, scale=0.05)) < 1e-5


def test_matches_transformers_vision_attention(gen):
    config = Qwen2_5_VLVisionConfig(hidden_size=160, num_heads=2)
    config._attn_implementation = "eager"
    attention = Qwen2_5_VLVisionAttention(config)
    with torch.no_grad():
        for param in attention.parameters():
            param.copy_(randn(gen, *param.shape, scale=0.1))
    cu = cu_seqlens_of([16, 16, 7, 1, 9])
    tokens = int(cu[-1])
    x = randn(gen, tokens, 160)
    angles = randn(gen, tokens, 40)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    with torch.no_grad():
        expected = attention(x, cu_seqlens=cu, position_embeddings=(cos, sin))
        q, k, v = attention.qkv(x).reshape(tokens, 3, 2, 80).unbind(1)
        q, k = qwen_kernels.mrope(q, k, cos, sin, backend="torch")
        attended = qwen_kernels.window_attn(q, k, v, cu, 16, backend="torch")
        ours = attention.proj(attended.reshape(tokens, 160))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("backend", "device"), targets("window_attn"))
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backend_matches_reference(gen, backend, device, head_dim, dtype):
    cu = cu_seqlens_of(WINDOW_LENGTHS)
    q, k, v = random_qkv(gen, int(cu[-1]), 2, head_dim, dtype, scale=2.0)
    ref64 = qwen_kernels.window_attn(q.double(), k.double(), v.double(), cu, 64, backend="torch")
    eager = qwen_kernels.window_attn(q, k, v, cu, 64, backend="torch")
    got = qwen_kernels.window_attn(*[t.to(device) for t in (q, k, v, cu)], 64, backend=backend)
    assert_close_to_reference(got.cpu(), ref64, eager)


@pytest.mark.parametrize(("backend", "device"), targets("window_attn"))
def test_strided_views_of_packed_qkv(gen, backend, device):
    cu = cu_seqlens_of([5, 64, 1, 30])
    qkv = randn(gen, int(cu[-1]), 3, 2, 80)
    q, k, v = qkv.to(device).unbind(1)
    out = qwen_kernels.window_attn(q, k, v, cu.to(device), 64, backend=backend)
    assert rel_err(out.cpu(), segment_loop(*qkv.unbind(1), cu)) < 1e-5


def test_skip_value_checks_skips_the_sync(gen):
    q, k, v = random_qkv(gen, 8, 1, 64)
    bad = torch.tensor([0, 5, 3, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="non-decreasing"):
        qwen_kernels.window_attn(q, k, v, bad, 8)
    with qwen_kernels.skip_value_checks():
        qwen_kernels.window_attn(q, k, v, bad, 8)  # the caller vouched for the values
    with pytest.raises(ValueError, match="non-decreasing"):
        qwen_kernels.window_attn(q, k, v, bad, 8)


def test_opcheck(gen):
    cu = cu_seqlens_of([3, 1, 4])
    q, k, v = random_qkv(gen, 8, 2, 16)
    torch.library.opcheck(torch.ops.qwen.window_attn, (q, k, v, cu, 4, None, "torch"))
    torch.library.opcheck(torch.ops.qwen.window_attn, (q, k, v, cu, 4, 0.3, "torch"))


def test_compiles_fullgraph(gen):
    cu = cu_seqlens_of([3, 5])
    q, k, v = random_qkv(gen, 8, 2, 16)
    compiled = torch.compile(
        lambda a, b, c: qwen_kernels.window_attn(a, b, c, cu, 5), fullgraph=True
    )
    torch.testing.assert_close(compiled(q, k, v), qwen_kernels.window_attn(q, k, v, cu, 5))


def test_bad_input(gen):
    q, k, v = random_qkv(gen, 8, 2, 16)
    cu = cu_seqlens_of([3, 5])
    args = SimpleNamespace(q=q, k=k, v=v, cu=cu, max_seqlen=5)

    def call(**changes):
        a = {**vars(args), **changes}
        return qwen_kernels.window_attn(a["q"], a["k"], a["v"], a["cu"], a["max_seqlen"])

    cases = [
        ({"cu": cu.long()}, "`cu_seqlens` must be an int32 tensor"),
        ({"cu": cu[None]}, "`cu_seqlens` must be 1-D"),
        ({"cu": cu[:1]}, r"`cu_seqlens` must be \[S\+1\] with at least one segment"),
        ({"cu": torch.tensor([0, 5, 3, 8], dtype=torch.int32)}, "non-decreasing"),
        ({"cu": torch.tensor([0, 3, 7], dtype=torch.int32)}, "ending at T = 8"),
        ({"cu": torch.tensor([1, 3, 8], dtype=torch.int32)}, "starting at 0"),
        ({"cu": torch.empty(3, dtype=torch.int32, device="meta")}, "`cu_seqlens` must be on cpu"),
        ({"max_seqlen": 4}, "`max_seqlen` must be at least the longest segment"),
        ({"max_seqlen": 0}, "`max_seqlen` must be a positive int"),
        ({"k": k[:7]}, "`k` must be of q's shape"),
        ({"v": v.half()}, "`v` must be of dtype torch.float32"),
        ({"q": q[0]}, "`q` must be 3-D"),
        ({"q": torch.randint(0, 3, (8, 2, 16))}, "`q` must be of dtype"),
    ]
    for changes, match in cases:
        with pytest.raises(ValueError, match=match):
            call(**changes)
    with pytest.raises(ValueError, match="`softmax_scale` must be a positive float"):
        qwen_kernels.window_attn(q, k, v, cu, 5, softmax_scale=-1.0)


def test_reference_in_several_chunks(gen, monkeypatch):
    """The reference bounds its memory by running segments in chunks; the result is the same."""
    module = importlib.import_module("qwen_kernels.ops.window_attn")
    monkeypatch.setattr(module, "_REFERENCE_CHUNK_ELEMENTS", 64 * 2 * 16 * 2)  # 2 segments a chunk
    cu = cu_seqlens_of(WINDOW_LENGTHS)
    q, k, v = random_qkv(gen, int(cu[-1]), 2, 16)
    out = qwen_kernels.window_attn(q, k, v, cu, 64, backend="torch")
    assert rel_err(out, segment_loop(q, k, v, cu)) < 1e-5


# ---- The CUDA kernels ("cuda" on a GPU, "cuda_emu" through the emulation) ------------------------
# Emulated mma.sync is slow (a 64-token (window, head) pair costs milliseconds): few heads, few
# windows, parametrised sparingly.

NATIVE = [t for t in targets("window_attn") if t.values[0] in ("cuda", "cuda_emu")]


def native_library(backend):
    """torch.ops.qwen_cuda, or torch.ops.qwen_emu built on first use."""
    if backend == "cuda_emu":
        return importlib.import_module("qwen_kernels._emu").load()
    importlib.import_module("qwen_kernels._C")
    return torch.ops.qwen_cuda


def assert_matches_reference(got, q, k, v, cu, max_seqlen, scale=None):
    """got against the fp64 reference: q's dtype and shape, and a relative error within 1.5x that
    of eager PyTorch in q's dtype (fp32 math, one rounding), which a 1% scale or a truncation to
    bf16 exceeds (the shared helper's few-ulp slack would let those through in bf16)."""
    assert got.dtype == q.dtype and got.shape == q.shape
    ref64 = window_attn_reference(q.double(), k.double(), v.double(), cu, max_seqlen, scale)
    eager = window_attn_reference(q, k, v, cu, max_seqlen, scale)
    assert_close_to_reference(got, ref64, eager)
    assert rel_err(got, ref64) <= 1.5 * rel_err(eager, ref64), (got - ref64).abs().max()


def check_native(q, k, v, cu, max_seqlen, backend, device, scale=None):
    """Runs the kernel through the Python op on ``device`` and checks it against the reference."""
    got = qwen_kernels.window_attn(
        *[t.to(device) for t in (q, k, v, cu)], max_seqlen, softmax_scale=scale, backend=backend
    ).cpu()
    assert got.is_contiguous()
    assert_matches_reference(got, q, k, v, cu, max_seqlen, scale)


def layout_segments(grid) -> tuple[torch.Tensor, int]:
    """The attention windows of real grids (edge windows included), as the encoder builds them."""
    layout = build_layout(VisionConfig(), normalize_grid(grid), torch.device("cpu"))
    return layout.cu_window_seqlens, layout.max_window_seqlen


@pytest.mark.parametrize(("backend", "device"), NATIVE)
@pytest.mark.parametrize(
    ("grid", "dtype"),
    [
        ([(1, 10, 14)], torch.bfloat16),  # one full window and three edge windows
        ([(2, 6, 10), (1, 4, 2)], torch.float16),  # a 2-frame video and a tiny image
    ],
    ids=["image-bf16", "video-fp16"],
)
def test_native_real_window_layouts(gen, backend, device, grid, dtype):
    cu, max_seqlen = layout_segments(grid)
    q, k, v = random_qkv(gen, int(cu[-1]), 2, 80, dtype, scale=2.0)
    check_native(q, k, v, cu, max_seqlen, backend, device)


@pytest.mark.parametrize(("backend", "device"), NATIVE)
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_native_random_segments(gen, backend, device, head_dim, dtype):
    """Random lengths with 1-token and empty segments, max_seqlen above the longest, a scale."""
    lengths = [*torch.randint(0, 41, (6,), generator=gen).tolist(), 1, 0, 64]
    lengths = [lengths[i] for i in torch.randperm(len(lengths), generator=gen)]
    cu = cu_seqlens_of(lengths)
    q, k, v = random_qkv(gen, int(cu[-1]), 1, head_dim, dtype, scale=2.0)
    check_native(q, k, v, cu, 64, backend, device, scale=0.3 * head_dim**-0.5)


@pytest.mark.parametrize(("backend", "device"), NATIVE)
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_native_long_segments(gen, backend, device, head_dim, dtype):
    """The long path: a 300-token segment (5 key tiles through the 2 stages, the last partial)
    next to short ones, and max_seqlen above the longest, so short segments take it too."""
    cu = cu_seqlens_of([300, 1, 0, 70])
    q, k, v = random_qkv(gen, int(cu[-1]), 1, head_dim, dtype, scale=2.0)
    check_native(q, k, v, cu, 320, backend, device)


@pytest.mark.parametrize(("backend", "device"), NATIVE)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_strided_and_misaligned_views(gen, backend, device, dtype):
    """q, k, v as views of a packed [T, 3, H, D] buffer (read in place), and views whose rows
    cannot move as 16-byte copies (an odd offset, a non-unit last stride: copied first)."""
    cu = cu_seqlens_of([5, 64, 1, 30])
    tokens = int(cu[-1])
    qkv = randn(gen, tokens, 3, 2, 64, dtype=dtype)
    check_native(*qkv.unbind(1), cu, 64, backend, device)
    flat = randn(gen, tokens * 2 * 64 + 1, dtype=dtype)
    shifted = flat[1:].view(tokens, 2, 64)
    transposed = randn(gen, tokens, 64, 2, dtype=dtype).transpose(1, 2)
    check_native(shifted, transposed, qkv[:, 2], cu, 64, backend, device)


@pytest.mark.parametrize(("backend", "device"), NATIVE)
def test_native_tolerance_rejects_a_broken_kernel(gen, backend, device):
    """The comparison used above passes the fp32 kernel's output rounded to bf16 but fails it
    scaled by 1.01 or truncated to bf16: what a broken bf16 epilogue would produce."""
    cu = cu_seqlens_of([64, 19, 1])
    q, k, v = random_qkv(gen, int(cu[-1]), 1, 80, torch.bfloat16, scale=2.0)
    fp32 = qwen_kernels.window_attn(
        *[t.float().to(device) for t in (q, k, v)], cu.to(device), 64, backend=backend
    ).cpu()
    assert_matches_reference(fp32.bfloat16(), q, k, v, cu, 64)
    truncated = (fp32.view(torch.int32) & -65536).view(torch.float32).bfloat16()
    for broken in ((fp32 * 1.01).bfloat16(), truncated):
        with pytest.raises(AssertionError):
            assert_matches_reference(broken, q, k, v, cu, 64)


@pytest.mark.parametrize(("backend", "device"), NATIVE)
def test_native_op_checks_its_arguments(gen, backend, device):
    """The C++ op checks its input itself when called directly (torch.ops.qwen_emu...)."""
    library = native_library(backend)
    cu = cu_seqlens_of([3, 5]).to(device)
    q, k, v = (t.to(device) for t in random_qkv(gen, 8, 2, 80, torch.float16))
    cases = [
        ((q, k[:7], v, cu, 5, None), "argument 'k'"),
        ((q, k, v.float(), cu, 5, None), "argument 'v'"),
        ((q.double(), k, v, cu, 5, None), "argument 'q'"),
        ((q[..., :48], k[..., :48], v[..., :48], cu, 5, None), "head dim"),
        ((q, k, v, cu.long(), 5, None), "argument 'cu_seqlens'"),
        ((q, k, v, cu[:1], 5, None), "at least one segment"),
        ((q, k, v, cu, 0, None), "argument 'max_seqlen'"),
        ((q, k, v, cu, 5, -1.0), "argument 'softmax_scale'"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            library.window_attn(*args)
    # softmax_scale None is D^-0.5, as in the Python op.
    torch.testing.assert_close(
        library.window_attn(q, k, v, cu, 5, None), library.window_attn(q, k, v, cu, 5, 80**-0.5)
    )


# ---- The rotary-fused CUDA kernel (torch.ops.qwen_{cuda,emu}.window_attn_rope) ----------------


def rope_case(gen, grid, heads, dtype):
    """Packed qkv of a real grid's tokens, with the layout's windows, positions and frequencies."""
    layout = build_layout(VisionConfig(), normalize_grid(grid), torch.device("cpu"))
    qkv = randn(gen, layout.num_tokens, 3, heads, 80, dtype=dtype, scale=2.0)
    return qkv, layout


def rope_reference_inputs(qkv, positions, inv_freq, section):
    """q and k rotated by mrope_pos's reference (rounded to qkv's dtype), and v."""
    q, k, v = qkv.unbind(1)
    q, k = mrope_pos_reference(q, k, positions, inv_freq, section)
    return q, k, v


@pytest.mark.parametrize(("backend", "device"), NATIVE)
@pytest.mark.parametrize(
    ("grid", "dtype"),
    [([(1, 10, 14)], torch.bfloat16), ([(2, 6, 10)], torch.float16), ([(1, 6, 10)], torch.float32)],
    ids=["image-bf16", "video-fp16", "image-fp32"],
)
def test_native_rope_matches_mrope_pos_then_attention(gen, backend, device, grid, dtype):
    """Window layers: the vision tower's 2-axis rotary on its window layout."""
    qkv, layout = rope_case(gen, grid, 2, dtype)
    section = layout.rotary_section
    got = native_library(backend).window_attn_rope(
        *[t.to(device) for t in (qkv, layout.cu_window_seqlens)],
        layout.max_window_seqlen,
        *[t.to(device) for t in (layout.positions, layout.inv_freq)],
        section,
        None,
    )
    q, k, v = rope_reference_inputs(qkv, layout.positions, layout.inv_freq, section)
    assert_matches_reference(got.cpu(), q, k, v, layout.cu_window_seqlens, layout.max_window_seqlen)


@pytest.mark.parametrize(("backend", "device"), NATIVE)
@pytest.mark.parametrize(
    ("head_dim", "dtype"),
    [(64, torch.float16), (80, torch.bfloat16), (80, torch.float32), (128, torch.bfloat16)],
)
def test_native_rope_long_segments_three_axes(gen, backend, device, head_dim, dtype):
    """The long path (one 120-token frame), 3 position axes with uneven bands (M-RoPE's text
    layout), int64 positions, an fp64 inv_freq and a softmax_scale."""
    cu = cu_seqlens_of([120, 1, 0, 9])
    half = head_dim // 2
    tokens, section, scale = int(cu[-1]), [half - 2 * (half // 5), half // 5, half // 5], 0.07
    qkv = randn(gen, tokens, 3, 1, head_dim, dtype=dtype, scale=2.0)
    positions = torch.randint(0, 300, (3, tokens), generator=gen)
    inv_freq = 1.0 / 10000.0 ** (torch.arange(half, dtype=torch.float64) / half)
    got = native_library(backend).window_attn_rope(
        *[t.to(device) for t in (qkv, cu)],
        130,
        *[t.to(device) for t in (positions, inv_freq)],
        section,
        scale,
    )
    q, k, v = rope_reference_inputs(qkv, positions, inv_freq, section)
    assert_matches_reference(got.cpu(), q, k, v, cu, 130, scale)


@pytest.mark.parametrize(("backend", "device"), NATIVE)
def test_native_rope_checks_its_arguments(gen, backend, device):
    library = native_library(backend)
    cu = cu_seqlens_of([3, 5]).to(device)
    qkv = randn(gen, 8, 3, 2, 64, dtype=torch.float16).to(device)
    positions = torch.randint(0, 9, (2, 8), dtype=torch.int32).to(device)
    inv_freq = torch.rand(32, generator=gen).to(device)
    good = {"qkv": qkv, "positions": positions, "inv_freq": inv_freq, "section": [16, 16]}
    cases = [
        ({"qkv": qkv[:, :2]}, "argument 'qkv'"),
        ({"positions": positions[:, :7]}, "argument 'positions'"),
        ({"positions": positions.float()}, "argument 'positions'"),
        ({"inv_freq": inv_freq[:31]}, "argument 'inv_freq'"),
        ({"section": [16, 15]}, "argument 'mrope_section'"),
        ({"section": [32]}, "argument 'mrope_section'"),
    ]
    for changes, match in cases:
        a = {**good, **changes}
        with pytest.raises(ValueError, match=match):
            library.window_attn_rope(
                a["qkv"], cu, 5, a["positions"], a["inv_freq"], a["section"], None
            )
