"""patch_merge: reference vs fp64 math and transformers' Qwen2_5_VLPatchMerger with the reverse
window index, every backend vs the reference (bit-exact up to the fp32 statistic), strided and
gathered inputs, opcheck, and bad input; gradients against fp64 autograd of the eager reference.

Exactness. Each token's output is ``round(round(x * r) * w)`` with one fp32 ``r`` (the reciprocal
RMS) per token. Backends sum the squares in different orders (and a GPU's rsqrt is approximate),
so ``r`` may differ by a few fp32 ulps between them; everything after ``r`` is fixed by the cast
order. ``assert_exact_up_to_rstd`` therefore requires every token row to equal, bit for bit, the
model's cast order evaluated with some fp32 ``r`` within ``RSTD_ULPS`` ulps of the exact one. A
kernel that scales, truncates instead of rounding, skips a rounding or swaps tokens fails it
(``test_exactness_check_rejects_broken_kernels``).
"""

import importlib

import pytest
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPatchMerger
from transformers.vision_utils import get_vision_window_index

import qwen_kernels
from qwen_kernels._checks import skip_value_checks
from qwen_kernels.ops.patch_merge import patch_merge_reference
from tests.helpers import (
    DTYPES,
    NormGradientBounds,
    assert_close_to_reference,
    autograd_grads,
    backends_for,
    randn,
    rel_err,
    targets,
    tolerance,
)

EPS = 1e-6
UNIT = 4
RSTD_ULPS = 8  # fp32 summation order and a GPU's approximate rsqrt, with margin
CHANNELS = [1280, 1000, 72, 3]
GRIDS = [
    [(1, 2, 2)],  # one merge unit
    [(1, 6, 10)],  # edge windows on both sides
    [(1, 10, 18)],
    [(3, 6, 4)],  # video: 3 temporal patches
    [(1, 6, 10), (2, 10, 6), (1, 2, 2)],  # a batch of images and a video
]


def model_cast_order(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """``round(round(x * rstd) * weight)`` in fp32 with x's dtype as the rounding target."""
    normed = (x.float() * rstd[..., None]).to(x.dtype).float()
    return (normed * weight.float()).to(x.dtype)


def merged_candidates(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    unit_index: torch.Tensor | None,
    unit: int = UNIT,
) -> torch.Tensor:
    """``[2 * RSTD_ULPS + 1, M * unit, C]``: the model's cast order on the gathered tokens with
    the exact reciprocal RMS rounded to fp32, then stepped 1..RSTD_ULPS fp32 ulps down and up."""
    tokens = x.reshape(-1, unit, x.shape[1])
    if unit_index is not None:
        tokens = tokens[unit_index.long()]
    tokens = tokens.reshape(-1, x.shape[1])
    x64 = tokens.double()
    exact = torch.rsqrt(x64.square().mean(-1) + eps).float()
    steps = [exact]
    for direction in (0.0, float("inf")):
        step = exact
        for _ in range(RSTD_ULPS):
            step = torch.nextafter(step, torch.full_like(step, direction))
            steps.append(step)
    return torch.stack([model_cast_order(tokens, weight, r) for r in steps])


def assert_exact_up_to_rstd(
    out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    unit_index: torch.Tensor | None,
    unit: int = UNIT,
) -> None:
    """Every token row of ``out`` is bit-equal to the model's cast order with one fp32 rstd
    within RSTD_ULPS ulps of the exact one (see the module docstring)."""
    candidates = merged_candidates(x, weight, EPS, unit_index, unit)
    rows = out.reshape(-1, x.shape[1])
    assert rows.shape == candidates.shape[1:], (rows.shape, candidates.shape)
    equal = (rows[None] == candidates).all(-1)  # NaN (an unwritten element) is never equal
    bad = (~equal.any(0)).nonzero().flatten()
    assert bad.numel() == 0, f"{bad.numel()} of {rows.shape[0]} token rows off, first {bad[:8]}"


def assert_matches_eager(out: torch.Tensor, eager: torch.Tensor) -> None:
    """16-bit outputs: the fp32 rstd changes a 16-bit result only when x * rstd lies within a few
    fp32 ulps of a rounding tie, so at least 99% of elements are bit-equal to the eager op."""
    if out.dtype != torch.float32:
        share = float((out == eager).double().mean()) if out.numel() else 1.0
        assert share >= 0.99, share


def run(backend, device, x, weight, unit_index=None, eps=EPS, merge_size=2):
    index = unit_index.to(device) if unit_index is not None else None
    out = qwen_kernels.patch_merge(
        x.to(device), weight.to(device), eps, index, merge_size, backend=backend
    )
    assert out.device.type == device and out.is_contiguous()
    return out.cpu()


def emulated_library():
    return importlib.import_module("qwen_kernels._emu").load()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels", [1280, 36])
def test_reference_matches_direct_math(gen, dtype, channels):
    tokens = 4 * 13
    x, weight = randn(gen, tokens, channels, dtype=dtype), randn(gen, channels, dtype=dtype)
    unit_index = torch.randperm(tokens // 4, generator=gen)
    out = qwen_kernels.patch_merge(x, weight, EPS, unit_index, backend="torch")
    x64 = x.double()
    normed = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + EPS) * weight.double()
    expected = normed.reshape(tokens // 4, 4 * channels)[unit_index]
    assert out.shape == (tokens // 4, 4 * channels) and out.dtype == dtype
    assert rel_err(out, expected) < 2 * tolerance(dtype)
    assert_exact_up_to_rstd(out, x, weight, unit_index)


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
        ours = merger.mlp(
            qwen_kernels.patch_merge(x, merger.ln_q.weight, EPS, reverse, backend="torch")
        )
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize(("backend", "device"), targets("patch_merge"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_matches_transformers_ln_q_and_reverse_window_index(gen, backend, device, dtype, grid):
    """transformers' merger front (ln_q, the view as merge units) then its reverse window index,
    on tokens in window order: our merge with the inverse window index straight to raster order."""
    channels = 40
    merger = Qwen2_5_VLPatchMerger(dim=24, context_dim=channels)
    with torch.no_grad():
        merger.ln_q.weight.copy_(randn(gen, channels))
    merger.to(dtype)
    window_index, _ = get_vision_window_index(torch.tensor(grid), 2, 112, 14)
    reverse = torch.argsort(window_index)
    x = randn(gen, UNIT * window_index.numel(), channels, dtype=dtype, scale=2.0)
    with torch.no_grad():
        expected = merger.ln_q(x).view(-1, merger.hidden_size)[reverse]
    out = run(backend, device, x, merger.ln_q.weight, reverse)
    assert out.dtype == dtype and out.shape == expected.shape
    assert rel_err(out, expected) < 2 * tolerance(dtype)
    assert_exact_up_to_rstd(out, x, merger.ln_q.weight.detach(), reverse)
    assert_matches_eager(out, expected)


@pytest.mark.parametrize(("backend", "device"), targets("patch_merge"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [None, torch.int32, torch.int64])
@pytest.mark.parametrize("channels", CHANNELS)
def test_backend_matches_reference(gen, backend, device, dtype, index_dtype, channels):
    tokens = 4 * 7
    x = randn(gen, tokens, channels, dtype=dtype)
    weight = randn(gen, channels, dtype=dtype)
    unit_index = None
    if index_dtype is not None:  # a gather that repeats and skips units, not just a permutation
        unit_index = torch.randint(0, tokens // 4, (9,), generator=gen).to(index_dtype)
    ref64 = qwen_kernels.patch_merge(x.double(), weight.double(), EPS, unit_index, backend="torch")
    eager = qwen_kernels.patch_merge(x, weight, EPS, unit_index, backend="torch")
    out = run(backend, device, x, weight, unit_index)
    assert out.dtype == dtype
    assert_close_to_reference(out, ref64, eager)
    assert_exact_up_to_rstd(out, x, weight, unit_index)
    assert_matches_eager(out, eager)


@pytest.mark.parametrize(("backend", "device"), targets("patch_merge"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("merge_size", [1, 3, 4])
@pytest.mark.parametrize("with_index", [False, True])
def test_other_merge_sizes(gen, backend, device, dtype, merge_size, with_index):
    """Units of s x s tokens (transformers' configs take any spatial_merge_size; s = 1 is a
    plain norm, gathered when an index is given), against the reference and the exact rows."""
    unit = merge_size * merge_size
    units = 5
    x = randn(gen, unit * units, 72, dtype=dtype)
    weight = randn(gen, 72, dtype=dtype)
    unit_index = torch.tensor([4, 0, 0, 2]) if with_index else None
    ref64 = qwen_kernels.patch_merge(
        x.double(), weight.double(), EPS, unit_index, merge_size, backend="torch"
    )
    eager = qwen_kernels.patch_merge(x, weight, EPS, unit_index, merge_size, backend="torch")
    assert eager.shape == ((4 if with_index else units), unit * 72)
    out = run(backend, device, x, weight, unit_index, merge_size=merge_size)
    assert_close_to_reference(out, ref64, eager)
    assert_exact_up_to_rstd(out, x, weight, unit_index, unit)
    assert_matches_eager(out, eager)
    if merge_size == 1 and not with_index:
        assert torch.equal(eager, qwen_kernels.rms_norm(x, weight, EPS, backend="torch"))


@pytest.mark.parametrize(("backend", "device"), targets("patch_merge"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weight_offset", [0, 1], ids=["aligned-weight", "weight-off-16-bytes"])
def test_fp32_weight_with_low_precision_input(gen, backend, device, dtype, weight_offset):
    """An fp32 weight, 16-byte aligned (vector loads) or a contiguous view one element past it
    (scalar loads, not a misaligned vector access)."""
    x = randn(gen, 4 * 3, 1280, dtype=dtype)
    weight = randn(gen, 1280 + weight_offset)[weight_offset:]
    unit_index = torch.tensor([2, 0, 1, 2])
    out = run(backend, device, x, weight, unit_index)
    assert out.dtype == dtype
    assert_exact_up_to_rstd(out, x, weight, unit_index)
    assert_matches_eager(out, qwen_kernels.patch_merge(x, weight, EPS, unit_index, backend="torch"))


@pytest.mark.parametrize(("backend", "device"), targets("patch_merge"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["wide-rows", "misaligned-rows", "column-stride", "transposed"])
def test_strided_inputs(gen, backend, device, dtype, layout):
    """x as views: rows of a wider buffer (aligned for 16-byte vectors, and one element past a
    16-byte boundary: a narrower vector, not a misaligned access), a column stride of 2, a
    transposed buffer; a strided weight (a contiguous one off 16 bytes with the misaligned rows)
    and a strided unit_index."""
    tokens, channels = 4 * 3, 1280
    if layout == "wide-rows":
        x = randn(gen, tokens, channels + 64, dtype=dtype)[:, 32 : 32 + channels]
    elif layout == "misaligned-rows":
        x = randn(gen, tokens, channels + 1, dtype=dtype)[:, 1:]
    elif layout == "column-stride":
        x = randn(gen, tokens, 2 * channels, dtype=dtype)[:, ::2]
    else:
        x = randn(gen, channels, tokens, dtype=dtype).T
    weight = randn(gen, 2 * channels, dtype=dtype)[::2]
    if layout == "misaligned-rows":  # and a contiguous weight off 16 bytes
        weight = randn(gen, channels + 1, dtype=dtype)[1:]
    unit_index = torch.tensor([2, 1, 0, 0, 2, 1], dtype=torch.int32)[::2]
    out = run(backend, device, x, weight, unit_index)
    expected = qwen_kernels.patch_merge(x.contiguous(), weight.contiguous(), EPS, unit_index)
    assert_exact_up_to_rstd(out, x, weight, unit_index)
    assert_matches_eager(out, expected)


@pytest.mark.parametrize(("backend", "device"), targets("patch_merge"))
def test_large_fp16_activations_stay_finite(gen, backend, device):
    x = randn(gen, 8, 1280, dtype=torch.float16, scale=1e4)
    weight = randn(gen, 1280, dtype=torch.float16)
    out = run(backend, device, x, weight)
    assert torch.isfinite(out).all()
    assert_exact_up_to_rstd(out, x, weight, None)


@pytest.mark.parametrize(("backend", "device"), targets("patch_merge"))
def test_empty(gen, backend, device):
    weight = randn(gen, 16)
    assert run(backend, device, randn(gen, 0, 16), weight).shape == (0, 64)
    x = randn(gen, 8, 16)
    assert run(backend, device, x, weight, torch.empty(0, dtype=torch.int64)).shape == (0, 64)


@pytest.mark.parametrize(("backend", "device"), targets("patch_merge"))
def test_unchecked_out_of_range_index_gives_nan_rows(gen, backend, device):
    """With the value checks skipped, an index out of range must not read out of bounds: kernels
    write that row as NaN and every other row as usual."""
    x, weight = randn(gen, 8, 64), randn(gen, 64)
    unit_index = torch.tensor([1, 2, -1, 0])
    with skip_value_checks():
        out = run(backend, device, x, weight, unit_index)
    assert torch.isnan(out[1:3]).all()
    good = torch.tensor([0, 3])
    assert_exact_up_to_rstd(out[good], x, weight, unit_index[good])


def test_exactness_check_rejects_broken_kernels(gen):
    """The checks above fail a kernel that scales its output by 1.01, truncates instead of
    rounding (either step), skips the intermediate rounding, or swaps two tokens of a unit."""
    x, weight = randn(gen, 4 * 5, 1280, dtype=torch.bfloat16), randn(gen, 1280)
    unit_index = torch.tensor([3, 1, 4, 1])
    good = qwen_kernels.patch_merge(x, weight, EPS, unit_index, backend="torch")
    assert_exact_up_to_rstd(good, x, weight, unit_index)

    def truncate(t: torch.Tensor) -> torch.Tensor:
        return (t.float().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)

    tokens = x.reshape(-1, UNIT, 1280)[unit_index].reshape(-1, 1280).float()
    rstd = torch.rsqrt(tokens.square().mean(-1, keepdim=True) + EPS)
    broken = {
        "scaled by 1.01": (good.float() * 1.01).to(torch.bfloat16),
        "truncated product": truncate((tokens * rstd).to(torch.bfloat16).float() * weight).reshape(
            good.shape
        ),
        "truncated normalised value": (truncate(tokens * rstd).float() * weight)
        .to(torch.bfloat16)
        .reshape(good.shape),
        "one rounding": (tokens * rstd * weight).to(torch.bfloat16).reshape(good.shape),
        "tokens of a unit swapped": good.reshape(-1, UNIT, 1280)[:, [1, 0, 2, 3]].reshape(
            good.shape
        ),
    }
    for name, out in broken.items():
        with pytest.raises(AssertionError):
            assert_exact_up_to_rstd(out, x, weight, unit_index)
            assert_matches_eager(out, good)
            pytest.fail(f"a kernel whose output is {name} passed the checks")


def test_opcheck(gen):
    x, weight = randn(gen, 12, 8), randn(gen, 8)
    torch.library.opcheck(torch.ops.qwen.patch_merge, (x, weight, EPS, None, 2, "torch"))
    index = torch.tensor([2, 0, 1])
    torch.library.opcheck(torch.ops.qwen.patch_merge, (x, weight, EPS, index, 2, "torch"))


@pytest.mark.parametrize(("backend", "device"), targets("patch_merge"))
def test_opcheck_kernels(gen, backend, device):
    x, weight = randn(gen, 36, 40).to(device), randn(gen, 40).to(device)
    index = torch.tensor([2, 0, 1], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.qwen.patch_merge, (x, weight, EPS, index, 2, backend))
    torch.library.opcheck(torch.ops.qwen.patch_merge, (x, weight, EPS, None, 3, backend))


def test_compiles_fullgraph(gen):
    x, weight, index = randn(gen, 12, 40), randn(gen, 40), torch.tensor([2, 0, 1])
    compiled = torch.compile(lambda a, w, i: qwen_kernels.patch_merge(a, w, EPS, i), fullgraph=True)
    torch.testing.assert_close(
        compiled(x, weight, index), qwen_kernels.patch_merge(x, weight, EPS, index)
    )


def test_bad_input(gen):
    x, weight = randn(gen, 12, 8), randn(gen, 8)
    cases = [
        (lambda: qwen_kernels.patch_merge(x[:10], weight, EPS), "T a multiple of 4"),
        (
            lambda: qwen_kernels.patch_merge(x, weight, EPS, None, 3),
            r"T a multiple of 9 \(whole 3x3 merge units\)",
        ),
        (
            lambda: qwen_kernels.patch_merge(x, weight, EPS, None, 0),
            "`merge_size` must be a positive int",
        ),
        (lambda: qwen_kernels.patch_merge(x[None], weight, EPS), "`x` must be 2-D"),
        (lambda: qwen_kernels.patch_merge(x.long(), weight, EPS), "`x` must be of dtype"),
        (lambda: qwen_kernels.patch_merge(x, weight[:7], EPS), "`weight` must be 1-D of size"),
        (
            lambda: qwen_kernels.patch_merge(x.bfloat16(), weight.half(), EPS),
            "`weight` must be of dtype bfloat16, float32",
        ),
        (lambda: qwen_kernels.patch_merge(x, weight, -1.0), "`eps` must be a non-negative"),
        (
            lambda: qwen_kernels.patch_merge(x, weight, EPS, torch.tensor([0.0, 1.0])),
            "`unit_index` must be int32 or int64",
        ),
        (
            lambda: qwen_kernels.patch_merge(
                x, weight, EPS, torch.tensor([0, 1], dtype=torch.int16)
            ),
            "`unit_index` must be int32 or int64",
        ),
        (
            lambda: qwen_kernels.patch_merge(x, weight, EPS, torch.tensor([[0, 1]])),
            "`unit_index` must be 1-D",
        ),
        (
            lambda: qwen_kernels.patch_merge(
                x, weight, EPS, torch.zeros(2, dtype=torch.long, device="meta")
            ),
            "`unit_index` must be on cpu",
        ),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.parametrize(("backend", "device"), targets("patch_merge"))
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_index_out_of_range(gen, backend, device, index_dtype):
    x, weight = randn(gen, 12, 8).to(device), randn(gen, 8).to(device)
    for values in ([0, 3], [-1, 0], [2, 7, 1]):
        index = torch.tensor(values, dtype=index_dtype, device=device)
        with pytest.raises(
            ValueError, match=r"`unit_index` must be indices of merge units in \[0, 3\)"
        ):
            qwen_kernels.patch_merge(x, weight, EPS, index, backend=backend)


def test_unknown_and_unavailable_backend(gen):
    x, weight = randn(gen, 4, 8), randn(gen, 8)
    with pytest.raises(ValueError, match="`backend` must be one of"):
        qwen_kernels.patch_merge(x, weight, EPS, backend="fast")
    missing = [b for b in ("triton", "cuda", "cuda_emu") if b not in backends_for("patch_merge")]
    for backend in missing:
        with pytest.raises(RuntimeError, match=backend):
            qwen_kernels.patch_merge(x, weight, EPS, backend=backend)


@pytest.mark.parametrize(("backend", "device"), targets("patch_merge"))
def test_kernel_backends_reject_float64(gen, backend, device):
    x = randn(gen, 4, 8, dtype=torch.float64).to(device)
    weight = randn(gen, 8, dtype=torch.float64).to(device)
    with pytest.raises(ValueError, match="only the 'torch' reference runs in float64"):
        qwen_kernels.patch_merge(x, weight, EPS, None, backend=backend)


@pytest.mark.parametrize(
    ("backend", "device"),
    [t for t in targets("patch_merge") if t.values[0] in ("cuda", "cuda_emu")],
)
def test_native_op_checks_its_arguments(gen, backend, device):
    """The C++ op checks its input itself when called directly (torch.ops.qwen_emu...)."""
    library = emulated_library() if backend == "cuda_emu" else torch.ops.qwen_cuda
    x = randn(gen, 8, 16).to(device)
    weight = randn(gen, 16).to(device)
    index = torch.tensor([1, 0], device=device)
    with pytest.raises(ValueError, match="argument 'x'"):
        library.patch_merge(x[:6], weight, EPS, index, 2)
    with pytest.raises(ValueError, match="argument 'x'"):
        library.patch_merge(x.double(), weight, EPS, index, 2)
    with pytest.raises(ValueError, match="argument 'weight'"):
        library.patch_merge(x, weight[:15], EPS, index, 2)
    with pytest.raises(ValueError, match="argument 'unit_index'"):
        library.patch_merge(x, weight, EPS, index.short(), 2)
    with pytest.raises(ValueError, match="argument 'unit_index'"):
        library.patch_merge(x, weight, EPS, index[None], 2)
    with pytest.raises(ValueError, match="argument 'merge_size'"):
        library.patch_merge(x, weight, EPS, index, -2)
    with pytest.raises(ValueError, match="T a multiple of 9"):
        library.patch_merge(x, weight, EPS, index, 3)


@pytest.mark.parametrize(("backend", "device"), targets("patch_merge", with_reference=True))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("merge_size", "unit_index"),
    [(2, None), (2, [3, 1, 4, 0, 2]), (2, [2, 2, 0]), (1, [5, 0, 7]), (3, None)],
    ids=["in order", "permuted", "repeated and dropped units", "merge size 1", "merge size 3"],
)
def test_gradients_match_fp64_autograd(gen, backend, device, dtype, merge_size, unit_index):
    """The output gradient goes back to each unit's tokens, summed where a unit repeats and
    zero where one is left out; then RMSNorm's backward."""
    unit = merge_size * merge_size
    tokens = unit * 8 if merge_size > 1 else 8
    x, weight = randn(gen, tokens, 96, dtype=dtype), randn(gen, 96, dtype=dtype)
    index = torch.tensor(unit_index) if unit_index is not None else None
    rows = index.numel() if index is not None else tokens // unit
    grad = randn(gen, rows, unit * 96, dtype=dtype)

    def run(fn, x, weight, index, grad):
        merge = lambda x, w: fn(x, w, EPS, index, merge_size)  # noqa: E731
        return autograd_grads(merge, (x, weight), grad, (0, 1))

    def call(x, w, eps, index, merge_size):
        return qwen_kernels.patch_merge(x, w, eps, index, merge_size, backend)

    on_device = index.to(device) if index is not None else None
    got = run(call, x.to(device), weight.to(device), on_device, grad.to(device))
    ref64 = run(patch_merge_reference, x.double(), weight.double(), index, grad.double())
    eager = run(patch_merge_reference, x, weight, index, grad)
    # The gradient each token's normalised value receives, summed in fp64 over repeats.
    units = tokens // unit
    per_unit = torch.zeros(units, unit * 96, dtype=torch.float64)
    per_unit.index_add_(0, index if index is not None else torch.arange(units), grad.double())
    bounds = NormGradientBounds.of(per_unit.reshape(tokens, 96), x, weight, EPS)
    for ours, want, same, size, accumulation in (
        (got[0], ref64[0], eager[0], bounds.x_magnitude, bounds.x_accumulation),
        (got[1], ref64[1], eager[1], bounds.weight_magnitude, bounds.weight_accumulation),
    ):
        assert_close_to_reference(ours.cpu(), want, same, magnitude=size, accumulation=accumulation)


def test_gradcheck_of_the_reference_backward(gen):
    x = randn(gen, 8, 5, dtype=torch.float64).requires_grad_()
    weight = randn(gen, 5, dtype=torch.float64).requires_grad_()
    index = torch.tensor([1, 0, 1])
    assert torch.autograd.gradcheck(
        lambda x, w: qwen_kernels.patch_merge(x, w, EPS, index, 2, "torch"), (x, weight)
    )


@pytest.mark.parametrize(("backend", "device"), targets("patch_merge", with_reference=True))
def test_opcheck_with_autograd(gen, backend, device):
    x = randn(gen, 12, 8).to(device).requires_grad_()
    weight = randn(gen, 8).to(device).requires_grad_()
    index = torch.tensor([2, 0, 1]).to(device)
    torch.library.opcheck(torch.ops.qwen.patch_merge.default, (x, weight, EPS, index, 2, backend))
