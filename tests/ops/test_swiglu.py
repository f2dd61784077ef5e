"""swiglu and rms_norm_swiglu: reference vs fp64 math and transformers' Qwen2_5_VLMLP, every
backend vs the reference, opcheck, and the errors of bad input; their gradients (swiglu_backward,
and the fused op's composed backward) against fp64 autograd of the eager reference."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLMLP, Qwen2_5_VLRMSNorm

import qwen_kernels
from qwen_kernels.ops.rms_norm_swiglu import fold_norm_weight, rms_norm_swiglu_reference
from qwen_kernels.ops.swiglu import swiglu_reference
from tests.helpers import (
    DTYPES,
    Accumulation,
    assert_close_to_reference,
    autograd_grads,
    randn,
    rel_err,
    targets,
    tolerance,
)

EPS = 1e-6


def direct_swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.double().chunk(2, dim=-1)
    return gate / (1 + torch.exp(-gate)) * up


def random_mlp(gen, hidden: int, intermediate: int, dtype) -> Qwen2_5_VLMLP:
    config = SimpleNamespace(hidden_size=hidden, intermediate_size=intermediate, hidden_act="silu")
    mlp = Qwen2_5_VLMLP(config, bias=True)
    with torch.no_grad():
        for param in mlp.parameters():
            param.copy_(randn(gen, *param.shape, scale=hidden**-0.5))
    return mlp.to(dtype)


@pytest.mark.parametrize("shape", [(1, 2 * 3420), (7, 2 * 3420), (3, 2, 2 * 1280), (5, 2)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_direct_math(gen, shape, dtype):
    gate_up = randn(gen, *shape, dtype=dtype, scale=2.0)
    out = qwen_kernels.swiglu(gate_up, backend="torch")
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype
    assert rel_err(out, direct_swiglu(gate_up)) < tolerance(dtype)


@pytest.mark.parametrize(("backend", "device"), targets("swiglu"))
@pytest.mark.parametrize("shape", [(7, 2 * 3420), (3, 2 * 1281), (1, 2), (2, 3, 2 * 1280)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backend_matches_reference(gen, backend, device, shape, dtype):
    gate_up = randn(gen, *shape, dtype=dtype, scale=3.0)
    ref64 = qwen_kernels.swiglu(gate_up.double(), "torch")
    eager = qwen_kernels.swiglu(gate_up, "torch")
    out = qwen_kernels.swiglu(gate_up.to(device), backend)
    assert_close_to_reference(out.cpu(), ref64, eager)


@pytest.mark.parametrize(("backend", "device"), targets("swiglu"))
def test_large_fp16_gates_stay_finite(gen, backend, device):
    gate_up = randn(gen, 3, 2 * 1280, dtype=torch.float16, scale=300.0)
    out = qwen_kernels.swiglu(gate_up.to(device), backend).cpu()
    eager = qwen_kernels.swiglu(gate_up, "torch")
    assert torch.equal(torch.isfinite(out), torch.isfinite(eager))


@pytest.mark.parametrize(("backend", "device"), targets("swiglu"))
def test_strided_input(gen, backend, device):
    gate_up = randn(gen, 2 * 96, 5).to(device).t()  # [5, 192] with column stride 5
    torch.testing.assert_close(
        qwen_kernels.swiglu(gate_up, backend), qwen_kernels.swiglu(gate_up.contiguous(), "torch")
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_matches_transformers_mlp(gen, dtype):
    mlp = random_mlp(gen, 64, 96, dtype)
    x = randn(gen, 10, 64, dtype=dtype)
    gate_up_weight = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
    gate_up_bias = torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias])
    with torch.no_grad():
        expected = mlp(x).double()
        ours = mlp.down_proj(
            qwen_kernels.swiglu(F.linear(x, gate_up_weight, gate_up_bias), "torch")
        )
    assert rel_err(ours, expected) < 2 * tolerance(dtype)


@pytest.mark.parametrize(("backend", "device"), targets("rms_norm_swiglu"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_swiglu_matches_transformers(gen, backend, device, dtype):
    hidden, intermediate = 80, 123
    mlp = random_mlp(gen, hidden, intermediate, dtype)
    norm = Qwen2_5_VLRMSNorm(hidden, eps=EPS)
    with torch.no_grad():
        norm.weight.copy_(randn(gen, hidden))
    norm.to(dtype)
    x = randn(gen, 3, 7, hidden, dtype=dtype, scale=2.0)
    gate_up_weight = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
    gate_up_bias = torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias])
    with torch.no_grad():
        h = norm(x)
        expected = F.silu(mlp.gate_proj(h).double()) * mlp.up_proj(h).double()
    args = [t.detach().to(device) for t in (x, norm.weight, gate_up_weight, gate_up_bias)]
    out = qwen_kernels.rms_norm_swiglu(*args, EPS, backend).cpu()
    assert out.shape == (3, 7, intermediate) and out.dtype == dtype
    assert rel_err(out, expected) < 3 * tolerance(dtype)


@pytest.mark.parametrize(("backend", "device"), targets("rms_norm_swiglu"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_rms_norm_swiglu_backend_matches_reference(gen, backend, device, dtype, with_bias):
    rows, hidden, intermediate = 37, 200, 130  # odd sizes: partial tiles on every side
    x = randn(gen, rows, hidden, dtype=dtype, scale=3.0)
    norm_weight = randn(gen, hidden, dtype=dtype)
    weight = randn(gen, 2 * intermediate, hidden, dtype=dtype, scale=hidden**-0.5)
    bias = randn(gen, 2 * intermediate, dtype=dtype) if with_bias else None
    args64 = [t.double() if t is not None else None for t in (x, norm_weight, weight, bias)]
    ref64 = qwen_kernels.rms_norm_swiglu(*args64, EPS, "torch")
    eager = qwen_kernels.rms_norm_swiglu(x, norm_weight, weight, bias, EPS, "torch")
    args = [t.to(device) if t is not None else None for t in (x, norm_weight, weight, bias)]
    got = qwen_kernels.rms_norm_swiglu(*args, EPS, backend)
    # The GEMM cancels: an output near zero carries the rounding of its row's largest values.
    row_scale = ref64.abs().amax(-1, keepdim=True)
    accumulation = swiglu_gemm_accumulation(*args64)
    assert_close_to_reference(
        got.cpu(), ref64, eager, magnitude=row_scale, accumulation=accumulation
    )


def swiglu_gemm_accumulation(x, norm_weight, weight, bias):
    """``Accumulation`` of ``silu(g) * u`` with ``[g | u] = rms_norm(x) @ weight.T + bias`` (fp64
    inputs): each of g and u sums K products and a bias, scaled by an rstd whose K-term sum of
    squares adds as many roundings again, and their errors reach the output through the
    derivatives of ``silu(g) * u`` (``silu'(g) = s (1 + g (1 - s))``, ``s = sigmoid(g)``)."""
    normed = qwen_kernels.rms_norm(x, norm_weight, EPS, "torch")
    gate, up = F.linear(normed, weight, bias).chunk(2, -1)
    abs_bias = bias.abs() if bias is not None else None
    abs_gate, abs_up = F.linear(normed.abs(), weight.abs(), abs_bias).chunk(2, -1)
    sigmoid = torch.sigmoid(gate)
    d_silu = sigmoid * (1 + gate * (1 - sigmoid))
    magnitude = d_silu.abs() * up.abs() * abs_gate + (gate * sigmoid).abs() * abs_up
    return Accumulation(2 * x.shape[-1] + 8, magnitude)


@pytest.mark.parametrize(("backend", "device"), targets("rms_norm_swiglu"))
def test_rms_norm_swiglu_sees_in_place_weight_updates(gen, backend, device):
    """Kernels that prepare folded weights once must notice a changed weight."""
    x, norm_weight = randn(gen, 5, 32).to(device), randn(gen, 32).to(device)
    weight = randn(gen, 24, 32, scale=0.2).to(device)
    first = qwen_kernels.rms_norm_swiglu(x, norm_weight, weight, None, EPS, backend)
    norm_weight.mul_(-0.5)
    weight[:3].add_(1.0)
    second = qwen_kernels.rms_norm_swiglu(x, norm_weight, weight, None, EPS, backend)
    expected = qwen_kernels.rms_norm_swiglu(x, norm_weight, weight, None, EPS, "torch")
    assert rel_err(second, expected) < 1e-5
    assert rel_err(first, expected) > 1e-2


def test_rms_norm_swiglu_without_bias(gen):
    x, norm_weight = randn(gen, 4, 16), randn(gen, 16)
    weight = randn(gen, 10, 16, scale=0.25)
    out = qwen_kernels.rms_norm_swiglu(x, norm_weight, weight, None, EPS, "torch")
    h = qwen_kernels.rms_norm(x, norm_weight, EPS, "torch")
    torch.testing.assert_close(out, qwen_kernels.swiglu(h @ weight.t(), "torch"))


def test_opcheck(gen):
    torch.library.opcheck(torch.ops.qwen.swiglu, (randn(gen, 3, 10), "torch"))
    args = (randn(gen, 3, 8), randn(gen, 8), randn(gen, 12, 8), randn(gen, 12), EPS, "torch")
    torch.library.opcheck(torch.ops.qwen.rms_norm_swiglu, args)


def test_bad_input(gen):
    with pytest.raises(ValueError, match="`gate_up` must be of even size"):
        qwen_kernels.swiglu(randn(gen, 3, 7))
    with pytest.raises(ValueError, match="`gate_up` must be of dtype"):
        qwen_kernels.swiglu(torch.randint(0, 5, (3, 8)))
    x, norm_weight = randn(gen, 4, 16), randn(gen, 16)
    with pytest.raises(ValueError, match=r"`gate_up_weight` must be \[2I, 16\]"):
        qwen_kernels.rms_norm_swiglu(x, norm_weight, randn(gen, 10, 15), None, EPS)
    with pytest.raises(ValueError, match="`gate_up_weight` must be an even number of rows"):
        qwen_kernels.rms_norm_swiglu(x, norm_weight, randn(gen, 9, 16), None, EPS)
    with pytest.raises(ValueError, match=r"`gate_up_bias` must be \[10\]"):
        qwen_kernels.rms_norm_swiglu(x, norm_weight, randn(gen, 10, 16), randn(gen, 9), EPS)
    with pytest.raises(ValueError, match=r"`gate_up_weight` must be of dtype torch\.float32"):
        qwen_kernels.rms_norm_swiglu(x, norm_weight, randn(gen, 10, 16).half(), None, EPS)


@pytest.mark.parametrize(("backend", "device"), targets("swiglu"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_strided_and_misaligned_views(gen, backend, device, dtype):
    """Rows of a wider buffer (a view, no copy) starting one element past a 16-byte boundary."""
    base = randn(gen, 6, 1 + 2 * 1280 + 7, dtype=dtype).to(device)
    gate_up = base[:, 1 : 1 + 2 * 1280]
    # Same kernel math on an aligned copy: a narrower vector width changes no bit.
    expected = qwen_kernels.swiglu(gate_up.contiguous(), backend)
    assert torch.equal(qwen_kernels.swiglu(gate_up, backend), expected)


@pytest.mark.parametrize(("backend", "device"), targets("swiglu"))
def test_empty_inputs(gen, backend, device):
    assert qwen_kernels.swiglu(randn(gen, 0, 8).to(device), backend).shape == (0, 4)
    assert qwen_kernels.swiglu(randn(gen, 3, 0).to(device), backend).shape == (3, 0)


@pytest.mark.parametrize(("backend", "device"), targets("swiglu"))
def test_opcheck_kernels(gen, backend, device):
    torch.library.opcheck(torch.ops.qwen.swiglu, (randn(gen, 3, 10).to(device), backend))


@pytest.mark.parametrize(("backend", "device"), targets("rms_norm_swiglu"))
def test_rms_norm_swiglu_opcheck_and_strided_bias(gen, backend, device):
    x, norm_weight = randn(gen, 3, 8).to(device), randn(gen, 8).to(device)
    weight = randn(gen, 12, 8).to(device)
    bias = randn(gen, 24).to(device)[::2]  # a strided view
    torch.library.opcheck(
        torch.ops.qwen.rms_norm_swiglu, (x, norm_weight, weight, bias, EPS, backend)
    )
    expected = qwen_kernels.rms_norm_swiglu(
        *[t.cpu() for t in (x, norm_weight, weight, bias)], EPS, "torch"
    )
    got = qwen_kernels.rms_norm_swiglu(x, norm_weight, weight, bias, EPS, backend)
    assert rel_err(got.cpu(), expected) < 1e-5


def test_rms_norm_swiglu_bias_must_match(gen):
    x, norm_weight, weight = randn(gen, 4, 16), randn(gen, 16), randn(gen, 10, 16)
    with pytest.raises(ValueError, match=r"`gate_up_bias` must be of dtype torch\.float32"):
        qwen_kernels.rms_norm_swiglu(x, norm_weight, weight, randn(gen, 10).half(), EPS)
    with pytest.raises(ValueError, match="`gate_up_bias` must be on cpu"):
        qwen_kernels.rms_norm_swiglu(x, norm_weight, weight, torch.empty(10, device="meta"), EPS)


@pytest.mark.parametrize(("backend", "device"), targets("rms_norm_swiglu", with_reference=True))
def test_rms_norm_swiglu_with_a_folded_weight(gen, backend, device):
    """``norm_weight=None``: the caller folded the norm weight into the gate/up weight, and every
    backend computes the same function as with the two weights apart."""
    x, norm_weight = randn(gen, 9, 40, scale=2.0), randn(gen, 40)
    weight, bias = randn(gen, 2 * 24, 40, scale=40**-0.5), randn(gen, 2 * 24)
    folded = fold_norm_weight(norm_weight, weight)
    assert folded.is_contiguous()
    assert torch.equal(folded, (weight.double() * norm_weight.double()).float())
    expected = qwen_kernels.rms_norm_swiglu(
        *(t.double() for t in (x, norm_weight, weight, bias)), EPS, "torch"
    )
    on_device = [t.to(device) for t in (x, folded, bias)]
    got = qwen_kernels.rms_norm_swiglu(on_device[0], None, *on_device[1:], EPS, backend)
    assert rel_err(got.cpu(), expected) < 1e-5


def swiglu_gradients(backend, device, gate_up, grad):
    """(ours on ``backend``, fp64 autograd of the eager reference, eager in the input dtype)."""
    ours = autograd_grads(
        lambda t: qwen_kernels.swiglu(t, backend), (gate_up.to(device),), grad.to(device), (0,)
    )[0]
    ref64 = autograd_grads(swiglu_reference, (gate_up.double(),), grad.double(), (0,))[0]
    eager = autograd_grads(swiglu_reference, (gate_up,), grad, (0,))[0]
    return ours.cpu(), ref64, eager


def swiglu_gradient_magnitude(gate_up, grad) -> torch.Tensor:
    """The size of the terms of each gradient element (fp64): ``silu'(g) = s (1 + g (1 - s))``
    cancels near g = -1.28, where the gradient of the gate carries the rounding of its terms."""
    gate, up = gate_up.double().chunk(2, -1)
    g, sig = grad.double().abs(), torch.sigmoid(gate)
    gate_terms = g * up.abs() * sig * (1 + gate.abs() * (1 - sig))
    return torch.cat((gate_terms, g * (gate * sig).abs()), -1)


@pytest.mark.parametrize(("backend", "device"), targets("swiglu_backward", with_reference=True))
@pytest.mark.parametrize("shape", [(1, 2 * 3420), (7, 2 * 1281), (3, 2, 2 * 1280), (5, 2)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_gradients_match_fp64_autograd(gen, backend, device, shape, dtype):
    gate_up = randn(gen, *shape, dtype=dtype, scale=3.0)
    grad = randn(gen, *shape[:-1], shape[-1] // 2, dtype=dtype)
    got, ref64, eager = swiglu_gradients(backend, device, gate_up, grad)
    assert got.dtype == dtype and got.shape == gate_up.shape
    assert_close_to_reference(got, ref64, eager, magnitude=swiglu_gradient_magnitude(gate_up, grad))


@pytest.mark.parametrize(("backend", "device"), targets("swiglu_backward", with_reference=True))
def test_swiglu_gradients_of_strided_views(gen, backend, device):
    """gate_up a row-strided slice, the output gradient a transposed view."""
    base = randn(gen, 9, 2 * 130 + 6, dtype=torch.bfloat16)
    grad = randn(gen, 130, 9, dtype=torch.bfloat16).t()

    def run(fn, base, grad):
        return autograd_grads(lambda b: fn(b[:, 3:-3]), (base,), grad, (0,))[0]

    got = run(lambda t: qwen_kernels.swiglu(t, backend), base.to(device), grad.to(device)).cpu()
    ref64 = run(swiglu_reference, base.double(), grad.double())
    eager = run(swiglu_reference, base, grad)
    assert torch.all(got[:, :3] == 0) and torch.all(got[:, -3:] == 0)
    magnitude = swiglu_gradient_magnitude(base[:, 3:-3], grad)
    assert_close_to_reference(got[:, 3:-3], ref64[:, 3:-3], eager[:, 3:-3], magnitude=magnitude)


@pytest.mark.parametrize(("backend", "device"), targets("swiglu_backward", with_reference=True))
def test_swiglu_gradient_of_another_dtype(gen, backend, device):
    """An fp32 output gradient of a bf16 swiglu is read as it is, not rounded to bf16 first."""
    gate_up = randn(gen, 11, 2 * 200, dtype=torch.bfloat16, scale=3.0)
    grad = randn(gen, 11, 200)
    got = qwen_kernels.swiglu_backward(grad.to(device), gate_up.to(device), backend).cpu()
    ref64 = qwen_kernels.swiglu_backward(grad.double(), gate_up.double(), "torch")
    eager = qwen_kernels.swiglu_backward(grad, gate_up, "torch")
    magnitude = swiglu_gradient_magnitude(gate_up, grad)
    assert_close_to_reference(got, ref64, eager.to(torch.bfloat16), magnitude=magnitude)


def test_swiglu_gradient_checks_reject_broken_kernels(gen):
    """A backward that scales by 1.01, swaps the gate and up halves, drops the sigmoid's
    derivative term or truncates fails the checks."""
    gate_up = randn(gen, 37, 2 * 130, dtype=torch.bfloat16, scale=3.0)
    grad = randn(gen, 37, 130, dtype=torch.bfloat16)
    good, ref64, eager = swiglu_gradients("torch", "cpu", gate_up, grad)
    magnitude = swiglu_gradient_magnitude(gate_up, grad)
    assert_close_to_reference(good, ref64, eager, magnitude=magnitude)
    gate, up = gate_up.float().chunk(2, -1)
    sig, g = torch.sigmoid(gate), grad.float()
    truncated = (ref64.float().view(torch.int32) & -65536).view(torch.float32)
    broken = {
        "scaled by 1.01": good.float() * 1.01,
        "halves swapped": torch.cat(good.float().chunk(2, -1)[::-1], -1),
        "silu' without g (1 - s)": torch.cat((g * up * sig, g * gate * sig), -1),
        "truncated": truncated,
    }
    for name, got in broken.items():
        with pytest.raises(AssertionError):
            assert_close_to_reference(got.to(torch.bfloat16), ref64, eager, magnitude=magnitude)
            pytest.fail(f"a backward whose output is {name} passed the checks")


def test_swiglu_gradcheck_of_the_reference_backward(gen):
    gate_up = randn(gen, 3, 10, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: qwen_kernels.swiglu(t, "torch"), (gate_up,))


@pytest.mark.parametrize(("backend", "device"), targets("swiglu_backward", with_reference=True))
def test_swiglu_opcheck_with_autograd(gen, backend, device):
    gate_up = randn(gen, 5, 2 * 24).to(device)
    torch.library.opcheck(torch.ops.qwen.swiglu.default, (gate_up.requires_grad_(), backend))
    grad = randn(gen, 5, 24).to(device)
    torch.library.opcheck(torch.ops.qwen.swiglu_backward.default, (grad, gate_up.detach(), backend))


def fused_gradients(backend, device, args, grad):
    """Gradients of every tensor argument of rms_norm_swiglu: ours, fp64 autograd of the eager
    reference, eager in the inputs' dtype."""
    wrt = tuple(i for i, t in enumerate(args) if t is not None)

    def run(fn, args, grad):
        return autograd_grads(lambda *a: fn(*a, EPS), args, grad, wrt)

    on = tuple(t.to(device) if t is not None else None for t in args)
    ours = run(lambda *a: qwen_kernels.rms_norm_swiglu(*a, backend), on, grad.to(device))
    wide = tuple(t.double() if t is not None else None for t in args)
    ref64 = run(rms_norm_swiglu_reference, wide, grad.double())
    eager = run(rms_norm_swiglu_reference, args, grad)
    return [t.cpu() for t in ours], ref64, eager


@pytest.mark.parametrize(("backend", "device"), targets("rms_norm_swiglu", with_reference=True))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_norm_weight", [True, False])
def test_rms_norm_swiglu_gradients_match_fp64_autograd(
    gen, backend, device, dtype, with_norm_weight
):
    """Every input's gradient. In fp32 each is held to the rule (the sums' orders differ only
    in fp32); in fp16/bf16 the backward's GEMMs are the same aten calls as eager autograd's, fed
    inputs a rounding apart, so the whole gradient is held to eager's relative error (its
    pieces, rms_norm_backward and swiglu_backward, are held to the rule above)."""
    rows, hidden, intermediate = 37, 200, 130
    x = randn(gen, 1, rows, hidden, dtype=dtype, scale=3.0)
    norm_weight = randn(gen, hidden, dtype=dtype) if with_norm_weight else None
    weight = randn(gen, 2 * intermediate, hidden, dtype=dtype, scale=hidden**-0.5)
    bias = randn(gen, 2 * intermediate, dtype=dtype)
    grad = randn(gen, 1, rows, intermediate, dtype=dtype)
    got, ref64, eager = fused_gradients(backend, device, (x, norm_weight, weight, bias), grad)
    for ours, want, same in zip(got, ref64, eager, strict=True):
        assert ours.dtype == dtype and ours.shape == want.shape
        if dtype == torch.float32:
            # fp32 roundings of sums over every row, channel and projection row: a bound
            # relative to the whole gradient's size.
            size = want.abs().amax().expand_as(want)
            terms = rows + hidden + 2 * intermediate
            assert_close_to_reference(
                ours, want, same, magnitude=size, accumulation=Accumulation(terms, size)
            )
        else:
            assert rel_err(ours, want) <= 1.25 * rel_err(same, want)
