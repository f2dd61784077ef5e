"""rms_norm and add_rms_norm: reference vs direct fp64 math and transformers, every backend vs the
reference, opcheck, and the errors of bad input; their gradients (rms_norm_backward) against fp64
autograd of the eager reference, gradcheck, and broken backward kernels caught."""

import pytest
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm

import qwen_kernels
from qwen_kernels.ops.rms_norm import add_rms_norm_reference, rms_norm_reference
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

SHAPES = [(1, 1280), (7, 1280), (5, 3420), (3, 5120), (13, 1), (2, 3, 97), (37, 64), (9, 5121)]
EPS = 1e-6


def direct_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x64 = x.double()
    return x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_direct_math(gen, shape, dtype):
    x, weight = randn(gen, *shape, dtype=dtype), randn(gen, shape[-1], dtype=dtype)
    out = qwen_kernels.rms_norm(x, weight, EPS, backend="torch")
    assert out.dtype == dtype and out.shape == x.shape
    # Two roundings to dtype (normalised value, then the product).
    assert rel_err(out, direct_rms_norm(x, weight, EPS)) < 2 * tolerance(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_transformers(gen, dtype):
    module = Qwen2_5_VLRMSNorm(1280, eps=EPS)
    with torch.no_grad():
        module.weight.copy_(randn(gen, 1280))
    module.to(dtype)
    x = randn(gen, 9, 1280, dtype=dtype, scale=3.0)
    with torch.no_grad():
        expected = module(x)
    torch.testing.assert_close(qwen_kernels.rms_norm(x, module.weight, EPS, "torch"), expected)


@pytest.mark.parametrize(("backend", "device"), targets("rms_norm"))
def test_large_fp16_activations_stay_finite(gen, backend, device):
    x = randn(gen, 4, 1280, dtype=torch.float16, scale=1e4)
    weight = randn(gen, 1280, dtype=torch.float16)
    out = qwen_kernels.rms_norm(x.to(device), weight.to(device), EPS, backend).cpu()
    assert torch.isfinite(out).all()
    assert rel_err(out, direct_rms_norm(x, weight, EPS)) < 2 * tolerance(torch.float16)


@pytest.mark.parametrize(("backend", "device"), targets("rms_norm"))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backend_matches_reference(gen, backend, device, shape, dtype):
    x, weight = randn(gen, *shape, dtype=dtype), randn(gen, shape[-1], dtype=dtype)
    ref64 = qwen_kernels.rms_norm(x.double(), weight.double(), EPS, "torch")
    eager = qwen_kernels.rms_norm(x, weight, EPS, "torch")
    out = qwen_kernels.rms_norm(x.to(device), weight.to(device), EPS, backend)
    assert_close_to_reference(out.cpu(), ref64, eager)


@pytest.mark.parametrize(("backend", "device"), targets("rms_norm"))
def test_fp32_weight_with_low_precision_input(gen, backend, device):
    x, weight = randn(gen, 7, 1280, dtype=torch.bfloat16), randn(gen, 1280)
    ref64 = qwen_kernels.rms_norm(x.double(), weight.double(), EPS, "torch")
    eager = qwen_kernels.rms_norm(x, weight, EPS, "torch")
    out = qwen_kernels.rms_norm(x.to(device), weight.to(device), EPS, backend)
    assert out.dtype == torch.bfloat16
    assert_close_to_reference(out.cpu(), ref64, eager)


@pytest.mark.parametrize(("backend", "device"), targets("add_rms_norm"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_add_rms_norm_fp32_weight_with_low_precision_input(gen, backend, device, dtype):
    x, residual = randn(gen, 7, 1280, dtype=dtype), randn(gen, 7, 1280, dtype=dtype)
    weight = randn(gen, 1280)
    out, summed = qwen_kernels.add_rms_norm(
        x.to(device), residual.to(device), weight.to(device), EPS, backend
    )
    assert out.dtype == summed.dtype == dtype
    assert torch.equal(summed.cpu(), x + residual)
    ref64 = qwen_kernels.rms_norm(summed.cpu().double(), weight.double(), EPS, "torch")
    eager = qwen_kernels.rms_norm(summed.cpu(), weight, EPS, "torch")
    assert_close_to_reference(out.cpu(), ref64, eager)


@pytest.mark.parametrize(("backend", "device"), targets("rms_norm"))
def test_strided_input(gen, backend, device):
    base = randn(gen, 6, 2 * 1280).to(device)
    x = base[:, 1280:]  # row stride 2560: a view, not a copy
    weight = randn(gen, 1280).to(device)
    out = qwen_kernels.rms_norm(x, weight, EPS, backend)
    assert torch.equal(out, qwen_kernels.rms_norm(x.contiguous(), weight, EPS, backend))


@pytest.mark.parametrize(("backend", "device"), targets("add_rms_norm"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(11, 1280), (3, 5, 3420), (37, 64)])
def test_add_rms_norm(gen, backend, device, dtype, shape):
    x, residual = randn(gen, *shape, dtype=dtype), randn(gen, *shape, dtype=dtype)
    weight = randn(gen, shape[-1], dtype=dtype)
    out, residual_out = qwen_kernels.add_rms_norm(
        x.to(device), residual.to(device), weight.to(device), EPS, backend
    )
    # The sum is rounded once to the input dtype, as torch rounds it: bit equality.
    assert residual_out.dtype == dtype
    assert torch.equal(residual_out.cpu(), x + residual)
    summed64 = residual_out.cpu().double()
    ref64 = qwen_kernels.rms_norm(summed64, weight.double(), EPS, "torch")
    eager = qwen_kernels.rms_norm(residual_out.cpu(), weight, EPS, "torch")
    assert_close_to_reference(out.cpu(), ref64, eager)


def test_add_rms_norm_matches_transformers_block_order(gen):
    """The vision block: residual = x + attn(norm1(x)); norm2(residual)."""
    module = Qwen2_5_VLRMSNorm(64, eps=EPS)
    with torch.no_grad():
        module.weight.copy_(randn(gen, 64))
    x, update = randn(gen, 5, 64), randn(gen, 5, 64)
    out, residual = qwen_kernels.add_rms_norm(update, x, module.weight, EPS, "torch")
    with torch.no_grad():
        torch.testing.assert_close(out, module(x + update))
    torch.testing.assert_close(residual, x + update)


def test_opcheck(gen):
    x, weight = randn(gen, 3, 40), randn(gen, 40)
    torch.library.opcheck(torch.ops.qwen.rms_norm, (x, weight, EPS, "torch"))
    torch.library.opcheck(torch.ops.qwen.add_rms_norm, (x, randn(gen, 3, 40), weight, EPS, "torch"))


@pytest.mark.parametrize(("backend", "device"), targets("rms_norm", with_reference=True))
def test_compiles_fullgraph(gen, backend, device):
    x, weight = randn(gen, 3, 40).to(device), randn(gen, 40).to(device)
    compiled = torch.compile(lambda a, w: qwen_kernels.rms_norm(a, w, EPS, backend), fullgraph=True)
    assert torch.equal(compiled(x, weight), qwen_kernels.rms_norm(x, weight, EPS, backend))


@pytest.mark.parametrize(
    ("make_args", "match"),
    [
        (lambda g: (torch.randint(0, 3, (2, 8)), randn(g, 8)), "`x` must be of dtype"),
        (lambda g: (randn(g, 2, 8), randn(g, 7)), "`weight` must be 1-D of size"),
        (lambda g: (randn(g, 2, 8), randn(g, 2, 8)), "`weight` must be 1-D of size"),
        (lambda g: (randn(g, 2, 8), torch.empty(8, device="meta")), "`weight` must be on cpu"),
        (lambda g: (torch.ones(()), torch.ones(1)), "`x` must be at least 1-D"),
    ],
)
def test_bad_input(gen, make_args, match):
    x, weight = make_args(gen)
    with pytest.raises(ValueError, match=match):
        qwen_kernels.rms_norm(x, weight, EPS)


def test_bad_eps_and_residual(gen):
    x, weight = randn(gen, 2, 8), randn(gen, 8)
    with pytest.raises(ValueError, match="`eps` must be a non-negative float"):
        qwen_kernels.rms_norm(x, weight, -1.0)
    with pytest.raises(ValueError, match="`residual` must be of x's shape"):
        qwen_kernels.add_rms_norm(x, randn(gen, 3, 8), weight, EPS)
    with pytest.raises(ValueError, match=r"`residual` must be of dtype torch\.float32"):
        qwen_kernels.add_rms_norm(x, x.half(), weight, EPS)


def test_unknown_and_unavailable_backend(gen):
    x, weight = randn(gen, 2, 8), randn(gen, 8)
    with pytest.raises(ValueError, match="`backend` must be one of"):
        qwen_kernels.rms_norm(x, weight, EPS, backend="fast")
    missing = [b for b in ("triton", "cuda", "cuda_emu") if b not in backends_for("rms_norm")]
    for backend in missing:
        with pytest.raises(RuntimeError, match=backend):
            qwen_kernels.rms_norm(x, weight, EPS, backend=backend)


@pytest.mark.parametrize(("backend", "device"), targets("rms_norm"))
def test_kernel_backends_reject_float64(gen, backend, device):
    x = randn(gen, 2, 8, dtype=torch.float64).to(device)
    weight = randn(gen, 8, dtype=torch.float64).to(device)
    with pytest.raises(ValueError, match="only the 'torch' reference runs in float64"):
        qwen_kernels.rms_norm(x, weight, EPS, backend)


def test_auto_runs_float64_on_the_reference(gen):
    x, weight = randn(gen, 2, 8, dtype=torch.float64), randn(gen, 8, dtype=torch.float64)
    torch.testing.assert_close(
        qwen_kernels.rms_norm(x, weight, EPS), direct_rms_norm(x, weight, EPS)
    )


@pytest.mark.parametrize(
    ("backend", "device"),
    [t for t in targets("rms_norm") if t.values[0] in ("cuda", "cuda_emu")],
)
def test_native_op_checks_its_arguments(gen, backend, device):
    """The C++ ops check their input themselves when called directly (torch.ops.qwen_emu...)."""
    import importlib

    library = (
        importlib.import_module("qwen_kernels._emu").load()
        if backend == "cuda_emu"
        else torch.ops.qwen_cuda
    )
    x = randn(gen, 3, 16).to(device)
    weight = randn(gen, 16).to(x.device)
    with pytest.raises(ValueError, match="argument 'weight'"):
        library.rms_norm(x, weight[:15], EPS)
    with pytest.raises(ValueError, match="argument 'x'"):
        library.rms_norm(x.double(), weight, EPS)
    with pytest.raises(ValueError, match="argument 'residual'"):
        library.add_rms_norm(x, x[:2], weight, EPS)


@pytest.mark.parametrize(("backend", "device"), targets("rms_norm"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_weight_and_misaligned_rows(gen, backend, device, dtype):
    """A weight view with stride 2, and rows that start one element past a 16-byte boundary
    (a narrower vector width must be chosen, not a misaligned 16-byte access)."""
    base = randn(gen, 5, 1 + 1280, dtype=dtype).to(device)
    x = base[:, 1:]
    weight = randn(gen, 2 * 1280, dtype=dtype).to(device)[::2]
    x_cpu, weight_cpu = x.cpu(), weight.cpu()
    ref64 = qwen_kernels.rms_norm(x_cpu.double(), weight_cpu.double(), EPS, "torch")
    eager = qwen_kernels.rms_norm(x_cpu, weight_cpu, EPS, "torch")
    assert_close_to_reference(qwen_kernels.rms_norm(x, weight, EPS, backend).cpu(), ref64, eager)
    out, summed = qwen_kernels.add_rms_norm(x, x, weight, EPS, backend)
    assert torch.equal(summed.cpu(), x_cpu + x_cpu)
    ref64 = qwen_kernels.rms_norm(summed.cpu().double(), weight_cpu.double(), EPS, "torch")
    eager = qwen_kernels.rms_norm(summed.cpu(), weight_cpu, EPS, "torch")
    assert_close_to_reference(out.cpu(), ref64, eager)


@pytest.mark.parametrize(("backend", "device"), targets("add_rms_norm"))
def test_add_rms_norm_large_fp16_stays_finite(gen, backend, device):
    x = randn(gen, 4, 1280, dtype=torch.float16, scale=1e4)
    residual = randn(gen, 4, 1280, dtype=torch.float16, scale=1e4)
    weight = randn(gen, 1280, dtype=torch.float16)
    out, summed = qwen_kernels.add_rms_norm(
        x.to(device), residual.to(device), weight.to(device), EPS, backend
    )
    expected_out, expected_sum = qwen_kernels.add_rms_norm(x, residual, weight, EPS, "torch")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(summed.cpu(), expected_sum)
    assert rel_err(out.cpu(), expected_out) < 2 * tolerance(torch.float16)


@pytest.mark.parametrize(("backend", "device"), targets("rms_norm"))
def test_opcheck_kernels(gen, backend, device):
    x, weight = randn(gen, 3, 40).to(device), randn(gen, 40).to(device)
    torch.library.opcheck(torch.ops.qwen.rms_norm, (x, weight, EPS, backend))
    residual = randn(gen, 3, 40).to(device)
    torch.library.opcheck(torch.ops.qwen.add_rms_norm, (x, residual, weight, EPS, backend))


@pytest.mark.parametrize(("backend", "device"), targets("rms_norm"))
def test_empty_rows(gen, backend, device):
    x, weight = randn(gen, 0, 64).to(device), randn(gen, 64).to(device)
    assert qwen_kernels.rms_norm(x, weight, EPS, backend).shape == (0, 64)
    out, summed = qwen_kernels.add_rms_norm(x, x, weight, EPS, backend)
    assert out.shape == summed.shape == (0, 64)


def test_weight_dtype_contract(gen):
    """The weight is x's dtype or fp32 on every backend, so "auto" never meets a kernel that
    refuses what the reference took."""
    x = randn(gen, 3, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="`weight` must be of dtype bfloat16, float32"):
        qwen_kernels.rms_norm(x, randn(gen, 16, dtype=torch.float16), EPS)
    out = qwen_kernels.rms_norm(x, randn(gen, 16), EPS)
    assert out.dtype == torch.bfloat16


def assert_norm_gradients(
    got, ref64, eager, bounds: NormGradientBounds, grad_residual: torch.Tensor | None = None
) -> None:
    """grad_x and grad_weight against fp64 autograd, each within the summation-order slack (a
    ``grad_residual`` added to grad_x adds its size to grad_x's)."""
    residual = 0.0 if grad_residual is None else grad_residual.double().abs()
    assert_close_to_reference(
        got[0].cpu(),
        ref64[0],
        eager[0],
        magnitude=bounds.x_magnitude + residual,
        accumulation=bounds.x_accumulation,
    )
    assert_close_to_reference(
        got[1].cpu(),
        ref64[1],
        eager[1],
        magnitude=bounds.weight_magnitude,
        accumulation=bounds.weight_accumulation,
    )


def norm_gradients(backend, device, x, weight, grad):
    """(ours on ``backend``, fp64 autograd of the eager reference, eager in x's dtype)."""
    ours = autograd_grads(
        lambda x, w: qwen_kernels.rms_norm(x, w, EPS, backend),
        (x.to(device), weight.to(device)),
        grad.to(device),
        (0, 1),
    )
    ref64 = autograd_grads(
        lambda x, w: rms_norm_reference(x, w, EPS),
        (x.double(), weight.double()),
        grad.double(),
        (0, 1),
    )
    eager = autograd_grads(lambda x, w: rms_norm_reference(x, w, EPS), (x, weight), grad, (0, 1))
    return ours, ref64, eager


@pytest.mark.parametrize(("backend", "device"), targets("rms_norm_backward", with_reference=True))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_match_fp64_autograd(gen, backend, device, shape, dtype):
    x, weight = randn(gen, *shape, dtype=dtype), randn(gen, shape[-1], dtype=dtype)
    grad = randn(gen, *shape, dtype=dtype)
    got, ref64, eager = norm_gradients(backend, device, x, weight, grad)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert_norm_gradients(got, ref64, eager, NormGradientBounds.of(grad, x, weight, EPS))


@pytest.mark.parametrize(("backend", "device"), targets("rms_norm_backward", with_reference=True))
def test_gradients_of_fp32_weight_and_many_rows(gen, backend, device):
    """bf16 activations with an fp32 master weight, and rows enough for several row tiles per
    program (the weight gradient's two-stage sum)."""
    x, weight = randn(gen, 2 * 1031, 64, dtype=torch.bfloat16), randn(gen, 64)
    grad = randn(gen, 2 * 1031, 64, dtype=torch.bfloat16)
    got, ref64, eager = norm_gradients(backend, device, x, weight, grad)
    assert got[1].dtype == torch.float32
    assert_norm_gradients(got, ref64, eager, NormGradientBounds.of(grad, x, weight, EPS))


@pytest.mark.parametrize(("backend", "device"), targets("rms_norm_backward", with_reference=True))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_of_wide_rows(gen, backend, device, dtype):
    """Rows wider than the CUDA backward's register accumulators hold (8192 features): its
    weight-gradient partials then live in memory; an odd width leaves scalar accesses."""
    x, weight = randn(gen, 5, 8195, dtype=dtype), randn(gen, 8195, dtype=dtype)
    grad = randn(gen, 5, 8195, dtype=dtype)
    got, ref64, eager = norm_gradients(backend, device, x, weight, grad)
    assert_norm_gradients(got, ref64, eager, NormGradientBounds.of(grad, x, weight, EPS))


@pytest.mark.parametrize(("backend", "device"), targets("rms_norm_backward", with_reference=True))
def test_gradient_of_another_dtype(gen, backend, device):
    """bf16 x with fp32 output and residual gradients: each is read as it is, without a
    rounding to x's dtype first."""
    x, weight = randn(gen, 19, 136, dtype=torch.bfloat16), randn(gen, 136, dtype=torch.bfloat16)
    grad, grad_residual = randn(gen, 19, 136), randn(gen, 19, 136)
    on = [t.to(device) for t in (grad, x, weight)]
    got = qwen_kernels.rms_norm_backward(*on, EPS, grad_residual.to(device), backend)
    wide = [t.double() for t in (grad, x, weight)]
    ref64 = qwen_kernels.rms_norm_backward(*wide, EPS, grad_residual.double(), "torch")
    eager = qwen_kernels.rms_norm_backward(grad, x, weight, EPS, grad_residual, "torch")
    bounds = NormGradientBounds.of(grad, x, weight, EPS)
    assert_norm_gradients(got, ref64, eager, bounds, grad_residual)


@pytest.mark.parametrize(("backend", "device"), targets("add_rms_norm", with_reference=True))
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_gradients(gen, backend, device, dtype):
    """Both outputs carry a gradient; x and residual get the same one."""
    shape = (11, 3, 97)
    x, residual = randn(gen, *shape, dtype=dtype), randn(gen, *shape, dtype=dtype)
    weight = randn(gen, 97, dtype=dtype)
    grads = (randn(gen, *shape, dtype=dtype), randn(gen, *shape, dtype=dtype))

    def run(fn, tensors, grads):
        return autograd_grads(lambda *t: fn(*t, EPS), tensors, grads, (0, 1, 2))

    on = (x.to(device), residual.to(device), weight.to(device))
    ours = run(
        lambda *a: qwen_kernels.add_rms_norm(*a, backend), on, tuple(g.to(device) for g in grads)
    )
    ref64 = run(
        add_rms_norm_reference,
        (x.double(), residual.double(), weight.double()),
        tuple(g.double() for g in grads),
    )
    eager = run(add_rms_norm_reference, (x, residual, weight), grads)
    summed = (x.double() + residual.double()).to(dtype)
    bounds = NormGradientBounds.of(grads[0], summed, weight, EPS)
    for got, want, same in ((ours[0], ref64[0], eager[0]), (ours[1], ref64[1], eager[1])):
        assert_close_to_reference(
            got.cpu(),
            want,
            same,
            magnitude=bounds.x_magnitude + grads[1].double().abs(),
            accumulation=bounds.x_accumulation,
        )
    assert torch.equal(ours[0], ours[1])
    assert_close_to_reference(
        ours[2].cpu(),
        ref64[2],
        eager[2],
        magnitude=bounds.weight_magnitude,
        accumulation=bounds.weight_accumulation,
    )


@pytest.mark.parametrize(("backend", "device"), targets("rms_norm_backward", with_reference=True))
def test_gradients_of_strided_views(gen, backend, device):
    """x a column slice of a wider tensor and the output gradient a transposed view."""
    base = randn(gen, 9, 2 * 77, dtype=torch.bfloat16)
    weight = randn(gen, 77, dtype=torch.bfloat16)
    grad = randn(gen, 77, 9, dtype=torch.bfloat16).t()

    def run(fn, base, weight, grad):
        return autograd_grads(lambda b, w: fn(b[:, 1::2], w), (base, weight), grad, (0, 1))

    ours = run(
        lambda x, w: qwen_kernels.rms_norm(x, w, EPS, backend),
        base.to(device),
        weight.to(device),
        grad.to(device),
    )
    ref64 = run(
        lambda x, w: rms_norm_reference(x, w, EPS), base.double(), weight.double(), grad.double()
    )
    eager = run(lambda x, w: rms_norm_reference(x, w, EPS), base, weight, grad)
    assert torch.all(ours[0][:, 0::2] == 0)
    bounds = NormGradientBounds.of(grad, base[:, 1::2], weight, EPS)
    got = [ours[0][:, 1::2], ours[1]]
    want = [ref64[0][:, 1::2], ref64[1]]
    same = [eager[0][:, 1::2], eager[1]]
    assert_norm_gradients(got, want, same, bounds)


def test_gradcheck_of_the_reference_backward(gen):
    x, weight = randn(gen, 3, 5, dtype=torch.float64), randn(gen, 5, dtype=torch.float64)
    residual = randn(gen, 3, 5, dtype=torch.float64)
    args = [t.requires_grad_() for t in (x, residual, weight)]
    assert torch.autograd.gradcheck(
        lambda x, w: qwen_kernels.rms_norm(x, w, EPS, "torch"), (args[0], args[2])
    )
    assert torch.autograd.gradcheck(lambda *a: qwen_kernels.add_rms_norm(*a, EPS, "torch"), args)


@pytest.mark.parametrize(("backend", "device"), targets("rms_norm_backward", with_reference=True))
def test_opcheck_with_autograd(gen, backend, device):
    x = randn(gen, 6, 40).to(device).requires_grad_()
    weight = randn(gen, 40).to(device).requires_grad_()
    residual = randn(gen, 6, 40).to(device).requires_grad_()
    torch.library.opcheck(torch.ops.qwen.rms_norm.default, (x, weight, EPS, backend))
    torch.library.opcheck(torch.ops.qwen.add_rms_norm.default, (x, residual, weight, EPS, backend))
    grad = randn(gen, 6, 40).to(device)
    torch.library.opcheck(
        torch.ops.qwen.rms_norm_backward.default,
        (grad, x.detach(), weight.detach(), EPS, residual.detach(), backend),
    )


def test_gradient_checks_reject_broken_kernels(gen):
    """The gradient checks fail a backward that scales grad_x or grad_weight by 1.01, drops the
    mean term of grad_x, truncates instead of rounding, or leaves out the last row's share of
    grad_weight."""
    x, weight = randn(gen, 37, 1280, dtype=torch.bfloat16), randn(gen, 1280, dtype=torch.bfloat16)
    grad = randn(gen, 37, 1280, dtype=torch.bfloat16)
    good, ref64, eager = norm_gradients("torch", "cpu", x, weight, grad)
    bounds = NormGradientBounds.of(grad, x, weight, EPS)
    assert_norm_gradients(good, ref64, eager, bounds)

    xf, g, w = x.float(), grad.float(), weight.float()
    rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + EPS)
    normed = xf * rstd
    without_mean = (rstd * g * w).to(torch.bfloat16)
    truncated = (
        (
            (rstd * (g * w - normed * (g * w * normed).mean(-1, keepdim=True))).view(torch.int32)
            & -65536
        )
        .view(torch.float32)
        .to(torch.bfloat16)
    )
    short = (g[:-1] * normed[:-1].to(torch.bfloat16).float()).sum(0).to(torch.bfloat16)
    broken = {
        "grad_x scaled by 1.01": [(good[0].float() * 1.01).to(torch.bfloat16), good[1]],
        "grad_weight scaled by 1.01": [good[0], (good[1].float() * 1.01).to(torch.bfloat16)],
        "grad_x without its mean term": [without_mean, good[1]],
        "grad_x truncated": [truncated, good[1]],
        "grad_weight without the last row": [good[0], short],
    }
    for name, got in broken.items():
        with pytest.raises(AssertionError):
            assert_norm_gradients(got, ref64, eager, bounds)
            pytest.fail(f"a backward whose output is {name} passed the checks")
