"""Helpers shared by the Triton kernels: the arch a launch is configured for, rounding that the
interpreter gets right, launch shapes, and 2-D row views of inputs.

Every launcher takes its launch configuration from a config object made by a pure heuristic of
the problem and the arch (``Arch``: a GPU's compute capability, or None for the interpreter),
which tests and ``qwen-kernels inspect`` call with any arch; ``launch_arch`` gives the arch of a
launch from its tensors' device.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from qwen_kernels._backends import TRITON_INTERPRETING

# A GPU's compute capability, e.g. (9, 0); None: the Triton interpreter.
Arch = tuple[int, int] | None

# The interpreter's fp32 -> bf16 cast truncates (even with fp_downcast_rounding="rtne"), so kernels
# round on the fp32 bits there; compiled kernels keep the native conversion.
INTERPRETING = tl.constexpr(TRITON_INTERPRETING)


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """Round fp32 ``x`` to ``dtype`` to nearest even, on the GPU and under the interpreter."""
    if dtype == tl.float32:
        return x
    elif INTERPRETING and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        # Add half an ulp of bf16 (minus one when the kept lsb is even: ties go to even) and keep
        # the high 16 bits, which are the bf16 value (subnormals included). NaN keeps its sign and
        # becomes a quiet NaN.
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        rounded = tl.where(x == x, rounded, (bits >> 16) | 0x40)
        return rounded.to(tl.uint16).to(dtype, bitcast=True)
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


@functools.cache
def interpreter_loops_over_runtime_bounds() -> bool:
    """Whether this Triton's interpreter runs ``range`` over a runtime value (triton 3.6's takes
    only constexpr trip counts); where it does not, kernels loop over a constexpr count."""
    bound = torch.tensor([3], dtype=torch.int32)
    out = torch.zeros(2, dtype=torch.int32)
    try:
        _count_kernel[(1,)](bound, out, 4)
    except Exception:  # the interpreter's own error type differs between versions
        return False
    return out.tolist() == [3, 4]


def needs_constexpr_trip_counts(arch: Arch) -> bool:
    """True when kernels must loop over constexpr trip counts: under an interpreter (``arch``
    None) that cannot loop over a runtime bound (a capability of the installed Triton, probed
    once; not a second answer to whether we interpret)."""
    return arch is None and not interpreter_loops_over_runtime_bounds()


@triton.jit
def _count_kernel(bound_ptr, out_ptr, argument_bound):
    """Counts to a loaded bound and to an argument bound (the interpreter wraps them apart)."""
    loaded = tl.load(bound_ptr)
    count = loaded * 0
    for _ in range(0, loaded):
        count += 1
    tl.store(out_ptr, count)
    count = loaded * 0
    for _ in range(0, argument_bound):
        count += 1
    tl.store(out_ptr + 1, count)


_OFFLINE_TARGET: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "offline_target", default=None
)


@contextlib.contextmanager
def offline_target(capability: tuple[int, int]) -> Iterator[None]:
    """Inside the block, launchers choose their configurations for a GPU of ``capability``
    (e.g. (9, 0)) whatever the device of their inputs: what ``qwen-kernels inspect`` compiles
    without a GPU is then what that GPU would run."""
    token = _OFFLINE_TARGET.set(capability)
    try:
        yield
    finally:
        _OFFLINE_TARGET.reset(token)


def launch_arch(device: torch.device) -> Arch:
    """The arch a launch on ``device`` is configured for: the offline target inside
    ``offline_target``, the device's compute capability for CUDA tensors, None for CPU tensors
    (the interpreter)."""
    target = _OFFLINE_TARGET.get()
    if target is not None:
        return target
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)
    return None


@dataclass(frozen=True)
class Launch:
    """One kernel launch as a launcher makes it: the kernel, the grid, the arguments (by position
    and by name, runtime values and constexprs alike) and Triton's launch options
    (``num_warps``, ``num_stages``, ``enable_fp_fusion``)."""

    kernel: Any  # triton.runtime.jit.JITFunction
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict[str, Any]
    options: dict[str, Any]


LAUNCH_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")
_RECORDING: contextvars.ContextVar[list[Launch] | None] = contextvars.ContextVar(
    "recorded_launches", default=None
)


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)``: every launcher launches through here, so that inside
    ``recorded_launches`` the launches are recorded instead of run."""
    recording = _RECORDING.get()
    if recording is None:
        kernel[grid](*args, **kwargs)
        return
    options = {name: kwargs.pop(name) for name in LAUNCH_OPTIONS if name in kwargs}
    recording.append(Launch(kernel, grid, args, kwargs, options))


@contextlib.contextmanager
def recorded_launches() -> Iterator[list[Launch]]:
    """Inside the block, launchers record their launches in the list yielded and run nothing:
    what ``qwen-kernels inspect`` compiles offline, with exactly the arguments and options the
    launcher chose."""
    launches: list[Launch] = []
    token = _RECORDING.set(launches)
    try:
        yield launches
    finally:
        _RECORDING.reset(token)


def vector_alignment(itemsize: int, *offsets: int) -> int:
    """The largest element count, at most 16 bytes' worth, that divides every offset (row
    strides, column splits). A kernel that takes its sizes in units of it (a constexpr factor:
    ``n_vectors * ALIGN``) lets the compiler prove the alignment and use 16-byte (or 8-byte)
    accesses where the JIT's divisible-by-16 specialisation cannot see it, e.g. a bf16 row of
    3420 elements starts on an 8-byte boundary. (``tl.multiple_of`` on a scalar argument does
    not reach the vectoriser.)"""
    align = 16 // itemsize
    while align > 1 and any(offset % align for offset in offsets):
        align //= 2
    return align


# Position axes the Triton rotaries take (vision 2, text 3): three band boundaries as constexprs.
MAX_ROTARY_AXES = 4


def band_bounds(op: str, mrope_section: Sequence[int] | None, half: int) -> list[int]:
    """The first frequency of position axes 1, 2 and 3 (``half`` where there is no such axis):
    the band boundaries a Triton rotary receives as constexprs. None means one axis.

    Raises:
        ValueError: more than ``MAX_ROTARY_AXES`` axes.
    """
    sections = list(mrope_section or [half])
    if len(sections) > MAX_ROTARY_AXES:
        raise ValueError(
            f"qwen.{op}: `mrope_section` must have at most {MAX_ROTARY_AXES} parts on the "
            f"triton backend, got {sections}"
        )
    bounds = list(itertools.accumulate(sections[:-1]))
    return bounds + [half] * (MAX_ROTARY_AXES - 1 - len(bounds))
