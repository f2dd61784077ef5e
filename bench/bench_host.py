"""Host cost of the qwen ops and of whole encoder forwards (the share of a forward spent in Python).

Per op call: the public function against a bare ``torch.library.custom_op`` taking the same
arguments, both running the same implementation: a stub that returns a prepared output, so no
compute hides the difference. That difference is what the qwen op adds: the lookup of its call
signature (argument checks and ``OpBackends.select`` run once per signature), value checks, the
``.contiguous()`` of the result and the Python wrapper. Measured on the "torch" and "auto"
backends, and with ``skip_value_checks()`` (as inside the encoder), on tiny tensors; each figure
is the best of several rounds that alternate the bare and the qwen call. On the CPU everything
runs with one intra-op thread.

Per forward: ``VisionEncoder`` (32 blocks, the released tower's windows and full-attention
blocks) and transformers' tower, stock and patched with ``qwen_kernels.hf.patch_qwen2_5_vl``,
for a 448x448 and a 1344x1344 image with tiny widths (hidden 16). On a GPU the forward is timed
both ways: CPU time to issue it (no sync) and GPU time (CUDA events). On the CPU only wall time
exists: the eager references run many small aten ops (host work too), and the full-frame
attention of the 1344x1344 image is real compute even at these widths.

    python bench/bench_host.py             # or: python -m bench.bench_host
    python bench/bench_host.py --tiny      # seconds: small grids, few repetitions (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

import qwen_kernels as qk
from qwen_kernels._backends import REGISTRY
from qwen_kernels.model import KernelConfig, VisionConfig, VisionEncoder
from qwen_kernels.ops._define import SPECS

# Bare custom ops: the qwen op's schema without `backend`, and nothing inside but the qwen op's
# "torch" implementation (the reference, or the stub `stubbed` sets). Looked up in the op
# registry, not in this module: the module may be imported twice (as bench/bench_host.py run as a
# script, and as bench.bench_host) while the custom ops are registered once.
_NS = "qwen_host_bench"


def _bare_op(op: str) -> Callable:
    """The bare custom op of ``op``, defined on first use."""
    if not hasattr(getattr(torch.ops, _NS), op):
        schema = SPECS[op].schema
        arguments = torch._C.parse_schema(f"{_NS}::{op}{schema}").arguments
        # The dispatcher leaves out trailing arguments equal to their defaults.
        defaults = [arg.default_value if arg.has_default_value() else None for arg in arguments]
        torch.library.custom_op(
            f"{_NS}::{op}",
            lambda *args: REGISTRY[op].impls["torch"](*args, *defaults[len(args) :]),
            mutates_args=tuple(arg.name for arg in arguments if arg.is_write),
            schema=schema,
        )
    return getattr(getattr(torch.ops, _NS), op)


def op_cases(device: str) -> dict[str, tuple[Callable, Callable]]:
    """op -> (bare custom op call, qwen op call taking a backend), tiny inputs."""
    gen = torch.Generator(device).manual_seed(0)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, device=device)

    x, res, w = randn(8, 16), randn(8, 16), randn(16)
    qkv = randn(8, 3, 2, 8)
    q, k, v = qkv.unbind(1)
    positions = torch.randint(0, 4, (2, 8), generator=gen, device=device, dtype=torch.int32)
    inv_freq, section = randn(4).abs(), [2, 2]
    cu = torch.tensor([0, 4, 8], dtype=torch.int32, device=device)
    args = {
        "rms_norm": (x, w, 1e-6),
        "add_rms_norm": (x, res, w, 1e-6),
        "swiglu": (randn(8, 32),),
        "mrope_pos_": (q, k, positions, inv_freq, section),
        "window_attn": (q, k, v, cu, 4, None),
        "window_attn_rope": (qkv, cu, 4, positions, inv_freq, section, None),
        "patch_merge": (x, w, 1e-6, torch.tensor([1, 0], device=device), 2),
    }
    return {
        op: (
            functools.partial(_bare_op(op), *op_args),
            lambda backend, op=op, op_args=op_args: getattr(qk, op)(*op_args, backend=backend),
        )
        for op, op_args in args.items()
    }


@contextlib.contextmanager
def stubbed(op: str, stub: Callable) -> Iterator[None]:
    """Every backend of ``op`` (and so the bare op) runs ``stub`` inside this block."""
    table = REGISTRY[op]
    saved = dict(table.impls)
    try:
        for backend in saved:
            table.register(backend, stub)
        yield
    finally:
        for backend, impl in saved.items():
            table.register(backend, impl)


def _returning(output: object) -> Callable:
    """A stub implementation: ignores its arguments and returns ``output``."""
    return lambda *args: output


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    """Microseconds per call over ``calls`` calls (host time: the tensors are tiny; on a GPU the
    queue is drained before and after)."""
    _sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync()
    return (time.perf_counter() - start) / calls * 1e6


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def bench_ops(device: str, calls: int, rounds: int) -> list[dict[str, float | str]]:
    """Per op: microseconds per call of the bare custom op and of the qwen op ("torch", "auto",
    "auto" with value checks skipped), all running one stub; each the best of ``rounds``."""
    rows = []
    with torch.no_grad():
        for op, (bare, qwen) in op_cases(device).items():
            # The stub returns what the op returns, so the qwen op's .contiguous() runs as usual.
            output = bare()
            runs = {
                "bare": bare,
                "torch": functools.partial(qwen, "torch"),
                "auto": functools.partial(qwen, "auto"),
            }
            best = dict.fromkeys([*runs, "auto skip"], float("inf"))
            with stubbed(op, _returning(output)):
                for fn in runs.values():
                    fn()  # first calls resolve backends and warm caches
                for _ in range(rounds):
                    for name, fn in runs.items():
                        best[name] = min(best[name], per_call_us(fn, calls))
                    with qk.skip_value_checks():
                        best["auto skip"] = min(best["auto skip"], per_call_us(runs["auto"], calls))
            rows.append({"op": op, **best})
    return rows


def tiny_tower(depth: int) -> VisionConfig:
    """The released tower's windows, merge and full-attention blocks with widths of 16."""
    full = tuple(i for i in (7, 15, 23, 31) if i < depth)
    return VisionConfig(
        depth=depth,
        hidden_size=16,
        num_heads=2,
        intermediate_size=16,
        out_hidden_size=16,
        fullatt_block_indexes=full,
    )


def forward_cases(config: VisionConfig, device: str) -> dict[str, Callable]:
    """name -> fn(pixels, grid_thw) running one forward."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
    )

    from qwen_kernels.hf import patch_qwen2_5_vl

    torch.manual_seed(0)
    hf_config = Qwen2_5_VLVisionConfig(**config.to_hf_dict())
    hf_config._attn_implementation = "sdpa"
    stock = Qwen2_5_VisionTransformerPretrainedModel(hf_config).to(device).eval()
    patched = Qwen2_5_VisionTransformerPretrainedModel(hf_config).to(device).eval()
    patched.load_state_dict(stock.state_dict())
    patch_qwen2_5_vl(patched, "auto")
    encoders = {
        backend: VisionEncoder.from_hf_state_dict(
            stock.state_dict(), config, KernelConfig.best_effort(backend), device=device
        )
        for backend in ("torch", "auto")
    }
    return {
        "VisionEncoder torch": lambda px, grid: encoders["torch"](px, grid),
        "VisionEncoder auto": lambda px, grid: encoders["auto"](px, grid),
        "transformers sdpa": lambda px, grid: stock(px, grid).pooler_output,
        "transformers patched auto": lambda px, grid: patched(px, grid).pooler_output,
    }


class CountQwenOps(TorchDispatchMode):
    """Counts the torch.ops.qwen calls that reach the dispatcher, per op and per (op, backend)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.backends: Counter[tuple[str, str]] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "qwen":
            self.counts[func._opname] += 1
            self.backends[func._opname, _backend_of(func, args, kwargs)] += 1
        return func(*args, **kwargs)


def _backend_of(func, args, kwargs) -> str:
    """The ``backend`` argument of a qwen op call (the dispatcher drops it when it is the
    default)."""
    names = [a.name for a in func._schema.arguments]
    index = names.index("backend")
    return args[index] if index < len(args) else kwargs.get("backend", "auto")


def count_qwen_calls(fn: Callable[[], object]) -> int:
    """torch.ops.qwen calls one run of ``fn`` makes."""
    with CountQwenOps() as counter:
        fn()
    return sum(counter.counts.values())


def time_forward(fn: Callable[[], object], repeats: int, device: str) -> tuple[float, float]:
    """(median host ms to issue one forward, median GPU ms of it; nan on the CPU)."""
    fn()
    host, gpu = [], []
    for _ in range(repeats):
        _sync()
        if device == "cuda":
            start_event = torch.cuda.Event(enable_timing=True)
            end_event = torch.cuda.Event(enable_timing=True)
            start_event.record()
        start = time.perf_counter()
        fn()
        host.append((time.perf_counter() - start) * 1e3)
        if device == "cuda":
            end_event.record()
            end_event.synchronize()
            gpu.append(start_event.elapsed_time(end_event))
    return statistics.median(host), statistics.median(gpu) if gpu else float("nan")


def bench_forwards(
    device: str, depth: int, images: dict[str, int], repeats: int
) -> list[dict[str, float | str | int]]:
    config = tiny_tower(depth)
    cases = forward_cases(config, device)
    rows = []
    for image, side in images.items():
        grid = [(1, side // 14, side // 14)]
        grid_thw = torch.tensor(grid)
        pixels = torch.randn(side * side // 196, config.patch_dim, device=device)
        with torch.no_grad():
            for name, forward in cases.items():
                run = functools.partial(forward, pixels, grid_thw)
                host_ms, gpu_ms = time_forward(run, repeats, device)
                calls = count_qwen_calls(run)
                rows.append(
                    {
                        "image": image,
                        "impl": name,
                        "host_ms": host_ms,
                        "gpu_ms": gpu_ms,
                        "qwen_calls": calls,
                    }
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small grids, few repetitions")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    if args.device == "cpu":
        # Host cost, not compute: one intra-op thread, or OpenMP workers spinning for a core on a
        # loaded machine slow the references' small parallel ops by an order of magnitude.
        torch.set_num_threads(1)
    try:
        report(args.device, args.tiny)
    finally:
        torch.set_num_threads(threads)
    return 0


def report(device: str, tiny: bool) -> None:
    """Measure and print both tables."""
    calls, rounds = (200, 3) if tiny else (2000, 15)
    depth = 4 if tiny else 32
    images = {"56x56": 56, "112x112": 112} if tiny else {"448x448": 448, "1344x1344": 1344}

    print(
        f"device {device}, torch {torch.__version__}; microseconds per call, tiny tensors, every "
        "call running the same stub; + columns: added over the bare custom op"
    )
    header = ["op", "bare", "torch", "auto", "auto skip", "+torch", "+auto", "+auto skip"]
    print(f"{header[0]:<18}" + "".join(f"{h:>11}" for h in header[1:]))
    for row in bench_ops(device, calls, rounds):
        added = [row[name] - row["bare"] for name in ("torch", "auto", "auto skip")]
        cells = [row[name] for name in header[1:5]] + added
        print(f"{row['op']:<18}" + "".join(f"{value:>11.2f}" for value in cells))

    print(
        f"\nforward of a {depth}-block tower with widths of 16; host ms is the time to issue it "
        "(on the CPU: its wall time, where the eager references' small ops count too and the "
        "full-frame attention of a large image is real compute)"
    )
    print(f"{'image':<11}{'implementation':<28}{'host ms':>10}{'GPU ms':>10}{'qwen calls':>12}")
    for row in bench_forwards(device, depth, images, 3 if tiny else 5):
        print(
            f"{row['image']:<11}{row['impl']:<28}{row['host_ms']:>10.2f}{row['gpu_ms']:>10.2f}"
            f"{row['qwen_calls']:>12}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
