"""The dtype helpers and input validation shared by the ops: every message names the op, the
argument and what was expected. Shape and dtype checks run everywhere (also on fake tensors while
tracing); checks that need the values of a device tensor run only in the real op and can be
skipped where the caller already validated them (``skip_value_checks``)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from collections.abc import Set as AbstractSet

import torch

# The kernels take fp16, bf16 and fp32; the "torch" backend also runs in float64: that is how
# tests build their references. Sets: a membership test on a tuple of dtypes costs several
# rich comparisons (the checks run once per new call signature, see OpBackends.resolve).
REFERENCE_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))
INDEX_DTYPES = frozenset((torch.int32, torch.int64))
# The order dtypes are named in messages.
_DTYPE_ORDER = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.int32,
    torch.int64,
)

_state = threading.local()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the references compute in: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def skip_value_checks() -> Iterator[None]:
    """Skip checks that read device values (and so synchronise with the GPU) inside this block.

    Shape, dtype and device checks still run. Use it where the caller has validated the values
    once, e.g. the encoder validates ``cu_seqlens`` per grid and then runs 32 layers.
    """
    previous = getattr(_state, "skip", False)
    _state.skip = True
    try:
        yield
    finally:
        _state.skip = previous


def value_checks_enabled() -> bool:
    """False inside ``skip_value_checks()``."""
    return not getattr(_state, "skip", False)


def values_readable(t: torch.Tensor) -> bool:
    """Whether a check may read the values of ``t`` now: not while torch.compile traces, and not
    while the current CUDA stream is capturing a graph (a read would synchronise, which capture
    forbids; ``torch.compile(mode="reduce-overhead")`` captures too). Such calls skip their value
    checks, as inside ``skip_value_checks()``."""
    if torch.compiler.is_compiling():
        return False
    return t.device.type != "cuda" or not torch.cuda.is_current_stream_capturing()


def fail(op: str, arg: str, expected: str, got: object) -> None:
    """Raise the ValueError every op uses for a bad argument."""
    raise ValueError(f"qwen.{op}: `{arg}` must be {expected}, got {got}")


def check_float(
    op: str, name: str, t: torch.Tensor, dtypes: AbstractSet[torch.dtype] = REFERENCE_DTYPES
) -> None:
    """``t`` is a tensor of one of ``dtypes`` (a set, e.g. ``REFERENCE_DTYPES``)."""
    if not isinstance(t, torch.Tensor):
        fail(op, name, "a tensor", type(t).__name__)
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in _DTYPE_ORDER if d in dtypes)
        fail(op, name, f"of dtype {names}", t.dtype)


def check_same(
    op: str, ref_name: str, ref: torch.Tensor, name: str, t: torch.Tensor | None
) -> None:
    """``t`` (if not None) lies on ``ref``'s device and has its dtype."""
    if t is None:
        return
    check_device(op, ref_name, ref, name, t)
    if t.dtype != ref.dtype:
        fail(op, name, f"of dtype {ref.dtype} like `{ref_name}`", t.dtype)


def check_device(
    op: str, ref_name: str, ref: torch.Tensor, name: str, t: torch.Tensor | None
) -> None:
    """``t`` (if not None) lies on ``ref``'s device (dtypes may differ)."""
    if t is not None and t.device != ref.device:
        fail(op, name, f"on {ref.device} like `{ref_name}`", t.device)


def check_ndim(op: str, name: str, t: torch.Tensor, ndim: int | tuple[int, ...]) -> None:
    """``t`` has exactly ``ndim`` dimensions, or at least ``ndim[0]`` when given as ``(min,)``."""
    if isinstance(ndim, int):
        if t.dim() != ndim:
            fail(op, name, f"{ndim}-D", f"shape {tuple(t.shape)}")
    elif t.dim() < ndim[0]:
        fail(op, name, f"at least {ndim[0]}-D", f"shape {tuple(t.shape)}")


def check_section(op: str, section: Sequence[int] | None, parts: int | None, total: int) -> None:
    """``section`` lists ``parts`` positive ints summing to ``total``."""
    if section is None:
        fail(op, "mrope_section", "a list of ints", None)
    if section and min(section) <= 0:
        fail(op, "mrope_section", "positive sizes", list(section))
    if parts is not None and len(section) != parts:
        fail(op, "mrope_section", f"{parts} parts (one per position axis)", list(section))
    if sum(section) != total:
        fail(op, "mrope_section", f"sizes summing to head_dim / 2 = {total}", list(section))
