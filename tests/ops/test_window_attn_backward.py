"""window_attn's gradients (window_attn_forward, window_attn_backward) against fp64 autograd of the
eager reference: window and long paths, 1-token and empty segments, segments longer than one key
tile, strided views of a packed qkv, every dtype; the saved log-sum-exp, gradcheck, opcheck,
torch.compile, and broken backward kernels caught."""

import math

import pytest
import torch

import qwen_kernels
from qwen_kernels.ops.window_attn import window_attn_backward_reference, window_attn_reference
from tests.helpers import (
    DTYPES,
    Accumulation,
    autograd_grads,
    max_abs_err,
    randn,
    targets,
)
from tests.ops.test_window_attn import WINDOW_LENGTHS, cu_seqlens_of

LONG_LENGTHS = [150, 1, 0, 70]  # longer than one 64-row tile of the long path, and short ones
# The (query, key) pairs over all heads below which assert_gradients_close checks no bias.
BIAS_MIN_SCORES = 2048
# ``Accumulation.typical_rel``'s factor: twice the random-walk size of fp32 roundings, two sides.
RANDOM_WALK = 2 * 2 * torch.finfo(torch.float32).eps / 2


def attention_grads(backend, device, packed, cu, max_seqlen, grad, scale=None):
    """dqkv of ``packed`` [T, 3, H, D] (q, k, v its views): ours on ``backend``, fp64 autograd of
    the eager reference, and eager autograd in the input dtype."""

    def run(fn, packed, grad):
        def attend(p):
            q, k, v = p.unbind(1)
            return fn(q, k, v)

        return autograd_grads(attend, (packed,), grad, (0,))[0]

    head_dim = packed.shape[-1]
    c = head_dim**-0.5 if scale is None else scale
    ours = run(
        lambda q, k, v: qwen_kernels.window_attn(
            q, k, v, cu.to(device), max_seqlen, scale, backend
        ),
        packed.to(device),
        grad.to(device),
    )
    ref64 = run(
        lambda q, k, v: window_attn_reference(q, k, v, cu, max_seqlen, c),
        packed.double(),
        grad.double(),
    )
    eager = run(lambda q, k, v: window_attn_reference(q, k, v, cu, max_seqlen, c), packed, grad)
    return ours.cpu(), ref64, eager


def operand_sizes(packed, cu, grad, scale=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per gradient element (fp64, ``[T, 3, H, D]`` each): the sizes of the products it adds up
    (``c |dS| |K|`` for dq, ``c |dS|^T |Q|`` for dk, ``P^T |dO|`` for dv), which bound what
    rounding P and dS to the input dtype moves it by (times the unit roundoff); and the same
    with dS's terms in place of dS (``P (|dO| |V|^T + rowsum |dO O|)``: dS = P (dP - D) cancels,
    a 1-token segment's to exactly zero), which bound its fp32 roundings."""
    q, k, v = packed.double().unbind(1)
    g = grad.double()
    c = q.shape[-1] ** -0.5 if scale is None else scale
    sizes = torch.zeros(2, q.shape[0], 3, *q.shape[1:], dtype=torch.float64)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        if end == start:
            continue
        qs, ks, vs, gs = (t[start:end].transpose(0, 1) for t in (q, k, v, g))  # [H, L, D]
        p = torch.softmax(qs @ ks.transpose(1, 2) * c, -1)
        delta = (gs * (p @ vs)).sum(-1, keepdim=True)
        ds = (p * (gs @ vs.transpose(1, 2) - delta)).abs()
        ds_terms = p * (gs.abs() @ vs.abs().transpose(1, 2) + (gs * (p @ vs)).abs().sum(-1, True))
        for which, s in enumerate((ds, ds_terms)):
            sizes[which, start:end, 0] = (c * s @ ks.abs()).transpose(0, 1)
            sizes[which, start:end, 1] = (c * s.transpose(1, 2) @ qs.abs()).transpose(0, 1)
            sizes[which, start:end, 2] = (p.transpose(1, 2) @ gs.abs()).transpose(0, 1)
    return sizes[0], sizes[1]


def error_norm(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm())


def assert_gradients_close(ours, ref64, eager, packed, cu, grad, scale=None) -> None:
    """Each of dq, dk, dv against fp64 autograd, measured against eager autograd in the input
    dtype (fp32 math rounded once):

    - error norm within 1.25x eager's plus what rounding P and dS to the input dtype before
      their products allows (the kernels do, as the forward rounds P, and as FlashAttention
      does; eager does not): the unit roundoff times ``operand_sizes``, plus the fp32 sums'
      random-walk size (over a segment's tokens and D, relative to their terms);
    - max abs error within 2x eager's plus the same roundings plus the fp32 sums' worst case;
    - in fp16/bf16 no bias: the mean signed error along the reference's sign within half of
      eager's mean error (truncation or a slightly wrong scale moves it by more), where the
      segments hold at least ``BIAS_MIN_SCORES`` (query, key) pairs in all heads: each pair's P
      and dS are rounded once, and fewer independent roundings than that leave the mean too
      noisy to tell a bias from chance (segments of 7 and 3 tokens, 116 pairs, move it by 0.54
      with correct rounding, in the Triton and the CUDA kernels alike).
    """
    rounded, terms = operand_sizes(packed, cu, grad, scale)
    unit = torch.finfo(packed.dtype).eps / 2
    count = int((cu[1:] - cu[:-1]).max()) + packed.shape[-1] + 16
    scores = int(((cu[1:] - cu[:-1]).long() ** 2).sum()) * packed.shape[2]
    for i, name in enumerate(("dq", "dk", "dv")):
        got, want, same = ours[:, i], ref64[:, i], eager[:, i]
        assert got.shape == want.shape and got.dtype == packed.dtype, name
        assert torch.isfinite(got).all(), f"{name}: non-finite (an element left unwritten?)"
        fp32 = Accumulation(count, terms[:, i])
        slack = float(unit * rounded[:, i].norm()) + RANDOM_WALK * math.sqrt(count) * float(
            terms[:, i].norm()
        )
        got_norm, eager_norm = error_norm(got, want), error_norm(same, want)
        assert got_norm <= 1.25 * eager_norm + slack, (name, got_norm, eager_norm, slack)
        abs_slack = float((unit * rounded[:, i] + fp32.worst()).max())
        got_abs, eager_abs = max_abs_err(got, want), max_abs_err(same, want)
        assert got_abs <= 2 * eager_abs + abs_slack, (name, got_abs, eager_abs, abs_slack)
        if packed.dtype != torch.float32 and scores >= BIAS_MIN_SCORES:
            err, eager_err = got.double() - want, same.double() - want
            bias = float((err * want.sign()).mean() / eager_err.abs().mean().clamp_min(1e-30))
            assert abs(bias) <= 0.5, f"{name}: biased by {bias:+.2f} mean eager errors"


# The gradient tests run on every backend of the training forward: its log-sum-exp feeds the
# backward (the forward's backend where that has backward kernels, else "auto"'s).
GRADIENT_TARGETS = targets("window_attn_forward", with_reference=True)


@pytest.mark.parametrize(("backend", "device"), GRADIENT_TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("lengths", "max_seqlen"),
    [(WINDOW_LENGTHS, 64), (LONG_LENGTHS, 150), ([1], 1), ([7, 3], 9)],
    ids=["windows", "long", "one token", "loose max_seqlen"],
)
def test_gradients_match_fp64_autograd(gen, backend, device, dtype, lengths, max_seqlen):
    cu = cu_seqlens_of(lengths)
    tokens = int(cu[-1])
    packed = randn(gen, tokens, 3, 2, 80, dtype=dtype)
    grad = randn(gen, tokens, 2, 80, dtype=dtype)
    ours, ref64, eager = attention_grads(backend, device, packed, cu, max_seqlen, grad)
    assert ours.dtype == dtype
    assert_gradients_close(ours, ref64, eager, packed, cu, grad)


@pytest.mark.parametrize(("backend", "device"), GRADIENT_TARGETS)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_other_head_dims_and_scales(gen, backend, device, head_dim):
    cu = cu_seqlens_of([33, 64, 5])
    packed = randn(gen, 102, 3, 3, head_dim, dtype=torch.bfloat16)
    grad = randn(gen, 102, 3, head_dim, dtype=torch.bfloat16)
    ours, ref64, eager = attention_grads(backend, device, packed, cu, 64, grad, scale=0.3)
    assert_gradients_close(ours, ref64, eager, packed, cu, grad, scale=0.3)


@pytest.mark.parametrize(("backend", "device"), GRADIENT_TARGETS)
def test_gradient_of_a_transposed_output_gradient(gen, backend, device):
    """The output gradient as autograd may hand it over: not contiguous."""
    cu = cu_seqlens_of([40, 24])
    packed = randn(gen, 64, 3, 2, 80, dtype=torch.bfloat16)
    grad = randn(gen, 2, 64, 80, dtype=torch.bfloat16).transpose(0, 1)
    ours, ref64, eager = attention_grads(backend, device, packed, cu, 64, grad)
    assert_gradients_close(ours, ref64, eager, packed, cu, grad)


@pytest.mark.parametrize(("backend", "device"), targets("window_attn_backward"))
@pytest.mark.parametrize(
    ("dtype", "grad_dtype"), [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)]
)
@pytest.mark.parametrize(("lengths", "max_seqlen"), [([40, 1, 23], 64), ([70, 9], 70)])
def test_output_gradient_of_another_dtype(
    gen, backend, device, dtype, grad_dtype, lengths, max_seqlen
):
    """An output gradient in another dtype than q's (a loss in fp32 hands one over): gradients in
    q's dtype against fp64 ones of that very gradient. bf16: a relative error norm within 3 unit
    roundoffs (one rounding of the output, one of P and dS, one of dO where the CUDA kernels round
    it to q's dtype for the tensor cores; a 1% error is 5). fp32, whose kernels take the bf16
    gradient exactly: within 64 unit roundoffs (fp32 sums over a segment's keys and the head dim,
    random walks of about sqrt(150) roundings, with margin)."""
    cu = cu_seqlens_of(lengths)
    tokens = int(cu[-1])
    q, k, v = (randn(gen, tokens, 2, 80, dtype=dtype) for _ in range(3))
    grad = randn(gen, tokens, 2, 80, dtype=grad_dtype)
    scale = 80**-0.5
    args = [t.to(device) for t in (q, k, v)]
    out, lse = qwen_kernels.window_attn_forward(*args, cu.to(device), max_seqlen, None, backend)
    ours = qwen_kernels.window_attn_backward(
        grad.to(device), *args, out, lse, cu.to(device), max_seqlen, scale, backend
    )
    wanted = window_attn_backward_reference(
        grad.double(), q.double(), k.double(), v.double(), None, None, cu, max_seqlen, scale
    )
    bound = (3 if dtype == torch.bfloat16 else 64) * torch.finfo(dtype).eps / 2
    for name, got, want in zip(("dq", "dk", "dv"), ours, wanted, strict=True):
        assert got.dtype == dtype, name
        rel = float((got.cpu().double() - want).norm() / want.norm())
        assert rel <= bound, (name, rel, bound)


@pytest.mark.parametrize(("backend", "device"), GRADIENT_TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("lengths", "max_seqlen"), [(LONG_LENGTHS, 150), (WINDOW_LENGTHS, 64)], ids=["long", "windows"]
)
def test_forward_returns_the_output_and_the_log_sum_exp(
    gen, backend, device, dtype, lengths, max_seqlen
):
    """Every row's log-sum-exp (window, long and fp32 kernels), and the same output as
    window_attn's."""
    cu = cu_seqlens_of(lengths)
    tokens = int(cu[-1])
    q, k, v = (randn(gen, tokens, 2, 80, dtype=dtype) for _ in range(3))
    args = [t.to(device) for t in (q, k, v, cu)]
    out, lse = qwen_kernels.window_attn_forward(*args, max_seqlen, None, backend)
    assert torch.equal(out, qwen_kernels.window_attn(*args, max_seqlen, None, backend))
    assert lse.dtype == torch.float32 and lse.shape == (tokens, 2)
    expected = torch.empty(tokens, 2, dtype=torch.float64)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        scores = q[start:end].double().transpose(0, 1) @ k[start:end].double().permute(1, 2, 0)
        expected[start:end] = torch.logsumexp(scores * 80**-0.5, -1).t()
    # A few fp32 roundings of values of a few units (the long path's ex2.approx: 2 ulp more).
    assert torch.allclose(lse.cpu().double(), expected, rtol=0, atol=1e-5)


def test_training_runs_the_training_forward_and_inference_the_kernels(gen):
    """A call that needs a gradient runs window_attn_forward; one under no_grad does not."""
    cu = cu_seqlens_of([5, 3])
    q, k, v = (randn(gen, 8, 1, 16).requires_grad_() for _ in range(3))
    calls = []
    table = qwen_kernels._backends.REGISTRY["window_attn_forward"]
    reference = table.impls["torch"]
    table.register("torch", lambda *a: calls.append(1) or reference(*a))
    try:
        qwen_kernels.window_attn(q, k, v, cu, 5, None, "torch").sum().backward()
        assert calls == [1] and q.grad is not None
        with torch.no_grad():
            qwen_kernels.window_attn(q, k, v, cu, 5, None, "torch")
        assert calls == [1]
    finally:
        table.register("torch", reference)


def test_gradcheck_of_the_reference_backward(gen):
    cu = cu_seqlens_of([3, 1, 2])
    q, k, v = (randn(gen, 6, 2, 4, dtype=torch.float64).requires_grad_() for _ in range(3))
    assert torch.autograd.gradcheck(
        lambda q, k, v: qwen_kernels.window_attn(q, k, v, cu, 3, None, "torch"), (q, k, v)
    )


@pytest.mark.parametrize(
    ("backend", "device"), targets("window_attn_backward", with_reference=True)
)
def test_opcheck_with_autograd(gen, backend, device):
    cu = cu_seqlens_of([5, 11]).to(device)
    # head_dim 64: one the CUDA kernels hold.
    q, k, v = (randn(gen, 16, 2, 64).to(device).requires_grad_() for _ in range(3))
    torch.library.opcheck(
        torch.ops.qwen.window_attn_forward.default, (q, k, v, cu, 11, None, backend)
    )
    out, lse = qwen_kernels.window_attn_forward(q, k, v, cu, 11, None, backend)
    grad = torch.randn_like(out)
    args = (grad, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), cu, 11, 0.25)
    torch.library.opcheck(torch.ops.qwen.window_attn_backward.default, (*args, backend))


def test_compiled_training_step_matches_eager(gen):
    cu = cu_seqlens_of([9, 7])
    packed = randn(gen, 16, 3, 2, 16).requires_grad_()

    def loss(p):
        q, k, v = p.unbind(1)
        return qwen_kernels.window_attn(q, k, v, cu, 9, None, "torch").square().sum()

    (expected,) = torch.autograd.grad(loss(packed), packed)
    (compiled,) = torch.autograd.grad(torch.compile(loss, fullgraph=True)(packed), packed)
    torch.testing.assert_close(compiled, expected)


def test_gradient_checks_reject_broken_kernels(gen):
    """A backward that scales a gradient by 1.01, truncates instead of rounding, leaves out D, or
    skips a segment's last query fails the checks."""
    cu = cu_seqlens_of(WINDOW_LENGTHS)
    tokens = int(cu[-1])
    packed = randn(gen, tokens, 3, 2, 80, dtype=torch.bfloat16)
    grad = randn(gen, tokens, 2, 80, dtype=torch.bfloat16)
    good, ref64, eager = attention_grads("torch", "cpu", packed, cu, 64, grad)
    assert_gradients_close(good, ref64, eager, packed, cu, grad)

    exact = ref64.float()
    truncated = (exact.view(torch.int32) & ~0xFFFF).view(torch.float32)
    last = cu[1:][cu[1:] > cu[:-1]] - 1
    without_last_query = ref64.clone()
    without_last_query[last, 0] = 0  # dq of each segment's last query left out
    q, k, v = packed.double().unbind(1)
    scores_only = ref64.clone()
    # dk and dq without the -D term: dS = P dP (what a kernel that forgot D would compute).
    scores_only[:, :2] = _gradients_without_delta(q, k, v, cu, grad.double())
    broken = {
        "scaled by 1.01": exact * 1.01,
        "truncated": truncated,
        "without the last query's dq": without_last_query.float(),
        "without D": scores_only.float(),
    }
    for name, wrong in broken.items():
        with pytest.raises(AssertionError):
            assert_gradients_close(wrong.to(torch.bfloat16), ref64, eager, packed, cu, grad)
            pytest.fail(f"a backward whose gradients are {name} passed the checks")


def _gradients_without_delta(q, k, v, cu, grad) -> torch.Tensor:
    """fp64 dq and dk ``[T, 2, H, D]`` of a backward that drops D from dS."""
    out = torch.zeros(q.shape[0], 2, *q.shape[1:], dtype=torch.float64)
    c = q.shape[-1] ** -0.5
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        if end == start:
            continue
        qs, ks, vs, gs = (t[start:end].transpose(0, 1) for t in (q, k, v, grad))
        p = torch.softmax(qs @ ks.transpose(1, 2) * c, -1)
        ds = p * (gs @ vs.transpose(1, 2))
        out[start:end, 0] = (ds @ ks * c).transpose(0, 1)
        out[start:end, 1] = (ds.transpose(1, 2) @ qs * c).transpose(0, 1)
    return out


def test_training_with_the_default_arguments(gen):
    """No scale and no backend given: the dispatcher leaves both out of the training call's
    arguments, which the op fills in again."""
    cu = cu_seqlens_of([5, 3])
    q, k, v = (randn(gen, 8, 2, 16).requires_grad_() for _ in range(3))
    qwen_kernels.window_attn(q, k, v, cu, 5).sum().backward()
    expected = autograd_grads(
        lambda q, k, v: qwen_kernels.window_attn(q, k, v, cu, 5, 0.25, "torch").sum(),
        (q, k, v),
        torch.ones(()),
        (0, 1, 2),
    )
    for got, want in zip((q.grad, k.grad, v.grad), expected, strict=True):
        torch.testing.assert_close(got, want)


def test_backward_launch_configs():
    """The pure heuristic, called with archs: the window path up to 64 tokens (fp16/bf16, or any
    dtype under the interpreter), the tiles that spill no registers on the long path."""
    from qwen_kernels.triton_kernels.window_attn_backward import attn_backward_config

    window = attn_backward_config(33, torch.bfloat16, (8, 0))
    assert window.one_pass and (window.block_m, window.block_n, window.num_warps) == (64, 64, 4)
    assert attn_backward_config(16, torch.float32, None).one_pass
    assert not attn_backward_config(16, torch.float32, (9, 0)).one_pass
    for arch, block_n in (((8, 0), 32), ((8, 6), 32), ((9, 0), 64), ((10, 0), 64)):
        long = attn_backward_config(4096, torch.bfloat16, arch)
        assert (long.one_pass, long.block_m, long.block_n, long.num_warps) == (
            False,
            64,
            block_n,
            8,
        )
    fp32 = attn_backward_config(4096, torch.float32, (9, 0))
    assert (fp32.block_m, fp32.block_n) == (32, 32)


def test_auto_trains_head_dims_the_kernels_cannot_hold_on_the_reference(gen):
    """head_dim 272 is past the Triton kernels' 256: "auto" runs the training forward and the
    backward on the reference, an explicit "triton" is refused with what the kernel holds."""
    cu = cu_seqlens_of([3, 2])
    q, k, v = (randn(gen, 5, 1, 272).requires_grad_() for _ in range(3))
    qwen_kernels.window_attn(q, k, v, cu, 3).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    if "triton" in qwen_kernels._backends.REGISTRY["window_attn_backward"].usable("cpu"):
        with pytest.raises(ValueError, match="up to 256"):
            qwen_kernels.window_attn_forward(q, k, v, cu, 3, None, "triton")
