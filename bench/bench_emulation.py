"""Cost of the CUDA emulation layer per block, on the CPU.

Emulated timings say nothing about the GPU; they measure the emulator itself (fibers, barriers,
warp collectives), which bounds how large the shapes of the ``cuda_emu`` tests can be. Run it as
``python -m bench.bench_emulation`` (or ``python bench/bench_emulation.py``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from qwen_kernels import _emu


def per_block_us(run: Callable[[], object], blocks: int, repeats: int) -> float:
    """Best wall time of ``run`` over ``repeats`` calls, per block, in microseconds."""
    run()
    best = min(_timed(run) for _ in range(repeats))
    return best / blocks * 1e6


def _timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    """Print the per-block cost of a few self-test kernels."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=200, help="blocks per launch")
    parser.add_argument("--repeats", type=int, default=5, help="launches timed (best is kept)")
    args = parser.parse_args(argv)

    ops = _emu.load()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.blocks * 128, generator=gen)
    rows = []
    for rounds in (0, 10, 100):
        cost = per_block_us(lambda r=rounds: ops.selftest_barriers(x, r), args.blocks, args.repeats)
        rows.append((f"128 threads, {rounds} __syncthreads()", cost))

    # One 32x32 output tile per block over K = 256: 8 cp.async stages; per warp 48 ldmatrix and
    # 32 mma.
    side = 32 * int(args.blocks**0.5)
    a = torch.randn(side, 256, generator=gen).bfloat16()
    b = torch.randn(side, 256, generator=gen).bfloat16()
    blocks = (side // 32) ** 2
    cost = per_block_us(lambda: ops.selftest_gemm(a, b, False), blocks, args.repeats)
    rows.append(("128 threads, bf16 GEMM tile 32x32x256", cost))

    width = max(len(name) for name, _ in rows)
    print(f"{'emulated block':<{width}}  cost per block")
    for name, cost in rows:
        print(f"{name:<{width}}  {cost:10.1f} us")


if __name__ == "__main__":
    main()
