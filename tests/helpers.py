"""Shared helpers for the op tests: random inputs, error metrics and the backends to run."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import qwen_kernels
from bench.harness import rel_err

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def randn(
    gen: torch.Generator, *shape: int, dtype=torch.float32, scale: float = 1.0
) -> torch.Tensor:
    """Seeded normal values (never zeros or ones), cast to ``dtype``."""
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def max_abs_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference in fp64 (inf on any non-finite output)."""
    out64 = out.detach().double()
    if not torch.isfinite(out64).all():
        return float("inf")
    return float((out64 - ref.detach().double()).abs().max()) if out.numel() else 0.0


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` numbers at each of ``values`` (fp64): the unit for slack that is
    as strict for large values as for small ones, in every dtype."""
    info = torch.finfo(dtype)
    magnitude = values.detach().double().abs().clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(magnitude))) * info.eps


def assert_close_to_reference(
    out: torch.Tensor,
    ref64: torch.Tensor,
    same_dtype_eager: torch.Tensor,
    factor: float = 1.25,
    ulps: float | None = None,
    magnitude: torch.Tensor | None = None,
    accumulation: Accumulation | None = None,
) -> None:
    """The project's numerics rule: ``out`` is as close to the fp64 reference as plain PyTorch in
    the same dtype (``same_dtype_eager``) is, up to rounding noise.

    - same shape and dtype as the eager result, no NaN or inf where the reference is finite;
    - every element within eager's error at that element plus ``ulps`` ulps of its value (a
      rounding that went the other way because the summation order differs; default 1 ulp for
      16-bit outputs, 4 for fp32, whose own arithmetic in a kernel costs a few ulps);
      ``magnitude`` (broadcast to out) replaces the value as the measure of an ulp where a
      reduction cancels (a GEMM's outputs near zero carry the error of their largest terms);
    - the relative error ``||out - ref|| / ||ref||`` at most ``factor`` x eager's (plus ``ulps``
      eps for fp32 outputs, where eager can be almost exact);
    - ``accumulation``, for ops that reduce (GEMMs, dot products), adds what the math allows two
      correct fp32 implementations that sum in different orders to differ by: its worst case to
      every element, its typical size to the relative error (``Accumulation``). Without it the
      rule would measure the summation orders of this machine's BLAS and of the kernel;
    - no bias in 16-bit outputs: on 1024+ elements the mean error toward zero, in ulps of each
      value (of those not far below ``magnitude``), is within 0.1 ulp of eager's (truncating
      instead of rounding to nearest drifts toward zero by half an ulp, a slightly wrong scale
      drifts one way).

    So a 1% scaled output, a truncating rounding or a dropped term fails in every dtype, where a
    slack of a few eps relative (3% in bf16) would let them through.
    """
    assert out.shape == ref64.shape, (out.shape, ref64.shape)
    assert out.dtype == same_dtype_eager.dtype, (out.dtype, same_dtype_eager.dtype)
    if not out.numel():
        return
    low_precision = out.dtype in (torch.float16, torch.bfloat16)
    ulps = (1.0 if low_precision else 4.0) if ulps is None else ulps
    ref, got = ref64.detach().double(), out.detach().double()
    eager = same_dtype_eager.detach().double()
    assert torch.isfinite(got).all() or not torch.isfinite(ref).all(), "non-finite output"
    unit = ulp(ref if magnitude is None else magnitude.expand_as(ref), out.dtype)
    got_err, eager_err = (got - ref).abs(), (eager - ref).abs()
    order_slack = accumulation.worst().expand_as(ref) if accumulation is not None else 0.0
    excess = (got_err - eager_err - order_slack) / unit
    worst = int(torch.argmax(excess))
    assert excess.flatten()[worst] <= ulps, (
        f"element {worst}: |out - ref| = {float(got_err.flatten()[worst]):.3g} exceeds eager's "
        f"{float(eager_err.flatten()[worst]):.3g} (+ the summation-order slack) by "
        f"{float(excess.flatten()[worst]):.3g} ulp "
        f"of {float(ref.flatten()[worst]):.4g} (allowed {ulps})"
    )
    got_rel, eager_rel = rel_err(out, ref), rel_err(same_dtype_eager, ref)
    rel_slack = 0.0 if low_precision else ulps * torch.finfo(out.dtype).eps
    if accumulation is not None:
        rel_slack += accumulation.typical_rel(ref)
    assert got_rel <= factor * eager_rel + rel_slack, (got_rel, eager_rel)
    if out.numel() >= 1024 and low_precision:
        # In ulps of each value, where a biased rounding shows; over the values whose ulp is at
        # least 1/16 of the ulp of ``magnitude``, so that a reduction's cancellation error near
        # zero does not drown it.
        own_unit = ulp(ref, out.dtype)
        counted = own_unit >= unit / 16
        toward_zero = -torch.sign(ref) / own_unit
        drift = float(
            ((got - ref) * toward_zero)[counted].mean()
            - ((eager - ref) * toward_zero)[counted].mean()
        )
        assert abs(drift) <= 0.1, (
            f"biased toward zero by {drift:.3g} ulp more than eager: truncation instead of "
            "rounding to nearest, or a scale that is slightly off?"
        )


@dataclass(frozen=True)
class Accumulation:
    """The fp32 arithmetic behind each output element of an op that reduces: at most ``terms``
    roundings (a K-term dot product has K), each relative to a partial result no larger than
    ``magnitude`` (per element, broadcast to the output; for a dot product ``sum |a_i * b_i|``,
    propagated through what follows the sum).

    Wilkinson's bound holds for any summation order: ``|fl(s) - s| <= gamma_n * magnitude`` with
    ``gamma_n = n u / (1 - n u)`` and u the unit roundoff. Two implementations (the kernel and
    eager) can each be that far from the exact value, hence the factor 2 in ``worst``. Over many
    elements the roundings behave like independent steps of a random walk (Higham and Mary, SIAM
    J. Sci. Comput. 2019): the error norm grows as ``sqrt(n) u``, which ``typical_rel`` gives,
    with a factor 2 of margin, for the relative error of the whole output.
    """

    terms: int
    magnitude: torch.Tensor
    dtype: torch.dtype = torch.float32

    def _unit_roundoff(self) -> float:
        return torch.finfo(self.dtype).eps / 2

    def worst(self) -> torch.Tensor:
        """Per element: how far two correct implementations may differ before the output's own
        rounding (fp64)."""
        nu = self.terms * self._unit_roundoff()
        return 2 * (nu / (1 - nu)) * self.magnitude.detach().double()

    def typical_rel(self, ref: torch.Tensor) -> float:
        """The same for ``||out - ref|| / ||ref||``, at its random-walk size."""
        size = 2 * 2 * math.sqrt(self.terms) * self._unit_roundoff()
        spread = self.magnitude.detach().double().expand_as(ref).norm()
        return float(size * spread / ref.detach().double().norm().clamp_min(1e-30))


EX2_APPROX_ROUNDINGS = 4


def attention_accumulation(q, k, v, cu_seqlens, softmax_scale=None, extra_terms: int = 0):
    """``Accumulation`` of non-causal attention inside segments, from the math of the softmax.

    A score ``s_j = scale * q . k_j`` (D products and a few scalings) is off by at most
    ``gamma * scale * |q| |k_j|`` (Cauchy-Schwarz bounds ``sum |q_i k_ji|``); the softmax turns
    an error in every score into a relative error of each weight of at most twice the largest
    one, and the weighted sum over the L keys adds its own L roundings, all relative to
    ``sum_j p_j |v_j|``. ``extra_terms`` counts roundings before the scores (a rotary of q and k:
    rotations keep the norms, their roundings add to the count).
    """
    qf, kf, vf = (t.detach().double() for t in (q, k, v))
    tokens, _, head_dim = qf.shape
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    segment = torch.searchsorted(cu_seqlens[1:].long(), torch.arange(tokens), right=True)
    k_norm = kf.norm(dim=-1)  # [T, H]
    longest_key = torch.zeros(cu_seqlens.numel() - 1, k_norm.shape[1], dtype=torch.float64)
    longest_key.scatter_reduce_(0, segment[:, None].expand_as(k_norm), k_norm, "amax")
    score_spread = scale * qf.norm(dim=-1) * longest_key[segment]  # [T, H]
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    longest = int(lengths.max()) if lengths.numel() else 1
    weighted_abs_v = qwen_kernels.window_attn(qf, kf, vf.abs(), cu_seqlens, longest, scale, "torch")
    # exp2 of the long path's CUDA kernel is one ex2.approx (within 2 ulp: up to 4 roundings of
    # each weight, csrc/common/ptx.h) where a correctly rounded exp2 makes one.
    terms = max(head_dim + 8 + extra_terms, longest + longest // 16 + 8) + EX2_APPROX_ROUNDINGS
    return Accumulation(terms, (2 * score_spread[..., None] + 1) * weighted_abs_v)


def backends_for(op: str, device: str = "cpu") -> list[str]:
    """Every backend that has a kernel for ``op`` and runs on ``device`` here."""
    return qwen_kernels._backends.REGISTRY[op].usable(device)


# The device types each backend runs on by design (CPU tensors: Triton through its interpreter,
# CUDA kernels through the emulation).
_BACKEND_DEVICES = {
    "torch": ("cpu", "cuda"),
    "triton": ("cpu", "cuda"),
    "cuda": ("cuda",),
    "cuda_emu": ("cpu",),
}


def targets(op: str, with_reference: bool = False) -> list:
    """pytest params ``(backend, device)`` for every kernel backend of ``op`` on CPU tensors and,
    when a GPU is visible, on CUDA tensors. A backend that cannot run here is a visible skip with
    the reason, never dropped (CI fails outright when the interpreter or the emulation is
    missing: tests/test_ci.py). ``with_reference`` adds the "torch" reference, for tests that
    hold for every implementation (errors, shapes) rather than comparing with the reference."""
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    table = qwen_kernels._backends.REGISTRY[op]
    params = []
    for device in devices:
        for backend in qwen_kernels._backends.BACKENDS:
            if backend not in table.impls or device not in _BACKEND_DEVICES[backend]:
                continue
            if backend == "torch" and not with_reference:
                continue
            missing = qwen_kernels._backends.runtime_missing(backend, device)
            marks = [pytest.mark.skip(reason=f"{backend} cannot run here: {missing}")] * bool(
                missing
            )
            params.append(pytest.param(backend, device, id=f"{backend}-{device}", marks=marks))
    return params


def tolerance(dtype: torch.dtype) -> float:
    """Relative-error bound for a result rounded to ``dtype`` from an fp32 computation."""
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}[
        dtype
    ]


def autograd_grads(fn, inputs: tuple, grad_outputs, wrt: tuple[int, ...]) -> list[torch.Tensor]:
    """The gradients of ``fn(*inputs)`` for ``grad_outputs`` (a tensor or a tuple, one per
    output) with respect to the inputs at the positions ``wrt``, each made a fresh leaf."""
    leaves = list(inputs)
    for i in wrt:
        leaves[i] = inputs[i].detach().clone().requires_grad_(True)
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    grads = grad_outputs if isinstance(grad_outputs, tuple) else (grad_outputs,)
    torch.autograd.backward(outs, grads)
    return [leaves[i].grad for i in wrt]


@dataclass(frozen=True)
class NormGradientBounds:
    """What the math allows the gradients of RMSNorm (fp64) to differ by between two correct fp32
    implementations, for ``assert_close_to_reference``.

    ``grad_x = rstd (dn - n mean(dn n))`` with ``n = x rstd``, ``dn = grad * weight``: the C-term
    sums of the mean square and of the dot product each round C times, relative to
    ``rstd (|dn| + |n| mean|dn n|)`` (the size of both terms, also the measure of an ulp where
    they cancel). ``grad_weight = sum over rows of grad * n``: as many roundings as rows,
    relative to ``sum |grad n|``.
    """

    x_accumulation: Accumulation
    x_magnitude: torch.Tensor
    weight_accumulation: Accumulation
    weight_magnitude: torch.Tensor

    @classmethod
    def of(cls, grad, x, weight, eps: float) -> NormGradientBounds:
        """Bounds for ``rms_norm(x, weight, eps)`` receiving the output gradient ``grad``."""
        g, xf, w = (t.detach().double() for t in (grad, x, weight))
        channels = xf.shape[-1]
        rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
        normed = xf * rstd
        grad_normed = g * w
        dot = (grad_normed * normed).abs().mean(-1, keepdim=True)
        x_size = rstd * (grad_normed.abs() + 2 * normed.abs() * dot)
        weight_size = (g * normed).abs().reshape(-1, channels).sum(0)
        rows = g.numel() // channels
        return cls(
            Accumulation(channels + 8, x_size),
            x_size,
            Accumulation(rows + 2, weight_size),
            weight_size,
        )
