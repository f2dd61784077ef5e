"""window_attn: reference vs an fp64 loop over segments and transformers' vision attention, every
backend vs the reference (windows, edge windows, 1-token and empty segments, long segments,
strided views), opcheck, and bad input."""

import dataclasses
import importlib
import itertools
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionAttention

import qwen_kernels
from qwen_kernels._backends import native_library
from qwen_kernels.model.config import VisionConfig
from qwen_kernels.model.layout import build_layout
from tests.helpers import (
    DTYPES,
    attention_accumulation,
    max_abs_err,
    randn,
    rel_err,
    targets,
    tolerance,
)

# Windows of 64 with the edge windows of a real grid, a 1-token and an empty segment.
WINDOW_LENGTHS = [64, 64, 32, 1, 0, 48, 16, 64, 4, 12]


def cu_seqlens_of(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def segment_loop(q, k, v, cu_seqlens, scale=None, drop_last_key=False) -> torch.Tensor:
    """fp64 attention, one segment at a time (``drop_last_key``: a broken one that leaves each
    segment's last key out of the softmax, where the segment has another)."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    bounds = cu_seqlens.tolist()
    for start, end in itertools.pairwise(bounds):
        if end == start:
            continue
        qs, ks, vs = (t[start:end].double().transpose(0, 1) for t in (q, k, v))  # [H, L, D]
        if drop_last_key and end - start > 1:
            ks, vs = ks[:, :-1], vs[:, :-1]
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


def assert_attention_close(out, ref64, eager, dtype, accumulation=None, factor=None):
    """The kernel's output against the fp64 reference, measured against the same-dtype eager
    reference (fp32 math rounded once): shape and dtype, relative error within 1.5x (2x in fp32)
    of eager's, max abs error within 2x of eager's plus an fp32 ulp of the output scale, and, in
    fp16/bf16, no bias: rounding to nearest leaves the mean error along the sign of the values
    near zero, while truncation or a 0.3% scale moves it by about 2 mean eager errors.
    ``accumulation`` (``attention_accumulation``) adds what two correct fp32 summation orders may
    differ by, from the math of the reduction rather than from this machine's eager kernels;
    ``factor`` replaces the relative-error factor (for outputs with a known second rounding)."""
    assert out.shape == ref64.shape and out.dtype == dtype, (out.shape, out.dtype)
    assert torch.isfinite(out).all(), "non-finite output (an element left unwritten?)"
    err, eager_err = out.double() - ref64, eager.double() - ref64
    scale = float(ref64.abs().max()) if ref64.numel() else 0.0
    abs_slack = rel_slack = torch.finfo(torch.float32).eps * scale
    if accumulation is not None and ref64.numel():
        abs_slack += float(accumulation.worst().max())
        rel_slack += accumulation.typical_rel(ref64)
    factor = factor or (2.0 if dtype == torch.float32 else 1.5)
    got_rel, eager_rel = rel_err(out, ref64), rel_err(eager, ref64)
    assert got_rel <= factor * eager_rel + rel_slack, (got_rel, eager_rel, rel_slack)
    got_abs, eager_abs = max_abs_err(out, ref64), max_abs_err(eager, ref64)
    assert got_abs <= 2 * eager_abs + abs_slack, (got_abs, eager_abs, abs_slack)
    if dtype != torch.float32 and out.numel() >= 256:
        bias = float((err * ref64.sign()).mean() / eager_err.abs().mean().clamp_min(1e-30))
        assert abs(bias) <= 0.5, f"biased rounding: mean signed error {bias:+.2f} eager errors"


def check_backend(backend, device, q, k, v, cu, max_seqlen, softmax_scale=None):
    """Run ``backend`` on ``device`` and hold it to ``assert_attention_close``."""
    up = [t.double() for t in (q, k, v)]
    ref64 = qwen_kernels.window_attn(*up, cu, max_seqlen, softmax_scale, backend="torch")
    eager = qwen_kernels.window_attn(q, k, v, cu, max_seqlen, softmax_scale, backend="torch")
    args = [t.to(device) for t in (q, k, v, cu)]
    got = qwen_kernels.window_attn(*args, max_seqlen, softmax_scale, backend=backend)
    assert got.device.type == torch.device(device).type and got.is_contiguous()
    accumulation = attention_accumulation(q, k, v, cu, softmax_scale)
    assert_attention_close(got.cpu(), ref64, eager, q.dtype, accumulation)


def grid_windows(grids) -> tuple[torch.Tensor, int, torch.Tensor, int]:
    """Window and frame segments of a batch of real grids (odd sizes: edge windows)."""
    layout = build_layout(VisionConfig.tiny(), tuple(grids), torch.device("cpu"))
    return (
        layout.cu_window_seqlens,
        layout.max_window_seqlen,
        layout.cu_frame_seqlens,
        layout.max_frame_seqlen,
    )


# An image of 10x14 patches (windows of 64, 48, 16 and 12 tokens) and a 2-frame 6x10 video (48
# and 12 per frame); frames of 140 and 60 tokens.
GRIDS = [(1, 10, 14), (2, 6, 10)]
# The CUDA kernels hold head_dim 64, 80 and 128 only (csrc/window_attn/variants.h); the Triton
# kernel any head_dim up to 256.
TRITON = [t for t in targets("window_attn") if t.values[0] == "triton"]


@pytest.mark.parametrize(("backend", "device"), targets("window_attn"))
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backend_matches_reference(gen, backend, device, head_dim, dtype):
    cu = cu_seqlens_of(WINDOW_LENGTHS)
    q, k, v = random_qkv(gen, int(cu[-1]), 2, head_dim, dtype, scale=2.0)
    check_backend(backend, device, q, k, v, cu, 64)


@pytest.mark.parametrize(("backend", "device"), targets("window_attn"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_windows_of_image_and_video_grids(gen, backend, device, dtype):
    cu, longest, _, _ = grid_windows(GRIDS)
    assert sorted(set((cu[1:] - cu[:-1]).tolist())) == [12, 16, 48, 64]
    q, k, v = random_qkv(gen, int(cu[-1]), 2, 80, dtype, scale=2.0)
    check_backend(backend, device, q, k, v, cu, longest)


# Each head_dim in bf16, each dtype at head_dim 80 (the interpreter takes seconds per case).
LONG_CASES = [(80, torch.float32), (80, torch.float16), (80, torch.bfloat16)] + [
    (d, torch.bfloat16) for d in (64, 128)
]


@pytest.mark.parametrize(("backend", "device"), targets("window_attn"))
@pytest.mark.parametrize(("head_dim", "dtype"), LONG_CASES)
def test_long_segments(gen, backend, device, head_dim, dtype):
    """Segments of hundreds of tokens (the long path: several query and key blocks, partial last
    blocks), a 1-token and an empty segment, max_seqlen above the longest."""
    cu = cu_seqlens_of([0, 300, 1, 0, 131])
    q, k, v = random_qkv(gen, int(cu[-1]), 2, head_dim, dtype, scale=2.0)
    check_backend(backend, device, q, k, v, cu, 333)


@pytest.mark.parametrize(("backend", "device"), targets("window_attn"))
def test_frames_of_a_grid(gen, backend, device):
    """The full-attention layers' segments: whole frames of the image and video."""
    _, _, cu, longest = grid_windows(GRIDS)
    q, k, v = random_qkv(gen, int(cu[-1]), 2, 80, torch.bfloat16, scale=2.0)
    check_backend(backend, device, q, k, v, cu, longest)


@pytest.mark.parametrize(("backend", "device"), targets("window_attn"))
@pytest.mark.parametrize("max_seqlen", [37, 40, 64, 65])
def test_random_lengths_and_loose_max_seqlen(gen, backend, device, max_seqlen):
    """Random segment lengths up to 37 with empty and 1-token ones; max_seqlen at or above the
    longest picks smaller or larger tiles (65: the long path over short segments)."""
    lengths = [*torch.randint(0, 38, (9,), generator=gen).tolist(), 0, 1, 37, 0]
    cu = cu_seqlens_of(lengths)
    q, k, v = random_qkv(gen, int(cu[-1]), 2, 80, torch.bfloat16, scale=2.0)
    check_backend(backend, device, q, k, v, cu, max_seqlen)


@pytest.mark.parametrize(("backend", "device"), TRITON)
@pytest.mark.parametrize("lengths", [[1, 3, 16], [9, 0, 32, 2]], ids=["to16", "to32"])
@pytest.mark.parametrize("head_dim", [16, 48, 72, 96])
def test_short_windows_and_other_head_dims(gen, backend, device, lengths, head_dim):
    """16- and 32-row tiles; head_dims that are one block, two blocks, or masked blocks."""
    cu = cu_seqlens_of(lengths)
    q, k, v = random_qkv(gen, int(cu[-1]), 3, head_dim, torch.float16, scale=2.0)
    check_backend(backend, device, q, k, v, cu, max(lengths))


@pytest.mark.parametrize(("backend", "device"), targets("window_attn"))
@pytest.mark.parametrize("softmax_scale", [0.05, 0.4])
def test_softmax_scale(gen, backend, device, softmax_scale):
    cu = cu_seqlens_of([64, 5, 17, 1])
    q, k, v = random_qkv(gen, int(cu[-1]), 2, 80, torch.bfloat16)
    check_backend(backend, device, q, k, v, cu, 64, softmax_scale)


@pytest.mark.parametrize(("backend", "device"), targets("window_attn"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_views_of_packed_qkv(gen, backend, device, dtype):
    cu = cu_seqlens_of([5, 64, 1, 30])
    qkv = randn(gen, int(cu[-1]), 3, 2, 80, dtype=dtype, scale=2.0)
    q, k, v = qkv.unbind(1)
    check_backend(backend, device, q, k, v, cu, 64)
    # Head-major storage, and columns with a stride (copied by kernels that need unit columns).
    heads_first = randn(gen, 2, int(cu[-1]), 80, dtype=dtype).transpose(0, 1)
    spaced = randn(gen, int(cu[-1]), 2, 160, dtype=dtype)[..., ::2]
    check_backend(backend, device, heads_first, k, spaced, cu, 64)


@pytest.mark.parametrize(("backend", "device"), targets("window_attn"))
def test_long_path_on_k_and_v_of_different_token_strides(gen, backend, device):
    """The long path with v stored head-major (token stride D) beside a token-major k (H * D):
    the CUDA kernel reads K and V through one token stride, so its launcher copies v."""
    cu = cu_seqlens_of([130, 7, 65])
    q, k, _ = random_qkv(gen, int(cu[-1]), 2, 80, torch.bfloat16, scale=2.0)
    v = randn(gen, 2, int(cu[-1]), 80, dtype=torch.bfloat16).transpose(0, 1)
    check_backend(backend, device, q, k, v, cu, 130)


def test_check_rejects_scaled_and_truncated_outputs(gen):
    """The comparison catches a kernel whose output is 0.3% off or truncated instead of rounded
    to bf16: built from the fp32 reference of bf16 inputs, then broken on purpose."""
    cu = cu_seqlens_of(WINDOW_LENGTHS)
    q, k, v = random_qkv(gen, int(cu[-1]), 2, 80, torch.bfloat16, scale=2.0)
    ref64 = qwen_kernels.window_attn(q.double(), k.double(), v.double(), cu, 64, backend="torch")
    eager = qwen_kernels.window_attn(q, k, v, cu, 64, backend="torch")
    exact = qwen_kernels.window_attn(q.float(), k.float(), v.float(), cu, 64, backend="torch")
    slack = attention_accumulation(q, k, v, cu)
    assert_attention_close(exact.bfloat16(), ref64, eager, torch.bfloat16, slack)
    truncated = (exact.view(torch.int32) & ~0xFFFF).view(torch.float32).bfloat16()
    for broken in (truncated, (exact * 1.003).bfloat16(), (exact * 1.01).bfloat16()):
        with pytest.raises(AssertionError):
            assert_attention_close(broken, ref64, eager, torch.bfloat16, slack)


def test_check_rejects_wrong_fp32_outputs_despite_the_summation_slack(gen):
    """In fp32 the summation-order slack admits the fp64 result rounded once (the best a kernel
    can do) and still rejects a 0.1% scale and a key dropped from each window."""
    cu = cu_seqlens_of(WINDOW_LENGTHS)
    q, k, v = random_qkv(gen, int(cu[-1]), 2, 80, torch.float32, scale=2.0)
    up = [t.double() for t in (q, k, v)]
    ref64 = qwen_kernels.window_attn(*up, cu, 64, backend="torch")
    eager = qwen_kernels.window_attn(q, k, v, cu, 64, backend="torch")
    slack = attention_accumulation(q, k, v, cu)
    assert_attention_close(ref64.float(), ref64, eager, torch.float32, slack)
    dropped = segment_loop(q, k, v, cu, drop_last_key=True)
    for broken in ((ref64 * 1.001).float(), dropped.float()):
        with pytest.raises(AssertionError):
            assert_attention_close(broken, ref64, eager, torch.float32, slack)


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


@pytest.mark.parametrize(("backend", "device"), targets("window_attn"))
def test_kernel_rejects_head_dims_it_cannot_hold(gen, backend, device):
    """An explicit backend refuses a head dim its kernels lack, naming what they hold (for the
    CUDA kernels: what the build reports)."""
    head_dim, held = (272, "up to 256") if backend == "triton" else (48, "64, 80, 128")
    q, k, v = (t.to(device) for t in random_qkv(gen, 4, 1, head_dim))
    cu = cu_seqlens_of([4]).to(device)
    match = f"backend '{backend}' cannot take these inputs: its kernels? holds? head dims {held}"
    with pytest.raises(ValueError, match=match):
        qwen_kernels.window_attn(q, k, v, cu, 4, backend=backend)


def test_triton_launch_configs():
    """The heuristic, a pure function of the problem and the arch (None: the interpreter): window
    tiles sized by max_seqlen, heads sharing rotary angles under the interpreter, long-path
    tiles by dtype, head_dim and GPU generation; head_dim split into power-of-two blocks."""
    pytest.importorskip("triton")
    module = importlib.import_module("qwen_kernels.triton_kernels.window_attn")
    config = module.attn_config
    assert [module.head_dim_blocks(d) for d in (16, 64, 72, 80, 96, 128)] == [
        (16, 0), (64, 0), (64, 16), (64, 16), (64, 32), (128, 0),
    ]  # fmt: skip
    window = config(64, 80, torch.bfloat16, None, heads=16)
    assert (window.block_m, window.block_n, window.one_pass, window.num_warps) == (64, 64, True, 4)
    assert window.heads_per_program == 1
    assert config(64, 80, torch.bfloat16, None, heads=6, rotary=True).heads_per_program == 2
    assert config(20, 80, torch.bfloat16, None).block_m == 32
    assert config(9, 80, torch.bfloat16, None).block_m == 16
    assert not config(65, 80, torch.bfloat16, None).one_pass
    hopper = config(4096, 80, torch.bfloat16, (9, 0))
    assert (hopper.block_m, hopper.block_n, hopper.num_warps, hopper.num_stages) == (128, 128, 8, 2)
    hopper_128 = config(4096, 128, torch.bfloat16, (9, 0))
    assert (hopper_128.block_m, hopper_128.block_n, hopper_128.num_stages) == (128, 64, 3)
    fp32 = config(4096, 80, torch.float32, (9, 0))
    assert (fp32.block_m, fp32.block_n, fp32.num_warps) == (64, 32, 8)
    assert config(64, 80, torch.float32, (9, 0)) == fp32
    assert config(64, 80, torch.bfloat16, (9, 0), heads=16, rotary=True).heads_per_program == 1
    assert config(4096, 80, torch.bfloat16, (8, 0)).num_stages == 3
    assert config(4096, 128, torch.bfloat16, (8, 0)).num_stages == 2
    assert config(4096, 80, torch.bfloat16, (8, 9)).num_stages == 2
    assert module.rotate_config(80, (9, 0)).block_tokens == 64
    assert module.rotate_config(128, (9, 0)).block_tokens == 32


def test_every_triton_launcher_has_a_pure_config_heuristic():
    """Each Triton launcher's configuration comes from a frozen config object made by a
    heuristic of the problem and the arch, the same answer every time."""
    pytest.importorskip("triton")
    kernels = "qwen_kernels.triton_kernels."
    rms_norm = importlib.import_module(kernels + "rms_norm").rms_norm_config
    swiglu = importlib.import_module(kernels + "swiglu").swiglu_config
    merge = importlib.import_module(kernels + "patch_merge").patch_merge_config
    rope = importlib.import_module(kernels + "mrope").mrope_config
    gemm = importlib.import_module(kernels + "rms_norm_swiglu").gemm_config
    for arch in (None, (8, 0), (9, 0)):
        configs = [
            rms_norm(1280, arch),
            swiglu(3420, arch),
            merge(1280, arch),
            rope(80, 16, 16, arch),
            gemm(1280, arch),
        ]
        for made in configs:
            assert dataclasses.is_dataclass(made) and made.__dataclass_params__.frozen
        assert configs == [rms_norm(1280, arch), swiglu(3420, arch), merge(1280, arch),
                           rope(80, 16, 16, arch), gemm(1280, arch)]  # fmt: skip
    assert rms_norm(1280, None).block_cols == 2048 and rms_norm(64, None).rows == 16
    assert gemm(1280, None).upcast and not gemm(1280, (9, 0)).upcast
    assert rope(80, 16, 2, (9, 0)).block_heads == 2


# ---- The CUDA kernels' own contract ("cuda" on a GPU, "cuda_emu" through the emulation) -------
# The tests above run them like every backend; these check what only the C++ ops do. Emulated
# mma.sync is slow (a 64-token (window, head) pair costs milliseconds): few heads, few windows.

NATIVE = [t for t in targets("window_attn") if t.values[0] in ("cuda", "cuda_emu")]


@pytest.mark.parametrize(("backend", "device"), NATIVE)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_misaligned_views(gen, backend, device, dtype):
    """Views whose rows cannot move as 16-byte copies (an odd offset, a non-unit last stride):
    the launcher copies them first."""
    cu = cu_seqlens_of([5, 64, 1, 30])
    tokens = int(cu[-1])
    flat = randn(gen, tokens * 2 * 64 + 1, dtype=dtype)
    shifted = flat[1:].view(tokens, 2, 64)
    transposed = randn(gen, tokens, 64, 2, dtype=dtype).transpose(1, 2)
    v = randn(gen, tokens, 2, 64, dtype=dtype)
    check_backend(backend, device, shifted, transposed, v, cu, 64)


# Run in a fresh process: the warning is once per process, and other tests may have shown it.
COPY_WARNING_SCRIPT = """
import sys, warnings
import torch, qwen_kernels
backend, device = sys.argv[1:]
cu = torch.tensor([0, 5, 69], dtype=torch.int32, device=device)
q, k, v = torch.randn(3, 69, 2, 64, dtype=torch.bfloat16, device=device)
shifted = torch.randn(69 * 2 * 64 + 1, dtype=torch.bfloat16, device=device)[1:].view(69, 2, 64)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    qwen_kernels.window_attn(q, k, v, cu, 64, backend=backend)
    aligned = len(caught)
    for _ in range(2):
        qwen_kernels.window_attn(shifted, k, v, cu, 64, backend=backend)
print(aligned, len(caught) - aligned)
print(caught[-1].message if len(caught) > aligned else "")
"""


@pytest.mark.parametrize(("backend", "device"), NATIVE)
def test_native_copy_of_misaligned_rows_warns_once(backend, device):
    """The copy of a misaligned q is not silent: the first one warns, naming the tensor, its
    strides and the bytes copied; aligned inputs warn nothing."""
    run = subprocess.run(
        [sys.executable, "-c", COPY_WARNING_SCRIPT, backend, device],
        capture_output=True,
        text=True,
        check=True,
    )
    counts, message = run.stdout.splitlines()
    assert counts == "0 1"
    assert "copies q" in message and "strides [128, 64, 1]" in message
    assert f"{69 * 2 * 64 * 2} bytes" in message


@pytest.mark.parametrize(("backend", "device"), NATIVE)
def test_native_op_checks_its_arguments(gen, backend, device):
    """The C++ op checks its input itself when called directly (torch.ops.qwen_emu...)."""
    library = native_library(backend)
    cu = cu_seqlens_of([3, 5]).to(device)
    q, k, v = (t.to(device) for t in random_qkv(gen, 8, 2, 80, torch.float16))
    scale = 80**-0.5
    cases = [
        ((q, k[:7], v, cu, 5, scale), "argument 'k'"),
        ((q, k, v.float(), cu, 5, scale), "argument 'v'"),
        ((q.double(), k, v, cu, 5, scale), "argument 'q'"),
        ((q[..., :48], k[..., :48], v[..., :48], cu, 5, scale), "head dim"),
        ((q, k, v, cu.long(), 5, scale), "argument 'cu_seqlens'"),
        ((q, k, v, cu[:1], 5, scale), "at least one segment"),
        ((q, k, v, cu, 0, scale), "argument 'max_seqlen'"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            library.window_attn(*args)


@pytest.mark.parametrize(("backend", "device"), NATIVE)
def test_native_head_dims_are_what_the_kernels_hold(gen, backend, device):
    """The build's list of head dims (what the op layer reads) is the list its dispatch holds:
    each runs, a head dim between them is refused with the same list."""
    library = native_library(backend)
    held = list(library.window_attn_head_dims())
    assert held and held == sorted(held)
    cu = cu_seqlens_of([3]).to(device)
    for head_dim in held:
        q = randn(gen, 3, 1, head_dim, dtype=torch.bfloat16).to(device)
        out = library.window_attn(q, q, q, cu, 3, 1.0)
        assert out.shape == q.shape and torch.isfinite(out).all()
    q = randn(gen, 3, 1, held[0] + 2, dtype=torch.bfloat16).to(device)
    dims = ", ".join(map(str, held))
    with pytest.raises(ValueError, match=f"a head dim \\(q.shape\\[2\\]\\) of {dims}"):
        library.window_attn(q, q, q, cu, 3, 1.0)


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
                a["qkv"], cu, 5, a["positions"], a["inv_freq"], a["section"], 0.125
            )


@pytest.mark.parametrize("op", ["window_attn", "window_attn_rope"])
def test_auto_picks_a_kernel_that_holds_the_head_dim(monkeypatch, op):
    """On CUDA tensors "auto" takes the CUDA kernels for the head dims the build holds, Triton for
    others up to 256, the reference beyond (shown here on meta tensors standing in for CUDA ones,
    with the head dims the emulation build reports: the same kernel source)."""
    pytest.importorskip("triton")
    backends = importlib.import_module("qwen_kernels._backends")
    attention = importlib.import_module("qwen_kernels.ops.window_attn")
    if backends.runtime_missing("cuda_emu", "cpu") is not None:
        pytest.skip(backends.runtime_missing("cuda_emu", "cpu"))
    held = attention.native_head_dims("cuda_emu")
    table = backends.REGISTRY[op]
    monkeypatch.setitem(backends._AUTO_ORDER, "meta", ("cuda", "triton", "torch"))
    monkeypatch.setattr(backends, "runtime_missing", lambda name, device=None: None)
    monkeypatch.setattr(attention, "native_head_dims", lambda backend: held)
    expected = {80: "cuda", 128: "cuda", 72: "triton", 256: "triton", 272: "torch"}
    for head_dim, backend in expected.items():
        like = torch.empty(4, 3, 2, head_dim, device="meta")
        assert table.select_name("auto", like) == backend, head_dim


# ---- What only a GPU shows (issue: device guards, capture-safe checks, FMA contraction) --------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_inputs_on_the_second_gpu(gen, backend):
    """Inputs on cuda:1 while cuda:0 is current: the launch goes to the inputs' device."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    cu = cu_seqlens_of(WINDOW_LENGTHS)
    q, k, v = random_qkv(gen, int(cu[-1]), 2, 80, torch.bfloat16)
    with torch.cuda.device(0):
        check_backend(backend, "cuda:1", q, k, v, cu, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_direct_call_captured_in_a_cuda_graph_replays_like_eager(gen, backend):
    """A direct op call (value checks on) inside torch.cuda.graph: the checks that would sync
    are skipped during capture, and the replay computes what the eager call does."""
    cu = cu_seqlens_of(WINDOW_LENGTHS).cuda()
    q, k, v = (t.cuda() for t in random_qkv(gen, int(cu[-1]), 2, 80, torch.bfloat16))
    eager = qwen_kernels.window_attn(q, k, v, cu, 64, backend=backend)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # warm up on the side stream, as capture requires
        qwen_kernels.window_attn(q, k, v, cu, 64, backend=backend)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = qwen_kernels.window_attn(q, k, v, cu, 64, backend=backend)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


@pytest.mark.parametrize(("backend", "device"), targets("window_attn", with_reference=True))
@pytest.mark.parametrize(
    ("bounds", "max_seqlen", "defined"),
    [
        ([0, 20, 64, 999], 64, [(0, 20), (20, 64), (64, 90)]),  # the last bound past T
        ([-5, 10, 90], 80, [(0, 10), (10, 90)]),  # a negative first bound
        ([0, 50, 90], 32, [(0, 32), (50, 82)]),  # segments longer than max_seqlen: cut
        ([0, 85, 90], 70, [(0, 70), (85, 90)]),  # the same on the long path
        # A decrease: segment 2 is [10, 90), and rows 10-69, which segment 0 holds too, are
        # undefined; segment 0's first 10 rows are not.
        ([0, 70, 10, 90], 80, [(0, 70, 10)]),
    ],
    ids=["past-end", "negative", "cut", "cut-long", "decreasing"],
)
def test_bad_layouts_with_checks_off(gen, backend, device, bounds, max_seqlen, defined):
    """With the value checks skipped, every backend clamps the segment bounds to [0, T] and cuts
    segments at max_seqlen: no access out of bounds, and the defined rows (each clamped segment's
    first max_seqlen tokens) are attention over those tokens, the same on every backend."""
    tokens = 90
    q, k, v = random_qkv(gen, tokens, 2, 64)
    cu = torch.tensor(bounds, dtype=torch.int32)
    with qwen_kernels.skip_value_checks():
        out = qwen_kernels.window_attn(
            *(t.to(device) for t in (q, k, v, cu)), max_seqlen, backend=backend
        ).cpu()
    for start, end, *rows in defined:
        piece = slice(start, end)
        expected = segment_loop(q[piece], k[piece], v[piece], cu_seqlens_of([end - start]))
        kept = rows[0] if rows else end - start
        assert rel_err(out[start : start + kept], expected[:kept]) < 1e-5, (start, end)


def test_auto_order_on_hopper_long_segments_comes_from_auto_choices(monkeypatch):
    """ "auto"'s order for CUDA tensors: AUTO_CHOICES's entry for the GPU and path (Triton first
    for long segments on sm_90), the device's order elsewhere; each entry names its source."""
    backends = importlib.import_module("qwen_kernels._backends")
    attention = importlib.import_module("qwen_kernels.ops.window_attn")
    like = torch.empty(4, 2, 80, device="meta")
    for major, max_seqlen, expected in [
        (9, 4096, ("triton", "cuda", "torch")),
        (9, 64, None),
        (8, 4096, None),
        (10, 4096, None),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, m=major: (m, 0))
        assert attention.attention_auto_order(like, max_seqlen) == expected, (major, max_seqlen)
    assert all(source.startswith("static") for _, source in attention.AUTO_CHOICES.values())
    monkeypatch.setattr(backends, "runtime_missing", lambda name, device=None: None)
    table = backends.REGISTRY["window_attn"]
    assert table.select_name("auto", like, ("triton", "cuda", "torch")) == "triton"
    assert table.select_name("auto", torch.empty(4, 2, 512, device="meta"), ("cuda",)) == "torch"
