"""mrope / mrope_pos and their in-place forms: reference vs fp64 math and transformers' vision
and text rotary embeddings, every backend vs the reference, opcheck, and bad input; gradients
against fp64 autograd of the eager reference, and the in-place forms refusing inputs that
require grad."""

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
from qwen_kernels._backends import TRITON_INTERPRETING
from qwen_kernels.ops.mrope import mrope_pos_reference, mrope_reference
from tests.helpers import (
    DTYPES,
    assert_close_to_reference,
    autograd_grads,
    backends_for,
    randn,
    rel_err,
    targets,
    tolerance,
)

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


def text_section(head_dim: int) -> list[int]:
    """Qwen2.5-VL's [16, 24, 24] scaled to ``head_dim``."""
    t, h = head_dim // 8, 3 * head_dim // 16
    return [t, h, head_dim // 2 - t - h]


def text_inv_freq(head_dim: int, theta: float = 1e6) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))


def layout_qk(gen, layout: str, dtype, head_dim: int, seq: int = 9):
    """q, k (and the buffer they are views of) in the layouts the model hands over:
    "vision": [T, H, D] views of a packed qkv [T, 3, H, D];
    "bshd": [B, S, H, D] with GQA (k has fewer heads), views of a packed [B, S, H + 2 H_k, D];
    "bhsd": [B, H, S, D] tensors seen as [B, S, H, D] (transposed views), GQA."""
    if layout == "vision":
        buffer = randn(gen, seq, 3, 3, head_dim, dtype=dtype)
        q, k, _ = buffer.unbind(1)
        return q, k, buffer
    if layout == "bshd":
        buffer = randn(gen, 2, seq, 4 + 2 * 2, head_dim, dtype=dtype)
        return buffer[:, :, :4], buffer[:, :, 4:6], buffer
    buffer = randn(gen, 2, 4 + 2 * 2, seq, head_dim, dtype=dtype)
    return buffer[:, :4].transpose(1, 2), buffer[:, 4:6].transpose(1, 2), buffer


def layout_positions(gen, layout: str, q: torch.Tensor, head_dim: int, high: int = 300):
    """Positions, inv_freq and mrope_section for q's layout (2 axes for the vision layout)."""
    seq = q.shape[-3]
    if layout == "vision":
        positions = torch.randint(0, high, (2, seq), generator=gen)
        axial = text_inv_freq(head_dim // 2, 1e4)
        return positions, torch.cat([axial, axial]), [head_dim // 4, head_dim // 4]
    # Text positions broadcast over the batch in one case, one row per sample in the other.
    batch = 1 if layout == "bshd" else q.shape[0]
    positions = torch.randint(0, high, (3, batch, seq), generator=gen)
    return positions, text_inv_freq(head_dim), text_section(head_dim)


def spacing(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The output dtype's spacing (1 ulp) at the larger of |out| and |ref|, in fp64."""
    eps = torch.finfo(out.dtype).eps
    big = torch.maximum(out.double().abs(), ref.double().abs()).clamp_min(1e-30)
    return eps * torch.exp2(torch.floor(torch.log2(big)))


def pair_magnitude(x: torch.Tensor) -> torch.Tensor:
    """|x1| + |x2| of the pair each output element is rotated from: the rotation cancels, so an
    output near zero carries the rounding of its inputs' size."""
    first, second = x.double().abs().chunk(2, dim=-1)
    return torch.cat([first + second] * 2, dim=-1)


def assert_matches_fp32_reference(out, ref, x, exact: bool) -> None:
    """``out`` against the eager fp32 reference ``ref`` (rounded once to the same dtype).

    exact: the arithmetic is the same (tables: products and a sum, each rounded), so bit equality.
    Otherwise cos/sin come from another libm (an fp32 ulp apart at most), which moves the fp32
    result by up to 2 fp32 ulps of |x1| + |x2| (more than an ulp of a small output): so within
    that plus one ulp of the output dtype, and most elements equal (99% for fp16/bf16, 75% for
    fp32). A kernel that truncates (half the elements off) or scales by 1.01 fails."""
    assert out.dtype == ref.dtype and out.shape == ref.shape, (out.dtype, out.shape, ref.shape)
    assert torch.isfinite(out).all()
    if exact:
        assert torch.equal(out, ref), f"{int((out != ref).sum())} of {out.numel()} differ"
        return
    bound = spacing(out, ref) + 2 * torch.finfo(torch.float32).eps * pair_magnitude(x)
    worst = float(((out.double() - ref.double()).abs() / bound).max())
    equal = float((out == ref).double().mean())
    assert worst <= 1.0, f"off by {worst:.2f} x the bound"
    assert equal >= (0.75 if out.dtype == torch.float32 else 0.99), f"only {equal:.1%} equal"


@pytest.mark.parametrize(("backend", "device"), targets("mrope_pos"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("layout", ["vision", "bshd", "bhsd"])
def test_mrope_pos_kernels(gen, backend, device, dtype, head_dim, layout):
    """Every kernel, layout, head_dim and dtype against fp64 math and the fp32 reference."""
    q, k, _ = layout_qk(gen, layout, dtype, head_dim)
    positions, inv_freq, section = layout_positions(gen, layout, q, head_dim)
    ref64 = qwen_kernels.mrope_pos(q.double(), k.double(), positions, inv_freq, section, "torch")
    eager = qwen_kernels.mrope_pos(q, k, positions, inv_freq, section, "torch")
    args = [t.to(device) for t in (q, k, positions, inv_freq)]
    got = qwen_kernels.mrope_pos(*args, section, backend)
    for out, ref, same, x in zip(got, ref64, eager, (q, k), strict=True):
        assert out.is_contiguous()
        assert_close_to_reference(out.cpu(), ref, same, magnitude=pair_magnitude(x))
        assert_matches_fp32_reference(out.cpu(), same, x, exact=False)


@pytest.mark.parametrize(("backend", "device"), targets("mrope"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["vision", "bshd", "bhsd"])
@pytest.mark.parametrize("table_dtype", ["fp32", "same", "other"])
def test_mrope_kernels(gen, backend, device, dtype, layout, table_dtype):
    """Tables composed (vision) and per axis (text) in fp32, q's dtype or another dtype: the
    arithmetic is the reference's, so the outputs are bit-equal to it."""
    head_dim = 80 if layout == "vision" else 64
    q, k, _ = layout_qk(gen, layout, dtype, head_dim)
    positions, inv_freq, section = layout_positions(gen, layout, q, head_dim)
    angles = positions[..., None].float() * inv_freq[: head_dim // 2]
    tables = torch.cat([angles, angles], dim=-1)
    cos, sin = tables.cos(), tables.sin()
    if layout == "vision":  # composed [T, D], angles already per frequency band
        cos, sin = (t[0] for t in rope_tables_vision(positions, inv_freq, head_dim))
        section = None
    other = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
    table_to = {"fp32": torch.float32, "same": dtype, "other": other}[table_dtype]
    cos, sin = cos.to(table_to), sin.to(table_to)
    ref64 = qwen_kernels.mrope(q.double(), k.double(), cos, sin, section, "torch")
    eager = qwen_kernels.mrope(q, k, cos, sin, section, "torch")
    got = qwen_kernels.mrope(*[t.to(device) for t in (q, k, cos, sin)], section, backend)
    for out, ref, same, x in zip(got, ref64, eager, (q, k), strict=True):
        assert_close_to_reference(out.cpu(), ref, same, magnitude=pair_magnitude(x))
        assert_matches_fp32_reference(out.cpu(), same, x, exact=True)


def rope_tables_vision(positions, inv_freq, head_dim):
    """Composed vision cos/sin [1, T, D] from (row, column) positions."""
    from qwen_kernels.ops.mrope import rope_tables

    return tuple(
        t[None] for t in rope_tables(positions, inv_freq, [head_dim // 4] * 2, torch.float32)
    )


@pytest.mark.parametrize(("backend", "device"), targets("mrope_pos_"))
@pytest.mark.parametrize("layout", ["vision", "bshd", "bhsd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_in_place_forms_on_packed_views(gen, backend, device, layout, dtype):
    """mrope_pos_ and mrope_ rotate q and k where they lie in a packed buffer; the rest of the
    buffer (v) is untouched."""
    head_dim = 80
    q, k, buffer = layout_qk(gen, layout, dtype, head_dim)
    positions, inv_freq, section = layout_positions(gen, layout, q, head_dim)
    expected = qwen_kernels.mrope_pos(q, k, positions, inv_freq, section, "torch")
    angles = positions[..., None].float() * inv_freq
    cos, sin = torch.cat([angles] * 2, -1).cos(), torch.cat([angles] * 2, -1).sin()
    table_section = section
    if layout == "vision":
        cos, sin = (t[0] for t in rope_tables_vision(positions, inv_freq, head_dim))
        table_section = None
    expected_tables = qwen_kernels.mrope(q, k, cos, sin, table_section, "torch")
    for rotate, want, exact in (
        (
            lambda q_, k_, d: qwen_kernels.mrope_pos_(
                q_, k_, positions.to(d), inv_freq.to(d), section, backend
            ),
            expected,
            False,
        ),
        (
            lambda q_, k_, d: qwen_kernels.mrope_(
                q_, k_, cos.to(d), sin.to(d), table_section, backend
            ),
            expected_tables,
            True,
        ),
    ):
        packed = buffer.clone().to(device)
        rotated_q, rotated_k, _ = layout_qk_views(layout, packed)
        untouched = torch.ones_like(packed, dtype=torch.bool)
        untouched_q, untouched_k, _ = layout_qk_views(layout, untouched)
        untouched_q.fill_(False)
        untouched_k.fill_(False)
        rotate(rotated_q, rotated_k, device)
        assert_matches_fp32_reference(rotated_q.cpu(), want[0], q, exact)
        assert_matches_fp32_reference(rotated_k.cpu(), want[1], k, exact)
        assert torch.equal(packed.cpu()[untouched.cpu()], buffer[untouched]), "v was touched"


def layout_qk_views(layout: str, buffer: torch.Tensor):
    """The q, k views ``layout_qk`` takes of a buffer."""
    if layout == "vision":
        return buffer.unbind(1)
    if layout == "bshd":
        return buffer[:, :, :4], buffer[:, :, 4:6], None
    return buffer[:, :4].transpose(1, 2), buffer[:, 4:6].transpose(1, 2), None


@pytest.mark.parametrize(("backend", "device"), targets("mrope_pos"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_positions(gen, backend, device, dtype):
    """Positions up to 10^6 (angles up to 10^6 rad): as accurate as the fp32 reference, which
    rounds the angle to fp32 and then takes a correctly reduced cos/sin."""
    head_dim = 64
    q, k, _ = layout_qk(gen, "bshd", dtype, head_dim, seq=7)
    positions = torch.randint(900_000, 1_000_001, (3, 1, 7), generator=gen)
    inv_freq = text_inv_freq(head_dim)
    section = text_section(head_dim)
    # fp64 rotation by the angles the fp32 reference forms (one fp32 rounding of p * f).
    axis = torch.repeat_interleave(torch.arange(3), torch.tensor(section))
    angles32 = positions.float()[axis].movedim(0, -1) * inv_freq
    eager = qwen_kernels.mrope_pos(q, k, positions, inv_freq, section, "torch")
    args = [t.to(device) for t in (q, k, positions, inv_freq)]
    got = qwen_kernels.mrope_pos(*args, section, backend)
    for out, same, x in zip(got, eager, (q, k), strict=True):
        ref64 = direct_rotate(x, angles32.double())
        assert_close_to_reference(out.cpu(), ref64, same, magnitude=pair_magnitude(x))
        assert_matches_fp32_reference(out.cpu(), same, x, exact=backend == "torch")


@pytest.mark.parametrize(("backend", "device"), targets("mrope_pos"))
def test_more_leading_dims_and_broadcast(gen, backend, device):
    """q [2, 2, S, H, D]: the positions broadcast over the first batch dim, the tables over both."""
    head_dim = 64
    q = randn(gen, 2, 2, 5, 3, head_dim)
    k = randn(gen, 2, 2, 5, 1, head_dim)
    positions = torch.randint(0, 50, (3, 2, 5), generator=gen)
    inv_freq, section = text_inv_freq(head_dim), text_section(head_dim)
    expected = qwen_kernels.mrope_pos(q, k, positions, inv_freq, section, "torch")
    args = [t.to(device) for t in (q, k, positions, inv_freq)]
    got = qwen_kernels.mrope_pos(*args, section, backend)
    for out, want, x in zip(got, expected, (q, k), strict=True):
        assert_matches_fp32_reference(out.cpu(), want, x, exact=backend == "torch")
    cos = torch.rand(3, 5, head_dim, generator=gen)
    sin = torch.rand(3, 5, head_dim, generator=gen)
    expected = qwen_kernels.mrope(q, k, cos, sin, section, "torch")
    table_backend = backend if backend in backends_for("mrope", device) else "torch"
    got = qwen_kernels.mrope(*[t.to(device) for t in (q, k, cos, sin)], section, table_backend)
    for out, want, x in zip(got, expected, (q, k), strict=True):
        assert_matches_fp32_reference(out.cpu(), want, x, exact=True)


try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    # Wrong replacements for ``round_to`` (module level: the interpreter looks up ``tl`` in the
    # function's globals): bf16 by truncation, and a 1% scale.
    @triton.jit
    def _truncate(x, dtype: tl.constexpr):
        bits = x.to(tl.uint32, bitcast=True) >> 16
        return bits.to(tl.uint16).to(dtype, bitcast=True)

    @triton.jit
    def _scale(x, dtype: tl.constexpr):
        return (x * 1.01).to(dtype)

    BROKEN_ROUNDINGS = {"truncating": _truncate, "scaled by 1.01": _scale}
else:
    BROKEN_ROUNDINGS = {}


@pytest.mark.skipif(
    not (TRITON_INTERPRETING and BROKEN_ROUNDINGS),
    reason="patches the Triton kernel under the interpreter",
)
@pytest.mark.parametrize("broken", ["truncating", "scaled by 1.01"])
def test_broken_kernel_is_rejected(gen, monkeypatch, broken):
    """The comparisons above catch a kernel that truncates instead of rounding to nearest even, or
    that is off by 1%: the Triton kernel runs once with such a rounding swapped in."""
    from qwen_kernels.triton_kernels import mrope as kernels

    broken_rounding = BROKEN_ROUNDINGS[broken]
    monkeypatch.setattr(kernels, "round_to", broken_rounding)
    dtype = torch.bfloat16
    q, k, _ = layout_qk(gen, "vision", dtype, 80)
    positions, inv_freq, section = layout_positions(gen, "vision", q, 80)
    eager = qwen_kernels.mrope_pos(q, k, positions, inv_freq, section, "torch")
    got = qwen_kernels.mrope_pos(q, k, positions, inv_freq, section, "triton")
    with pytest.raises(AssertionError):
        assert_matches_fp32_reference(got[0], eager[0], q, exact=False)
    cos, sin = (t[0] for t in rope_tables_vision(positions, inv_freq, 80))
    eager = qwen_kernels.mrope(q, k, cos, sin, None, "torch")
    got = qwen_kernels.mrope(q, k, cos, sin, None, "triton")
    with pytest.raises(AssertionError):
        assert_matches_fp32_reference(got[0], eager[0], q, exact=True)


@pytest.mark.parametrize(("backend", "device"), targets("mrope"))
def test_kernel_backends_match_transformers(gen, backend, device):
    """The kernels against transformers' vision rotary and text M-RoPE in bf16."""
    config = Qwen2_5_VLVisionConfig(hidden_size=160, num_heads=2)
    rotary = Qwen2_5_VLVisionRotaryEmbedding(config)
    q, k, positions, _ = vision_inputs(gen, 29, heads=2, dtype=torch.bfloat16)
    cos, sin = rotary(q, positions.t())
    expected = apply_rotary_pos_emb_vision(q, k, cos, sin)
    inv_freq = torch.cat([rotary.inv_freq, rotary.inv_freq])
    on = [t.to(device) for t in (q, k, positions, inv_freq, cos, sin)]
    for ours in (
        qwen_kernels.mrope_pos(*on[:4], VISION_SECTION, backend),
        qwen_kernels.mrope(*on[:2], *on[4:], backend=backend),
    ):
        for out, want in zip(ours, expected, strict=True):
            assert_matches_fp32_reference(out.cpu(), want, q, exact=False)
    # transformers' text rotary rounds cos/sin to bf16 and multiplies in bf16: ours (fp32 math)
    # must be at least as close to fp64 math as it is.
    rotary, positions, q, k = text_inputs(gen, dtype=torch.bfloat16)
    cos, sin = rotary(q, positions)
    hf = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    ref64 = qwen_kernels.mrope_pos(
        q.double(), k.double(), positions, rotary.inv_freq, TEXT_SECTION, "torch"
    )
    on = [t.to(device) for t in (q, k, positions, rotary.inv_freq)]
    got = qwen_kernels.mrope_pos(*on, TEXT_SECTION, backend)
    for out, ref, theirs, x in zip(got, ref64, hf, (q, k), strict=True):
        transposed = theirs.transpose(1, 2)
        assert_close_to_reference(
            out.cpu(), ref, transposed, factor=1.0, magnitude=pair_magnitude(x)
        )
    # Its composed bf16 tables [B, S, D] (broadcast over the heads), through our mrope.
    eager = qwen_kernels.mrope(q, k, cos, sin, backend="torch")
    got = qwen_kernels.mrope(*[t.to(device) for t in (q, k, cos, sin)], backend=backend)
    for out, same, x in zip(got, eager, (q, k), strict=True):
        assert_matches_fp32_reference(out.cpu(), same, x, exact=True)


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


@pytest.mark.parametrize(("backend", "device"), targets("mrope"))
def test_opcheck_kernel_backends(gen, backend, device):
    q, k, positions, inv_freq = (t.to(device) for t in vision_inputs(gen, 5, heads=2, head_dim=16))
    cos, sin = (t[0].to(device) for t in rope_tables_vision(positions.cpu(), inv_freq.cpu(), 16))
    section = [4, 4]
    torch.library.opcheck(torch.ops.qwen.mrope, (q, k, cos, sin, None, backend))
    torch.library.opcheck(torch.ops.qwen.mrope_, (q.clone(), k.clone(), cos, sin, None, backend))
    args = (positions, inv_freq, section, backend)
    torch.library.opcheck(torch.ops.qwen.mrope_pos, (q, k, *args))
    torch.library.opcheck(torch.ops.qwen.mrope_pos_, (q.clone(), k.clone(), *args))


@pytest.mark.parametrize(("backend", "device"), targets("mrope_pos"))
def test_kernels_refuse_more_than_four_axes(gen, backend, device):
    q, k = randn(gen, 3, 2, 20).to(device), randn(gen, 3, 1, 20).to(device)
    positions = torch.randint(0, 9, (5, 3), generator=gen).to(device)
    inv_freq = text_inv_freq(20).to(device)
    with pytest.raises(ValueError, match="mrope_section"):
        qwen_kernels.mrope_pos(q, k, positions, inv_freq, [2] * 5, backend)


@pytest.mark.skipif("cuda_emu" not in backends_for("mrope"), reason="no CUDA emulation here")
def test_native_ops_check_their_arguments(gen):
    """The C++ ops check what they index by, when called directly (without the Python checks)."""
    from qwen_kernels import _emu

    ops = _emu.load()
    q, k, positions, inv_freq = vision_inputs(gen, 5, heads=2, head_dim=16)
    cos = torch.rand(5, 16, generator=gen)
    cases = [
        (lambda: ops.mrope_pos(q, k, positions, inv_freq, [4, 5]), "summing to head_dim / 2"),
        (lambda: ops.mrope_pos(q, k, positions[:, :4], inv_freq, [4, 4]), "'positions'"),
        (lambda: ops.mrope_pos(q, k, positions, inv_freq[:7], [4, 4]), "'inv_freq'"),
        (lambda: ops.mrope_pos(q, k, positions.float(), inv_freq, [4, 4]), "'positions'"),
        (lambda: ops.mrope(q, k[:4], cos, cos, None), "'k'"),
        (lambda: ops.mrope(q, k, cos[:, :8], cos[:, :8], None), "'cos'"),
        (lambda: ops.mrope(q, k, cos, cos[:4], None), "'sin'"),
        (lambda: ops.mrope(q, k.half(), cos, cos, None), "'k'"),
        (lambda: ops.mrope(q, k, cos[None], cos[None], [4, 4]), "one positive size per position"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.parametrize(("backend", "device"), targets("mrope_pos"))
def test_empty_sequence(backend, device):
    q, k = torch.empty(0, 2, 16, device=device), torch.empty(0, 1, 16, device=device)
    positions = torch.empty(2, 0, dtype=torch.long, device=device)
    q_out, k_out = qwen_kernels.mrope_pos(
        q, k, positions, text_inv_freq(16).to(device), [4, 4], backend
    )
    assert q_out.shape == q.shape and k_out.shape == k.shape
    qwen_kernels.mrope_pos_(q, k, positions, text_inv_freq(16).to(device), [4, 4], backend)


def rotary_gradients(fn, reference, layout, buffer, grads, *angle_args):
    """Gradients of the q and k views of ``buffer`` (in ``layout``) through ``fn`` on the device
    of the inputs given, through the eager ``reference`` in fp64 and in the buffer's dtype."""

    def run(rotate, buffer, grads, *angles):
        def through_views(b):
            q, k, _ = layout_qk_views(layout, b)
            return rotate(q, k, *angles)

        return autograd_grads(through_views, (buffer,), grads, (0,))[0]

    device = angle_args[0].device
    ours = run(fn, buffer.to(device), tuple(g.to(device) for g in grads), *angle_args)
    cpu_angles = [a.cpu() if isinstance(a, torch.Tensor) else a for a in angle_args]
    wide = [
        a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
        for a in cpu_angles
    ]
    ref64 = run(reference, buffer.double(), tuple(g.double() for g in grads), *wide)
    eager = run(reference, buffer, grads, *cpu_angles)
    return ours.cpu(), ref64, eager


def gradient_magnitude(layout, buffer, grads, table_bound: float = 1.0) -> torch.Tensor:
    """``pair_magnitude`` of the output gradients where they land in ``buffer``, times the
    largest table entry: the size of the terms each gradient element sums (it cancels)."""
    placed = autograd_grads(
        lambda b: layout_qk_views(layout, b)[:2],
        (buffer.double(),),
        tuple(g.double().abs() for g in grads),
        (0,),
    )[0]
    return pair_magnitude(placed) * table_bound


def output_grads(gen, layout, buffer):
    q, k, _ = layout_qk_views(layout, buffer)
    return (randn(gen, *q.shape, dtype=buffer.dtype), randn(gen, *k.shape, dtype=buffer.dtype))


@pytest.mark.parametrize(("backend", "device"), targets("mrope_pos", with_reference=True))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["vision", "bshd", "bhsd"])
def test_mrope_pos_gradients_match_fp64_autograd(gen, backend, device, dtype, layout):
    """Views of a packed buffer: the gradient lands in the q and k parts, nothing elsewhere."""
    head_dim = 80 if layout == "vision" else 64
    q, _, buffer = layout_qk(gen, layout, dtype, head_dim)
    positions, inv_freq, section = layout_positions(gen, layout, q, head_dim)
    grads = output_grads(gen, layout, buffer)
    got, ref64, eager = rotary_gradients(
        lambda q, k, *a: qwen_kernels.mrope_pos(q, k, *a, backend),
        mrope_pos_reference,
        layout,
        buffer,
        grads,
        positions.to(device),
        inv_freq.to(device),
        section,
    )
    assert got.dtype == dtype
    magnitude = gradient_magnitude(layout, buffer, grads)
    assert_close_to_reference(got, ref64, eager, magnitude=magnitude)


@pytest.mark.parametrize(("backend", "device"), targets("mrope", with_reference=True))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tables", ["rotary", "random"])
def test_mrope_gradients_match_fp64_autograd(gen, backend, device, dtype, tables):
    """Per-axis tables with a section (the text model's), broadcast over the batch; random
    tables (halves unequal) need the exact transpose, not only the negative angle."""
    head_dim = 64
    q, _, buffer = layout_qk(gen, "bshd", dtype, head_dim)
    positions, inv_freq, section = layout_positions(gen, "bshd", q, head_dim)
    angles = positions[..., None].float() * inv_freq
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    if tables == "random":
        cos, sin = randn(gen, *cos.shape), randn(gen, *sin.shape)
    grads = output_grads(gen, "bshd", buffer)
    got, ref64, eager = rotary_gradients(
        lambda q, k, *a: qwen_kernels.mrope(q, k, *a, backend),
        mrope_reference,
        "bshd",
        buffer,
        grads,
        cos.to(device),
        sin.to(device),
        section,
    )
    bound = float(torch.maximum(cos.abs().max(), sin.abs().max()))
    magnitude = gradient_magnitude("bshd", buffer, grads, bound)
    assert_close_to_reference(got, ref64, eager, magnitude=magnitude)


def test_rotary_gradcheck_of_the_reference_backward(gen):
    q = randn(gen, 2, 5, 3, 8, dtype=torch.float64).requires_grad_()
    k = randn(gen, 2, 5, 1, 8, dtype=torch.float64).requires_grad_()
    cos, sin = (
        randn(gen, 3, 1, 5, 8, dtype=torch.float64),
        randn(gen, 3, 1, 5, 8, dtype=torch.float64),
    )
    positions = torch.randint(0, 50, (3, 2, 5), generator=gen)
    inv_freq = torch.rand(4, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda q, k: qwen_kernels.mrope(q, k, cos, sin, [1, 2, 1], "torch"), (q, k)
    )
    assert torch.autograd.gradcheck(
        lambda q, k: qwen_kernels.mrope_pos(q, k, positions, inv_freq, [1, 2, 1], "torch"), (q, k)
    )


@pytest.mark.parametrize(("backend", "device"), targets("mrope", with_reference=True))
def test_rotary_opcheck_with_autograd(gen, backend, device):
    q = randn(gen, 5, 2, 8).to(device).requires_grad_()
    k = randn(gen, 5, 2, 8).to(device).requires_grad_()
    cos, sin = randn(gen, 5, 8).to(device), randn(gen, 5, 8).to(device)
    positions = torch.randint(0, 9, (2, 5), generator=gen).to(device)
    inv_freq = torch.rand(4, generator=gen).to(device)
    torch.library.opcheck(torch.ops.qwen.mrope.default, (q, k, cos, sin, None, backend))
    torch.library.opcheck(
        torch.ops.qwen.mrope_pos.default, (q, k, positions, inv_freq, [2, 2], backend)
    )


def test_tables_and_frequencies_are_not_differentiable(gen):
    q, k = randn(gen, 5, 2, 8), randn(gen, 5, 2, 8)
    cos, sin = randn(gen, 5, 8), randn(gen, 5, 8)
    positions = torch.randint(0, 9, (2, 5), generator=gen)
    inv_freq = torch.rand(4, generator=gen)
    with pytest.raises(ValueError, match="`sin` must not require grad"):
        qwen_kernels.mrope(q, k, cos, sin.requires_grad_(), None)
    with pytest.raises(ValueError, match="`inv_freq` must not require grad"):
        qwen_kernels.mrope_pos(q, k, positions, inv_freq.requires_grad_(), [2, 2])


def test_in_place_forms_refuse_inputs_that_require_grad(gen):
    """Where autograd would return a silently wrong gradient, the in-place forms raise; under
    no_grad they rotate as ever."""
    qkv = randn(gen, 5, 3, 2, 8).requires_grad_()
    cos, sin = randn(gen, 5, 8), randn(gen, 5, 8)
    positions = torch.randint(0, 9, (2, 5), generator=gen)
    inv_freq = torch.rand(4, generator=gen)
    calls = {
        "mrope_": lambda q, k: qwen_kernels.mrope_(q, k, cos, sin, None),
        "mrope_pos_": lambda q, k: qwen_kernels.mrope_pos_(q, k, positions, inv_freq, [2, 2]),
    }
    for name, call in calls.items():
        q, k, _ = (qkv * 1).unbind(1)
        with pytest.raises(RuntimeError, match=f"qwen.{name} writes its inputs in place"):
            call(q, k)
        with torch.no_grad():
            q, k, _ = (qkv * 1).unbind(1)
            call(q, k)
