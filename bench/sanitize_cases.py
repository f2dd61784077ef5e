"""One tiny call of every op on the "cuda" backend, to run under compute-sanitizer.

    compute-sanitizer --tool memcheck python -m bench.sanitize_cases
    python -m bench.sanitize_cases --list   # the ops with a CUDA kernel, one a line

Each op runs the smallest case of each of its series (window_attn: edge windows and whole frames;
mrope: the vision and the text form), built by the benchmark files at their tiny size, plus the
edge cases of ``EDGE_CASES`` that reach the paths tiny cases miss (several warps per row, odd and
misaligned rows, fp32 weights). Ops with no usable CUDA kernel are listed as skipped. Exit status:
0, or 1 when a call raised.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

import qwen_kernels
from qwen_kernels._backends import REGISTRY

from .harness import Case, Maker
from .shapes import TINY
from .suites import SUITES


def cuda_ops() -> list[str]:
    """Ops whose "cuda" kernel can run here (none without a GPU or a built extension)."""
    return sorted(op for op, table in REGISTRY.items() if "cuda" in table.usable("cuda"))


def _bf16(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, device="cuda").to(torch.bfloat16)


def _attention_backward(dtype: torch.dtype, head_dim: int, lengths: list[int]) -> object:
    """window_attn_backward on the "cuda" backend over segments of ``lengths``, from the training
    forward's output and log-sum-exp."""
    tokens = sum(lengths)
    q, k, v = (torch.randn(tokens, 2, head_dim, device="cuda").to(dtype) for _ in range(3))
    bounds = torch.tensor([0, *lengths], device="cuda").cumsum(0).to(torch.int32)
    out, lse = qwen_kernels.window_attn_forward(q, k, v, bounds, max(lengths), None, "cuda")
    grad = torch.randn_like(out)
    return qwen_kernels.window_attn_backward(
        grad, q, k, v, out, lse, bounds, max(lengths), head_dim**-0.5, "cuda"
    )


# name -> a call on the "cuda" backend; each name starts with its op.
EDGE_CASES: dict[str, Callable[[], object]] = {
    "rms_norm 8x1280 (2 warps a row)": lambda: qwen_kernels.rms_norm(
        _bf16(8, 1280), _bf16(1280), 1e-6, "cuda"
    ),
    "rms_norm 8x3420 fp32 weight (8 warps a row)": lambda: qwen_kernels.rms_norm(
        _bf16(8, 3420), torch.randn(3420, device="cuda"), 1e-6, "cuda"
    ),
    "rms_norm 5x5121 rows off 16 bytes": lambda: qwen_kernels.rms_norm(
        _bf16(5, 5122)[:, 1:], _bf16(5121), 1e-6, "cuda"
    ),
    "add_rms_norm 8x3420": lambda: qwen_kernels.add_rms_norm(
        _bf16(8, 3420), _bf16(8, 3420), _bf16(3420), 1e-6, "cuda"
    ),
    "swiglu 8x6840": lambda: qwen_kernels.swiglu(_bf16(8, 2 * 3420), "cuda"),
    "swiglu 5x2562 rows off 16 bytes": lambda: qwen_kernels.swiglu(
        _bf16(5, 2 * 1281 + 1)[:, 1:], "cuda"
    ),
    "patch_merge 16x1280 int32 unit_index": lambda: qwen_kernels.patch_merge(
        _bf16(16, 1280),
        _bf16(1280),
        1e-6,
        torch.tensor([3, 0, 2, 0, 1], dtype=torch.int32, device="cuda"),
        backend="cuda",
    ),
    "patch_merge 27x80 merge size 3 (units of 9 tokens)": lambda: qwen_kernels.patch_merge(
        _bf16(27, 80), _bf16(80), 1e-6, None, 3, "cuda"
    ),
    "patch_merge 8x5121 rows off 16 bytes, fp32 weight (8 warps a row)": lambda: (
        qwen_kernels.patch_merge(
            _bf16(8, 5122)[:, 1:], torch.randn(5121, device="cuda"), 1e-6, None, backend="cuda"
        )
    ),
    "window_attn 200+64+1 tokens, head_dim 128 fp16 (long path, partial tiles)": lambda: (
        qwen_kernels.window_attn(
            *(torch.randn(265, 2, 128, device="cuda").half() for _ in range(3)),
            torch.tensor([0, 200, 264, 265], dtype=torch.int32, device="cuda"),
            200,
            backend="cuda",
        )
    ),
    "window_attn 64+13 tokens fp32 (the fp32 kernel)": lambda: qwen_kernels.window_attn(
        *(torch.randn(77, 2, 80, device="cuda") for _ in range(3)),
        torch.tensor([0, 64, 77], dtype=torch.int32, device="cuda"),
        64,
        backend="cuda",
    ),
    "window_attn_backward 200+64+1 tokens, head_dim 128 fp16 (long path, partial tiles)": lambda: (
        _attention_backward(torch.float16, 128, [200, 64, 1])
    ),
    "window_attn_backward 64+13 tokens fp32 (the fp32 kernels)": lambda: _attention_backward(
        torch.float32, 80, [64, 13]
    ),
    "window_attn_backward 64+1+37 tokens bf16 (windows)": lambda: _attention_backward(
        torch.bfloat16, 80, [64, 1, 37]
    ),
    "window_attn views of a packed qkv, one misaligned (copied)": lambda: qwen_kernels.window_attn(
        *_bf16(40, 3, 2, 80).unbind(1)[:2],
        _bf16(40 * 2 * 80 + 1)[1:].view(40, 2, 80),
        torch.tensor([0, 33, 40], dtype=torch.int32, device="cuda"),
        33,
        backend="cuda",
    ),
}


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
    calls: list[tuple[str, Callable[[], object]]] = []
    for op in sorted(REGISTRY):
        if op not in cuda_ops():
            print(f"{op}: skipped (no usable cuda kernel)")
            continue
        for case in cases_for(op):
            calls.append((f"{op} {case.name}", lambda op=op, case=case: run(op, case)))
        calls += [(name, call) for name, call in EDGE_CASES.items() if name.split()[0] == op]
    failed = 0
    for name, call in calls:
        try:
            call()
            torch.cuda.synchronize()
        except Exception as exc:  # report every call, then fail
            failed += 1
            print(f"{name}: FAILED {type(exc).__name__}: {exc}")
        else:
            print(f"{name}: ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
