"""Where the Triton interpreter (``TRITON_INTERPRET=1``, how CI runs every Triton kernel) differs
from compiled Triton on a GPU, and how our kernels live with it. Each known infidelity has a test
that pins today's behaviour, so a Triton upgrade that changes it fails here and the workaround
can be revisited:

1. fp32 -> bf16 casts truncate, even with ``fp_downcast_rounding="rtne"`` (fp32 -> fp16 rounds
   to nearest even). Workaround: ``triton_kernels._common.round_to`` rounds on the fp32 bits with
   integer arithmetic when interpreting; the GPU keeps its native ``cvt.rn``.
2. Arithmetic on bf16 values is wrong (the interpreter works on the raw 16-bit patterns).
   Workaround: kernels upcast bf16 loads to fp32 before any arithmetic (and ``tl.dot`` operands
   under the interpreter; see triton_kernels/rms_norm_swiglu.py).
3. ``@triton.autotune`` with several configs fails; kernels pick one config when interpreting.
4. triton 3.6's interpreter cannot loop over a runtime bound (``range(0, n)`` with ``n`` an
   argument or a loaded value); 3.8's can. Workaround: kernels that loop over a runtime count
   take a constexpr trip count instead where ``_common.needs_constexpr_trip_counts(arch)`` says so.
"""

import pytest
import torch
import triton
import triton.language as tl

from qwen_kernels._backends import runtime_missing
from qwen_kernels.triton_kernels._common import interpreter_loops_over_runtime_bounds, round_to

pytestmark = pytest.mark.skipif(
    runtime_missing("triton", "cpu") is not None, reason=str(runtime_missing("triton", "cpu"))
)


@triton.jit
def _casts_kernel(x_ptr, native_ptr, rounded_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    mask = i < n
    x = tl.load(x_ptr + i, mask=mask)
    dtype: tl.constexpr = native_ptr.dtype.element_ty
    tl.store(native_ptr + i, x.to(dtype, fp_downcast_rounding="rtne"), mask=mask)
    tl.store(rounded_ptr + i, round_to(x, dtype), mask=mask)


@triton.jit
def _bf16_arithmetic_kernel(a_ptr, b_ptr, product_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    mask = i < n
    a, b = tl.load(a_ptr + i, mask=mask), tl.load(b_ptr + i, mask=mask)
    tl.store(product_ptr + i, (a * b).to(tl.float32), mask=mask)


def _hard_values(gen: torch.Generator) -> torch.Tensor:
    """Random fp32 over a wide exponent range, exact ties of both 16-bit formats, subnormals,
    signed zeros, infinities and values that round to the largest finite or to infinity."""
    wide = torch.randn(1 << 14, generator=gen) * torch.exp2(
        torch.randint(-140, 120, (1 << 14,), generator=gen).float()
    )
    halves = torch.randint(-(1 << 15), 1 << 15, (4096,), generator=gen, dtype=torch.int32)
    bf16_ties = ((halves << 16) | 0x8000).view(torch.float32)  # halfway between bf16 neighbours
    low = torch.randint(0, 0x7BFF, (4096,), generator=gen, dtype=torch.int16)  # finite fp16
    fp16_ties = (low.view(torch.float16).float() + (low + 1).view(torch.float16).float()) / 2
    special = torch.tensor(
        [
            0.0,
            -0.0,
            float("inf"),
            -float("inf"),
            1e-40,
            -3e-39,
            3.3961e38,
            3.4e38,
            65519.0,
            65520.0,
            -34037.6,
        ]
    )
    values = torch.cat([wide, bf16_ties, fp16_ties, special])
    return values[torch.isfinite(values) | torch.isinf(values)]


def _casts(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    native, rounded = torch.empty(x.numel(), dtype=dtype), torch.empty(x.numel(), dtype=dtype)
    _casts_kernel[(1,)](x, native, rounded, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    return native, rounded


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_to_is_bit_exact_round_to_nearest_even(gen, dtype):
    x = _hard_values(gen)
    _, rounded = _casts(x, dtype)
    assert torch.equal(rounded.view(torch.int16), x.to(dtype).view(torch.int16))


def test_round_to_keeps_nan(gen):
    _, rounded = _casts(torch.tensor([float("nan"), -float("nan"), 1.0]), torch.bfloat16)
    assert rounded[:2].isnan().all() and rounded[2] == 1.0


def test_quirk_bf16_cast_truncates(gen):
    """Infidelity 1. If this fails, the interpreter rounds now: round_to's integer path can go."""
    x = _hard_values(gen)
    native, _ = _casts(x, torch.bfloat16)
    bits = x.view(torch.int32)
    truncated = (bits >> 16).to(torch.int16)
    finite = torch.isfinite(x) & (x.abs() >= torch.finfo(torch.float32).tiny)
    assert torch.equal(native.view(torch.int16)[finite], truncated[finite])
    assert not torch.equal(native.view(torch.int16)[finite], x.bfloat16().view(torch.int16)[finite])


def test_quirk_fp16_cast_rounds(gen):
    """fp16 is not affected (numpy rounds it): round_to uses the native cast there."""
    x = _hard_values(gen)
    native, _ = _casts(x, torch.float16)
    assert torch.equal(native.view(torch.int16), x.half().view(torch.int16))


def test_quirk_bf16_arithmetic_is_wrong(gen):
    """Infidelity 2. If this fails, bf16 arithmetic works now: the fp32 upcasts could go."""
    a = torch.randn(256, generator=gen).bfloat16()
    b = torch.randn(256, generator=gen).bfloat16()
    product = torch.empty(256)
    _bf16_arithmetic_kernel[(1,)](a, b, product, 256, BLOCK=256)
    assert not torch.allclose(product, (a.float() * b.float()), rtol=1e-2, equal_nan=False)


def test_quirk_autotune_with_several_configs_fails():
    """Infidelity 3. If this fails, autotuning works under the interpreter."""

    @triton.autotune(
        configs=[triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})], key=["n"]
    )
    @triton.jit
    def copy_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + i, tl.load(x_ptr + i, mask=i < n), mask=i < n)

    x = torch.arange(64, dtype=torch.float32)
    out = torch.empty_like(x)
    with pytest.raises(RuntimeError, match="active drivers"):
        copy_kernel[lambda meta: (triton.cdiv(64, meta["BLOCK"]),)](x, out, 64)


# Infidelity 4, per Triton release: whether the interpreter loops over runtime bounds.
RUNTIME_LOOPS = {"3.6": False, "3.8": True}


def test_quirk_runtime_loop_bounds():
    """If this fails, record this Triton's behaviour in RUNTIME_LOOPS (and, where it loops over
    runtime bounds now, the constexpr trip counts are no longer needed with it)."""
    release = ".".join(triton.__version__.split(".")[:2])
    assert release in RUNTIME_LOOPS, f"unknown Triton {triton.__version__}: record its behaviour"
    assert interpreter_loops_over_runtime_bounds() == RUNTIME_LOOPS[release]
