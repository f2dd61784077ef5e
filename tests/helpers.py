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


def assert_close_to_reference(
    out: torch.Tensor, ref64: torch.Tensor, same_dtype_eager: torch.Tensor, factor: float = 2.0
) -> None:
    """The project's numerics rule: within ``factor`` x the error of plain PyTorch in the same
    dtype, by relative error and by max abs error (plus a few ulps of slack for exact eager)."""
    assert out.shape == ref64.shape, (out.shape, ref64.shape)
    ulp = torch.finfo(out.dtype).eps if out.dtype.is_floating_point else 0.0
    scale = float(ref64.abs().max()) if ref64.numel() else 0.0
    slack = 4 * ulp * max(scale, 1.0)
    eager_rel, eager_abs = rel_err(same_dtype_eager, ref64), max_abs_err(same_dtype_eager, ref64)
    got_rel, got_abs = rel_err(out, ref64), max_abs_err(out, ref64)
    assert got_rel <= factor * eager_rel + 4 * ulp, (got_rel, eager_rel)
    assert got_abs <= factor * eager_abs + slack, (got_abs, eager_abs)


def backends_for(op: str, device: str = "cpu") -> list[str]:
    """Every backend that has a kernel for ``op`` and runs on ``device`` here."""
    return qwen_kernels._backends.REGISTRY[op].usable(device)


def targets(op: str, kernels_only: bool = False) -> list:
    """pytest params ``(backend, device)`` for every backend of ``op`` on every device where it
    runs here: CPU tensors always (Triton through the interpreter, CUDA through the emulation),
    CUDA tensors when a GPU is visible. ``kernels_only`` leaves out the "torch" reference."""
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    return [
        pytest.param(backend, device, id=f"{backend}-{device}")
        for device in devices
        for backend in backends_for(op, device)
        if not (kernels_only and backend == "torch")
    ]


def tolerance(dtype: torch.dtype) -> float:
    """Relative-error bound for a result rounded to ``dtype`` from an fp32 computation."""
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}[
        dtype
    ]
