"""Triton RMSNorm + gate/up GEMM + SwiGLU in one kernel (``rms_norm_swiglu``).

The norm's weight is folded into the gate/up weight (``fold_norm_weight``: by the caller, once, when
it passes ``norm_weight=None``; here, per call, otherwise), so the GEMM reads the raw activations:
each program accumulates its rows' sum of squares from the A tiles it loads
anyway and applies the per-row scale ``rsqrt(mean(x^2) + eps)``, the bias and SwiGLU in the
epilogue. The normalised activations and the ``[T, 2I]`` gate/up product never reach memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qwen_kernels.ops.rms_norm_swiglu import fold_norm_weight

from ._common import Arch, as_rows, launch, launch_arch, round_to


@dataclass(frozen=True)
class GemmConfig:
    """Launch shape of the fused GEMM: the output tile (rows x columns of each of gate and up),
    the K step, warps and pipeline stages, and whether products run in fp32 (the interpreter
    computes bf16 products wrongly)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    upcast: bool


def gemm_config(n_in: int, arch: Arch) -> GemmConfig:
    """64x64 output tiles over K steps of 32 with 4 warps and 3 stages: two accumulators (gate
    and up) of 64x64 fp32 fit the registers of 4 warps; the same on every GPU (not yet tuned on
    one: "auto" does not run this kernel until it is measured)."""
    del n_in
    return GemmConfig(64, 64, 32, 4, 3, upcast=arch is None)


@triton.jit
def _rms_norm_swiglu_kernel(
    x_ptr,
    weight_ptr,
    up_weight_ptr,
    bias_ptr,
    out_ptr,
    n_rows,
    n_out,
    n_in,
    x_row_stride,
    eps,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    K_TILES: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_mask, col_mask = rows < n_rows, cols < n_out
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * x_row_stride + ks[None, :]
    # Weight tiles are [BLOCK_K, BLOCK_N] views of the row-major [2I, C] weight: gate rows `cols`
    # from weight_ptr, up rows `cols` from up_weight_ptr (row I of the same weight).
    gate_ptrs = weight_ptr + cols.to(tl.int64)[None, :] * n_in + ks[:, None]
    up_ptrs = up_weight_ptr + cols.to(tl.int64)[None, :] * n_in + ks[:, None]

    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    square_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # A constexpr trip count (the hidden size is fixed per model): older Triton interpreters
    # cannot loop over a runtime bound.
    for tile in range(K_TILES):
        k = tile * BLOCK_K
        k_mask = (k + ks) < n_in
        a = tl.load(x_ptrs + k, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & col_mask[None, :]
        w_gate = tl.load(gate_ptrs + k, mask=w_mask, other=0.0)
        w_up = tl.load(up_ptrs + k, mask=w_mask, other=0.0)
        a32 = a.to(tl.float32)
        square_sum += tl.sum(a32 * a32, axis=1)
        if UPCAST:  # the interpreter computes bf16 products wrongly: multiply in fp32 there
            a, w_gate, w_up = a32, w_gate.to(tl.float32), w_up.to(tl.float32)
        if IEEE_FP32:
            gate = tl.dot(a, w_gate, gate, input_precision="ieee")
            up = tl.dot(a, w_up, up, input_precision="ieee")
        else:
            gate = tl.dot(a, w_gate, gate)
            up = tl.dot(a, w_up, up)

    scale = tl.rsqrt(square_sum / n_in + eps)[:, None]
    gate = gate * scale
    up = up * scale
    if HAS_BIAS:
        gate += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        up += tl.load(bias_ptr + n_out + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out = gate * tl.sigmoid(gate) * up
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * n_out + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    tl.store(out_ptrs, round_to(out, out_ptr.dtype.element_ty), mask=mask)


def rms_norm_swiglu(
    x: torch.Tensor,
    norm_weight: torch.Tensor | None,
    gate_up_weight: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """``silu(g) * u`` with ``[g | u] = rms_norm(x) @ gate_up_weight.T + gate_up_bias`` (validated
    by the op); ``norm_weight=None``: ``gate_up_weight`` is folded already."""
    n_out = gate_up_weight.shape[0] // 2
    out = torch.empty((*x.shape[:-1], n_out), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    if norm_weight is None:
        folded = gate_up_weight.contiguous()
    else:
        folded = fold_norm_weight(norm_weight, gate_up_weight)
    rows = as_rows(x)
    n_rows, n_in = rows.shape
    config = gemm_config(n_in, launch_arch(x.device))
    bias = gate_up_bias.contiguous() if gate_up_bias is not None else None
    grid = (triton.cdiv(n_rows, config.block_m), triton.cdiv(n_out, config.block_n))
    launch(
        _rms_norm_swiglu_kernel,
        grid,
        rows,
        folded,
        folded[n_out:],
        bias if bias is not None else folded,
        out,
        n_rows,
        n_out,
        n_in,
        rows.stride(0),
        eps,
        HAS_BIAS=bias is not None,
        UPCAST=config.upcast,
        IEEE_FP32=x.dtype == torch.float32,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        K_TILES=triton.cdiv(n_in, config.block_k),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out
