"""Triton RMSNorm, with an optional fused residual add (``rms_norm``, ``add_rms_norm``).

One program normalises ``ROWS`` rows held whole in registers (hidden sizes up to a few thousand),
so each element is read once and written once; statistics are fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import Arch, as_rows, launch, launch_arch, num_warps_for, round_to

# Elements one program aims to hold: several short rows per program, one long row alone.
_ELEMENTS_PER_PROGRAM = 4096


@dataclass(frozen=True)
class RmsNormConfig:
    """Launch shape of the norm kernel: columns of the register tile (the next power of two of
    the row), rows per program, warps per program."""

    block_cols: int
    rows: int
    num_warps: int


def rms_norm_config(n_cols: int, arch: Arch) -> RmsNormConfig:
    """Whole rows in registers, as many per program as keep the tile near 4096 values (at most
    16), 8-16 values per thread; the same on every arch (``arch`` is taken for uniformity)."""
    del arch
    block_cols = triton.next_power_of_2(n_cols)
    rows = max(1, min(16, _ELEMENTS_PER_PROGRAM // block_cols))
    return RmsNormConfig(block_cols, rows, num_warps_for(block_cols * rows))


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    n_rows,
    n_cols,
    x_row_stride,
    residual_row_stride,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    ROWS: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_COLS)
    col_mask = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    out_offsets = rows64 * n_cols + cols[None, :]
    dtype: tl.constexpr = out_ptr.dtype.element_ty

    x = tl.load(x_ptr + rows64 * x_row_stride + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if HAS_RESIDUAL:
        residual = tl.load(
            residual_ptr + rows64 * residual_row_stride + cols[None, :], mask=mask, other=0.0
        )
        # The model keeps its residual stream in the activation dtype: round the sum first.
        summed = round_to(x + residual.to(tl.float32), dtype)
        tl.store(residual_out_ptr + out_offsets, summed, mask=mask)
        x = summed.to(tl.float32)

    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    normed = round_to(x * rstd[:, None], dtype).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_offsets, round_to(normed * weight[None, :], dtype), mask=mask)


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    residual_out = torch.empty_like(out) if residual is not None else out
    if out.numel() == 0:
        return out, residual_out if residual is not None else None
    x_rows = as_rows(x)
    residual_rows = as_rows(residual) if residual is not None else x_rows
    weight = weight.contiguous()
    n_rows, n_cols = x_rows.shape
    config = rms_norm_config(n_cols, launch_arch(x.device))
    grid = (triton.cdiv(n_rows, config.rows),)
    launch(
        _rms_norm_kernel,
        grid,
        x_rows,
        residual_rows,
        weight,
        out,
        residual_out,
        n_rows,
        n_cols,
        x_rows.stride(0),
        residual_rows.stride(0),
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK_COLS=config.block_cols,
        ROWS=config.rows,
        num_warps=config.num_warps,
    )
    return out, residual_out if residual is not None else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` (validated by the op) into a new contiguous tensor."""
    return _launch(x, None, weight, eps)[0]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``r = x + residual`` rounded to x's dtype, then RMSNorm of r; returns ``(out, r)``."""
    out, residual_out = _launch(x, residual, weight, eps)
    return out, residual_out
