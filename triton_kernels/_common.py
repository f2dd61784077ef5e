"""Helpers shared by the Triton kernels: rounding that the interpreter gets right, launch shapes,
and 2-D row views of inputs."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """Round fp32 ``x`` to ``dtype`` to nearest even (the interpreter truncates a plain ``.to``)."""
    if dtype == tl.float32:
        return x
    else:
        return x.to(dtype, fp_downcast_rounding="rtne")


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` (with at least one element) as ``[rows, cols]`` with unit column stride: a view when
    the strides allow one."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.shape[-1] == 1 else rows.contiguous()


def num_warps_for(elements: int) -> int:
    """Warps for a program that touches ``elements`` values: about 8-16 values per thread."""
    return 4 if elements <= 2048 else 8 if elements <= 8192 else 16
