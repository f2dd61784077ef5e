"""The ``qwen-kernels`` command: ``info`` (what this install can run), ``demo`` (encode a sample
image with the best kernels and with the reference) and ``bench`` (the benchmark suite)."""

from __future__ import annotations

import argparse
import importlib.util
import platform
import shutil
import subprocess
import sys

import torch

from . import __version__
from ._backends import BACKENDS, REGISTRY, cuda_extension_error, runtime_missing
from .bench_cli import add_bench_parser, add_inspect_parser, run_bench, run_inspect


def _triton_version() -> str:
    if importlib.util.find_spec("triton") is None:
        return "not installed"
    import triton

    return triton.__version__


def _nvcc_version() -> str:
    nvcc = shutil.which("nvcc") or shutil.which("/usr/local/cuda/bin/nvcc")
    if nvcc is None:
        return "not found"
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    release = [line for line in out.splitlines() if "release" in line]
    return release[-1].strip() if release else nvcc


def _gpus() -> list[str]:
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append(
            f"cuda:{index} {props.name} (sm_{props.major}{props.minor}, "
            f"{props.total_memory / 2**30:.0f} GiB)"
        )
    return gpus


def _cuda_extension_archs() -> str:
    error = cuda_extension_error()
    if error:
        return f"not available: {error}"
    return torch.ops.qwen_cuda.build_info()


def info_report() -> dict[str, object]:
    """Versions, GPUs, the CUDA extension's archs and the usable backends per op."""
    backends = {}
    for op, table in REGISTRY.items():
        backends[op] = {
            name: ("yes" if runtime_missing(name) is None else f"no: {runtime_missing(name)}")
            if name in table.impls
            else "no kernel yet"
            for name in BACKENDS
        }
    return {
        "qwen-kernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "CPU-only build",
        "triton": _triton_version(),
        "nvcc": _nvcc_version(),
        "GPUs": _gpus() or ["none visible"],
        "qwen_kernels._C archs": _cuda_extension_archs(),
        "backends": backends,
    }


def _print_info() -> int:
    report = info_report()
    backends = report.pop("backends")
    width = max(len(key) for key in report)
    for key, value in report.items():
        if isinstance(value, list):
            value = "; ".join(value)
        print(f"{key:<{width}}  {value}")
    print("\nbackends per op (yes = usable here):")
    op_width = max(len(op) for op in backends)
    for op, states in backends.items():
        usable = [name for name, state in states.items() if state == "yes"]
        print(f"  {op:<{op_width}}  {', '.join(usable)}")
        if REGISTRY[op].auto_note:
            print(f"  {'':<{op_width}}  auto: {REGISTRY[op].auto_note}")
    reasons = {
        f"{name}: {state[4:]}"
        for states in backends.values()
        for name, state in states.items()
        if state.startswith("no: ")
    }
    for reason in sorted(reasons):
        print(f"  (unavailable) {reason}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qwen-kernels`` console script."""
    parser = argparse.ArgumentParser(prog="qwen-kernels", description=__doc__)
    parser.add_argument("--version", action="version", version=f"qwen-kernels {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, GPUs, compiled archs and backends per op")
    # Listed here for --help; its arguments (and its own --help) belong to the demo's parser.
    commands.add_parser(
        "demo", help="encode a sample image with the best kernels and with the reference"
    )
    add_bench_parser(commands)
    add_inspect_parser(commands)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:
        from .model import demo

        return demo.main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "info":
        return _print_info()
    if args.command == "bench":
        return run_bench(args)
    if args.command == "inspect":
        return run_inspect(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
