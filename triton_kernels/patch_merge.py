"""Triton patch merge (``patch_merge``): RMSNorm of each token of a merge unit, the unit's U = s * s
tokens written as one ``[U*C]`` row, units gathered in ``unit_index`` order.

Output row i, viewed as U rows of C, is tokens ``U*u .. U*u + U-1`` of x (u = ``unit_index[i]``)
normalised: the op is a row-gathered RMSNorm whose output is ``[M * U, C]`` contiguous. One program
normalises ``rows`` consecutive token rows of that output held whole in registers (for U = 4, whole
merge units), so each element of x is read once and each output element written once; statistics
are fp32, in the model's cast order (normalise, round to x's dtype, multiply by the weight, round
again).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import Arch, as_rows, launch, launch_arch, num_warps_for, round_to

# Elements one program aims to hold: many short tokens per program, 4 long ones (4 x 1280 -> a
# [4, 2048] tile: one 2x2 unit of the tower) together.
_ELEMENTS_PER_PROGRAM = 8192
_MAX_ROWS = 64


@dataclass(frozen=True)
class PatchMergeConfig:
    """Launch shape of the merge kernel.

    Attributes:
        block_cols: columns of the register tile (the next power of two of C).
        rows: token rows per program (a power of two).
        num_warps: warps per program.
    """

    block_cols: int
    rows: int
    num_warps: int


def patch_merge_config(channels: int, arch: Arch) -> PatchMergeConfig:
    """The launch shape for tokens of ``channels`` features: the whole token in one tile, as many
    token rows per program as keep the tile near ``_ELEMENTS_PER_PROGRAM`` values (at least 4,
    a 2x2 unit; at most 64), 8-16 per thread; the same on every arch."""
    del arch
    block_cols = triton.next_power_of_2(channels)
    rows = max(4, min(_MAX_ROWS, _ELEMENTS_PER_PROGRAM // block_cols))
    return PatchMergeConfig(block_cols, rows, num_warps_for(rows * block_cols))


@triton.jit
def _patch_merge_kernel(
    x_ptr,
    weight_ptr,
    unit_index_ptr,
    out_ptr,
    n_out_units,
    n_units,
    n_cols,
    x_row_stride,
    eps,
    HAS_INDEX: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    ROWS: tl.constexpr,
    UNIT: tl.constexpr,
):
    # Token rows of this program's output: row r is token r % UNIT of output unit r // UNIT.
    out_rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    out_units = out_rows // UNIT
    row_ok = out_units < n_out_units
    if HAS_INDEX:
        units = tl.load(unit_index_ptr + out_units, mask=row_ok, other=0).to(tl.int64)
        # An index out of range (possible only when the caller skipped the op's value checks)
        # reads nothing: its row comes out NaN rather than from out-of-bounds memory.
        index_ok = (units >= 0) & (units < n_units)
    else:
        units = out_units.to(tl.int64)
        index_ok = row_ok
    cols = tl.arange(0, BLOCK_COLS)
    col_mask = cols < n_cols
    src_rows = units * UNIT + (out_rows % UNIT)
    load_mask = (row_ok & index_ok)[:, None] & col_mask[None, :]
    dtype: tl.constexpr = out_ptr.dtype.element_ty

    x = tl.load(x_ptr + src_rows[:, None] * x_row_stride + cols[None, :], mask=load_mask, other=0.0)
    x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    rstd = tl.where(index_ok, rstd, float("nan"))
    normed = round_to(x * rstd[:, None], dtype).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    out_offsets = out_rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    store_mask = row_ok[:, None] & col_mask[None, :]
    tl.store(out_ptr + out_offsets, round_to(normed * weight[None, :], dtype), mask=store_mask)


def patch_merge(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    unit_index: torch.Tensor | None,
    merge_size: int,
) -> torch.Tensor:
    """RMSNorm of x's tokens, merge units of ``merge_size**2`` concatenated and gathered in
    ``unit_index`` order (arguments validated by the op); returns a new contiguous ``[M, U*C]``
    tensor."""
    unit = merge_size * merge_size
    n_units, n_cols = x.shape[0] // unit, x.shape[1]
    n_out_units = n_units if unit_index is None else unit_index.shape[0]
    out = torch.empty((n_out_units, unit * n_cols), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    x_rows = as_rows(x)
    index = unit_index.contiguous() if unit_index is not None else x_rows
    config = patch_merge_config(n_cols, launch_arch(x.device))
    grid = (triton.cdiv(n_out_units * unit, config.rows),)
    launch(
        _patch_merge_kernel,
        grid,
        x_rows,
        weight.contiguous(),
        index,
        out,
        n_out_units,
        n_units,
        n_cols,
        x_rows.stride(0),
        eps,
        HAS_INDEX=unit_index is not None,
        BLOCK_COLS=config.block_cols,
        ROWS=config.rows,
        UNIT=unit,
        num_warps=config.num_warps,
    )
    return out
