"""One tiny call of every op on the "cuda" backend, to run under compute-sanitizer.

    compute-sanitizer --tool memcheck python -m qwen_kernels.bench.sanitize_cases
    python -m qwen_kernels.bench.sanitize_cases --list   # the ops with a CUDA kernel, one a line

Each op runs the smallest case of each of its series (window_attn: edge windows and whole frames;
mrope: the vision and the text form), built by the benchmark files at their tiny size. Ops with no
CUDA kernel yet are listed as skipped. Exit status: 0, or 1 when a call raised.
"""

from __future__ import annotations

import argparse
import sys

import torch

import qwen_kernels
from qwen_kernels._backends import REGISTRY

from .harness import Case, Maker
from .shapes import TINY
from .suites import SUITES


def cuda_ops() -> list[str]:
    """Ops with a registered "cuda" kernel."""
    return sorted(op for op, table in REGISTRY.items() if "cuda" in table.impls)


def cases_for(op: str) -> list[Case]:
    """The first tiny case of each series of ``op`` (an in-place form uses its op's cases)."""
    base = op.rstrip("_")
    first: dict[str, Case] = {}
    for suite in SUITES:
        for case in suite.cases(TINY):
            if case.op == base:
                first.setdefault(case.series, case)
    return list(first.values())


def run(op: str, case: Case) -> None:
    """Call ``op`` once on the "cuda" backend and wait for the kernel."""
    inputs = case.build(Maker("cuda", seed=0))
    getattr(qwen_kernels, op)(*(inputs[name] for name in case.args), backend="cuda")
    torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    """Run every CUDA kernel once; print one line per op and case."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the ops with a CUDA kernel")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(cuda_ops()))
        return 0
    if not torch.cuda.is_available():
        print("no CUDA GPU is visible to torch", file=sys.stderr)
        return 1
    failed = 0
    for op in sorted(REGISTRY):
        if op not in cuda_ops():
            print(f"{op}: skipped (no cuda kernel yet)")
            continue
        for case in cases_for(op):
            try:
                run(op, case)
            except Exception as exc:  # report every op, then fail
                failed += 1
                print(f"{op} {case.name}: FAILED {type(exc).__name__}: {exc}")
            else:
                print(f"{op} {case.name}: ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
