"""The 2x2 patch merge front: ``qwen::patch_merge``.

RMSNorm of each token, the 4 consecutive tokens of each merge unit concatenated, and the merge
units gathered in ``unit_index`` order. Passing the inverse window permutation as ``unit_index``
yields raster order straight out of the merge, with no separate gather pass.

The backward scatters the output gradient back to the merge units (summed in fp32 where an index
repeats) and runs ``rms_norm_backward`` on x: nothing is saved but x and the weight.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import INDEX_DTYPES, check_device, check_ndim, fail
from ._define import Autograd, OpSpec, backward_backend, define
from .rms_norm import check_rms_norm_args, rms_norm_reference

OP = "patch_merge"


def patch_merge_reference(
    x: Tensor, weight: Tensor, eps: float, unit_index: Tensor | None, merge_size: int
) -> Tensor:
    """Eager RMSNorm, view as merge units, then gather the units."""
    unit = merge_size * merge_size
    merged = rms_norm_reference(x, weight, eps).reshape(x.shape[0] // unit, unit * x.shape[1])
    return merged if unit_index is None else merged.index_select(0, unit_index.long())


def _check_args(
    x: Tensor, weight: Tensor, eps: float, unit_index: Tensor | None, merge_size: int
) -> None:
    check_rms_norm_args(OP, x, weight, eps)
    check_ndim(OP, "x", x, 2)
    if merge_size < 1:
        fail(OP, "merge_size", "a positive int (the spatial merge size s)", merge_size)
    unit = merge_size * merge_size
    if x.shape[0] % unit:
        expected = (
            f"[T, C] with T a multiple of {unit} (whole {merge_size}x{merge_size} merge units)"
        )
        fail(OP, "x", expected, tuple(x.shape))
    if unit_index is not None:
        if unit_index.dtype not in INDEX_DTYPES:
            fail(OP, "unit_index", "int32 or int64", unit_index.dtype)
        check_ndim(OP, "unit_index", unit_index, 1)
        check_device(OP, "x", x, "unit_index", unit_index)


def _check_values(x: Tensor, unit_index: Tensor | None, merge_size: int) -> None:
    if unit_index is None or unit_index.numel() == 0:
        return
    units = x.shape[0] // (merge_size * merge_size)
    lo, hi = torch.stack(torch.aminmax(unit_index)).tolist()  # one device-to-host copy
    if lo < 0 or hi >= units:
        fail(OP, "unit_index", f"indices of merge units in [0, {units})", f"values in [{lo}, {hi}]")


def _out_shape(x: Tensor, unit_index: Tensor | None, merge_size: int) -> tuple[int, int]:
    unit = merge_size * merge_size
    rows = x.shape[0] // unit if unit_index is None else unit_index.shape[0]
    return rows, unit * x.shape[1]


def _save(ctx, inputs: tuple, output: Tensor) -> None:
    x, weight, ctx.eps, unit_index, ctx.merge_size, _ = inputs
    ctx.save_for_backward(x, weight, unit_index)


def _backward(ctx, grad: Tensor) -> tuple:
    x, weight, unit_index = ctx.saved_tensors
    grad_units = grad
    if unit_index is not None:
        units = x.shape[0] // (ctx.merge_size * ctx.merge_size)
        grad_units = grad.new_zeros((units, grad.shape[1]), dtype=torch.float32)
        grad_units = grad_units.index_add_(0, unit_index.long(), grad.float()).to(grad.dtype)
    backend = backward_backend("rms_norm_backward", ctx.backend)
    grad_x, grad_weight = torch.ops.qwen.rms_norm_backward(
        grad_units.reshape(x.shape), x, weight, ctx.eps, None, backend
    )
    return grad_x, grad_weight if ctx.needs_input_grad[1] else None, None, None, None


patch_merge = define(
    OpSpec(
        name=OP,
        schema="(Tensor x, Tensor weight, float eps, Tensor? unit_index=None, int merge_size=2) "
        "-> Tensor",
        doc="""RMSNorm each token, concatenate each merge unit, gather units by ``unit_index``.

    Args:
        x: ``[T, C]`` tokens, the U = s * s tokens of each merge unit consecutive (s =
            ``merge_size``); T a multiple of U.
        weight: ``[C]`` RMSNorm weight.
        eps: RMSNorm epsilon.
        unit_index: optional int32/int64 ``[M]``, values in ``[0, T/U)``: row i of the output is
            merge unit ``unit_index[i]``. None keeps the input order. The values are checked (one
            host sync) except inside ``skip_value_checks()``, where the kernels write the row of
            an index out of range as NaN rather than read outside x.
        merge_size: s, the spatial merge size (2 in the released models: 2x2 units of 4 tokens;
            1: a plain RMSNorm, gathered by ``unit_index`` when given).
        backend: "auto", "torch", "triton", "cuda" or "cuda_emu".

    Returns:
        ``[M, U*C]`` (M = T/U without unit_index) in x's dtype.
    """,
        reference=patch_merge_reference,
        check=_check_args,
        outputs=lambda x, weight, eps, unit_index, merge_size: x.new_empty(
            _out_shape(x, unit_index, merge_size)
        ),
        kernels={"triton": "qwen_kernels.triton_kernels.patch_merge:patch_merge"},
        native=True,
        check_values=lambda x, weight, eps, unit_index, merge_size: _check_values(
            x, unit_index, merge_size
        ),
        autograd=Autograd(_save, _backward),
    )
)
