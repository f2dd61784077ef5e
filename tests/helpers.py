"""Shared helpers for the op tests: random inputs, error metrics and the backends to run."""

from __future__ import annotations

import pytest
import torch

import qwen_kernels

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def randn(
    gen: torch.Generator, *shape: int, dtype=torch.float32, scale: float = 1.0
) -> torch.Tensor:
    """Seeded normal values (never zeros or ones), cast to ``dtype``."""
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in fp64; inf when out has NaN/inf where ref is finite."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out64).all():
        return float("inf")
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))


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
    - no bias in 16-bit outputs: on 1024+ elements the mean error toward zero, in ulps of each
      value, is within 0.1 ulp of eager's (truncating instead of rounding to nearest drifts
      toward zero by half an ulp, a slightly wrong scale drifts one way).

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
    excess = (got_err - eager_err) / unit
    worst = int(torch.argmax(excess))
    assert excess.flatten()[worst] <= ulps, (
        f"element {worst}: |out - ref| = {float(got_err.flatten()[worst]):.3g} exceeds eager's "
        f"{float(eager_err.flatten()[worst]):.3g} by {float(excess.flatten()[worst]):.3g} ulp "
        f"of {float(ref.flatten()[worst]):.4g} (allowed {ulps})"
    )
    got_rel, eager_rel = rel_err(out, ref), rel_err(same_dtype_eager, ref)
    rel_slack = 0.0 if low_precision else ulps * torch.finfo(out.dtype).eps
    assert got_rel <= factor * eager_rel + rel_slack, (got_rel, eager_rel)
    if out.numel() >= 1024 and low_precision:
        toward_zero = -torch.sign(ref) / unit
        drift = float(((got - ref) * toward_zero).mean() - ((eager - ref) * toward_zero).mean())
        assert abs(drift) <= 0.1, (
            f"biased toward zero by {drift:.3g} ulp more than eager: truncation instead of "
            "rounding to nearest, or a scale that is slightly off?"
        )


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
