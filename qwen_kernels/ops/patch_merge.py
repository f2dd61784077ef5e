"""The 2x2 patch merge front: ``qwen::patch_merge``.

RMSNorm of each token, the 4 consecutive tokens of each merge unit concatenated, and the merge
units gathered in ``unit_index`` order. Passing the inverse window permutation as ``unit_index``
yields raster order straight out of the merge, with no separate gather pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import INDEX_DTYPES, check_device, check_ndim, fail
from ._define import OpSpec, define
from .rms_norm import check_rms_norm_args, rms_norm_reference

OP = "patch_merge"
UNIT = 4  # tokens per 2x2 merge unit


def patch_merge_reference(
    x: Tensor, weight: Tensor, eps: float, unit_index: Tensor | None
) -> Tensor:
    """Eager RMSNorm, view as merge units, then gather the units."""
    merged = rms_norm_reference(x, weight, eps).reshape(x.shape[0] // UNIT, UNIT * x.shape[1])
    return merged if unit_index is None else merged.index_select(0, unit_index.long())


def _check_args(x: Tensor, weight: Tensor, eps: float, unit_index: Tensor | None) -> None:
    check_rms_norm_args(OP, x, weight, eps)
    check_ndim(OP, "x", x, 2)
    if x.shape[0] % UNIT:
        fail(OP, "x", f"[T, C] with T a multiple of {UNIT} (whole 2x2 merge units)", tuple(x.shape))
    if unit_index is not None:
        if unit_index.dtype not in INDEX_DTYPES:
            fail(OP, "unit_index", "int32 or int64", unit_index.dtype)
        check_ndim(OP, "unit_index", unit_index, 1)
        check_device(OP, "x", x, "unit_index", unit_index)


def _check_values(x: Tensor, unit_index: Tensor | None) -> None:
    if unit_index is None or unit_index.numel() == 0:
        return
    units = x.shape[0] // UNIT
    lo, hi = torch.aminmax(unit_index)
    if bool((lo < 0) | (hi >= units)):
        fail(
            OP,
            "unit_index",
            f"indices of merge units in [0, {units})",
            f"values in [{int(lo)}, {int(hi)}]",
        )


def _out_shape(x: Tensor, unit_index: Tensor | None) -> tuple[int, int]:
    rows = x.shape[0] // UNIT if unit_index is None else unit_index.shape[0]
    return rows, UNIT * x.shape[1]


patch_merge = define(
    OpSpec(
        name=OP,
        schema="(Tensor x, Tensor weight, float eps, Tensor? unit_index=None) -> Tensor",
        doc="""RMSNorm each token, concatenate each 2x2 merge unit, gather units by ``unit_index``.

    Args:
        x: ``[T, C]`` tokens, the 4 tokens of each merge unit consecutive; T a multiple of 4.
        weight: ``[C]`` RMSNorm weight.
        eps: RMSNorm epsilon.
        unit_index: optional int32/int64 ``[M]``, values in ``[0, T/4)``: row i of the output is
            merge unit ``unit_index[i]``. None keeps the input order. The values are checked (one
            host sync) except inside ``skip_value_checks()``, where the kernels write the row of
            an index out of range as NaN rather than read outside x.
        backend: "auto", "torch", "triton", "cuda" or "cuda_emu".

    Returns:
        ``[M, 4C]`` (M = T/4 without unit_index) in x's dtype.
    """,
        reference=patch_merge_reference,
        check=_check_args,
        outputs=lambda x, weight, eps, unit_index: x.new_empty(_out_shape(x, unit_index)),
        kernels={"triton": "qwen_kernels.triton_kernels.patch_merge:patch_merge"},
        native=True,
        check_values=lambda x, weight, eps, unit_index: _check_values(x, unit_index),
    )
)
