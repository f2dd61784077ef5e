"""Every benchmark file, and the choice of what to run by op or file name."""

from __future__ import annotations

from collections.abc import Sequence

from . import (
    bench_encoder,
    bench_encoder_training,
    bench_mrope,
    bench_norm_swiglu,
    bench_patch_merge,
    bench_vllm,
    bench_window_attn,
)
from .harness import Suite

# Ops with our kernels first: a run cut short by its time limit keeps the rows that matter most.
SUITES: tuple[Suite, ...] = (
    bench_norm_swiglu.SUITE,
    bench_patch_merge.SUITE,
    bench_mrope.SUITE,
    bench_window_attn.SUITE,
    bench_encoder.SUITE,  # the whole tower: our ops inside a model
    bench_encoder_training.SUITE,  # the tower's forward and backward
    bench_vllm.SUITE,  # vLLM's tower with and without the plug-in, where vllm is installed
)
# Ops with no cases of their own: they run the kernels of the op they are a form of.
NOT_BENCHED = {
    "mrope_": "the in-place form of mrope: same kernels, same bytes",
    "mrope_pos_": "the in-place form of mrope_pos: same kernels, same bytes",
}


def benched_ops() -> list[str]:
    """Every op some suite has cases for."""
    return [op for suite in SUITES for op in suite.ops]


def select(names: Sequence[str] | None) -> list[tuple[Suite, tuple[str, ...]]]:
    """The suites to run and, for each, the ops chosen; ``names`` are ops or suite names
    (None or empty: everything)."""
    if not names:
        return [(suite, suite.ops) for suite in SUITES]
    known = {suite.name for suite in SUITES} | set(benched_ops())
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(
            f"unknown op or benchmark {', '.join(unknown)}; choose from {', '.join(sorted(known))}"
        )
    chosen = []
    for suite in SUITES:
        ops = tuple(op for op in suite.ops if suite.name in names or op in names)
        if ops:
            chosen.append((suite, ops))
    return chosen
