"""The numerics rule rejects plausible wrong kernels: a small Triton RMSNorm, written right and
then broken the ways real kernels break (output scaled by 1%, truncation instead of rounding to
nearest, a term dropped from the sum, the last row never written), runs through
``assert_close_to_reference`` like every backend test. The right one must pass and each broken
one must fail, in every dtype where the defect exists."""

import pytest
import torch
import triton
import triton.language as tl

import qwen_kernels
from qwen_kernels._backends import runtime_missing
from qwen_kernels.triton_kernels._common import round_to
from tests.helpers import DTYPES, assert_close_to_reference, randn

pytestmark = pytest.mark.skipif(
    runtime_missing("triton", "cpu") is not None, reason=str(runtime_missing("triton", "cpu"))
)

EPS = 1e-6
RIGHT, SCALED, TRUNCATED, DROPPED_TERM, UNWRITTEN_ROW = range(5)
DEFECTS = {
    "scaled by 1.01": SCALED,
    "truncated": TRUNCATED,
    "dropped term": DROPPED_TERM,
    "unwritten row": UNWRITTEN_ROW,
}


@triton.jit
def _round_toward_zero(x, dtype: tl.constexpr):
    """Truncation: the nearest value, stepped back one ulp where it rounded away from zero."""
    rounded = round_to(x, dtype)
    bits = rounded.to(tl.int16, bitcast=True)
    stepped = (bits - 1).to(dtype, bitcast=True)
    return tl.where(tl.abs(rounded.to(tl.float32)) > tl.abs(x), stepped, rounded)


@triton.jit
def _rms_norm_kernel(
    x_ptr, w_ptr, out_ptr, n_rows, n_cols, eps, MODE: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    summed = x if MODE != DROPPED_TERM else tl.where(cols < n_cols - 1, x, 0.0)
    rstd = tl.rsqrt(tl.sum(summed * summed, axis=0) / n_cols + eps)
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    normed = round_to(x * rstd, dtype).to(tl.float32)
    out = normed * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if MODE == SCALED:
        out = out * 1.01
    stored = _round_toward_zero(out, dtype) if MODE == TRUNCATED else round_to(out, dtype)
    if MODE != UNWRITTEN_ROW or row < n_rows - 1:
        tl.store(out_ptr + row * n_cols + cols, stored, mask=mask)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, mode: int) -> torch.Tensor:
    out = torch.empty_like(x)  # NaN-filled by the suite's poisoning fixture
    rows, cols = x.shape
    _rms_norm_kernel[(rows,)](
        x, weight, out, rows, cols, EPS, MODE=mode, BLOCK=triton.next_power_of_2(cols)
    )
    return out


def _check(gen, dtype: torch.dtype, mode: int) -> None:
    x, weight = randn(gen, 40, 100, dtype=dtype, scale=2.0), randn(gen, 100, dtype=dtype)
    ref64 = qwen_kernels.rms_norm(x.double(), weight.double(), EPS, "torch")
    eager = qwen_kernels.rms_norm(x, weight, EPS, "torch")
    assert_close_to_reference(_rms_norm(x, weight, mode), ref64, eager)


# The same defects in the fused RMSNorm + gate/up GEMM + SwiGLU, held to the rule with the
# summation-order slack of its reduction (``Accumulation``): the slack admits a correct kernel
# that sums in another order, and still rejects each defect.
GEMM_ROWS, GEMM_IN, GEMM_OUT = 37, 200, 130


def _toward_zero(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Truncation to ``dtype``: the nearest value, one ulp back where it rounded away from 0."""
    nearest = exact.to(dtype)
    away = nearest.double().abs() > exact.double().abs()
    bits = nearest.view(torch.int16)
    return torch.where(away, (bits - 1).view(dtype), nearest)


TF32_PRODUCTS = len(DEFECTS) + 1  # fp32 inputs multiplied as TF32 (10 mantissa bits)


def _tf32(t: torch.Tensor) -> torch.Tensor:
    """fp32 values rounded to TF32's 10 mantissa bits (to nearest), as tensor cores take them."""
    bits = t.float().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def _sequential_gemm_swiglu(x, norm_weight, weight, bias, mode: int) -> torch.Tensor:
    """fp32 math summed one product at a time (an order no BLAS uses), then broken by ``mode``."""
    normed = qwen_kernels.rms_norm(x.float(), norm_weight.float(), EPS, "torch")
    weight = weight.float()
    if mode == TF32_PRODUCTS:
        normed, weight = _tf32(normed), _tf32(weight)
    terms = GEMM_IN - 1 if mode == DROPPED_TERM else GEMM_IN
    acc = bias.float().expand(GEMM_ROWS, -1).clone()
    for i in range(terms):
        acc += normed[:, i : i + 1] * weight[:, i]
    gate, up = acc.chunk(2, -1)
    exact = torch.nn.functional.silu(gate) * up
    if mode == SCALED:
        exact = exact * 1.01
    out = _toward_zero(exact, x.dtype) if mode == TRUNCATED else exact.to(x.dtype)
    if mode == UNWRITTEN_ROW:
        out[-1] = float("nan")
    return out


def _check_gemm(gen, dtype: torch.dtype, mode: int) -> None:
    from tests.ops.test_swiglu import swiglu_gemm_accumulation

    x = randn(gen, GEMM_ROWS, GEMM_IN, dtype=dtype, scale=3.0)
    norm_weight = randn(gen, GEMM_IN, dtype=dtype)
    weight = randn(gen, 2 * GEMM_OUT, GEMM_IN, dtype=dtype, scale=GEMM_IN**-0.5)
    bias = randn(gen, 2 * GEMM_OUT, dtype=dtype)
    args64 = [t.double() for t in (x, norm_weight, weight, bias)]
    ref64 = qwen_kernels.rms_norm_swiglu(*args64, EPS, "torch")
    eager = qwen_kernels.rms_norm_swiglu(x, norm_weight, weight, bias, EPS, "torch")
    got = _sequential_gemm_swiglu(x, norm_weight, weight, bias, mode)
    assert_close_to_reference(
        got,
        ref64,
        eager,
        magnitude=ref64.abs().amax(-1, keepdim=True),
        accumulation=swiglu_gemm_accumulation(*args64),
    )


# The RMSNorm kernel, and the GEMM summed in an order no BLAS uses.
CHECKS = {"norm": _check, "gemm": _check_gemm}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", CHECKS)
def test_right_kernel_passes(gen, dtype, kernel):
    CHECKS[kernel](gen, dtype, RIGHT)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("defect", DEFECTS)
@pytest.mark.parametrize("kernel", CHECKS)
def test_broken_kernel_is_rejected(gen, dtype, defect, kernel):
    if defect == "truncated" and dtype == torch.float32:
        pytest.skip("fp32 outputs are not rounded to a narrower type")
    with pytest.raises(AssertionError):
        CHECKS[kernel](gen, dtype, DEFECTS[defect])


def test_tf32_products_in_an_fp32_gemm_are_rejected(gen):
    """A GEMM that multiplies fp32 inputs as TF32 (the kernel's IEEE_FP32 flag forgotten) is
    rejected despite the slack: TF32 rounds each factor 8192x coarser than fp32."""
    with pytest.raises(AssertionError):
        _check_gemm(gen, torch.float32, TF32_PRODUCTS)
