"""Triton SwiGLU on a packed ``[..., 2I]`` gate/up tensor: ``silu(gate) * up`` in fp32, and its
backward (both halves of the gradient from one read of gate, up and the output gradient)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import Arch, as_rows, launch, launch_arch, round_to, vector_alignment


@dataclass(frozen=True)
class SwigluConfig:
    """Launch shape: output columns per program and warps per program."""

    block: int
    num_warps: int


def swiglu_config(n_cols: int, arch: Arch) -> SwigluConfig:
    """1024 columns (8 per thread with 4 warps) per program, whatever the row length and arch
    (both taken for uniformity: a heuristic of the problem and the arch)."""
    del n_cols, arch
    return SwigluConfig(1024, 4)


@triton.jit
def _swiglu_kernel(
    gate_up_ptr, out_ptr, n_vectors, row_vectors, BLOCK: tl.constexpr, ALIGN: tl.constexpr
):
    # Sizes arrive in whole ALIGN-element vectors: products with the constexpr ALIGN let the
    # compiler prove the alignment of every row and emit vector accesses.
    n_cols = n_vectors * ALIGN
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate_ptrs = gate_up_ptr + row * (row_vectors * ALIGN) + cols
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + n_cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    out_ptrs = out_ptr + row * n_cols + cols
    tl.store(out_ptrs, round_to(out, out_ptr.dtype.element_ty), mask=mask)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` with ``[gate | up] = gate_up`` (validated by the op)."""
    n_cols = gate_up.shape[-1] // 2
    out = torch.empty((*gate_up.shape[:-1], n_cols), dtype=gate_up.dtype, device=gate_up.device)
    if out.numel() == 0:
        return out
    rows = as_rows(gate_up)
    n_rows = rows.shape[0]
    config = swiglu_config(n_cols, launch_arch(gate_up.device))
    grid = (n_rows, triton.cdiv(n_cols, config.block))
    align = vector_alignment(rows.element_size(), n_cols, rows.stride(0))
    launch(
        _swiglu_kernel,
        grid,
        rows,
        out,
        n_cols // align,
        rows.stride(0) // align,
        BLOCK=config.block,
        ALIGN=align,
        num_warps=config.num_warps,
    )
    return out


@triton.jit
def _swiglu_backward_kernel(
    grad_ptr,
    gate_up_ptr,
    grad_gate_up_ptr,
    n_vectors,
    row_vectors,
    grad_row_vectors,
    BLOCK: tl.constexpr,
    ALIGN: tl.constexpr,
):
    n_cols = n_vectors * ALIGN
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate_ptrs = gate_up_ptr + row * (row_vectors * ALIGN) + cols
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + n_cols, mask=mask, other=0.0).to(tl.float32)
    grad = tl.load(grad_ptr + row * (grad_row_vectors * ALIGN) + cols, mask=mask, other=0.0)
    grad = grad.to(tl.float32)
    sig = tl.sigmoid(gate)
    grad_gate = grad * up * sig * (1 + gate * (1 - sig))
    dtype: tl.constexpr = grad_gate_up_ptr.dtype.element_ty
    out_ptrs = grad_gate_up_ptr + row * (2 * n_cols) + cols
    tl.store(out_ptrs, round_to(grad_gate, dtype), mask=mask)
    tl.store(out_ptrs + n_cols, round_to(grad * gate * sig, dtype), mask=mask)


def swiglu_backward(grad: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """``[grad_gate | grad_up]`` of SwiGLU (arguments validated by the op)."""
    out = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
    if out.numel() == 0:
        return out
    rows, grad_rows = as_rows(gate_up), as_rows(grad)
    n_cols = gate_up.shape[-1] // 2
    config = swiglu_config(n_cols, launch_arch(gate_up.device))
    grid = (rows.shape[0], triton.cdiv(n_cols, config.block))
    align = min(
        vector_alignment(rows.element_size(), n_cols, rows.stride(0)),
        vector_alignment(grad_rows.element_size(), n_cols, grad_rows.stride(0)),
    )
    launch(
        _swiglu_backward_kernel,
        grid,
        grad_rows,
        rows,
        out,
        n_cols // align,
        rows.stride(0) // align,
        grad_rows.stride(0) // align,
        BLOCK=config.block,
        ALIGN=align,
        num_warps=config.num_warps,
    )
    return out
