"""Host cost of the qwen ops and of whole encoder forwards (the share of a forward spent in Python).

Per op call: the public function on the "torch" and "auto" backends against a bare
``torch.library.custom_op`` that runs the same eager reference with no checks and no backend
selection (and the reference called directly), on tiny tensors so that compute is negligible.
``select auto`` is the part of a call spent in ``OpBackends.select`` (every call selects). On the
CPU everything runs with one intra-op thread.
The difference to the bare op is what the qwen op adds: argument checks, ``OpBackends.select``,
the ``.contiguous()`` of the result and the Python wrapper.

Per forward: ``VisionEncoder`` (32 blocks, the released tower's windows and full-attention
blocks) and transformers' tower, stock and patched with ``qwen_kernels.hf.patch_qwen2_5_vl``,
for a 448x448 and a 1344x1344 image with tiny widths (hidden 16). On a GPU the forward is timed
both ways: CPU time to issue it (no sync) and GPU time (CUDA events). On the CPU only wall time
exists: the eager references run many small aten ops (host work too), and the full-frame
attention of the 1344x1344 image is real compute even at these widths.

    python bench/bench_host.py             # or: python -m qwen_kernels.bench.bench_host
    python bench/bench_host.py --tiny      # seconds: small grids, few repetitions (CI)
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections import Counter
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

import qwen_kernels as qk
from qwen_kernels._backends import REGISTRY
from qwen_kernels.model import KernelConfig, VisionConfig, VisionEncoder
from qwen_kernels.ops.mrope import mrope_pos_reference
from qwen_kernels.ops.patch_merge import patch_merge_reference
from qwen_kernels.ops.rms_norm import add_rms_norm_reference, rms_norm_reference
from qwen_kernels.ops.swiglu import swiglu_reference
from qwen_kernels.ops.window_attn import window_attn_reference

# Bare custom ops: the reference inside torch.library.custom_op, nothing else.
_NS = "qwen_host_bench"


@torch.library.custom_op(f"{_NS}::rms_norm", mutates_args=())
def _bare_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return rms_norm_reference(x, weight, eps)


@torch.library.custom_op(f"{_NS}::add_rms_norm", mutates_args=())
def _bare_add_rms_norm(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    return add_rms_norm_reference(x, residual, weight, eps)


@torch.library.custom_op(f"{_NS}::swiglu", mutates_args=())
def _bare_swiglu(gate_up: Tensor) -> Tensor:
    return swiglu_reference(gate_up)


@torch.library.custom_op(f"{_NS}::mrope_pos_", mutates_args=("q", "k"))
def _bare_mrope_pos_(
    q: Tensor, k: Tensor, positions: Tensor, inv_freq: Tensor, mrope_section: list[int]
) -> None:
    q_out, k_out = mrope_pos_reference(q, k, positions, inv_freq, mrope_section)
    q.copy_(q_out)
    k.copy_(k_out)


@torch.library.custom_op(f"{_NS}::window_attn", mutates_args=())
def _bare_window_attn(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int
) -> Tensor:
    return window_attn_reference(q, k, v, cu_seqlens, max_seqlen, None)


@torch.library.custom_op(f"{_NS}::patch_merge", mutates_args=())
def _bare_patch_merge(x: Tensor, weight: Tensor, eps: float, unit_index: Tensor) -> Tensor:
    return patch_merge_reference(x, weight, eps, unit_index)


def op_cases(device: str) -> dict[str, tuple[Callable, Callable, Callable]]:
    """op -> (reference call, bare custom op call, qwen op call taking a backend), tiny inputs."""
    gen = torch.Generator(device).manual_seed(0)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, device=device)

    x, res, w = randn(8, 16), randn(8, 16), randn(16)
    gate_up = randn(8, 32)
    q, k, v = randn(8, 2, 8), randn(8, 2, 8), randn(8, 2, 8)
    positions = torch.randint(0, 4, (2, 8), generator=gen, device=device, dtype=torch.int32)
    inv_freq, section = randn(4).abs(), [2, 2]
    cu = torch.tensor([0, 4, 8], dtype=torch.int32, device=device)
    units = torch.tensor([1, 0], device=device)
    bare = getattr(torch.ops, _NS)
    return {
        "rms_norm": (
            lambda: rms_norm_reference(x, w, 1e-6),
            lambda: bare.rms_norm(x, w, 1e-6),
            lambda b: qk.rms_norm(x, w, 1e-6, backend=b),
        ),
        "add_rms_norm": (
            lambda: add_rms_norm_reference(x, res, w, 1e-6),
            lambda: bare.add_rms_norm(x, res, w, 1e-6),
            lambda b: qk.add_rms_norm(x, res, w, 1e-6, backend=b),
        ),
        "swiglu": (
            lambda: swiglu_reference(gate_up),
            lambda: bare.swiglu(gate_up),
            lambda b: qk.swiglu(gate_up, backend=b),
        ),
        "mrope_pos_": (
            lambda: mrope_pos_reference(q, k, positions, inv_freq, section),
            lambda: bare.mrope_pos_(q, k, positions, inv_freq, section),
            lambda b: qk.mrope_pos_(q, k, positions, inv_freq, section, backend=b),
        ),
        "window_attn": (
            lambda: window_attn_reference(q, k, v, cu, 4, None),
            lambda: bare.window_attn(q, k, v, cu, 4),
            lambda b: qk.window_attn(q, k, v, cu, 4, backend=b),
        ),
        "patch_merge": (
            lambda: patch_merge_reference(x, w, 1e-6, units),
            lambda: bare.patch_merge(x, w, 1e-6, units),
            lambda b: qk.patch_merge(x, w, 1e-6, units, backend=b),
        ),
    }


def per_call_us(fn: Callable[[], object], seconds: float, repeats: int) -> float:
    """Best of ``repeats`` averages over batches of calls lasting about ``seconds``, in
    microseconds (host time: the tensors are tiny; on a GPU the queue is drained after each
    batch)."""
    fn()
    start = time.perf_counter()
    fn()
    calls = max(3, int(seconds / max(time.perf_counter() - start, 1e-7)))
    best = float("inf")
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def bench_ops(device: str, seconds: float, repeats: int) -> list[dict[str, float | str]]:
    """Per op: microseconds per call of the reference, the bare custom op and the qwen op."""
    rows = []
    # select looks at the device and dtype of the op's first tensor only (all cases are fp32).
    like = torch.ones(1, device=device)
    with torch.no_grad():
        for op, (reference, bare, qwen) in op_cases(device).items():
            row: dict[str, float | str] = {"op": op}
            row["reference"] = per_call_us(reference, seconds, repeats)
            row["bare"] = per_call_us(bare, seconds, repeats)
            for backend in ("torch", "auto"):
                row[backend] = per_call_us(functools.partial(qwen, backend), seconds, repeats)
            with qk.skip_value_checks():
                row["torch+skip"] = per_call_us(functools.partial(qwen, "torch"), seconds, repeats)
            # The share of OpBackends.select, which every call runs inside the op.
            row["select auto"] = per_call_us(
                functools.partial(REGISTRY[op].select, "auto", like), seconds, repeats
            )
            rows.append(row)
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
    seconds, repeats = (0.002, 2) if tiny else (0.02, 15)
    depth = 4 if tiny else 32
    images = {"56x56": 56, "112x112": 112} if tiny else {"448x448": 448, "1344x1344": 1344}

    print(f"device {device}, torch {torch.__version__}; microseconds per call, tiny tensors")
    header = ["op", "reference", "bare", "torch", "auto", "torch+skip", "select auto"]
    print(f"{header[0]:<14}" + "".join(f"{h:>13}" for h in header[1:]) + f"{'torch - bare':>14}")
    for row in bench_ops(device, seconds, repeats):
        cells = "".join(f"{row[h]:>13.2f}" for h in header[1:])
        print(f"{row['op']:<14}{cells}{row['torch'] - row['bare']:>14.2f}")

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
