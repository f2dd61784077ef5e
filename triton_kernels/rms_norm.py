"""Triton RMSNorm, with an optional fused residual add (``rms_norm``, ``add_rms_norm``), and its
backward (``rms_norm_backward``).

One program normalises ``ROWS`` rows held whole in registers (hidden sizes up to a few thousand),
so each element is read once and written once; statistics are fp32. The backward program walks
``TILES`` such row tiles, recomputing each row's statistics, and adds its rows' share of the
weight gradient into one fp32 partial row; the partial rows are summed after the launch (a
two-stage reduction: no atomics, the same sum on every run).
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


@dataclass(frozen=True)
class RmsNormBackwardConfig:
    """Launch shape of the backward: the forward's tile, and the row tiles each program walks
    (a power of two, so that the grid, and the partial rows of the weight gradient, stay near
    ``_PARTIAL_ROWS``)."""

    tile: RmsNormConfig
    tiles: int


_PARTIAL_ROWS = 1024  # programs (fp32 partial rows of the weight gradient) a launch aims at
_MAX_TILES = 64


def rms_norm_backward_config(n_rows: int, n_cols: int, arch: Arch) -> RmsNormBackwardConfig:
    """The forward's tile; enough tiles per program that at most ``_PARTIAL_ROWS`` programs run
    (up to 64 tiles each)."""
    tile = rms_norm_config(n_cols, arch)
    programs = triton.cdiv(n_rows, tile.rows)
    tiles = min(_MAX_TILES, triton.next_power_of_2(triton.cdiv(programs, _PARTIAL_ROWS)))
    return RmsNormBackwardConfig(tile, tiles)


@triton.jit
def _rms_norm_backward_kernel(
    grad_ptr,
    x_ptr,
    weight_ptr,
    grad_residual_ptr,
    grad_x_ptr,
    partial_ptr,
    n_rows,
    n_cols,
    grad_row_stride,
    x_row_stride,
    grad_residual_row_stride,
    eps,
    HAS_GRAD_RESIDUAL: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    ROWS: tl.constexpr,
    TILES: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_COLS)
    col_mask = cols < n_cols
    dtype: tl.constexpr = grad_x_ptr.dtype.element_ty
    weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    grad_weight = tl.zeros([BLOCK_COLS], dtype=tl.float32)
    for tile in range(TILES):
        rows = (tl.program_id(0) * TILES + tile) * ROWS + tl.arange(0, ROWS)
        mask = (rows < n_rows)[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        # Rows past the end load as zeros: they add nothing to the sums and store nothing.
        x = tl.load(x_ptr + rows64 * x_row_stride + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        grad = tl.load(grad_ptr + rows64 * grad_row_stride + cols[None, :], mask=mask, other=0.0)
        grad = grad.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        normed = x * rstd[:, None]
        grad_normed = grad * weight[None, :]
        mean_dot = tl.sum(grad_normed * normed, axis=1) / n_cols
        grad_x = rstd[:, None] * (grad_normed - normed * mean_dot[:, None])
        if HAS_GRAD_RESIDUAL:
            grad_residual = tl.load(
                grad_residual_ptr + rows64 * grad_residual_row_stride + cols[None, :],
                mask=mask,
                other=0.0,
            )
            grad_x += grad_residual.to(tl.float32)
        tl.store(grad_x_ptr + rows64 * n_cols + cols[None, :], round_to(grad_x, dtype), mask=mask)
        # The forward multiplies the weight by the normalised value rounded to x's dtype.
        grad_weight += tl.sum(grad * round_to(normed, dtype).to(tl.float32), axis=0)
    tl.store(
        partial_ptr + tl.program_id(0).to(tl.int64) * n_cols + cols, grad_weight, mask=col_mask
    )


def rms_norm_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    grad_residual: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_weight)`` of RMSNorm (arguments validated by the op)."""
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return grad_x, torch.zeros_like(weight)
    x_rows, grad_rows = as_rows(x), as_rows(grad)
    residual_rows = as_rows(grad_residual) if grad_residual is not None else grad_rows
    n_rows, n_cols = x_rows.shape
    config = rms_norm_backward_config(n_rows, n_cols, launch_arch(x.device))
    grid = (triton.cdiv(n_rows, config.tile.rows * config.tiles),)
    partial = torch.empty((grid[0], n_cols), dtype=torch.float32, device=x.device)
    launch(
        _rms_norm_backward_kernel,
        grid,
        grad_rows,
        x_rows,
        weight.contiguous(),
        residual_rows,
        grad_x,
        partial,
        n_rows,
        n_cols,
        grad_rows.stride(0),
        x_rows.stride(0),
        residual_rows.stride(0),
        eps,
        HAS_GRAD_RESIDUAL=grad_residual is not None,
        BLOCK_COLS=config.tile.block_cols,
        ROWS=config.tile.rows,
        TILES=config.tiles,
        num_warps=config.tile.num_warps,
    )
    return grad_x, partial.sum(0).to(weight.dtype)


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
