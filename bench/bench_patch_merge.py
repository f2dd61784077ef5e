"""Benchmarks of ``qwen.patch_merge``: the merger's RMSNorm, the 2x2 concatenation and the gather
that returns merge units from window order to raster order.

Cases: tokens ``[T, 1280]`` in window order over a square image of T patches (the token sweep),
and the real grids of a 1288x952 image and a 16-frame 448x448 video; ``unit_index`` is the inverse
of the grid's window permutation, as the encoder passes it. Peers: the eager path as transformers
runs it (its ``Qwen2_5_VLRMSNorm``, the view as merge units, then the gather) and torch.compile of
our eager reference.

Run as a script (``python -m bench.bench_patch_merge``), it also times what the op
suite does not: building the grid layout on the host (a 4k x 4k image, a 64-frame video), and, on
a GPU, the gather at the start of the tower (``index_select`` of the pixel patches into window
order) against a plain copy of the same bytes: the evidence for (or against) a gather kernel.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

from qwen_kernels.ops.patch_merge import patch_merge_reference

from .harness import Case, Impl, Inputs, Maker, Suite, compile_peer, measure, missing_module
from .shapes import FULL, MERGE, Grid, Scale, Visual, short_count, square_grid, window_unit_order

OP = "patch_merge"
ARGS = ("x", "weight", "eps", "unit_index", "merge_size")
EPS = 1e-6
UNIT = MERGE * MERGE
BF16 = 2  # bytes per element
PATCH_DIM = 3 * 2 * 14 * 14  # values per pixel patch (the tower's input rows)
# Inputs whose layout build time the script reports: (name, (t, h, w) in patches).
LAYOUT_GRIDS = (
    ("image-4096x4096", (1, 4096 // 14 // MERGE * MERGE, 4096 // 14 // MERGE * MERGE)),
    ("video-64x448x448", (32, 32, 32)),
)


def cases(scale: Scale) -> list[Case]:
    """The merge over the token sweep and the real grids of ``scale``."""
    hidden = scale.dims.hidden
    sweep = [
        _case(f"T={short_count(tokens)}", "tokens", square_grid(tokens), hidden)
        for tokens in scale.tokens
    ]
    return sweep + [_case(visual.name, "real", visual.grid, hidden) for visual in scale.visuals]


def _case(name: str, series: str, grid: Grid, hidden: int) -> Case:
    tokens = grid[0] * grid[1] * grid[2]
    units = tokens // UNIT
    return Case(
        op=OP,
        name=name,
        series=series,
        x=tokens,
        tokens=tokens,
        shape=f"x [{tokens}, {hidden}] bf16 -> [{units}, {UNIT * hidden}]; "
        f"unit_index [{units}] int64",
        # x read and the merged rows written (bf16), the weight and the int64 index read.
        bytes=2 * tokens * hidden * BF16 + hidden * BF16 + units * 8,
        flops=0,
        args=ARGS,
        build=functools.partial(_build, grid, hidden),
    )


def _build(grid: Grid, hidden: int, make: Maker) -> Inputs:
    raster_of_window = window_unit_order(grid)
    tokens = grid[0] * grid[1] * grid[2]
    return {
        "x": make.randn(tokens, hidden),
        "weight": make.randn(hidden),
        "eps": EPS,
        "unit_index": make.put(torch.argsort(raster_of_window), torch.int64),
        "merge_size": 2,
    }


def peers(op: str) -> list[Impl]:
    """transformers' eager merge front + gather, and torch.compile of our reference."""
    return [
        Impl(
            "transformers",
            _transformers_merge,
            missing=missing_module("transformers", "transformers"),
            prepare=_with_ln_q,
        ),
        compile_peer(patch_merge_reference, ARGS),
    ]


def _with_ln_q(inputs: Inputs) -> Inputs:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm

    weight = inputs["weight"]
    ln_q = Qwen2_5_VLRMSNorm(weight.shape[0], eps=inputs["eps"]).to(weight.device, weight.dtype)
    with torch.no_grad():
        ln_q.weight.copy_(weight)
    return {**inputs, "ln_q": ln_q}


def _transformers_merge(inputs: Inputs) -> torch.Tensor:
    """What transformers' merger does before its MLP (ln_q, the view as merge units), then its
    reverse window index; transformers gathers the MLP's output rows instead, the same bytes per
    row at out_hidden >= 4C."""
    x = inputs["x"]
    with torch.no_grad():
        merged = inputs["ln_q"](x).view(-1, UNIT * x.shape[1])
    return merged[inputs["unit_index"]]


SUITE = Suite("patch_merge", (OP,), cases, peers)


def layout_build_ms(grid: Grid, repeats: int = 3) -> float:
    """Best host time of building the encoder's layout for ``grid`` (uncached), in ms."""
    from qwen_kernels.model import VisionConfig
    from qwen_kernels.model.layout import build_layout

    config = VisionConfig()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        build_layout(config, (grid,), torch.device("cpu"))
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def gather_vs_copy(visual: Visual, device: str = "cuda") -> dict[str, float]:
    """GPU time of the tower's first gather (pixel patches ``[T, 1176]`` in window order through
    ``index_select``) and of a contiguous copy of the same bytes, in ms; the copy is the floor a
    gather kernel could reach."""
    tokens = visual.grid[0] * visual.grid[1] * visual.grid[2]
    order = window_unit_order(visual.grid)
    token_index = (order[:, None] * UNIT + torch.arange(UNIT)).reshape(-1).to(device)
    pixels = torch.randn(tokens, PATCH_DIM, device=device, dtype=torch.bfloat16)
    out = torch.empty_like(pixels)
    gather_ms, _, _ = measure(lambda: torch.index_select(pixels, 0, token_index, out=out))
    copy_ms, _, _ = measure(lambda: out.copy_(pixels))
    return {"index_select_ms": gather_ms, "copy_ms": copy_ms, "bytes": 2 * pixels.nbytes}


def main(argv: list[str] | None = None) -> None:
    """Print the layout build times and, on a GPU, the start gather against a copy."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    for name, grid in LAYOUT_GRIDS:
        tokens = grid[0] * grid[1] * grid[2]
        print(f"layout {name} grid {grid} ({tokens} tokens): {layout_build_ms(grid):.1f} ms host")
    if not torch.cuda.is_available():
        print("gather at the start of the tower: needs a GPU, not timed")
        return
    for visual in FULL.visuals:
        result = gather_vs_copy(visual)
        share = 100 * result["copy_ms"] / result["index_select_ms"]
        print(
            f"gather {visual.name}: index_select {result['index_select_ms'] * 1e3:.1f} us, "
            f"copy of the same {result['bytes'] / 1e6:.1f} MB {result['copy_ms'] * 1e3:.1f} us "
            f"({share:.0f}% of the copy floor)"
        )


if __name__ == "__main__":
    main()
